"""Coarse & fine weight splitting (CFWS, Yang et al., arXiv 2312.10588) of fused re-parameterized kernels.

Why: a fused RepVGG kernel carries the identity and 1×1 branches on its centre tap, so the centre values of a
channel are often an order of magnitude larger than the 8 outer taps and one INT8 scale per channel wipes out the
outer taps. CFWS splits the kernel ``W``::

    Wc       = W[:, :, 1, 1]                          # centre taps
    s_c      = max|Wc| / bound                        # per output channel (or per tensor)
    W_coarse = pad(round(Wc / s_c) · s_c)             # exactly representable with scale s_c
    W_fine   = W − W_coarse                           # outer taps + centre residual (|residual| ≤ s_c / 2)

and runs two quantized convs whose outputs are added: the coarse one is a 1×1 conv (the only non-zero tap of a
padded 3×3 kernel is the centre, and with padding 0 the 1×1 conv reads the same input pixels), the fine one a 3×3
conv with its own, much smaller, weight scale. :class:`CFWSConv2d` is made of two ``QuantConv2d`` s so the ONNX
exporter emits two QDQ convs and an ``Add``.

The fine part's weight amax: the paper's is ``max|W_fine|``. With one scale per tensor at 6 bits, a single large
outer tap then sets the step for every channel, and the channels whose fine taps are several times smaller keep a
handful of levels. ``fine_range="mse"`` (the default) clips the fine range where that lowers
``Σ|W_fine − fq(W_fine)|^2.4`` (BRECQ's weight init, :func:`~qat_rep.quant.qmath.mse_weight_amax`); ``"max"`` is the paper's.
Measured on RepVGG-A0 trained with SGD at 32×32, W6A6 per-tensor, seeds 0 / 1 / 2: top-1 drop from FP32
0.84 / 0.56 / 2.79 with ``"max"``, 0.28 / −0.28 / 2.23 with ``"mse"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.qmath import channel_amax, mse_weight_amax, qbound, round_clamp

FINE_RANGES = ("mse", "max")


@dataclass
class CFWSSplit:
    """The two halves of a split kernel and the amax of each (``coarse`` is 1×1, ``coarse_amax`` = ``max|Wc|``)."""

    coarse: Tensor  # [O, I/g, 1, 1]
    fine: Tensor  # [O, I/g, 3, 3]
    coarse_amax: Tensor
    fine_amax: Tensor

    def coarse_3x3(self) -> Tensor:
        """The coarse part zero-padded back to 3×3 (``coarse_3x3() + fine == W``)."""
        return F.pad(self.coarse, [1, 1, 1, 1])


@torch.no_grad()
def cfws_split(weight: Tensor, num_bits: int = 8, per_channel: bool = True, fine_range: str = "mse") -> CFWSSplit:
    """Split a 3×3 kernel into its coarse centre (exact at ``num_bits``) and fine remainder; ``fine_range``: the
    fine part's amax, ``"mse"`` (clipped where that lowers its weight error) or ``"max"``; see the module doc."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"CFWS splits 3x3 conv kernels; got a weight of shape {tuple(weight.shape)}")
    if fine_range not in FINE_RANGES:
        raise ValueError(f"fine_range must be one of {FINE_RANGES}, got {fine_range!r}")
    bound = qbound(num_bits)
    centre = weight[:, :, 1:2, 1:2]
    c_amax = channel_amax(centre, per_channel)
    scale = torch.where(c_amax > 0, c_amax / bound, torch.ones_like(c_amax))
    coarse = round_clamp(centre / scale, -bound, bound) * scale
    fine = weight - F.pad(coarse, [1, 1, 1, 1])
    fine_amax = mse_weight_amax(fine, num_bits, per_channel) if fine_range == "mse" else channel_amax(fine, per_channel)
    return CFWSSplit(coarse=coarse, fine=fine, coarse_amax=c_amax.clone(), fine_amax=fine_amax.clone())


class CFWSConv2d(nn.Module):
    """A 3×3 conv computed as ``coarse(x) + fine(x)``: two ``QuantConv2d`` s (1×1 centre and 3×3 remainder).

    Build the structure with :meth:`from_conv` (depends only on the conv's shape and the bits, so a loader can
    rebuild it before loading a state dict); :meth:`load_split` fills in weights and weight amax. Both convs see
    the same input and share one input amax.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 w_bits: int = 8, a_bits: int = 8, per_channel: bool = True):
        super().__init__()
        from ..quant import backend  # the only door to pytorch-quantization

        self.in_channels, self.out_channels, self.stride, self.groups = in_channels, out_channels, stride, groups
        self.per_channel = per_channel
        w_axis, w_shape = (0, (out_channels, 1, 1, 1)) if per_channel else (None, ())
        coarse = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        fine = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=True)
        self.coarse = backend.QuantConv2d.from_float(
            coarse, backend.make_quantizer(a_bits), backend.make_quantizer(w_bits, w_axis, amax_shape=w_shape))
        self.fine = backend.QuantConv2d.from_float(
            fine, backend.make_quantizer(a_bits), backend.make_quantizer(w_bits, w_axis, amax_shape=w_shape))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, w_bits: int = 8, a_bits: int = 8, per_channel: bool = True) -> "CFWSConv2d":
        """The CFWS structure for a 3×3, padding-1 conv (no values loaded)."""
        if tuple(conv.kernel_size) != (3, 3) or tuple(conv.padding) != (1, 1) or tuple(conv.dilation) != (1, 1):
            raise ValueError(
                f"CFWS needs a 3x3 conv with padding 1 and dilation 1, got kernel_size={conv.kernel_size}, "
                f"padding={conv.padding}, dilation={conv.dilation}")
        if conv.stride[0] != conv.stride[1]:
            raise ValueError(f"CFWS needs a square stride, got {conv.stride}")
        return cls(conv.in_channels, conv.out_channels, conv.stride[0], conv.groups, w_bits, a_bits, per_channel)

    @torch.no_grad()
    def load_split(self, weight: Tensor, bias: Tensor | None, input_amax: Tensor | float | None = None,
                   fine_range: str = "mse") -> CFWSSplit:
        """Split ``weight`` (:func:`cfws_split` with ``fine_range``) and load both halves, their weight amax, the
        bias and (optionally) the input amax."""
        split = cfws_split(weight, self.coarse._weight_quantizer.num_bits, self.per_channel, fine_range)
        self.coarse.weight.copy_(split.coarse)
        self.fine.weight.copy_(split.fine)
        self.fine.bias.copy_(bias if bias is not None else torch.zeros_like(self.fine.bias))
        self.coarse._weight_quantizer.set_amax(split.coarse_amax)
        self.fine._weight_quantizer.set_amax(split.fine_amax)
        if input_amax is not None:
            for conv in (self.coarse, self.fine):
                conv._input_quantizer.set_amax(input_amax)
        return split

    def float_weight(self) -> Tensor:
        """The float 3×3 kernel this module stands for (``pad(coarse) + fine``)."""
        return F.pad(self.coarse.weight, [1, 1, 1, 1]) + self.fine.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.coarse(x) + self.fine(x)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, stride={self.stride}, groups={self.groups}, "
                f"per_channel={self.per_channel}, coarse=1x1+fine=3x3")

