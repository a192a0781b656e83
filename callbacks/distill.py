"""Knowledge distillation from an FP32 teacher during QAT, without touching the user's ``training_step``.

YOLOv6 needed distillation to recover accuracy in QAT: logit KD with a temperature and channel-wise
feature distillation (KL of the per-channel spatial softmax). Here both are added to the gradient, not to the
returned loss: a forward hook on the student records its inputs, runs the teacher on the same inputs, and registers
a gradient hook on the student's output (and on each chosen feature map) that adds ``d(weight · KD)/d(output)``.
By the chain rule that is exactly the gradient of ``loss + weight · KD``; it needs no second backward (so it works
under DDP), no change to the module's ``forward`` or ``training_step``, and no in-place edit of the loss tensor.
The KD terms are logged as ``qat/kd_logit`` and ``qat/kd_feature``; the ``loss`` the module logs excludes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillConfig", "logit_kd_loss", "channel_kd_loss", "Distiller", "kd_grad_scale", "find_submodule"]


@dataclass
class DistillConfig:
    """How to distil from the teacher (all JSON-safe, so LightningCLI can fill it).

    Args:
        temperature: softmax temperature of the logit KD (the loss is scaled by ``T²`` as in Hinton et al.).
        logit_weight: weight of the logit KD term; 0 disables it (e.g. for a backbone returning feature maps).
        features: ``{student module name: teacher module name}`` — feature maps distilled channel-wise. Student
            names are relative to the LightningModule (``"model.stage2.0"``), teacher names to the teacher.
        feature_weight: weight of the channel-wise feature term (YOLOv6 uses 10).
        feature_temperature: temperature of the per-channel spatial softmax.
        student: name of the submodule (relative to the LightningModule) whose output is compared with the teacher's
            output; ``""`` means the LightningModule itself (its ``forward``). The teacher is called with the same
            positional and keyword arguments.
    """

    temperature: float = 4.0
    logit_weight: float = 1.0
    features: dict[str, str] = field(default_factory=dict)
    feature_weight: float = 10.0
    feature_temperature: float = 1.0
    student: str = ""

    def __post_init__(self) -> None:
        for name in ("temperature", "feature_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DistillConfig.{name} must be a positive number, got {value!r}")
        for name in ("logit_weight", "feature_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DistillConfig.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.features, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.features.items()
        ):
            raise TypeError(
                "DistillConfig.features must map student module names to teacher module names (str -> str), "
                f"got {self.features!r}"
            )
        if not isinstance(self.student, str):
            raise TypeError(f"DistillConfig.student must be a module name (str), got {self.student!r}")
        if self.logit_weight == 0 and (not self.features or self.feature_weight == 0):
            raise ValueError(
                "DistillConfig distils nothing: logit_weight is 0 and no features (with feature_weight > 0) are set"
            )


def logit_kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch (classes on dim 1)."""
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * t * t


def channel_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021; YOLOv6 QAT): per channel, KL between the spatial softmax
    of the teacher and of the student map, ``τ²``-scaled and averaged over batch × channels."""
    if student.dim() < 3:
        raise ValueError(f"channel-wise distillation needs [N, C, ...] feature maps, got shape {tuple(student.shape)}")
    n, c = student.shape[:2]
    s = student.float().reshape(n, c, -1) / temperature
    t = teacher.float().reshape(n, c, -1) / temperature
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(dim=-1)
    return kl.mean() * temperature * temperature


def _kd_grad_hook(grad: Tensor, *, value: Tensor, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  weight: float, scale: Callable[[], float], fired: list[bool]) -> Tensor:
    fired[0] = True
    with torch.enable_grad():
        s = value.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(s, target) * weight, s)
    return grad + g.to(grad.dtype) * scale()


class Distiller:
    """Hooks that add teacher-KD gradients to a student; built by :class:`~qat_rep.callbacks.RepQATCallback`.

    ``attach(root)`` installs the hooks on the LightningModule ``root``; ``active`` gates them (on only inside a
    training batch with gradients enabled); ``detach()`` removes them. ``grad_scale`` returns the factor applied
    to the KD gradient (``1 / accumulate_grad_batches``, times the AMP loss scale when one is used).
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, grad_scale: Callable[[], float] = lambda: 1.0):
        self.teacher = teacher
        self.config = config
        self.grad_scale = grad_scale
        self.active = False
        self._handles: list[Any] = []
        self._student_feats: dict[str, Tensor] = {}
        self._teacher_feats: dict[str, Tensor] = {}
        self._fired: list[list[bool]] = []
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self, root: nn.Module) -> None:
        """Install the hooks; validates every module name first (a typo is a ``ValueError`` naming it)."""
        self.detach()
        cfg = self.config
        student = find_submodule(root, cfg.student, "student module (DistillConfig.student)")
        s_feats = {s: find_submodule(root, s, "student feature module") for s in cfg.features}
        t_feats = {t: find_submodule(self.teacher, t, "teacher feature module") for t in cfg.features.values()}
        for name, mod in s_feats.items():
            self._handles.append(mod.register_forward_hook(functools.partial(self._keep, self._student_feats, name)))
        for name, mod in t_feats.items():
            self._handles.append(mod.register_forward_hook(functools.partial(self._keep, self._teacher_feats, name)))
        self._handles.append(student.register_forward_hook(self._on_student_forward, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._student_feats.clear()
        self._teacher_feats.clear()

    def begin_batch(self) -> None:
        self.active = True
        self._fired = []
        self.last_losses = {}
        self._student_feats.clear()
        self._teacher_feats.clear()

    def end_batch(self) -> None:
        """Close the batch; raises if a KD gradient was registered but never reached (output not in the loss)."""
        self.active = False
        self._student_feats.clear()
        self._teacher_feats.clear()
        if self._fired and not all(f[0] for f in self._fired):
            raise RuntimeError(
                "teacher distillation: the student's output (or a distilled feature map) received no gradient in "
                "this training step, so the KD term was not applied. Make the loss depend on the output of "
                f"DistillConfig.student={self.config.student!r} (\"\" = the LightningModule's forward)"
            )

    def _keep(self, store: dict[str, Tensor], name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            store[name] = output

    def _on_student_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (self.active and module.training and torch.is_grad_enabled()):
            return
        cfg = self.config
        self._teacher_feats.clear()
        with torch.no_grad():
            t_out = self.teacher(*args, **kwargs)
        if cfg.logit_weight > 0:
            if not isinstance(output, Tensor) or not isinstance(t_out, Tensor):
                raise TypeError(
                    "logit distillation needs the student and the teacher to return one tensor (got "
                    f"{type(output).__name__} and {type(t_out).__name__}); set DistillConfig(logit_weight=0) and "
                    "distil feature maps with DistillConfig(features={...}), or point DistillConfig.student at the "
                    "submodule that returns the logits"
                )
            _check_shapes("output", output, t_out)
            self._add(output, t_out.detach(), functools.partial(logit_kd_loss, temperature=cfg.temperature),
                      cfg.logit_weight, "kd_logit")
        if cfg.features and cfg.feature_weight > 0:
            total = 0.0
            for s_name, t_name in cfg.features.items():
                s_feat, t_feat = self._student_feats.get(s_name), self._teacher_feats.get(t_name)
                if not isinstance(s_feat, Tensor) or not isinstance(t_feat, Tensor):
                    raise RuntimeError(
                        f"feature distillation: no tensor output recorded for student module {s_name!r} or teacher "
                        f"module {t_name!r} during this forward; name modules that run in the forward and return "
                        "one tensor"
                    )
                _check_shapes(f"feature {s_name!r} / {t_name!r}", s_feat, t_feat)
                total += self._add(s_feat, t_feat.detach(),
                                   functools.partial(channel_kd_loss, temperature=cfg.feature_temperature),
                                   cfg.feature_weight, None)
            self.last_losses["kd_feature"] = total

    def _add(self, value: Tensor, target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], weight: float,
             log_name: str | None) -> float:
        with torch.no_grad():
            loss_value = float(loss_fn(value.detach(), target))
        if log_name is not None:
            self.last_losses[log_name] = loss_value
        if value.requires_grad:
            fired = [False]
            self._fired.append(fired)
            value.register_hook(functools.partial(
                _kd_grad_hook, value=value.detach(), target=target, loss_fn=loss_fn, weight=float(weight),
                scale=self.grad_scale, fired=fired))
        return loss_value


def kd_grad_scale(trainer: Any) -> float:
    """The factor the KD gradient needs to match the user's loss gradient: ``1 / accumulate_grad_batches``, times
    the AMP loss scale when a grad scaler is active."""
    scale = 1.0 / max(1, int(trainer.accumulate_grad_batches))
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        scale *= float(scaler.get_scale())
    return scale


def find_submodule(root: nn.Module, name: str, what: str) -> nn.Module:
    """``root.get_submodule(name)`` (``root`` for ``""``); a missing one is a ``ValueError`` naming ``what``."""
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in root.named_children()]
        raise ValueError(
            f"{what} {name!r} does not exist in {type(root).__name__}; top-level children are {children}"
        ) from None


def _check_shapes(what: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher distillation: {what} shape {tuple(teacher.shape)} of the teacher does not match the student's "
            f"{tuple(student.shape)}; use a teacher with the same output (e.g. the FP32 model the QAT run starts from)"
        )
