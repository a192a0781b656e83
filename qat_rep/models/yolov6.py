"""YOLOv6-N/S detectors (the QARep release) with upstream module names, so upstream state dicts load strictly.

The architecture is the one ``configs/qarepvgg/yolov6{n,s}_qa.py`` of meituan/YOLOv6 describes: an EfficientRep
backbone with ``fuse_P2`` and ``SimCSPSPPF``, the ``RepBiFPANNeck`` and the efficient decoupled head
(``EffiDeHead``, anchor-free, strides 8/16/32, no DFL). The top-level children are ``backbone``, ``neck`` and
``detect`` — upstream's state-dict prefixes. The rep block type is a parameter (``repvgg``, ``qarepvgg``,
``qarepvggv2``).

The network itself ends at the raw head outputs: one tensor per level, ``(B, 4·(reg_max+1) + num_classes, H, W)``
— box distances (left, top, right, bottom, in units of the level's stride) followed by class logits. Training
returns them as they are (the loss consumes them); evaluation decodes them into boxes and scores with
:func:`qat_rep.detection.boxes.decode_outputs`, which is *not* part of the quantized graph: a model with
``export=True`` returns the raw outputs in eval mode too, which is what an ONNX file holds (NMS runs after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import RepBlock, get_block_type
from ..detection.boxes import decode_outputs
from .efficientrep import ConvBlock, EfficientRep, RepBlockStack, scale_channels, scale_repeats
from .registry import register_model

__all__ = ["Transpose", "BiFusion", "RepBiFPANNeck", "EffiDeHead", "YOLOv6", "YOLOv6Cfg", "MODEL_CFGS"]

_BACKBONE_CHANNELS = (64, 128, 256, 512, 1024)
_BACKBONE_REPEATS = (1, 6, 12, 18, 6)
_NECK_CHANNELS = (256, 128, 128, 256, 256, 512)
_NECK_REPEATS = (12, 12, 12, 12)
_PROJ_BINS = 17  # upstream's Detect builds ``proj`` with its default reg_max=16 whatever the head's reg_max is;
# DFL (reg_max=16) uses the same 17 bins


class Transpose(nn.Module):
    """YOLOv6's upsampling layer: a 2×2, stride-2 transposed conv with bias (``upsample_transpose``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample_transpose(x)


class BiFusion(nn.Module):
    """YOLOv6's ``BiFusion``: upsample the coarse map, 1×1 the same-level map, downsample the fine map, concat,
    then 1×1 (``cv3``)."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int):
        super().__init__()
        self.cv1 = ConvBlock(in_channels[0], out_channels, 1, 1)
        self.cv2 = ConvBlock(in_channels[1], out_channels, 1, 1)
        self.cv3 = ConvBlock(out_channels * 3, out_channels, 1, 1)
        self.upsample = Transpose(out_channels, out_channels)
        self.downsample = ConvBlock(out_channels, out_channels, 3, 2)

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        x0 = self.upsample(x[0])
        x1 = self.cv1(x[1])
        x2 = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat((x0, x1, x2), 1))


class RepBiFPANNeck(nn.Module):
    """YOLOv6 v3's RepBiFPAN neck over four backbone maps (strides 4, 8, 16, 32) → three outputs (8, 16, 32).

    ``channels`` are the 11 scaled channel counts (5 backbone + 6 neck), ``repeats`` the 9 scaled repeats, as in
    upstream's ``build_network``.
    """

    def __init__(self, channels: Sequence[int], repeats: Sequence[int], block: type[RepBlock]):
        super().__init__()
        c = channels
        self.reduce_layer0 = ConvBlock(c[4], c[5], 1, 1)
        self.Bifusion0 = BiFusion((c[3], c[2]), c[5])
        self.Rep_p4 = RepBlockStack(c[5], c[5], repeats[5], block)
        self.reduce_layer1 = ConvBlock(c[5], c[6], 1, 1)
        self.Bifusion1 = BiFusion((c[2], c[1]), c[6])
        self.Rep_p3 = RepBlockStack(c[6], c[6], repeats[6], block)
        self.downsample2 = ConvBlock(c[6], c[7], 3, 2)
        self.Rep_n3 = RepBlockStack(c[6] + c[7], c[8], repeats[7], block)
        self.downsample1 = ConvBlock(c[8], c[9], 3, 2)
        self.Rep_n4 = RepBlockStack(c[5] + c[9], c[10], repeats[8], block)
        self.out_channels = (c[6], c[8], c[10])

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        x3, x2, x1, x0 = feats
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, x1, x2]))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1([fpn_out1, x2, x3]))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class _Projection(nn.Module):
    """DFL's fixed projection (upstream's ``proj_conv``: a 1×1 conv, key ``weight``), not an ``nn.Conv2d`` so that
    quantization leaves it alone — it has no learned weight and runs after the network when it runs at all."""

    def __init__(self, bins: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, bins, 1, 1), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight)


class EffiDeHead(nn.Module):
    """YOLOv6's efficient decoupled head (upstream class ``Detect``): per level a 1×1 ``stems`` conv, then a 3×3
    ``cls_convs`` → 1×1 ``cls_preds`` and a 3×3 ``reg_convs`` → 1×1 ``reg_preds`` branch (SiLU activations).

    ``forward`` returns the raw outputs, one ``cat([reg, cls_logits], 1)`` tensor per level. ``proj``/``proj_conv``
    are the DFL projection, kept (with upstream's 17 bins) so that upstream checkpoints load strictly.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, reg_max: int = 0, prior_prob: float = 1e-2):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.stems = nn.ModuleList(ConvBlock(c, c, 1, 1, act="silu") for c in in_channels)
        self.cls_convs = nn.ModuleList(ConvBlock(c, c, 3, 1, act="silu") for c in in_channels)
        self.reg_convs = nn.ModuleList(ConvBlock(c, c, 3, 1, act="silu") for c in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), 1) for c in in_channels)
        self.proj = nn.Parameter(torch.linspace(0, _PROJ_BINS - 1, _PROJ_BINS), requires_grad=False)
        self.proj_conv = _Projection(_PROJ_BINS)
        self.initialize_biases(prior_prob)

    @torch.no_grad()
    def initialize_biases(self, prior_prob: float = 1e-2) -> None:
        """Upstream's start: zero prediction weights, class bias at ``prior_prob``, box-distance bias 1."""
        for conv in self.cls_preds:
            conv.weight.zero_()
            conv.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
        for conv in self.reg_preds:
            conv.weight.zero_()
            conv.bias.fill_(1.0)
        self.proj.copy_(torch.linspace(0, self.proj.numel() - 1, self.proj.numel()))
        self.proj_conv.weight.copy_(self.proj.view(1, -1, 1, 1))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, x in enumerate(feats):
            x = self.stems[i](x)
            reg = self.reg_preds[i](self.reg_convs[i](x))
            cls = self.cls_preds[i](self.cls_convs[i](x))
            out.append(torch.cat([reg, cls], 1))
        return out


@dataclass(frozen=True)
class YOLOv6Cfg:
    """Depth and width multipliers of one YOLOv6 size."""

    depth: float
    width: float


MODEL_CFGS = {"n": YOLOv6Cfg(0.33, 0.25), "s": YOLOv6Cfg(0.33, 0.50)}


class YOLOv6(nn.Module):
    """A YOLOv6 detector: ``backbone`` (EfficientRep, fuse_P2, SimCSPSPPF) → ``neck`` (RepBiFPAN) → ``detect``.

    Training mode (and ``export=True``) returns the raw per-level head outputs; eval mode returns
    ``(boxes, scores)``: boxes ``(B, N, 4)`` as ``x1, y1, x2, y2`` in input pixels and per-class scores
    ``(B, N, num_classes)`` in [0, 1] over all ``N`` anchor points (NMS is :func:`qat_rep.detection.postprocess`).
    ``small_input=True`` makes the stem stride 1 (strides 4/8/16) for small canvases.
    """

    def __init__(self, cfg: YOLOv6Cfg, num_classes: int = 80, block: str | type[RepBlock] = "qarepvggv2",
                 in_channels: int = 3, small_input: bool = False, reg_max: int = 0):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if reg_max not in (0, 16):
            raise ValueError(f"reg_max must be 0 (no DFL, the QARep release) or 16 (DFL), got {reg_max!r}")
        blk = get_block_type(block)
        channels = scale_channels(_BACKBONE_CHANNELS + _NECK_CHANNELS, cfg.width)
        repeats = scale_repeats(_BACKBONE_REPEATS + _NECK_REPEATS, cfg.depth)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = (4, 8, 16) if small_input else (8, 16, 32)
        self.export = False
        self.backbone = EfficientRep(channels[:5], repeats[:5], block=blk, in_channels=in_channels,
                                     small_input=small_input, fuse_P2=True, cspsppf=True)
        self.neck = RepBiFPANNeck(channels, repeats, blk)
        self.detect = EffiDeHead(self.neck.out_channels, num_classes, reg_max=reg_max)
        for m in self.modules():  # upstream's initialize_weights
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03

    def forward_raw(self, x: Tensor) -> list[Tensor]:
        """The raw head outputs, one ``(B, 4·(reg_max+1) + num_classes, H, W)`` tensor per level."""
        return self.detect(self.neck(self.backbone(x)))

    def decode(self, raw: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Boxes (xyxy pixels) and class scores from raw outputs; runs outside the quantized graph."""
        return decode_outputs(raw, self.strides, self.num_classes, self.reg_max)

    def forward(self, x: Tensor) -> list[Tensor] | tuple[Tensor, Tensor]:
        raw = self.forward_raw(x)
        if self.training or self.export:
            return raw
        return self.decode(raw)


def _make(size: str):
    def fn(num_classes: int = 80, small_input: bool = False, block: str = "qarepvggv2", **kwargs: Any) -> YOLOv6:
        return YOLOv6(MODEL_CFGS[size], num_classes=num_classes, block=block, small_input=small_input, **kwargs)

    fn.__name__ = f"yolov6_{size}"
    fn.__doc__ = (f"YOLOv6-{size.upper()} detector ({MODEL_CFGS[size]}), upstream keys; block='repvgg' | 'qarepvgg' | "
                  "'qarepvggv2' (the QARep release's default).")
    return fn


for _size in MODEL_CFGS:
    register_model(_make(_size))
