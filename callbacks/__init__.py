"""The Lightning layer of qat-rep, imported as ``qat_rep.callbacks``.

Thin by design: every callback here delegates to the torch-only core in :mod:`qat_rep`.

* :class:`RepQATCallback` — QAT in any LightningModule (``Trainer(callbacks=[RepQATCallback()])``); works with
  ``pytorch_lightning`` and ``lightning.pytorch`` alike.
* :func:`load_qat_checkpoint` — ``load_from_checkpoint`` for a QAT checkpoint in a fresh process.
* :class:`DistillConfig` — logit and channel-wise feature distillation from an FP32 teacher.
"""

from .checkpoint import load_qat_checkpoint, weights_only_errors
from .distill import DistillConfig, channel_kd_loss, logit_kd_loss
from .metrics import quantizers_disabled
from .rep_qat import STATE_KEY, RepQATCallback, config_mismatch, read_callback_state

__all__ = [
    "RepQATCallback",
    "load_qat_checkpoint",
    "weights_only_errors",
    "DistillConfig",
    "logit_kd_loss",
    "channel_kd_loss",
    "quantizers_disabled",
    "config_mismatch",
    "read_callback_state",
    "STATE_KEY",
]
