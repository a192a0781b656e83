"""The quantization arithmetic of QAT, ``convert``, calibration and every PTQ method, once: integer bounds, scales,
rounding, straight-through estimators, the int32 bias grid, ``max|x|`` reductions and the MSE weight-range search.

Symmetric (TensorRT-style) quantization with zero point 0: ``scale = max(amax, EPS) / qmax``, integers
``clamp(round(x · (1/s)), qmin, qmax)`` with round-half-even and the float32 reciprocal — the numbers of
``torch.fake_quantize_per_tensor_affine`` — and a bias rounded to the accumulator grid ``s_x · s_w``. The quantizers
(:mod:`.backend`), the equivalent-kernel QAT path (:mod:`.rep_qat`), ``convert``, the histogram calibrators and
:mod:`qat_rep.ptq` call these functions; none of them rounds, derives a bit range or defines a straight-through
gradient itself (``tests/test_quant_lean.py`` checks every module). The PTQ forms at the end divide by the scale
(``round(x / s)``) where the quantizers multiply by its float32 reciprocal: reconstruction results are written back
into quantizers through their ``amax``, and the two differ only for values within float rounding of a .5 tie.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

#: amax below this quantizes everything to 0, as in pytorch-quantization
EPS = 1.0 / (1 << 24)


def bounds(num_bits: int, unsigned: bool, narrow_range: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``num_bits`` integer: ``[0, 2^b − 1]`` unsigned, ``[−2^(b−1) (+1 narrow), 2^(b−1) − 1]``
    signed."""
    qmax = (1 << (num_bits - 1 + int(unsigned))) - 1
    qmin = 0 if unsigned else (-qmax if narrow_range else -qmax - 1)
    return qmin, qmax


def scale_from_amax(amax: Tensor, qmax: int) -> Tensor:
    """``max(amax, EPS) / qmax`` (keeps ``amax``'s gradient: LSQ learns through it)."""
    return amax.clamp_min(EPS) / qmax


def quantize_to_int(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """``(q, mask)``: the integers ``clamp(round(x · (1/s)))`` (as floats, one buffer) and the unclipped mask."""
    q = torch.mul(x.detach(), torch.reciprocal(scale)).round_()
    mask = byte_mask((q >= qmin) & (q <= qmax))
    return q.clamp_(qmin, qmax), mask


def byte_mask(cond: Tensor) -> Tensor:
    """``cond`` as a mask to keep for backward: itself in eager mode; under ``torch.compile`` a ``uint8`` 0/1 tensor
    made through a float select, because inductor's CPU code writes ``bool`` buffers ~20× slower than ``uint8`` ones
    (measured on a 32×48×32×32 activation, one core: 12–19 ms vs 0.2–0.4 ms). Either multiplies a gradient to the
    same values (``grad · 1``, ``grad · 0``)."""
    if not torch.compiler.is_compiling():
        return cond
    return torch.where(cond, 1.0, 0.0).to(torch.uint8)


class RoundSTE(torch.autograd.Function):
    """``clamp(round(x / s), qmin, qmax) · s`` with the identity gradient, computed in place on one buffer (``x``'s
    own with ``in_place=True``).

    For weights quantized with their own ``max|w|`` (nothing is clipped, so the straight-through gradient is the
    identity): four passes over the kernel instead of the seven of the out-of-place STE expression, and ~3× faster
    on CPU than ``fake_quantize_per_channel_affine``, with the same numbers. Runs at every QAT step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, in_place: bool = False) -> Tensor:  # noqa: D102
        if in_place:  # the caller's own temporary: the same operations in x's buffer
            ctx.mark_dirty(x)
            return x.div_(scale).round_().clamp_(qmin, qmax).mul_(scale)
        q = x.detach() / scale
        return q.round_().clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # noqa: D102
        return grad, None, None, None, None


class ClippedSTE(torch.autograd.Function):
    """``clamp(round(x · (1/s)), qmin, qmax) · s`` with the gradient masked to the unclipped range.

    The numbers of ``torch.fake_quantize_per_tensor_affine`` with zero point 0 (the float32 reciprocal ``1/s``,
    round-half-even, the mask taken on the rounded value) — tested bit for bit — in four in-place passes, ~40 %
    faster forward + backward on CPU than that fused kernel (measured on a 32×48×32×32 activation, one core).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D102
        q, mask = quantize_to_int(x, scale, qmin, qmax)
        if ctx.needs_input_grad[0]:
            # a parameter (a layer's weight) stays alive through the step: keep it, not a mask of its size
            ctx.save_for_backward(*((x, scale) if isinstance(x, torch.nn.Parameter) else (mask,)))
            ctx.bounds = (qmin, qmax)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        saved = ctx.saved_tensors
        mask = saved[0] if len(saved) == 1 else quantize_to_int(saved[0], saved[1], *ctx.bounds)[1]
        return grad * mask, None, None, None


def lsq_fake_quant(x: Tensor, amax: Tensor, qmin: int, qmax: int) -> Tensor:
    """LSQ-style fake quantization ``s · (c + (round(c) − c).detach())``, ``c = clamp(x / s, qmin, qmax)``: the
    gradient reaches ``amax`` through the scale, STE on the rounding only (:class:`LSQFakeQuant`)."""
    return LSQFakeQuant.apply(x, scale_from_amax(amax, qmax), qmin, qmax)


class LSQFakeQuant(torch.autograd.Function):
    """The LSQ fake quantization of :func:`lsq_fake_quant`, keeping only ``x`` and the scale for backward.

    Written as an autograd composition it keeps ``x``, ``x / s``, the clamped and the rounded values as floats
    (16 bytes per element: for weights, four copies of every kernel). All are cheap functions of ``x`` and ``s``:
    backward recomputes them and applies the composition's formulas in its order (:func:`_lsq_backward`), so the
    gradients to ``x`` and ``s`` are the composition's bit for bit (tested). ``s`` may be per tensor or per channel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, scale)
        ctx.bounds = (qmin, qmax)
        return _lsq_values(x, scale, qmin, qmax)[2].mul_(scale.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, scale = ctx.saved_tensors
        v, mask, q = _lsq_values(x, scale, *ctx.bounds)
        gx, gs = _lsq_backward(grad, v, mask, q, scale.detach(), ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gs, None, None


def _lsq_values(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x/s, clamp mask, q)`` of :func:`lsq_fake_quant`, by the same float operations (``q = c + (round(c) − c)``
    is ``round(c)`` exactly)."""
    v = x.detach() / scale.detach()
    c = torch.clamp(v, qmin, qmax)
    q = torch.round(c).sub_(c).add_(c)  # (round(c) − c) + c: the same bits as c + (round(c) − c), one buffer
    return v, (v >= qmin) & (v <= qmax), q


def _lsq_backward(g: Tensor, v: Tensor, mask: Tensor, q: Tensor, scale: Tensor, need_x: bool,
                  need_s: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``s · STE(clamp(x / s))`` given ``g`` on its output, as autograd computes them through the
    composition: ``g·s`` through the product, the identity STE, the clamp mask, ``/ s`` through the division; the
    scale's two uses (``q·s`` and ``x/s``) each reduced to its shape (``sum_to_size``) and then added."""
    g_v = (g * scale).mul_(mask)
    gs = None
    if need_s:  # (the buffers are reused in place: v and q are not needed after this)
        s_q = q.mul_(g).sum_to_size(scale.shape)
        s_x = torch.neg(g_v).mul_(v.div_(scale)).sum_to_size(scale.shape)
        gs = s_q + s_x
    gx = g_v.div_(scale) if need_x else None
    return gx, gs


def round_to_grid_ste(value: Tensor, step: Tensor) -> Tensor:
    """``value`` rounded to multiples of ``step`` (e.g. the int32 bias grid ``s_x · s_w``), straight-through."""
    step = step.clamp_min(torch.finfo(torch.float32).tiny)
    return value + (torch.round(value.detach() / step) * step - value.detach()).detach()


def reduce_amax(x: Tensor, axes: Sequence[int] | None, shape: Sequence[int]) -> Tensor:
    """``max|x|`` over every dimension except ``axes`` (``None``: over everything), reshaped to ``shape``; no
    gradient."""
    x = x.detach()
    if axes is None:
        return torch.maximum(x.amax(), -x.amin()).reshape(shape)
    if len(axes) == 1 and torch.compiler.is_compiling():
        # one reduction over the other dimensions, which the compiler walks in the order of the buffer's memory
        # layout (it may lay a computed kernel out channels-last); a [C, rest] view of such a buffer is read with
        # an integer division per element. max and min are exact, so the order changes nothing
        dims = [d for d in range(x.dim()) if d != axes[0] % x.dim()]
        return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims)).reshape(shape)
    if len(axes) == 1:
        # max and -min of the rows of a [C, rest] view: no |x| copy, ~7x faster on CPU than abs().amax(dims)
        rows = x.movedim(axes[0], 0).reshape(x.shape[axes[0]], -1)
        return torch.maximum(rows.amax(1), -rows.amin(1)).reshape(shape)
    dims = [d for d in range(x.dim()) if d not in axes]
    return x.abs().amax(dim=dims, keepdim=True).reshape(shape)


# Eight 0/1 bytes read as one little-endian int64 ``w``: ``(w · _GATHER) >> 56`` collects byte i into bit i (the
# partial products land on distinct bits, so nothing carries); a byte ``p`` times ``_SPREAD`` is eight copies of
# ``p``, and ``& _SELECT`` keeps bit i in byte i. int64 products wrap modulo 2^64, which is all the trick needs.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64
_HIGH = 0x7F7F7F7F7F7F7F7F


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor packed eight elements to a byte (``uint8``, ``ceil(n / 8)`` bytes, element i of each group
    in bit i): what the lean backward functions keep of a clip or ReLU mask. :func:`unpack_mask` restores it."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder != "little":
        bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
        return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_mask` packed."""
    n = 1
    for d in shape:
        n *= int(d)
    if sys.byteorder != "little":
        bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=packed.device)
        flat = (packed.unsqueeze(1) & bits).ne(0)
    else:
        # byte i of each word is 0 or 2^i; + 0x7F sets its bit 7 exactly when it is not 0 (no carry: at most 255),
        # >> 7 and & 0x01 per byte leave 0/1 bytes — a bool tensor in the same buffer, one byte per element
        flat = (packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_SELECT).add_(_HIGH).bitwise_right_shift_(7)
                .bitwise_and_(_SPREAD).view(torch.uint8).view(torch.bool))
    return flat.view(-1)[:n].view(tuple(shape))


class KernelSource(NamedTuple):
    """The float kernel a lean function's weight quantizer saw, as ``fn(*tensors)``: a function of tensors that
    stay alive through the step anyway (parameters, buffers, a few per-channel scales).

    Given one, :class:`LeanQuantConv` and :class:`LeanLSQConv` keep references to ``tensors`` instead of a copy of
    the fake-quantized kernel and call ``fn`` again in backward (under ``no_grad``; ``fn`` includes the weight
    quantizer). ``fn`` must repeat the forward's float operations, so it returns the same bits; autograd's version
    counters on the saved ``tensors`` refuse a backward after any of them changed in place (an optimizer step, a
    collapse), rather than differentiate through another kernel.
    """

    fn: Callable[..., Tensor]
    tensors: tuple[Tensor | None, ...]


def _int8_weight(w: Tensor, w_scale: Tensor | None) -> Tensor:
    """What the lean functions keep of the fake-quantized kernel: ``round(wq / s_w)`` as int8 (``wq`` itself when
    there is no scale); :func:`_weight_back` rebuilds it exactly."""
    return w if w_scale is None else torch.div(w, w_scale).round_().to(torch.int8)


def _weight_back(w_saved: Tensor, w_scale: Tensor | None) -> Tensor:
    """The forward's fake-quantized kernel from :func:`_int8_weight`'s result, bit for bit."""
    return w_saved if w_scale is None else w_saved.to(w_scale.dtype) * w_scale


def _save_kernel(ctx, w: Tensor, w_scale: Tensor | None, source: KernelSource | None) -> tuple:
    """What a lean function saves for its kernel: ``source``'s tensors (references, no copy), else the int8 form."""
    ctx.kernel_fn = None if source is None else source.fn
    if source is not None:
        return tuple(None if t is None else t.detach() for t in source.tensors)
    return _int8_weight(w, w_scale), w_scale


def _load_kernel(ctx, saved: Sequence[Tensor | None]) -> Tensor:
    """The forward's fake-quantized kernel, bit for bit, from what :func:`_save_kernel` kept."""
    if ctx.kernel_fn is None:
        return _weight_back(*saved)
    with torch.no_grad():
        return ctx.kernel_fn(*saved)


def _weight_grad(grad: Tensor, xq: Tensor, wq: Tensor, conf: tuple) -> Tensor:
    """The weight gradient of ``conv_or_linear(xq, wq)`` (``conf``: stride, padding, dilation, groups)."""
    if wq.dim() == 2:  # linear
        return grad.reshape(-1, grad.shape[-1]).t().matmul(xq.reshape(-1, xq.shape[-1]))
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(grad, xq, wq, None, stride, padding, dilation, False, [0, 0], groups,
                                               [False, True, False])[1]


def _input_grad(grad: Tensor, shape: Sequence[int], wq: Tensor, conf: tuple) -> Tensor:
    """The input gradient of ``conv_or_linear(xq, wq)`` for an input of ``shape``, without the input itself: the
    lean backward functions free the rebuilt ``Q(x)`` after the weight gradient, before this one is allocated, so
    the two activation-sized buffers never coexist. For a conv it is the transposed convolution of ``grad``, which
    runs the same backward-data kernel as ``convolution_backward``'s input gradient (bit for bit, tested) without
    that op's contiguous copy of an input it never reads."""
    if wq.dim() == 2:
        return grad.matmul(wq)
    stride, padding, dilation, groups = conf
    out_pad = [int(shape[i + 2]) - ((grad.shape[i + 2] - 1) * stride[i] - 2 * padding[i]
                                    + dilation[i] * (wq.shape[i + 2] - 1) + 1) for i in range(2)]
    return F.conv_transpose2d(grad, wq, None, stride, padding, out_pad, groups, dilation)


class LeanQuantConv(torch.autograd.Function):
    """``conv(Q(x), wq)`` (or ``linear``) that saves its operands as integers and rebuilds them in backward.

    The composition ``conv(clippedSTE(x), wq)`` keeps the float ``Q(x)`` (4 bytes per element) for the weight
    gradient, a clip mask (1 byte) for the input gradient and the float fake-quantized kernel ``wq`` (4 bytes per
    weight) for the input gradient. ``Q(x)`` is exactly an integer tensor times one scale, so this saves the integers
    as int8/uint8 (1 byte) plus the mask packed to one bit (:func:`pack_mask`), and rebuilds ``Q(x) = q·s`` — the
    same float values, bit for bit — in backward. Given ``w_scale`` (the weight quantizer's scale, per tensor or per
    output channel), ``wq`` is saved the same way: ``round(wq / s_w)`` as int8 and ``q_w·s_w`` in backward, the very
    product the weight quantizer returned (``|q_w| ≤ 127``: ``wq / s_w`` is within 2⁻¹⁶ of ``q_w``). Given a
    :class:`KernelSource` (the kernel as a function of parameters), nothing of the kernel is kept at all: backward
    recomputes it. The gradients equal the composition's (tested). ``scale`` is the per-tensor input scale, fixed
    (learned input ranges run :class:`LeanLSQConv`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, wq: Tensor, scale: Tensor, w_scale: Tensor | None, qmin: int, qmax: int,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                source: KernelSource | None = None) -> Tensor:  # noqa: D102
        out, saved = _lean_conv_forward(ctx, x, wq, scale, w_scale, qmin, qmax, (stride, padding, dilation, groups),
                                        source)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        gx, gw = _lean_conv_backward(ctx, grad, ctx.saved_tensors, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None, None, None, None, None, None, None, None, None


def _lean_conv_forward(ctx, x: Tensor, wq: Tensor, scale: Tensor, w_scale: Tensor | None, qmin: int, qmax: int,
                       conf: tuple, source: KernelSource | None) -> tuple[Tensor, tuple]:
    """:class:`LeanQuantConv`'s forward: ``(conv(Q(x), wq), tensors to save)``; sets ``ctx.conf`` and the kernel
    recipe."""
    q, mask = quantize_to_int(x, scale, qmin, qmax)
    q_int, packed = q.to(torch.uint8 if qmin >= 0 else torch.int8), pack_mask(mask)
    del mask
    xq = q.mul_(scale)  # in place: one float buffer less at the step's peak
    w = wq.detach()
    out = conv_or_linear(xq, w, *conf)
    del xq, q
    ctx.conf = conf
    return out, (q_int, packed, scale, *_save_kernel(ctx, w, w_scale, source))


def _lean_conv_backward(ctx, grad: Tensor, saved: Sequence[Tensor | None], need_x: bool, need_w: bool,
                        wq: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """:class:`LeanQuantConv`'s backward from what :func:`_lean_conv_forward` saved: ``(grad_x, grad_wq)``."""
    q, packed, scale, *kernel = saved
    wq, gx, gw = _load_kernel(ctx, kernel) if wq is None else wq, None, None
    if need_w:
        gw = _weight_grad(grad, q.to(scale.dtype).mul_(scale), wq, ctx.conf)  # the forward's Q(x), exactly
    if need_x:
        gx = _input_grad(grad, q.shape, wq, ctx.conf).mul_(unpack_mask(packed, q.shape))
    return gx, gw


def shift_scale(out: Tensor, t: Tensor | None, bias: Tensor | None) -> Tensor:
    """``out / t + bias`` per channel (dimension 1), ``t`` or ``bias`` left out when ``None``: a rep block's conv
    output before its post-BN, the same operations in :class:`LeanQuantConvBN` and the composition it replaces."""
    shape = (1, -1) + (1,) * (out.dim() - 2)
    y = out if t is None else out / t.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


class LeanQuantConvBN(torch.autograd.Function):
    """``batch_norm(conv(Q(x), wq) / t + b)`` with batch statistics, keeping no float activation for backward.

    A rep block with a trainable post-BN (QARepVGG) runs conv, per-channel affine and a training BatchNorm; the
    BatchNorm keeps its float input (4 bytes per element) for backward, the largest thing a QAT step of such a block
    keeps. This function keeps what :class:`LeanQuantConv` keeps (the input as int8 and a 1-bit mask, the kernel's
    recipe) plus the per-channel batch statistics, and in backward runs the conv again on the rebuilt ``Q(x)`` —
    the same operands, the same bits — to get the BatchNorm's input back: one more convolution per step for about
    half the step's memory. Running statistics are updated in the forward with ``momentum`` (the caller's
    exponential-average factor), as ``F.batch_norm`` does; the gradients to ``x``, ``wq``, ``t``, ``b`` and the
    BatchNorm's weight and bias equal those of the composition ``batch_norm(LeanQuantConv(...) / t + b)`` bit for
    bit (tested). 2-D convs only; ``scale`` is the fixed per-tensor input scale.
    """

    @staticmethod
    def forward(ctx, x: Tensor, wq: Tensor, scale: Tensor, w_scale: Tensor | None, qmin: int, qmax: int,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                source: KernelSource | None, t: Tensor | None, bias: Tensor | None, bn_weight: Tensor | None,
                bn_bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                eps: float) -> Tensor:  # noqa: D102
        out, saved = _lean_conv_forward(ctx, x, wq, scale, w_scale, qmin, qmax, (stride, padding, dilation, groups),
                                        source)
        y = shift_scale(out, t, bias)
        del out
        z, mean, invstd = torch.ops.aten.native_batch_norm(y, bn_weight, bn_bias, running_mean, running_var, True,
                                                            momentum, eps)
        ctx.n_conv, ctx.eps = len(saved), eps
        ctx.save_for_backward(*saved, t, bias, bn_weight, mean, invstd)
        return z

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        saved = ctx.saved_tensors
        conv_saved, (t, bias, weight, mean, invstd) = saved[:ctx.n_conv], saved[ctx.n_conv:]
        need = ctx.needs_input_grad
        q, _, scale, *kernel = conv_saved
        wq = _load_kernel(ctx, kernel)
        out = conv_or_linear(q.to(scale.dtype).mul_(scale), wq, *ctx.conf)  # the forward's conv output, exactly
        y = shift_scale(out, t, bias)
        if t is None or not need[11]:
            del out
        g_y, g_weight, g_bias_bn = torch.ops.aten.native_batch_norm_backward(
            grad, y, weight, None, None, mean, invstd, True, ctx.eps, [True, need[13], need[14]])
        del y
        dims, g_t, g_b = [0] + list(range(2, grad.dim())), None, None
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        if t is not None and need[11]:  # autograd's formulas for a / t and its broadcast: same operations
            t_r = t.reshape(shape)
            g_t = (-g_y * ((out / t_r) / t_r)).sum(dims, keepdim=True).reshape(t.shape)
            del out
        if bias is not None and need[12]:
            g_b = g_y.sum(dims, keepdim=True).reshape(bias.shape)
        g_out = g_y if t is None else g_y / t.reshape(shape)
        del g_y
        gx, gw = _lean_conv_backward(ctx, g_out, conv_saved, need[0], need[1], wq)
        return (gx, gw, None, None, None, None, None, None, None, None, None, g_t, g_b, g_weight, g_bias_bn, None,
                None, None, None)


class LeanLSQConv(torch.autograd.Function):
    """``conv(lsq_fake_quant(x), wq)`` (or ``linear``) for a learned-amax (LSQ) per-tensor input quantizer, keeping
    only the float input ``x`` (and ``wq`` as int8 given ``w_scale``, nothing given a :class:`KernelSource`) for
    backward.

    The composition keeps ``x``, ``x / s``, the rounded ``q`` and ``Q(x)`` as floats (16 bytes per element) to
    differentiate through the clamp, the rounding STE and the scale. All of them are cheap functions of ``x`` and
    ``s``, so backward recomputes them and applies the same autograd formulas in the same order
    (:func:`_lsq_backward`): the gradients to ``x``, ``wq`` and the scale equal the composition's bit for bit
    (tested). ``x`` itself is what the ReLU before it produced, so nothing is kept that a float step would not keep.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, wq: Tensor, w_scale: Tensor | None, qmin: int, qmax: int,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                source: KernelSource | None = None) -> Tensor:  # noqa: D102
        xq = _lsq_values(x, scale, qmin, qmax)[2].mul_(scale)
        w = wq.detach()
        out = conv_or_linear(xq, w, stride, padding, dilation, groups)
        del xq
        ctx.save_for_backward(x.detach(), scale.detach(), *_save_kernel(ctx, w, w_scale, source))
        ctx.bounds, ctx.conf = (qmin, qmax), (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, scale, *kernel = ctx.saved_tensors
        need_x, need_s, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        wq, gx, gs, gw = _load_kernel(ctx, kernel), None, None, None
        if need_w:
            gw = _weight_grad(grad, _lsq_values(x, scale, *ctx.bounds)[2].mul_(scale), wq, ctx.conf)
        if need_x or need_s:
            g_xq = _input_grad(grad, x.shape, wq, ctx.conf)
            v, mask, q = _lsq_values(x, scale, *ctx.bounds)
            gx, gs = _lsq_backward(g_xq, v, mask, q, scale, need_x, need_s)
        return gx, gs, gw, None, None, None, None, None, None, None, None


class MaskReLU(torch.autograd.Function):
    """``relu(x)`` that keeps the mask ``x > 0`` (one bit per element, :func:`pack_mask`) for backward instead of the
    4-byte output.

    ``torch.relu`` saves its output. In a QAT step the output of a block's ReLU is the next layer's input, which
    :class:`LeanQuantConv` keeps as int8: with this ReLU the float activation is freed once the next conv ran.
    Same values and gradients as ``torch.relu`` (the gradient at 0 is 0 in both).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        out = torch.relu(x)
        # torch.relu's backward masks on ``output > 0`` too; under the compiler a byte per element (its bit
        # packing runs there as separate integer kernels)
        compiling = torch.compiler.is_compiling()
        ctx.save_for_backward(byte_mask(out > 0) if compiling else pack_mask(out > 0))
        ctx.shape = None if compiling else out.shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        (mask,) = ctx.saved_tensors
        return grad * (mask if ctx.shape is None else unpack_mask(mask, ctx.shape))


def conv_or_linear(xq: Tensor, wq: Tensor, stride, padding, dilation, groups) -> Tensor:
    """``conv2d`` for a 4-D weight, ``linear`` for a 2-D one (no bias): the conv of every QAT training path.

    A CPU conv with more output channels than output positions in the batch (a deep layer at a small resolution:
    RepVGG-A0's last block at 32×32 has 1280 channels and 128 positions at batch 32) runs as one matrix product
    against the kernel where it lies (:class:`KernelGemmConv`): oneDNN would first copy the whole kernel into its
    blocked layout, a kernel-sized buffer at the step's peak, where the product's unfolded input is smaller than the
    kernel. Other convs run ``F.conv2d``. The choice depends on shapes alone: a compiled step makes the same one.
    """
    if wq.dim() == 2:
        return F.linear(xq, wq)
    if _kernel_bound(xq, wq, stride, padding, dilation, groups):
        return KernelGemmConv.apply(xq, wq, _pair(stride), _pair(padding), _pair(dilation))
    return F.conv2d(xq, wq, None, stride, padding, dilation, groups)


def _conv_out_hw(x: Tensor, w: Tensor, stride, padding, dilation) -> tuple[int, int]:
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    return tuple((x.shape[i + 2] + 2 * p[i] - d[i] * (w.shape[i + 2] - 1) - 1) // s[i] + 1 for i in range(2))


def _kernel_bound(x: Tensor, w: Tensor, stride, padding, dilation, groups) -> bool:
    """Is ``conv2d(x, w)`` one whose kernel outweighs its unfolded input (:func:`conv_or_linear`)?"""
    if groups != 1 or x.device.type != "cpu" or x.dim() != 4:
        return False
    h, w_out = _conv_out_hw(x, w, stride, padding, dilation)
    return x.shape[0] * h * w_out < w.shape[0]


class KernelGemmConv(torch.autograd.Function):
    """``conv2d(x, w)`` (no bias, ``groups=1``) as ``unfold(x)ᵀ · wᵀ``: one GEMM that reads the kernel in place.

    For a conv with more output channels than output positions the unfolded input (positions × ``C·k·k``) is smaller
    than the kernel (channels × ``C·k·k``), so the product's only temporaries are smaller than the copy of the
    kernel oneDNN's direct convolution makes first (and the GEMM is as fast or faster on such shapes). The values
    equal ``conv2d``'s up to float summation order; the gradients are ``conv2d``'s own
    (``aten.convolution_backward``, which they depend on through ``x``, ``w`` and the incoming gradient only), bit
    for bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:  # noqa: D102
        n, c_out = x.shape[0], w.shape[0]
        h, w_out = _conv_out_hw(x, w, stride, padding, dilation)
        cols = F.unfold(x, w.shape[2:], dilation, padding, stride)  # [N, C·kh·kw, L]
        cols = cols.transpose(1, 2).reshape(n * h * w_out, -1)
        out = torch.mm(cols, w.reshape(c_out, -1).t())
        del cols
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation)
        # an NCHW copy with conv2d's strides (``contiguous()`` keeps odd strides for a 1×1 output: downstream
        # kernels pick their algorithm, and their bits, by the strides)
        nchw = out.new_empty((n, c_out, h, w_out))
        return nchw.copy_(out.view(n, h, w_out, c_out).permute(0, 3, 1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return gx, gw, None, None, None


# ----------------------------------------------------------------------------------------------------- PTQ forms
# Post-training reconstruction (AdaRound, BRECQ, MRECG, CFWS) differentiates through rounding and learns step sizes
# on plain tensors, on the same symmetric, signed grid as the quantizers above (``round_half_even(x / s)`` clamped to
# ``[-qmax - 1, qmax]``, ``s = max(amax, EPS) / qmax``); a result is written back into ordinary quantizers through its
# ``amax`` (see the module docstring for the division/reciprocal difference).


def qbound(num_bits: int) -> int:
    """Largest magnitude of a signed narrow-range integer of ``num_bits`` bits (127 for 8 bits)."""
    if not isinstance(num_bits, int) or isinstance(num_bits, bool) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer in [2, 16], got {num_bits!r}")
    return bounds(num_bits, False, True)[1]


def channel_amax(weight: Tensor, per_channel: bool) -> Tensor:
    """``max|W|`` per output channel (shape ``[C, 1, …]``, TensorQuantizer's axis-0 layout) or per tensor (0-d)."""
    if not per_channel:
        return reduce_amax(weight, None, ())
    return reduce_amax(weight, (0,), (-1,) + (1,) * (weight.dim() - 1))


def round_ste(x: Tensor) -> Tensor:
    """Round (half to even) with a straight-through gradient."""
    return (x.round() - x).detach() + x


def round_clamp(x: Tensor, qmin: float, qmax: float) -> Tensor:
    """``clamp(round(x), qmin, qmax)``: the integer grid point of values already divided by their scale (no
    gradient through the rounding)."""
    return torch.clamp(torch.round(x), qmin, qmax)


def grid_floor(x: Tensor) -> Tensor:
    """The integer grid point at or below ``x`` (values already divided by their scale): AdaRound's base, from which
    a learned variable rounds up or not."""
    return torch.floor(x)


def fake_quant(x: Tensor, amax: Tensor, num_bits: int) -> Tensor:
    """Quantize-dequantize ``x`` on the signed ``num_bits`` grid of ``amax`` (no gradient through the rounding)."""
    bound = qbound(num_bits)
    scale = scale_from_amax(amax, bound)
    return round_clamp(x / scale, -bound - 1, bound) * scale


def fake_quant_ste(x: Tensor, amax: Tensor, num_bits: int) -> Tensor:
    """:func:`fake_quant` with an STE through the rounding and an LSQ-style gradient to ``amax``."""
    bound = qbound(num_bits)
    scale = scale_from_amax(amax, bound)
    return torch.clamp(round_ste(x / scale), -bound - 1, bound) * scale


@torch.no_grad()
def mse_weight_amax(weight: Tensor, num_bits: int, per_channel: bool, grid: int = 20, p: float = 2.4) -> Tensor:
    """Weight amax minimizing ``Σ|W − fq(W)|^p`` over ``grid`` clipping ratios 0.5 … 1.0 of ``max|W|`` (BRECQ's
    init, with a coarser grid).

    Shape as :func:`channel_amax`. Low-bit weights start from this instead of ``max|W|`` (at 4 bits the max scale
    wastes most of the grid on a few outliers): PTQ reconstruction and learned QAT ranges
    (``QuantConfig.weight_calibrator="mse"``).
    """
    base = channel_amax(weight, per_channel)
    best = base.clone()
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    best_err = torch.full((flat.shape[0],), float("inf"), dtype=weight.dtype, device=weight.device)
    for i in range(grid):
        ratio = 1.0 - 0.5 * i / grid
        amax = base * ratio
        err = (fake_quant(weight, amax, num_bits) - weight).abs().pow(p)
        err = err.reshape(flat.shape).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.reshape(best.shape), amax, best)
    return best
