"""The Lightning layer of qat-rep, imported as ``qat_rep.callbacks``.

Thin by design: every callback here delegates to the torch-only core in :mod:`qat_rep`.

* :class:`RepQATCallback` — QAT in any LightningModule (``Trainer(callbacks=[RepQATCallback()])``); works with
  ``pytorch_lightning`` and ``lightning.pytorch`` alike.
* :func:`load_qat_checkpoint` — ``load_from_checkpoint`` for a QAT checkpoint in a fresh process.
* :class:`DistillConfig` — logit and channel-wise feature distillation from an FP32 teacher.
"""

from . import _origin  # noqa: F401  (first: refuses to mix two checkouts)
from .checkpoint import load_qat_checkpoint
from .distill import DistillConfig
from .rep_qat import RepQATCallback

__all__ = ["RepQATCallback", "load_qat_checkpoint", "DistillConfig"]
