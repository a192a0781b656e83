"""Shared test utilities (importable as ``helpers`` from any test module; fixtures live in ``conftest.py``).

- :func:`randomize_bn`: non-default BatchNorm statistics (default BN values hide fusion bugs).
- :func:`tiny_rep_net` / :func:`calib_batches`: the small re-parameterized network and the deterministic batches
  the PTQ tests quantize.
- :func:`prepared_a0`: an A0 prepared for QAT, calibrated and put in one phase of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qat_rep import create_model
from qat_rep.blocks import RepVGGBlock
from qat_rep.quant import QuantConfig, Schedule, apply_schedule, calibrate, prepare


@dataclass(frozen=True)
class BNRanges:
    """Uniform ``(low, high)`` ranges for :func:`randomize_bn`; ``bias=None`` leaves the BN bias alone."""

    mean: tuple[float, float] = (-0.5, 0.5)
    var: tuple[float, float] = (0.2, 2.0)
    weight: tuple[float, float] = (0.5, 1.5)
    bias: tuple[float, float] | None = None


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(n).uniform_(bounds[0], bounds[1], generator=generator)


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator | None = None, min_var: float = 1e-3, *,
                 ranges: BNRanges | None = None) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters: default BN values hide fusion bugs.

    By default mean ~ N(0, 0.5²), var ~ ``min_var`` + U(0, 2), weight ~ N(0, 1), bias ~ N(0, 0.5²); with ``ranges``
    each is uniform in its range instead (drawn per BN in the order mean, var, weight, bias). ``generator=None``
    draws from the global RNG.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if ranges is not None:
                m.running_mean.copy_(_uniform(n, ranges.mean, generator))
                m.running_var.copy_(_uniform(n, ranges.var, generator))
                if m.affine:
                    m.weight.copy_(_uniform(n, ranges.weight, generator))
                    if ranges.bias is not None:
                        m.bias.copy_(_uniform(n, ranges.bias, generator))
                continue
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(min_var + torch.rand(n, generator=generator) * 2.0)
            if m.affine:
                m.weight.copy_(torch.randn(n, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model


def tiny_rep_net(block: type = RepVGGBlock, seed: int = 0, bn: BNRanges = BNRanges()) -> nn.Sequential:
    """Four rep blocks (strides 2, 1, 2, 1; 3 → 8 → 16 channels) and a 4-class classifier, BN randomized by ``bn``
    from ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    m = nn.Sequential(block(3, 8, stride=2), block(8, 8), block(8, 16, stride=2), block(16, 16),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    return randomize_bn(m, ranges=bn).eval()


def calib_batches(n: int = 64, bs: int = 16, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor]]:
    """``n`` standard-normal images ``3 × size × size`` from seed ``seed``, as ``(x,)`` batches of ``bs``."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return [(x[i:i + bs],) for i in range(0, n, bs)]


def prepared_a0(arch: str, phase: str = "qat", config: QuantConfig | None = None) -> tuple[nn.Module, torch.Tensor]:
    """``arch`` (small input, 10 classes) prepared with ``config``, calibrated on the returned 4×3×16×16 batch and
    put in ``phase`` (``qat``, ``frozen`` or ``fused``) at the first step, in train mode; from
    ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=True)
    x = torch.randn(4, 3, 16, 16)
    prepare(model, QuantConfig() if config is None else config)
    calibrate(model, [x])
    if phase == "fused":
        apply_schedule(model, Schedule.fused(), 0, 0)
    elif phase == "frozen":
        apply_schedule(model, Schedule.all_at_once(freeze_at=0), 0, 0)
    return model.train(), x


class PicklePayload:
    """Unpickling this runs ``os.system('touch <marker>')``: what a crafted checkpoint or data file would carry.

    A test writes it into a file, hands the file to a loader and asserts that ``marker`` was never created.
    """

    def __init__(self, marker: object) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)
