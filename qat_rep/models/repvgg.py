"""RepVGG and QARepVGG classification families (A0–B3, g2/g4), module names as in the official repository."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..blocks import RepBlock, get_block_type
from .registry import register_model

# Layers 2, 4, …, 26 counted over the whole net (stage0 is layer 0) take the group conv in the g2/g4 variants.
_GROUPWISE_LAYERS = tuple(range(2, 27, 2))


@dataclass(frozen=True)
class RepVGGCfg:
    """Depths of stages 1–4, width multipliers of [64, 128, 256, 512], groups of the odd group-wise layers."""

    depths: tuple[int, int, int, int]
    widths: tuple[float, float, float, float]
    groups: int = 1
    group_layers: tuple[int, ...] = field(default=_GROUPWISE_LAYERS)


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
MODEL_CFGS: dict[str, RepVGGCfg] = {
    "a0": RepVGGCfg(_A, (0.75, 0.75, 0.75, 2.5)),
    "a1": RepVGGCfg(_A, (1, 1, 1, 2.5)),
    "a2": RepVGGCfg(_A, (1.5, 1.5, 1.5, 2.75)),
    "b0": RepVGGCfg(_B, (1, 1, 1, 2.5)),
    "b1": RepVGGCfg(_B, (2, 2, 2, 4)),
    "b1g2": RepVGGCfg(_B, (2, 2, 2, 4), groups=2),
    "b1g4": RepVGGCfg(_B, (2, 2, 2, 4), groups=4),
    "b2": RepVGGCfg(_B, (2.5, 2.5, 2.5, 5)),
    "b2g4": RepVGGCfg(_B, (2.5, 2.5, 2.5, 5), groups=4),
    "b3": RepVGGCfg(_B, (3, 3, 3, 5)),
}


class RepVGG(nn.Module):
    """``stage0`` (one block, stride 2), ``stage1``–``stage4`` (ModuleLists of blocks), ``gap``, ``linear``.

    ``block_kwargs`` go to every block (e.g. ``post_bn=False`` for a QARep model built fused with its post-BN folded).
    """

    def __init__(self, cfg: RepVGGCfg, block: str | type[RepBlock] = "repvgg", num_classes: int = 1000,
                 small_input: bool = False, deploy: bool = False, use_se: bool = False, **block_kwargs: Any):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        block_fn = get_block_type(block)
        self.cfg = cfg
        widths = [int(base * m) for base, m in zip((64, 128, 256, 512), cfg.widths)]
        in_planes = min(64, int(64 * cfg.widths[0]))
        self.stage0 = block_fn(3, in_planes, stride=1 if small_input else 2, deploy=deploy, use_se=use_se,
                               **block_kwargs)
        layer = 1
        stages = []
        for planes, depth in zip(widths, cfg.depths):
            blocks = []
            for i in range(depth):
                groups = cfg.groups if layer in cfg.group_layers else 1
                blocks.append(block_fn(in_planes, planes, stride=2 if i == 0 else 1, groups=groups, deploy=deploy,
                                       use_se=use_se, **block_kwargs))
                in_planes = planes
                layer += 1
            stages.append(nn.ModuleList(blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stage0(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            for blk in stage:
                x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.gap(self.forward_features(x)).flatten(1)
        return self.linear(x)


def _make(variant: str, block: str):
    def fn(num_classes: int = 1000, small_input: bool = False, **kwargs: Any) -> RepVGG:
        return RepVGG(MODEL_CFGS[variant], block=block, num_classes=num_classes, small_input=small_input, **kwargs)

    fn.__name__ = f"{block}_{variant}"
    fn.__doc__ = f"{'QARepVGG' if block == 'qarepvgg' else 'RepVGG'}-{variant.upper()} ({MODEL_CFGS[variant]})."
    return fn


for _variant in MODEL_CFGS:
    for _block in ("repvgg", "qarepvgg"):
        register_model(_make(_variant, _block))
