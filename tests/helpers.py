"""Shared test utilities (importable as ``helpers`` from any test module)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_bn(model: nn.Module, generator: torch.Generator | None = None, min_var: float = 1e-3) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters: default BN values hide fusion bugs."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(min_var + torch.rand(n, generator=generator) * 2.0)
            if m.affine:
                m.weight.copy_(torch.randn(n, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return model


class PicklePayload:
    """Unpickling this runs ``os.system('touch <marker>')``: what a crafted checkpoint or data file would carry.

    A test writes it into a file, hands the file to a loader and asserts that ``marker`` was never created.
    """

    def __init__(self, marker: object) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)
