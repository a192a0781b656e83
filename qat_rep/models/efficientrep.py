"""YOLOv6-style EfficientRep backbone built from any rep block type, with YOLOv6's module names.

``stem`` (rep block, stride 2) → ``ERBlock_2`` … ``ERBlock_5``, each ``[rep block stride 2, RepBlock(n)]``;
``ERBlock_5`` ends in ``SimSPPF`` (or, with ``cspsppf=True``, YOLOv6's ``SimCSPSPPF`` with upstream keys). The forward
returns the feature maps of ERBlock_3, _4, _5 (strides 8, 16, 32), preceded by ERBlock_2's (stride 4) with
``fuse_P2=True`` — the two options the QARep detectors (``configs/qarepvgg/yolov6*_qa.py``) switch on.
Sizes follow YOLOv6's n/s/m multipliers (m is built as EfficientRep here; YOLOv6 v3 switched m to a CSP backbone).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import RepBlock, get_block_type
from .registry import register_model

__all__ = ["ConvModule", "ConvBNReLU", "ConvBlock", "RepBlockStack", "SimSPPF", "SimCSPSPPF", "EfficientRep",
           "scale_channels", "scale_repeats", "efficientrep_channels"]

_BASE_CHANNELS = (64, 128, 256, 512, 1024)
_BASE_REPEATS = (1, 6, 12, 18, 6)
_SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.60, 0.75)}


_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class ConvModule(nn.Module):
    """YOLOv6's ``ConvModule``: ``conv`` (no bias) → ``bn`` → ``act`` (``"relu"`` or ``"silu"``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 act: str = "relu"):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; valid: {', '.join(_ACTIVATIONS)}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = _ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvBNReLU(ConvModule):
    """A :class:`ConvModule` with ReLU (keys ``conv.*``, ``bn.*``), the layer of :class:`SimSPPF`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, act="relu")


class ConvBlock(nn.Module):
    """YOLOv6's ``ConvBNReLU`` / ``ConvBNSiLU``: a :class:`ConvModule` held as ``block`` (keys ``block.conv.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 act: str = "relu"):
        super().__init__()
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class RepBlockStack(nn.Module):
    """YOLOv6's ``RepBlock``: ``conv1`` then ``block`` (a Sequential of n − 1 rep blocks, or None)."""

    def __init__(self, in_channels: int, out_channels: int, n: int, block: type[RepBlock]):
        super().__init__()
        self.conv1 = block(in_channels, out_channels)
        self.block = nn.Sequential(*(block(out_channels, out_channels) for _ in range(n - 1))) if n > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.block(x) if self.block is not None else x


class SimSPPF(nn.Module):
    """Simplified SPPF: ``cv1`` (1×1) → three chained 5×5 max-pools → concat → ``cv2`` (1×1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNReLU(in_channels, hidden)
        self.cv2 = ConvBNReLU(hidden * 4, out_channels)
        self.m = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class _CSPSPPFModule(nn.Module):
    """YOLOv6's ``CSPSPPFModule`` (ReLU): a CSP split around an SPPF (three chained 5×5 max-pools)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5):
        super().__init__()
        hidden = int(out_channels * e)
        self.cv1 = ConvBlock(in_channels, hidden, 1, 1)
        self.cv2 = ConvBlock(in_channels, hidden, 1, 1)
        self.cv3 = ConvBlock(hidden, hidden, 3, 1)
        self.cv4 = ConvBlock(hidden, hidden, 1, 1)
        self.m = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.cv5 = ConvBlock(4 * hidden, hidden, 1, 1)
        self.cv6 = ConvBlock(hidden, hidden, 3, 1)
        self.cv7 = ConvBlock(2 * hidden, out_channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat([x1, y1, y2, self.m(y2)], 1)))
        return self.cv7(torch.cat((y0, y3), 1))


class SimCSPSPPF(nn.Module):
    """YOLOv6's ``SimCSPSPPF``: the CSP-SPPF held as ``cspsppf`` (keys ``cspsppf.cv1.block.conv.weight`` …)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5):
        super().__init__()
        self.cspsppf = _CSPSPPFModule(in_channels, out_channels, kernel_size, e)

    def forward(self, x: Tensor) -> Tensor:
        return self.cspsppf(x)


class EfficientRep(nn.Module):
    """EfficientRep backbone; ``forward`` returns a tuple of feature maps (strides 8, 16, 32; and 4 first with
    ``fuse_P2``). ``cspsppf=True`` ends ERBlock_5 in :class:`SimCSPSPPF` instead of :class:`SimSPPF`."""

    def __init__(self, channels: tuple[int, ...], repeats: tuple[int, ...], block: str | type[RepBlock] = "repvgg",
                 in_channels: int = 3, small_input: bool = False, fuse_P2: bool = False, cspsppf: bool = False):
        super().__init__()
        blk = get_block_type(block)
        self.fuse_P2 = bool(fuse_P2)
        self.out_channels = tuple(channels[1 if fuse_P2 else 2:5])
        self.stem = blk(in_channels, channels[0], stride=1 if small_input else 2)
        for i in range(1, 5):
            layers: list[nn.Module] = [
                blk(channels[i - 1], channels[i], stride=2),
                RepBlockStack(channels[i], channels[i], repeats[i], blk),
            ]
            if i == 4:
                merge = SimCSPSPPF if cspsppf else SimSPPF
                layers.append(merge(channels[4], channels[4], kernel_size=5))
            setattr(self, f"ERBlock_{i + 1}", nn.Sequential(*layers))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.stem(x)
        c2 = self.ERBlock_2(x)
        c3 = self.ERBlock_3(c2)
        c4 = self.ERBlock_4(c3)
        c5 = self.ERBlock_5(c4)
        return (c2, c3, c4, c5) if self.fuse_P2 else (c3, c4, c5)


def scale_channels(channels: tuple[int, ...], width: float) -> tuple[int, ...]:
    """YOLOv6's width scaling: ``ceil(c·w/8)·8``."""
    return tuple(math.ceil(c * width / 8) * 8 for c in channels)


def scale_repeats(repeats: tuple[int, ...], depth: float) -> tuple[int, ...]:
    """YOLOv6's depth scaling: ``max(round(n·d), 1)`` for n > 1 (a single layer stays single)."""
    return tuple(max(round(n * depth), 1) if n > 1 else n for n in repeats)


def efficientrep_channels(size: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The backbone's channels and repeats for YOLOv6 size ``n``/``s``/``m``."""
    depth, width = _SIZES[size]
    return scale_channels(_BASE_CHANNELS, width), scale_repeats(_BASE_REPEATS, depth)


def _make(size: str):
    def fn(num_classes: int = 1000, small_input: bool = False, block: str = "repvgg", **kwargs: Any) -> EfficientRep:
        # A backbone has no classifier: num_classes is accepted for create_model's uniform signature and unused.
        channels, repeats = efficientrep_channels(size)
        return EfficientRep(channels, repeats, block=block, small_input=small_input, **kwargs)

    fn.__name__ = f"efficientrep_{size}"
    fn.__doc__ = f"YOLOv6-{size} EfficientRep backbone (returns 3 feature maps; num_classes is unused)."
    return fn


for _size in _SIZES:
    register_model(_make(_size))
