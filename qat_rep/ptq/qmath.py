"""Symmetric fake quantization in plain torch, bit-for-bit the arithmetic of pytorch-quantization's TensorQuantizer.

PTQ reconstruction (AdaRound, BRECQ, MRECG) has to differentiate through rounding and to learn activation step
sizes, which TensorQuantizer does not offer; these helpers simulate exactly what the deployed ``QuantConv2d`` will
compute (``round_half_even(x / s)`` clamped to ``[-bound − 1, bound]``, ``s = amax / bound``, ``bound = 2^(b-1) − 1``,
as ``torch.fake_quantize_per_*_affine`` in :mod:`qat_rep.quant.backend`), so the
result of a reconstruction can be written back into ordinary quantizers without changing a single rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1.0 / (1 << 24)  # as the backend: a smaller amax quantizes everything to 0


def qbound(num_bits: int) -> int:
    """Largest magnitude of a signed narrow-range integer of ``num_bits`` bits (127 for 8 bits)."""
    if not isinstance(num_bits, int) or isinstance(num_bits, bool) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer in [2, 16], got {num_bits!r}")
    return (1 << (num_bits - 1)) - 1


def channel_amax(weight: Tensor, per_channel: bool) -> Tensor:
    """``max|W|`` per output channel (shape ``[C, 1, …]``, TensorQuantizer's axis-0 layout) or per tensor (0-d)."""
    if not per_channel:
        return weight.detach().abs().max()
    return weight.detach().abs().reshape(weight.shape[0], -1).max(dim=1).values.reshape(
        (-1,) + (1,) * (weight.dim() - 1))


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def fake_quant(x: Tensor, amax: Tensor, num_bits: int) -> Tensor:
    """Quantize-dequantize ``x`` as the backend's TensorQuantizer does (no gradient through the rounding)."""
    bound = float(qbound(num_bits))
    scale = amax.clamp_min(_EPS) / bound
    return torch.clamp(torch.round(x / scale), -bound - 1, bound) * scale


def fake_quant_ste(x: Tensor, amax: Tensor, num_bits: int) -> Tensor:
    """:func:`fake_quant` with an STE through the rounding and an LSQ-style gradient to ``amax``."""
    bound = float(qbound(num_bits))
    scale = amax.clamp_min(_EPS) / bound
    return torch.clamp(round_ste(x / scale), -bound - 1, bound) * scale



@torch.no_grad()
def mse_weight_amax(weight: Tensor, num_bits: int, per_channel: bool, grid: int = 20, p: float = 2.4) -> Tensor:
    """Weight amax minimizing ``Σ|W − fq(W)|^p`` over ``grid`` clipping ratios 0.5 … 1.0 of ``max|W|`` (BRECQ's
    init, with a coarser grid).

    Shape as :func:`channel_amax`. Low-bit reconstruction starts from this instead of ``max|W|`` (at 4 bits the
    max scale wastes most of the grid on a few outliers).
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
        if per_channel:
            best = torch.where(better.reshape(best.shape), amax, best)
        elif bool(better.item()):
            best = amax
    return best
