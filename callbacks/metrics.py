"""Fake-quant and FP32-equivalent accuracy side by side, with torchmetrics.

Contract: when ``validation_step`` / ``test_step`` returns a mapping with ``"logits"`` (``[N, C]``) and ``"target"``
(``[N]`` class indices), :class:`~qat_rep.callbacks.RepQATCallback` updates a fake-quant accuracy from those logits
and an FP32-equivalent accuracy from the same forward re-run with every quantizer disabled (rep blocks then run
their float equivalent kernel, which equals the multi-branch float model in eval mode). Anything else is ignored.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from qat_rep.quant.state import quantizers_disabled

__all__ = ["quantizers_disabled", "SideBySideAccuracy", "is_logits_output"]


class SideBySideAccuracy:
    """Two ``MulticlassAccuracy`` (micro) metrics, created at the first update from the number of classes."""

    def __init__(self) -> None:
        self.fakequant: MulticlassAccuracy | None = None
        self.fp32: MulticlassAccuracy | None = None

    def update(self, fakequant_logits: Tensor, target: Tensor, fp32_logits: Tensor | None) -> None:
        if self.fakequant is None:
            n = int(fakequant_logits.shape[1])
            self.fakequant = MulticlassAccuracy(num_classes=n, average="micro").to(fakequant_logits.device)
            self.fp32 = MulticlassAccuracy(num_classes=n, average="micro").to(fakequant_logits.device)
        self.fakequant.update(fakequant_logits.detach(), target)
        if fp32_logits is not None:
            self.fp32.update(fp32_logits.detach(), target)

    def update_from_step(self, model: nn.Module, outputs: object, recorded_output: object,
                         rerun: Callable[[], Tensor] | None) -> None:
        """Update from a step's outputs when they follow the contract; ``rerun()`` repeats the step's recorded
        forward, run here with every quantizer disabled for the FP32-equivalent logits (when its output had the
        logits' shape)."""
        if not is_logits_output(outputs):
            return
        fp32 = None
        if rerun is not None and isinstance(recorded_output, Tensor) and \
                recorded_output.shape == outputs["logits"].shape:
            with torch.no_grad(), quantizers_disabled(model):
                fp32 = rerun()
        self.update(outputs["logits"], outputs["target"], fp32)

    def log(self, module: nn.Module, prefix: str) -> dict[str, float]:
        """Log ``qat/<prefix>_acc_*`` through ``module.log`` (rank zero only) and return them, keyed without
        ``qat/``."""
        values = {f"{prefix}_{k}": v for k, v in self.compute().items()}
        for name, value in values.items():
            module.log(f"qat/{name}", value, rank_zero_only=True)
        return values

    def compute(self) -> dict[str, float]:
        """``{"acc_fakequant": ..., "acc_fp32": ...}`` synced across ranks (torchmetrics); empty if never updated."""
        out: dict[str, float] = {}
        if self.fakequant is not None and self.fakequant.update_count:
            out["acc_fakequant"] = float(self.fakequant.compute())
        if self.fp32 is not None and self.fp32.update_count:
            out["acc_fp32"] = float(self.fp32.compute())
        return out

    def reset(self) -> None:
        for m in (self.fakequant, self.fp32):
            if m is not None:
                m.reset()


def is_logits_output(outputs: object) -> bool:
    """True when a step output follows the metrics contract (a mapping with tensor ``logits`` [N, C] and ``target``)."""
    if not isinstance(outputs, dict):
        return False
    logits, target = outputs.get("logits"), outputs.get("target")
    return isinstance(logits, Tensor) and logits.dim() == 2 and isinstance(target, Tensor) and \
        target.shape[:1] == logits.shape[:1] and not torch.is_floating_point(target)
