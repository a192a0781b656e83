"""Equivalent-kernel QAT for rep blocks: one conv of the fake-quantized equivalent kernel, gradients to every branch.

A :class:`RepQuant` is installed as ``block.rep_quant``; the block then runs ``post(rep_quant(block, x))``
(:class:`qat_rep.blocks.RepBlock`). Per phase:

* ``float`` — the float multi-branch sum (``block.branches(x)``), no quantization (calibration still observes the
  input, so a block can enter QAT later with a calibrated input scale);
* ``qat`` — ``K, b = block.equivalent_kernel_bias()`` (differentiable in every branch parameter), ``K`` fake-quantized
  per output channel (or per tensor) with a straight-through estimator, the input fake-quantized per tensor, and
  **one** conv ``block.conv(Q(x), Q(K), b)``;
* ``frozen`` — as ``qat`` but the kernel is computed under ``no_grad``: the branch parameters still exist (so an
  optimizer and a DDP wrapper built earlier stay valid) but receive no gradient (``grad is None``, so optimizers
  skip them — no momentum or weight-decay drift). Under DDP use ``find_unused_parameters=True`` once blocks freeze.

Branch BatchNorm statistics (design choice): in ``qat``/``frozen`` the branch BNs are folded with their *running*
statistics, which are therefore frozen — the branch outputs are never computed, and computing them only for their
batch statistics would cost the two extra convs this path exists to save. This is BN-folding QAT practice
(torchvision/torchao freeze BN statistics early in QAT, which fine-tunes a converged model); the BN affine
parameters (γ, β) keep training through the kernel. Statistics keep updating while a block is in ``float``.

The bias is added on the int32 accumulator grid ``s_x · s_w`` (:func:`~.backend.int32_bias`, STE), as the INT8
runtime adds it — wherever it is the deployed bias: always without a post-BN, in evaluation with one.

What you train is what you ship: in evaluation (``rep_quant`` not training) and whenever the post-BN does not use
batch statistics, the block runs :func:`deploy_kernel_bias` — the one kernel assembly that
:func:`~qat_rep.quant.convert` writes into the deployed conv — through :func:`~.backend.quant_conv2d`, the converted
``QuantConv2d``'s own forward. So ``model.eval()(x)`` and ``convert(copy.deepcopy(model))(x)`` perform the same
float operations in the same order and give the same bits (tested for RepVGG/QARepVGG × per-channel/per-tensor ×
learned/calibrated amax after QAT steps). The post-BN is then bypassed, not applied to a conv output with its
affine map divided out, which only equals the folded conv in exact arithmetic.

QARepVGG's post-sum BN (``block.bn``) stays a real BN (batch statistics) in training. Its scale
``t = γ / sqrt(running_var + eps)`` is folded into the kernel *before* weight quantization and divided out after the
conv (the torch.ao ``ConvBn`` QAT scheme): ``y = conv(Q(x), Q(K·t)) / t + b`` then ``bn(y)``, so per-tensor and
learned weight amax see the deployed kernel's range (folding a post-BN after per-tensor QAT would otherwise change
the rounding grid). For dynamic per-channel amax ``Q(K·t) = t·Q(K)``, and the cheaper unfolded form is used.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
from torch import Tensor, nn

from ..blocks import RepBlock
from ..fuse import bn_module_scale
from .backend import TensorQuantizer, int32_bias, quant_conv2d, quant_conv_bn, quant_matmul
from .qmath import KernelSource

PHASES = ("float", "qat", "frozen", "fused")
_T_MIN = 1e-8


def _post_bn_scale(block: RepBlock) -> Tensor | None:
    bn = getattr(block, "bn", None)
    if bn is None or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return None
    if bn.running_var is None:
        raise ValueError(f"post-BN of {type(block).__name__} tracks no running statistics; it cannot be folded")
    t = bn_module_scale(bn)
    # keep the sign, avoid dividing by ~0 for a channel whose γ collapsed
    return torch.where(t.abs() < _T_MIN, torch.full_like(t, _T_MIN) * torch.where(t < 0, -1.0, 1.0), t)


def deploy_kernel_bias(block: RepBlock) -> tuple[Tensor, Tensor]:
    """The kernel and bias of the block's deployed conv: equivalent kernel with the post-BN (if any) folded with its
    running statistics. The one kernel assembly of :func:`~qat_rep.quant.convert` and of the evaluation forward."""
    return _deploy_kernel_bias(block)[:2]


def _deploy_kernel_bias(block: RepBlock) -> tuple[Tensor, Tensor, Tensor | None]:
    kernel, bias, t = folded_kernel_bias(block)
    if t is not None:
        bn = block.bn
        bias = (bias - bn.running_mean) * t
        if bn.bias is not None:
            bias = bias + bn.bias
    return kernel, bias, t


def block_kernel_bias(block: RepBlock) -> tuple[Tensor, Tensor]:
    """The block's equivalent kernel and bias before any post-BN: read from the dense branch once the block is in
    the ``fused`` phase (:meth:`~qat_rep.blocks.RepBlock.collapsed_kernel_bias`), assembled from every branch
    otherwise."""
    rq = block.rep_quant
    if isinstance(rq, RepQuant) and rq.phase == "fused":
        return block.collapsed_kernel_bias()
    return block.equivalent_kernel_bias()


def _kernel_source(block: RepBlock, t: Tensor | None) -> KernelSource:
    """The kernel this step's conv quantizes — :func:`block_kernel_bias`'s, times the post-BN scale ``t`` when
    folded — as a function of the block's branch parameters and buffers (alive through the step anyway) and ``t``:
    the lean conv recomputes it in backward instead of keeping a copy. The kernel never depends on the post-BN's
    running statistics here (``t`` is passed as computed): a training post-BN updates them during the forward."""
    build = block.collapsed_kernel_bias if block.rep_quant.phase == "fused" else block.equivalent_kernel_bias
    tensors = tuple(v for n, v in itertools.chain(block.named_parameters(), block.named_buffers())
                    if n.startswith("rbr_"))
    n = len(tensors)

    def kernel(*saved: Tensor | None) -> Tensor:
        k, scale = build()[0], saved[n]
        return k if scale is None else k * scale.reshape(-1, 1, 1, 1)

    return KernelSource(kernel, (*tensors, None if t is None else t.detach()))


def folded_kernel_bias(block: RepBlock) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(K·t, b, t)``: the block's equivalent kernel with the post-BN scale ``t`` folded in (``t=None``: no post-BN).

    ``b`` is the branch bias *before* the post-BN; the fully folded deploy bias is ``(b − μ)·t + β``.
    """
    kernel, bias = block_kernel_bias(block)
    t = _post_bn_scale(block)
    if t is not None:
        kernel = kernel * t.reshape(-1, 1, 1, 1)
    return kernel, bias, t


class RepQuant(nn.Module):
    """The QAT hook of one rep block: its input quantizer, its weight quantizer and its phase.

    ``forward(block, x)`` returns what ``block.activation`` expects (the post-BN output, or the deployed conv's
    output with the post-BN folded in). The block is passed in rather than stored, so the module tree has no cycle.

    The ``_collapsed`` buffer records that :meth:`collapse_` rewrote the block's branches into its dense branch (it
    travels with checkpoints, so a resumed run never collapses twice); only a collapsed block may be in the
    ``fused`` phase.

    ``recompute_post_bn`` (set per block by :func:`~.insert.prepare` from ``QuantConfig.recompute_post_bn``) runs a
    training post-BN through :func:`~.backend.quant_conv_bn`'s recomputing function: no float activation kept for
    it, one more conv in backward.
    """

    def __init__(self, input_quantizer: TensorQuantizer, weight_quantizer: TensorQuantizer, phase: str = "qat",
                 recompute_post_bn: bool = False):
        super().__init__()
        self._input_quantizer = input_quantizer
        self._weight_quantizer = weight_quantizer
        self.recompute_post_bn = recompute_post_bn
        self.register_buffer("_collapsed", torch.zeros((), dtype=torch.bool))
        self._is_collapsed = False  # Python mirror of the buffer: the forward never reads a tensor flag
        self.phase = phase

    @property
    def collapsed(self) -> bool:
        """True once :meth:`collapse_` wrote the block's branches into its dense branch."""
        return self._is_collapsed

    @torch.no_grad()
    def collapse_(self, block: RepBlock) -> list[nn.Parameter]:
        """Collapse ``block`` into its dense branch (:meth:`~qat_rep.blocks.RepBlock.collapse_to_dense_`) and mark
        it; returns the parameters whose values were rewritten (reset their optimizer state). A no-op (``[]``) for a
        block already collapsed."""
        if self._is_collapsed:
            return []
        params = block.collapse_to_dense_()
        self._collapsed.fill_(True)
        self._is_collapsed = True
        return params

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: D401 - torch hook
        key = prefix + "_collapsed"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not had and key in missing_keys:  # checkpoints written before the fused phase existed: not collapsed
            missing_keys.remove(key)
            self._collapsed.fill_(False)
        self._is_collapsed = bool(self._collapsed)
        if self._phase == "fused" and not self._is_collapsed:
            self._phase = "qat"

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}; got {value!r}")
        if value == "fused" and not getattr(self, "_is_collapsed", False):
            raise ValueError("the 'fused' phase needs a collapsed block: use qat_rep.quant.apply_schedule (pass "
                             "the optimizers) or rep_quant.collapse_(block) first")
        self._phase = value

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_quantizer

    def forward(self, block: RepBlock, x: Tensor) -> Tensor:
        if self._phase == "float":
            if self._input_quantizer._if_calib:
                self._input_quantizer(x)  # calibration observes the input in every phase
            return block.post_bn(block.branches(x))
        bn = getattr(block, "bn", None)
        if bn is None or not bn.training:
            # No post-BN, or one with fixed statistics: the block is exactly the deployed conv (post-BN folded)
            with torch.no_grad() if self._phase == "frozen" else contextlib.nullcontext():
                kernel, bias, t = _deploy_kernel_bias(block)
            if not self.training:  # evaluation: convert's arithmetic, operation for operation
                return quant_conv2d(x, kernel, bias, self._input_quantizer, self._weight_quantizer, block.stride, 1,
                                    1, block.groups)
            with self._in_place(block, kernel):
                y = quant_matmul(x, kernel, self._input_quantizer, self._weight_quantizer, block.stride, 1, 1,
                                 block.groups, functools.partial(_kernel_source, block, t))
            bias = int32_bias(bias, self._input_quantizer, self._weight_quantizer)
            # training: the bias added after the conv, not inside it: oneDNN's convolution backward with a bias
            # costs 10-25 % more on CPU than without one plus a broadcast add
            return y + bias.reshape(1, -1, 1, 1)
        # a training post-BN (batch statistics): fold its running scale t into the kernel for quantization, divide
        # it out after the conv, then the real BN
        with torch.no_grad() if self._phase == "frozen" else contextlib.nullcontext():
            if self._folds_post_bn(block):
                kernel, bias, t = folded_kernel_bias(block)
            else:
                (kernel, bias), t = block_kernel_bias(block), None
        with self._in_place(block, kernel):
            return quant_conv_bn(x, kernel, self._input_quantizer, self._weight_quantizer, bn, t, bias, block.stride,
                                 1, 1, block.groups, functools.partial(_kernel_source, block, t),
                                 self.recompute_post_bn)

    def _in_place(self, block: RepBlock, kernel: Tensor) -> contextlib.AbstractContextManager:
        """Let the weight quantizer fake-quantize ``kernel`` in its own buffer when it was assembled in this forward:
        it shares no storage with the block's parameters or buffers (a collapsed block may hand out its dense
        weight itself)."""
        if torch.compiler.is_compiling():  # the compiler plans the kernel's buffers itself
            return contextlib.nullcontext()
        storage = kernel.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() == storage for t in itertools.chain(block.parameters(),
                                                                                  block.buffers())):
            return contextlib.nullcontext()
        return self._weight_quantizer.in_place()

    def _folds_post_bn(self, block: RepBlock) -> bool:
        """Fold the post-BN scale into the kernel before quantization? Needed for per-tensor (and learned) weight
        amax; for dynamic per-channel amax ``Q(K·t) = t·Q(K)`` exactly, so the cheaper unfolded path is used."""
        if getattr(block, "bn", None) is None:
            return False
        wq = self._weight_quantizer
        return wq.axis is None or wq.learn_amax or not wq.dynamic

    def extra_repr(self) -> str:
        return f"phase={self._phase}" + (", collapsed" if self._is_collapsed else "")
