"""The one module that imports pytorch-quantization (2.1.3): thin, checkpoint-stable subclasses of its classes.

Why subclasses instead of the library's classes as they are (the library keeps state that checkpoints cannot rely on):

* pytorch-quantization registers the ``_amax`` buffer lazily (after calibration), so a model's state-dict keys
  depend on whether it was calibrated, and loading an ``_amax`` into a quantizer without one calls ``.cuda()``.
  Our :class:`TensorQuantizer` registers ``_amax`` at construction, filled with NaN until calibrated: the keys
  depend only on the architecture and the config, and "never calibrated" travels with the state dict.
* An uncalibrated quantizer fails with ``'TensorQuantizer' object has no attribute '_amax'``. Ours
  raises :class:`NotCalibratedError` naming the layer and the fix.
* The fake quantization runs through ``torch.fake_quantize_per_{tensor,channel}_affine`` (one fused CPU/GPU kernel
  with a clipped straight-through gradient) instead of the library's Python composition: same numbers
  (round-half-even, range ``[-2^(b-1), 2^(b-1)-1]``, scale ``amax / (2^(b-1)-1)``), fewer passes over memory.
* ``learn_amax`` is LSQ-style: ``amax`` is a parameter and the gradient flows to it through the scale (STE on the
  rounding only), per tensor or per channel (the library's ``Clip`` module supports per-tensor only).
* The bias of a quantized conv/linear is rounded to the int32 accumulator grid ``s_x · s_w`` (STE), because that is
  what the INT8 runtime adds: ONNX Runtime's ``QLinearConv``/QDQ kernels take an int32 bias at that scale. Without
  it the fake-quant model and ONNX Runtime disagree on ~0.5 % of top-1 decisions (measured on digits: 2 of 359,
  2.2 output steps of logit error); with it 100 %, within 0.02–1.2 output steps (what is left: a float conv
  output within rounding of a tie, rounded to the neighbouring integer, on two CPUs). See :func:`int32_bias`.
* ``auto_unsigned`` input quantizers (``QuantConfig.unsigned_activations``) carry a ``_unsigned_flag`` buffer that
  calibration sets when the quantizer's input was never negative (a ReLU output): the unsigned range
  ``[0, 2^b - 1]`` — UINT8 in ONNX Runtime, where the ReLU folds into the quantizer. The flag travels with the state
  dict, so a resumed checkpoint or a deploy artifact quantizes exactly as the trained model did.
* Under AMP a quantizer may receive a float16/bfloat16 tensor; it computes ``x / s``, the rounding and the clip in
  float32 and returns the input's dtype, so the integers are those the INT8 runtime would pick for those values.
* ``dynamic`` quantizers (used for weights) take ``amax = max|w|`` (per channel or tensor) of the current tensor at
  every forward and keep the last value in ``_amax``; export (``onnx_export_mode``) reads the stored value.

The class-level switch ``use_fb_fake_quant`` is only ever flipped through :func:`onnx_export_mode`, which always
restores it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pq_import import QuantDescriptor, fake_tensor_quant
from .pq_import import TensorQuantizer as _PQTensorQuantizer
from .pq_import import calib as _pq_calib
from .pq_import import compute_amax_entropy as pq_compute_amax_entropy
from .pq_import import compute_amax_mse as pq_compute_amax_mse
from .pq_import import compute_amax_percentile as pq_compute_amax_percentile
from .pq_import import quant_nn as _pq_nn

from . import qmath as qm
from ..fuse import fuse_bn_module

#: pytorch-quantization's own classes, unchanged — for comparisons against the stock library (benchmarks)
PQTensorQuantizer = _PQTensorQuantizer
PQQuantConv2d = _pq_nn.QuantConv2d
PQQuantLinear = _pq_nn.QuantLinear

MaxCalibrator = _pq_calib.MaxCalibrator
HistogramCalibrator = _pq_calib.HistogramCalibrator

#: calibrator name → pytorch-quantization collector kind
CALIBRATORS: dict[str, str] = {"max": "max", "percentile": "histogram", "entropy": "histogram", "mse": "histogram"}

_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


class NotCalibratedError(RuntimeError):
    """A quantizer was asked to quantize (or be exported) before it had an ``amax``."""


class TensorQuantizer(_PQTensorQuantizer):
    """pytorch-quantization's ``TensorQuantizer`` with a fixed-shape ``_amax`` (NaN = not calibrated).

    Args:
        quant_desc: the library's descriptor (bits, axis, calibrator method, unsigned, narrow range).
        amax_shape: shape of ``_amax``: ``()`` per tensor, ``(C, 1, 1, 1)`` for a conv weight per channel.
        dynamic: take ``amax`` from the current input at every forward (weights); stored in ``_amax``.
        learn_amax: ``_amax`` is an ``nn.Parameter`` trained LSQ-style (gradient through the scale).
        auto_unsigned: register the ``_unsigned_flag`` buffer (signed until :meth:`set_unsigned` or a state dict
            says otherwise); calibration decides it from the data.
    """

    def __init__(self, quant_desc: QuantDescriptor = QuantDescriptor(), disabled: bool = False,
                 if_quant: bool = True, if_clip: bool = False, if_calib: bool = False, *,
                 amax_shape: Sequence[int] = (), dynamic: bool = False, learn_amax: bool = False,
                 auto_unsigned: bool = False):
        if quant_desc.learn_amax:
            raise ValueError("pass learn_amax=True to qat_rep's TensorQuantizer, not in the QuantDescriptor "
                             "(the library's Clip-based amax learning is per-tensor only)")
        super().__init__(quant_desc, disabled=disabled, if_quant=if_quant, if_clip=if_clip, if_calib=if_calib)
        amax_shape = tuple(int(s) for s in amax_shape)
        if self._axis is None and math.prod(amax_shape) != 1:
            raise ValueError(f"a per-tensor quantizer needs amax_shape=() (got {amax_shape})")
        if self._axis is not None and len(amax_shape) == 0:
            raise ValueError(f"a per-channel quantizer (axis={self._axis}) needs amax_shape, e.g. (C, 1, 1, 1)")
        init = torch.full(amax_shape, float("nan"))
        if "_amax" in self._buffers:
            del self._buffers["_amax"]
        if learn_amax:
            self._amax = nn.Parameter(init)
        else:
            self.register_buffer("_amax", init)
        self._lsq = bool(learn_amax)
        self._dynamic = bool(dynamic)
        # Python mirror of "amax is finite", set where amax is written (set_amax, a state dict) and otherwise
        # checked once: the training forward never synchronises with the device to ask (torch.compile-friendly)
        self._amax_known_finite = False
        if auto_unsigned:
            if self._axis is not None or quant_desc.unsigned:
                raise ValueError("auto_unsigned is for per-tensor activation quantizers built signed")
            self.register_buffer("_unsigned_flag", torch.zeros((), dtype=torch.bool))
        self.qat_rep_name = ""  # set by qat_rep.quant.prepare: the layer name used in error messages
        self._in_place = False  # see in_place()

    # ------------------------------------------------------------------------------------------ state
    @property
    def learn_amax(self) -> bool:
        return self._lsq

    @property
    def dynamic(self) -> bool:
        return self._dynamic

    @property
    def is_calibrated(self) -> bool:
        """True when ``_amax`` holds finite values (set by calibration, a dynamic forward or a state dict)."""
        return bool(torch.isfinite(self._amax).all())

    @property
    def auto_unsigned(self) -> bool:
        """True when calibration may switch this quantizer to the unsigned range (it has ``_unsigned_flag``)."""
        return "_unsigned_flag" in self._buffers

    @torch.no_grad()
    def set_unsigned(self, value: bool) -> None:
        """Use the unsigned range ``[0, 2^b - 1]`` (``True``) or the signed one; only for ``auto_unsigned``."""
        if not self.auto_unsigned:
            raise ValueError(f"{self.qat_rep_name or 'this quantizer'} was not built with auto_unsigned=True "
                             "(QuantConfig.unsigned_activations)")
        self._unsigned_flag.fill_(bool(value))
        self._unsigned = bool(value)

    @torch.no_grad()
    def set_amax(self, value: Tensor | float) -> None:
        """Copy ``value`` (broadcast to the fixed ``_amax`` shape) into ``_amax``."""
        value = torch.as_tensor(value, dtype=self._amax.dtype, device=self._amax.device)
        if value.numel() != self._amax.numel():
            raise ValueError(f"amax for {self.qat_rep_name or 'quantizer'} must have {self._amax.numel()} "
                             f"element(s) (shape {tuple(self._amax.shape)}), got shape {tuple(value.shape)}")
        self._amax.copy_(value.reshape(self._amax.shape))
        # a structure built on the meta device (load_quantized) holds no values yet: its state dict sets the flag
        self._amax_known_finite = False if self._amax.is_meta else self.is_calibrated

    def reduce_amax(self, x: Tensor) -> Tensor:
        """``max|x|`` over every dimension except ``axis``, in ``_amax``'s shape (no gradient)."""
        if self._axis is None:
            return qm.reduce_amax(x, None, self._amax.shape)
        axes = self._axis if isinstance(self._axis, (list, tuple)) else (self._axis,)
        return qm.reduce_amax(x, tuple(axes), self._amax.shape)

    def _get_amax(self, inputs: Tensor) -> Tensor:
        if self._dynamic and not self._lsq and not _PQTensorQuantizer.use_fb_fake_quant:
            with torch.no_grad():
                self._amax.copy_(self.reduce_amax(inputs))
            return self._amax
        if not self._amax_known_finite:
            self._amax_known_finite = self.is_calibrated  # one host sync until amax is known, then never again
        if not self._amax_known_finite:
            name = self.qat_rep_name or "a TensorQuantizer"
            raise NotCalibratedError(
                f"quantizer {name} has no amax: it was never calibrated. Run "
                "qat_rep.quant.calibrate(model, batches) first (or load a calibrated state dict)")
        return self._amax

    def _quant_forward(self, inputs: Tensor) -> Tensor:
        if inputs.dtype in _REDUCED_FLOATS:
            # Under AMP (bf16/fp16 autocast) activations arrive in 16 bits, where x / s carries 3-4 significant
            # digits: measured 14 % of bf16 rounding decisions off the INT8 grid (outputs up to 1.1 steps away).
            # Decide the integers in float32, hand the result back in the input's dtype.
            return self._quant_forward(inputs.float()).to(inputs.dtype)
        amax = self._get_amax(inputs)
        if _PQTensorQuantizer.use_fb_fake_quant:
            return self._fb_fake_quant(inputs, amax.detach())
        if not self._fake_quant:
            return super()._quant_forward(inputs)
        return self._fake_quant_with(inputs, amax, *qm.bounds(self._num_bits, self._unsigned, self._narrow_range))

    @contextlib.contextmanager
    def in_place(self) -> Iterator[None]:
        """Within: a dynamic per-channel quantizer (a weight's, ``amax = max|w|``) fake-quantizes its input in that
        input's own buffer instead of a new one — for a kernel assembled in this forward that nothing reads after
        quantization (a rep block's equivalent kernel): one kernel-sized buffer less at the step's peak, the same
        values (the same operations) and the same identity gradient. The caller vouches that the input is such a
        temporary; a parameter, a view or a tensor that needs its own gradient is still copied."""
        self._in_place = True
        try:
            yield
        finally:
            self._in_place = False

    def _fake_quant_with(self, inputs: Tensor, amax: Tensor, qmin: int, qmax: int) -> Tensor:
        """The fake quantization of a float32 ``inputs`` with the given ``amax`` and integer bounds: the one
        dispatch of the training forward and of a lean conv's backward that recomputes its kernel."""
        if self._lsq:
            return qm.lsq_fake_quant(inputs, amax, qmin, qmax)
        scale = qm.scale_from_amax(amax.detach(), qmax)
        if amax.numel() == 1:
            return qm.ClippedSTE.apply(inputs, scale.reshape(()).to(inputs.dtype), qmin, qmax)
        if self._dynamic:
            # amax = max|w| per channel: nothing is clipped, so the STE is the identity
            in_place = (self._in_place and not isinstance(inputs, nn.Parameter) and inputs._base is None
                        and not (inputs.is_leaf and inputs.requires_grad) and not torch.compiler.is_compiling())
            return qm.RoundSTE.apply(inputs, scale, qmin, qmax, in_place)
        axis = self._axis if not isinstance(self._axis, (list, tuple)) else self._axis[0]
        zeros = torch.zeros(scale.numel(), dtype=torch.int32, device=inputs.device)
        return torch.fake_quantize_per_channel_affine(inputs, scale.flatten(), zeros, axis, qmin, qmax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        # Skip the library's override: it moves a loaded amax to CUDA and logs a warning per quantizer.
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        self._amax_known_finite = self.is_calibrated
        if self.auto_unsigned:
            self._unsigned = bool(self._unsigned_flag)

    def _short_amax(self, fmt: str = ".4f") -> str:
        if not self.is_calibrated:
            return "dynamic" if self._dynamic else "uncalibrated"
        return super()._short_amax(fmt)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (" dynamic" if self._dynamic else "") + (" lsq" if self._lsq else "")


def make_quantizer(num_bits: int, axis: int | None = None, calibrator: str = "max", learn_amax: bool = False, *,
                   amax_shape: Sequence[int] | None = None, dynamic: bool = False, unsigned: bool = False,
                   auto_unsigned: bool = False, name: str = "") -> TensorQuantizer:
    """Build a symmetric (TensorRT-style) fake quantizer.

    ``axis=None`` is per tensor; ``axis=0`` with ``amax_shape=(C, 1, 1, 1)`` is per output channel of a conv weight.
    ``calibrator`` is ``max`` or a histogram method (``percentile``/``entropy``/``mse``; histograms are per tensor).
    ``auto_unsigned`` lets calibration pick the unsigned range for a never-negative input (see the module docstring).
    """
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits must be an integer in 2..8, got {num_bits!r}")
    if calibrator not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {calibrator!r}; valid: {', '.join(CALIBRATORS)}")
    method = CALIBRATORS[calibrator]
    if axis is not None and method != "max":
        raise ValueError(f"calibrator {calibrator!r} builds a per-tensor histogram; per-channel (axis={axis}) "
                         "quantizers use calibrator='max'")
    if amax_shape is None:
        if axis is not None:
            raise ValueError("a per-channel quantizer needs amax_shape, e.g. (out_channels, 1, 1, 1)")
        amax_shape = ()
    desc = QuantDescriptor(num_bits=num_bits, axis=axis, calib_method=method, unsigned=unsigned)
    q = TensorQuantizer(desc, amax_shape=amax_shape, dynamic=dynamic, learn_amax=learn_amax,
                        auto_unsigned=auto_unsigned)
    q.qat_rep_name = name
    return q


def _active(q: nn.Module) -> bool:
    return isinstance(q, _PQTensorQuantizer) and not q._disabled and q._if_quant


def int32_bias(bias: Tensor | None, input_quantizer: nn.Module, weight_quantizer: nn.Module) -> Tensor | None:
    """``bias`` rounded to the int32 grid ``s_x · s_w`` (per output channel) with a straight-through gradient.

    Call after both quantizers ran on this forward (a dynamic weight quantizer stores the ``amax`` it used). Returns
    ``bias`` unchanged when there is none, when either quantizer is off (calibration, float layers) and during ONNX
    export — the runtime rounds the float bias of a QDQ conv itself, to the same integers.
    """
    if bias is None or _PQTensorQuantizer.use_fb_fake_quant:
        return bias
    if not (_active(input_quantizer) and _active(weight_quantizer)):
        return bias
    qx = qm.bounds(input_quantizer._num_bits, input_quantizer._unsigned, input_quantizer._narrow_range)[1]
    qw = qm.bounds(weight_quantizer._num_bits, weight_quantizer._unsigned, weight_quantizer._narrow_range)[1]
    step = (input_quantizer._amax.detach().reshape(()) / qx) * (weight_quantizer._amax.detach().flatten() / qw)
    return qm.round_to_grid_ste(bias, step)


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _lean_ok(q: nn.Module, x: Tensor, lsq: bool = False) -> bool:
    """Can ``q`` run inside :class:`~.qmath.LeanQuantConv` (``lsq=False``: a fixed-amax quantizer) or
    :class:`~.qmath.LeanLSQConv` (``lsq=True``: a learned-amax one)? A per-tensor fake quantizer (not calibrating,
    not exporting) on a float32 input in a step with gradients, outside autocast (whose reduced-precision matmul
    would meet the float32 integers in backward, where autocast no longer casts) and outside ``torch.compile``: the
    compiler fuses the composition's elementwise work and plans its memory itself, while the lean functions' integer
    and bit-packing passes run there as separate kernels (measured: the compiled step 1.3–1.7× the eager one with
    them, faster than eager without)."""
    return (isinstance(q, TensorQuantizer) and not q._disabled and q._if_quant and not q._if_calib
            and q._fake_quant and q._lsq == lsq and q._axis is None and not q._if_clip
            and not _PQTensorQuantizer.use_fb_fake_quant and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())


def _fake_quantized(q: nn.Module, wq: Tensor) -> bool:
    """Did the weight quantizer ``q`` return ``wq`` through :meth:`TensorQuantizer._fake_quant_with` (active, not
    calibrating, a float32 kernel)?"""
    return (isinstance(q, TensorQuantizer) and _active(q) and q._fake_quant and not q._if_calib and not q._if_clip
            and wq.dtype == torch.float32)


def _weight_scale(q: nn.Module, wq: Tensor) -> Tensor | None:
    """The scale ``s_w`` with ``wq = q_w · s_w`` (``q_w`` int8) that the weight quantizer ``q`` just applied, shaped to
    broadcast against the weight; ``None`` when ``wq`` is not such a product (quantizer off, not a fake quantizer, or
    more than 8 signed bits), and :class:`~.qmath.LeanQuantConv` then keeps ``wq`` as it is."""
    if not _fake_quantized(q, wq):
        return None
    qmin, qmax = qm.bounds(q._num_bits, q._unsigned, q._narrow_range)
    if qmin < -128 or qmax > 127:
        return None
    scale = qm.scale_from_amax(q._amax.detach(), qmax)
    return scale.reshape(()) if scale.numel() == 1 else scale


def _kernel_source(q: nn.Module, weight: Tensor, wq: Tensor,
                   recipe: Callable[[], qm.KernelSource] | None) -> qm.KernelSource | None:
    """``wq = q(weight)`` as a function of tensors the step keeps anyway: the float kernel's own source (``recipe()``)
    followed by ``q``'s fake quantization with the ``amax`` and bounds it just used; a parameter ``weight`` is its own
    source. ``None`` when ``q`` is not a plain fake quantizer or there is no source (a computed kernel without a
    recipe): the lean functions then keep the kernel as int8."""
    if not _fake_quantized(q, wq):
        return None
    if recipe is not None:
        source = recipe()
    elif isinstance(weight, nn.Parameter):
        source = qm.KernelSource(_itself, (weight,))
    else:
        return None
    build, n = source.fn, len(source.tensors)
    bounds = qm.bounds(q._num_bits, q._unsigned, q._narrow_range)

    def fake_quantized_kernel(*tensors: Tensor) -> Tensor:
        return q._fake_quant_with(build(*tensors[:n]), tensors[n], *bounds)

    # the amax of this forward (a dynamic quantizer overwrites its buffer at the next one): per channel, tiny
    return qm.KernelSource(fake_quantized_kernel, (*source.tensors, q._amax.detach().clone()))


def _itself(weight: Tensor) -> Tensor:
    return weight


def _fixed_input_scale(q: TensorQuantizer, x: Tensor) -> tuple[Tensor, int, int]:
    """``(scale, qmin, qmax)`` of the per-tensor, fixed-amax input quantizer ``q`` for ``x``: the scale as a 0-d
    tensor in ``x``'s dtype, without gradient (what :class:`~.qmath.LeanQuantConv` takes)."""
    qmin, qmax = qm.bounds(q._num_bits, q._unsigned, q._narrow_range)
    return qm.scale_from_amax(q._get_amax(x).detach(), qmax).reshape(()).to(x.dtype), qmin, qmax


def quant_matmul(x: Tensor, weight: Tensor, input_quantizer: nn.Module, weight_quantizer: nn.Module,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1,
                 kernel_source: Callable[[], qm.KernelSource] | None = None) -> Tensor:
    """``conv2d(Q_x(x), Q_w(W))`` (4-D weight) or ``linear(Q_x(x), Q_w(W))`` (2-D), no bias: the training step.

    When the input quantizer is a per-tensor fake quantizer, a lean function runs: :class:`~.qmath.LeanQuantConv`
    (fixed amax: the input saved as int8 + scale + mask, ``Q(x)`` rebuilt in backward) or
    :class:`~.qmath.LeanLSQConv` (learned amax: only the float input kept); otherwise the composition of the
    quantizers' own straight-through functions and the conv. Same forward values and gradients either way.

    The fake-quantized kernel is recomputed in backward when ``weight`` is a parameter or ``kernel_source()`` (called
    only when a lean function runs) says how to rebuild the float ``weight`` from tensors that stay alive
    (:class:`~.qmath.KernelSource`, e.g. a rep block's branch parameters); otherwise it is kept as int8 + the weight
    scale.
    """
    wq = weight_quantizer(weight)
    if _lean_ok(input_quantizer, x, lsq=True) and (x.requires_grad or wq.requires_grad
                                                   or input_quantizer._amax.requires_grad):
        amax = input_quantizer._get_amax(x)
        qmin, qmax = qm.bounds(input_quantizer._num_bits, input_quantizer._unsigned, input_quantizer._narrow_range)
        return qm.LeanLSQConv.apply(x, qm.scale_from_amax(amax, qmax), wq, _weight_scale(weight_quantizer, wq), qmin,
                                    qmax, _pair(stride), _pair(padding), _pair(dilation), int(groups),
                                    _kernel_source(weight_quantizer, weight, wq, kernel_source))
    if _lean_ok(input_quantizer, x) and (x.requires_grad or wq.requires_grad):
        scale, qmin, qmax = _fixed_input_scale(input_quantizer, x)
        return qm.LeanQuantConv.apply(x, wq, scale, _weight_scale(weight_quantizer, wq), qmin, qmax, _pair(stride),
                                      _pair(padding), _pair(dilation), int(groups),
                                      _kernel_source(weight_quantizer, weight, wq, kernel_source))
    return qm.conv_or_linear(input_quantizer(x), wq, stride, padding, dilation, groups)


def quant_conv_bn(x: Tensor, weight: Tensor, input_quantizer: nn.Module, weight_quantizer: nn.Module,
                  bn: nn.Module, t: Tensor | None, bias: Tensor, stride: int | Sequence[int] = 1,
                  padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                  kernel_source: Callable[[], qm.KernelSource] | None = None, recompute: bool = False) -> Tensor:
    """``bn(conv2d(Q_x(x), Q_w(W)) / t + bias)``: the training step of a rep block with a post-BN (``t=None`` leaves
    the division out).

    ``recompute=True`` (a block that ``QuantConfig.recompute_post_bn`` selects), with a per-tensor fake input
    quantizer (fixed amax) and a plain ``nn.BatchNorm2d`` in training without hooks: :class:`~.qmath.LeanQuantConvBN`
    runs, which keeps no float activation — the BatchNorm's input is recomputed in backward from the int8 ``Q(x)`` —
    and updates the running statistics as ``bn`` would. Otherwise (or with a learned input range, a SyncBatchNorm,
    hooks on ``bn``) the composition of :func:`quant_matmul` and ``bn``. Same values and gradients either way.
    """
    if not (recompute and _lean_ok(input_quantizer, x) and type(bn) is nn.BatchNorm2d and bn.training
            and weight.dim() == 4 and not bn._forward_hooks and not bn._forward_pre_hooks):
        y = quant_matmul(x, weight, input_quantizer, weight_quantizer, stride, padding, dilation, groups,
                         kernel_source)
        return bn(qm.shift_scale(y, t, bias))
    wq = weight_quantizer(weight)
    scale, qmin, qmax = _fixed_input_scale(input_quantizer, x)
    track = bn.track_running_stats
    return qm.LeanQuantConvBN.apply(x, wq, scale, _weight_scale(weight_quantizer, wq), qmin, qmax, _pair(stride),
                                    _pair(padding), _pair(dilation), int(groups),
                                    _kernel_source(weight_quantizer, weight, wq, kernel_source), t, bias,
                                    bn.weight, bn.bias, bn.running_mean if track else None,
                                    bn.running_var if track else None, _bn_momentum(bn), bn.eps)


def _bn_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The exponential-average factor of ``bn``'s next training forward, counting the batch as ``bn.forward``
    does (``momentum=None``: the cumulative average)."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def quant_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, input_quantizer: nn.Module,
                 weight_quantizer: nn.Module, stride: int | tuple[int, int], padding: int | tuple[int, int],
                 dilation: int | tuple[int, int] = 1, groups: int = 1) -> Tensor:
    """The deployed quantized conv: ``conv2d(Q_x(x), Q_w(W), int32_bias(b))`` with the bias inside the conv.

    The one code path of :class:`QuantConv2d` (the converted model, the deploy artifact) *and* of an evaluation-mode
    rep block in QAT form, so ``model.eval()(x)`` and ``convert(model)(x)`` run the same float operations in the
    same order and agree bit for bit.
    """
    xq = input_quantizer(x)
    wq = weight_quantizer(weight)
    return F.conv2d(xq, wq, int32_bias(bias, input_quantizer, weight_quantizer), stride, padding, dilation, groups)


class QuantConv2d(_pq_nn.QuantConv2d):
    """pytorch-quantization's ``QuantConv2d`` (``_input_quantizer``, ``_weight_quantizer``) built from a float conv.

    The forward is :func:`quant_conv2d`: the library's with the bias on the int32 accumulator grid
    (:func:`int32_bias`). A conv that :func:`~qat_rep.quant.prepare` paired with the BatchNorm after it
    (:meth:`fold_bn`) runs, in evaluation mode, the conv that :func:`~qat_rep.quant.convert` writes — the BN folded
    into the kernel and bias, then quantized — while that BN passes its input through; so ``model.eval()(x)`` equals
    ``convert(copy.deepcopy(model))(x)`` bit for bit for conv+BN pairs as for rep blocks. Training runs conv then BN
    (batch statistics), as before.
    """

    def fold_bn(self, bn: "FoldedBatchNorm2d") -> None:
        """Fold ``bn`` (the BN right after this conv) in evaluation mode. Plain references, not submodules: the
        state-dict keys do not change."""
        object.__setattr__(self, "_eval_bn", bn)
        object.__setattr__(bn, "_folded_by", self)

    def unfold_bn(self) -> None:
        """Forget the pairing (``convert`` folded the BN for good)."""
        bn = self.__dict__.pop("_eval_bn", None)
        if bn is not None:
            bn.__dict__.pop("_folded_by", None)

    def forward(self, input: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        else:
            padding = self.padding
        bn = self.__dict__.get("_eval_bn")
        if bn is not None and not self.training and not bn.training:  # convert's folded conv
            weight, bias = fuse_bn_module(self.weight, bn, self.bias)
            return quant_conv2d(input, weight, bias, self._input_quantizer, self._weight_quantizer, self.stride,
                                padding, self.dilation, self.groups)
        if self.training:  # the lean step (int8-saved input), bias added after the conv
            y = quant_matmul(input, self.weight, self._input_quantizer, self._weight_quantizer, self.stride, padding,
                             self.dilation, self.groups)
            bias = int32_bias(self.bias, self._input_quantizer, self._weight_quantizer)
            # the bias in the output's dtype: under autocast the conv ran in reduced precision, as F.conv2d would
            return y if bias is None else y + bias.reshape(1, -1, 1, 1).to(y.dtype)
        return quant_conv2d(input, self.weight, self.bias, self._input_quantizer, self._weight_quantizer,
                            self.stride, padding, self.dilation, self.groups)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_quantizer: TensorQuantizer,
                   weight_quantizer: TensorQuantizer) -> "QuantConv2d":
        """Wrap ``conv``'s own parameters (same ``Parameter`` objects) with the given quantizers."""
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported by QuantConv2d; use integers")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode)
        q.weight = conv.weight
        q.bias = conv.bias
        q._input_quantizer = input_quantizer
        q._weight_quantizer = weight_quantizer
        return q.to(device=conv.weight.device)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """The BatchNorm after a :class:`QuantConv2d` that folds it in evaluation mode (:meth:`QuantConv2d.fold_bn`):
    then the identity (the conv already applied it), otherwise an ordinary ``BatchNorm2d``. Same state-dict keys."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        """A ``FoldedBatchNorm2d`` holding ``bn``'s own parameters and buffers (the same objects)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for k, v in bn._parameters.items():
            new._parameters[k] = v
        for k, v in bn._buffers.items():
            new._buffers[k] = v
        new.train(bn.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        conv = self.__dict__.get("_folded_by")
        if conv is not None and not self.training and not conv.training:
            return input
        return super().forward(input)


class QuantLinear(_pq_nn.QuantLinear):
    """pytorch-quantization's ``QuantLinear`` built from a float ``nn.Linear`` (bias on the int32 grid)."""

    def forward(self, input: Tensor) -> Tensor:
        if self.training:  # the lean step (int8-saved input), bias added after the matmul
            y = quant_matmul(input, self.weight, self._input_quantizer, self._weight_quantizer)
            bias = int32_bias(self.bias, self._input_quantizer, self._weight_quantizer)
            return y if bias is None else y + bias.to(y.dtype)  # autocast: stay in the matmul's dtype
        quant_input = self._input_quantizer(input)
        quant_weight = self._weight_quantizer(self.weight)
        return F.linear(quant_input, quant_weight, int32_bias(self.bias, self._input_quantizer, self._weight_quantizer))

    @classmethod
    def from_float(cls, linear: nn.Linear, input_quantizer: TensorQuantizer,
                   weight_quantizer: TensorQuantizer) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight = linear.weight
        q.bias = linear.bias
        q._input_quantizer = input_quantizer
        q._weight_quantizer = weight_quantizer
        return q.to(device=linear.weight.device)


class QuantConvTranspose2d(_pq_nn.QuantConvTranspose2d):
    """pytorch-quantization's ``QuantConvTranspose2d`` built from a float ``nn.ConvTranspose2d`` (bias on the int32
    grid).

    The weight of a transposed conv is ``(in, out, kH, kW)``: per-channel weight quantizers use ``axis=1`` (one
    ``amax`` per output channel, as TensorRT's deconvolution expects and the ONNX ``ConvTranspose``'s
    ``DequantizeLinear`` carries). Only ``groups=1`` (the output channels are then the weight's axis 1). Training and
    evaluation run the same composition ``conv_transpose2d(Q_x(x), Q_w(W), int32_bias(b))``.
    """

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("QuantConvTranspose2d supports padding_mode='zeros' only")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        xq = self._input_quantizer(input)
        wq = self._weight_quantizer(self.weight)
        return F.conv_transpose2d(xq, wq, int32_bias(self.bias, self._input_quantizer, self._weight_quantizer),
                                  self.stride, self.padding, output_padding, self.groups, self.dilation)

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, input_quantizer: TensorQuantizer,
                   weight_quantizer: TensorQuantizer) -> "QuantConvTranspose2d":
        """Wrap ``conv``'s own parameters (same ``Parameter`` objects) with the given quantizers."""
        if conv.groups != 1:
            raise ValueError(f"QuantConvTranspose2d quantizes groups=1 transposed convs only, got groups={conv.groups}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode)
        q.weight = conv.weight
        q.bias = conv.bias
        q._input_quantizer = input_quantizer
        q._weight_quantizer = weight_quantizer
        return q.to(device=conv.weight.device)


class LeanReLU(nn.ReLU):
    """The ``nn.ReLU`` of a prepared model: in a training step with gradients it runs :class:`~.qmath.MaskReLU` (the
    same values and gradients, a 1-bit mask — a byte under ``torch.compile`` — kept for backward instead of the float
    output), otherwise ``torch.relu``. A ReLU's output is usually the next
    quantized layer's input, which the lean conv step keeps as int8: with this ReLU the float activation is freed
    once that conv ran (~4 bytes per element of every activation less). :func:`~qat_rep.quant.prepare` swaps every
    non-inplace ``nn.ReLU`` for one; no state, same state dict."""

    @classmethod
    def from_relu(cls, relu: nn.ReLU) -> "LeanReLU":
        """A ``LeanReLU`` in ``relu``'s training mode."""
        return cls().train(relu.training)

    def forward(self, input: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and input.requires_grad:
            return qm.MaskReLU.apply(input)
        return super().forward(input)


class QuantAvgPool(nn.Module):
    """An average pool (``nn.AdaptiveAvgPool2d``/``nn.AvgPool2d``) with an input quantizer.

    The role of pytorch-quantization's ``QuantAdaptiveAvgPool2d``: with the pool's input quantized, the conv before
    it ends in a quantizer too, so INT8 runtimes run that conv as an integer kernel (in ONNX Runtime the last conv
    of a RepVGG otherwise runs in float with its weights dequantized at every call). Holds the original pool as
    ``pool``; no parameters.
    """

    def __init__(self, pool: nn.Module, input_quantizer: TensorQuantizer):
        super().__init__()
        if not isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            raise TypeError(f"QuantAvgPool wraps nn.AdaptiveAvgPool2d or nn.AvgPool2d, got {type(pool).__name__}")
        self.pool = pool
        self._input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self._input_quantizer(x))


@contextlib.contextmanager
def onnx_export_mode() -> Iterator[None]:
    """Make every quantizer emit ``torch.fake_quantize_*`` ops (→ ONNX QuantizeLinear/DequantizeLinear).

    Sets the library's class-level ``TensorQuantizer.use_fb_fake_quant = True`` and always restores the previous
    value, even when the export raises. The library's "Use Pytorch's native experimental fake quantization" warning
    is dropped meanwhile: these ops are the export path, not an experiment.
    """
    previous = _PQTensorQuantizer.use_fb_fake_quant
    _PQTensorQuantizer.use_fb_fake_quant = True
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_drop_fb_notice)
    try:
        yield
    finally:
        _PQTensorQuantizer.use_fb_fake_quant = previous
        absl_logger.removeFilter(_drop_fb_notice)


def _drop_fb_notice(record: logging.LogRecord) -> bool:
    return "native experimental fake quantization" not in record.getMessage()
