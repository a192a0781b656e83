"""The constructor arguments of :class:`~qat_rep.callbacks.RepQATCallback`, validated once where they arrive, and
the Trainer/module combinations it refuses at setup."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from qat_rep.export.onnx_export import TARGETS as ONNX_TARGETS
from qat_rep.quant import QuantConfig, Schedule

from ._compat import is_instance_of_any
from .distill import DistillConfig

#: the key of the callback's state in a Lightning checkpoint's ``"callbacks"`` dict (one per Trainer)
STATE_KEY = "RepQATCallback"


def check_int(name: str, value: Any, low: int, meaning: str) -> None:
    """``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) ``>= low``; ``meaning`` explains the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} ({meaning}), got {value!r}")


def _coerce(value: Any, cls: type, name: str, hint: str) -> Any:
    """``value`` as a ``cls`` (its dict is accepted too), else a ``TypeError`` naming the argument."""
    if isinstance(value, Mapping):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {hint} (or its dict), got {type(value).__name__}")
    return value


@dataclass
class RepQATOptions:
    """The arguments of :class:`~qat_rep.callbacks.RepQATCallback`; dicts become their dataclasses.

    Args:
        config: what to quantize and how (:class:`qat_rep.quant.QuantConfig` or its dict); default W8A8 per channel.
        schedule: when each rep block is ``float`` / ``qat`` / ``frozen`` / ``fused`` (:class:`qat_rep.quant.Schedule`);
            default :meth:`Schedule.fused() <qat_rep.quant.Schedule.fused>`: every block collapsed into one
            trainable conv from the start (fuse-first's cost; equivalent-kernel QAT,
            ``Schedule.all_at_once()``, measured no more accurate in ``benchmarks/qat_accuracy.py``).
        calib_batches: how many of the first training steps calibrate (overrides ``config.calib_batches``).
        calib_forward: explicit override ``fn(module, batch)``: calibrate at train start on the first training
            batches through it, in eval mode (module level, to be picklable for ``ddp_spawn``).
        teacher, distill: an FP32 model to distil from (not a submodule) and a :class:`DistillConfig`.
        export_dir: where ``on_fit_end`` (global rank 0) runs :func:`qat_rep.export.deploy`: ``model.safetensors``
            + ``qat_rep.json`` (one format; a model without a registry name is saved with its class),
            ``model_int8.onnx`` and ``onnx_verify.json``.
        export_module: ``"auto"`` (the ``qat_rep.create_model`` submodule if the steps call it, else the outermost
            called module holding every quantized layer), a submodule name, or ``""`` for the LightningModule.
        compare_fp32, progress: also log the FP32-equivalent accuracy; print the fit-end report (rank 0).
        onnx: QDQ layout of the fit-end ONNX file (``"onnxruntime"``, ``"tensorrt"``) or ``None`` for none.
        verify_batches: validation batches (training ones without validation) whose recorded calls are replayed
            in ONNX Runtime next to the fake-quant model; ``0`` skips the check.
    """

    config: QuantConfig | Mapping[str, Any] | None = None
    schedule: Schedule | Mapping[str, Any] | None = None
    calib_batches: int | None = None
    calib_forward: Callable[[nn.Module, Any], Any] | None = None
    teacher: nn.Module | None = None
    distill: DistillConfig | Mapping[str, Any] | None = None
    export_dir: str | os.PathLike[str] | None = None
    export_module: str = "auto"
    compare_fp32: bool = True
    progress: bool = True
    onnx: str | None = "onnxruntime"
    verify_batches: int = 8

    def __post_init__(self) -> None:
        self.config = _coerce(QuantConfig() if self.config is None else self.config, QuantConfig, "config",
                              "qat_rep.quant.QuantConfig")
        if self.calib_batches is not None:
            check_int("calib_batches", self.calib_batches, 1, "training steps that calibrate")
            self.config = dataclasses.replace(self.config, calib_batches=self.calib_batches)
        self.schedule = _coerce(Schedule.fused() if self.schedule is None else self.schedule, Schedule,
                                "schedule", "qat_rep.quant.Schedule (e.g. Schedule.shallow_to_deep())")
        if self.calib_forward is not None and not callable(self.calib_forward):
            raise TypeError(f"calib_forward must be a callable (module, batch) -> output, got {self.calib_forward!r}")
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module (the FP32 model), got {type(self.teacher).__name__}")
        if self.distill is not None:
            self.distill = _coerce(self.distill, DistillConfig, "distill", "DistillConfig")
            if self.teacher is None:
                raise ValueError("distill=... needs a teacher: RepQATCallback(teacher=fp32_model, "
                                 "distill=DistillConfig())")
        elif self.teacher is not None:
            self.distill = DistillConfig()
        if self.export_dir is not None:
            if not isinstance(self.export_dir, (str, os.PathLike)):
                raise TypeError(f"export_dir must be a path (str or os.PathLike) or None, got "
                                f"{type(self.export_dir).__name__}")
            self.export_dir = Path(self.export_dir)
        if not isinstance(self.export_module, str):
            raise TypeError(f"export_module must be a module name, '' (the LightningModule) or 'auto', "
                            f"got {self.export_module!r}")
        for name in ("compare_fp32", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.onnx is not None and self.onnx not in ONNX_TARGETS:
            raise ValueError(f"onnx must be one of {', '.join(map(repr, ONNX_TARGETS))} (the QDQ layout of the "
                             f"fit-end ONNX file) or None for no ONNX file, got {self.onnx!r}")
        if self.onnx == "tensorrt" and self.config.unsigned_activations:
            raise ValueError("onnx='tensorrt' cannot carry QuantConfig(unsigned_activations=True): TensorRT has no "
                             "UINT8 activations. Use onnx='onnxruntime', or a config without unsigned_activations")
        check_int("verify_batches", self.verify_batches, 0, "0: do not run the ONNX file in ONNX Runtime")


def check_fit_setup(trainer: Any, pl_module: nn.Module, teacher: nn.Module | None) -> None:
    """Refuse a Trainer or module the callback cannot work with, before any surgery."""
    if any(is_instance_of_any(cb, "callbacks.ModelPruning") for cb in trainer.callbacks):
        raise ValueError("RepQATCallback cannot be combined with ModelPruning in one Trainer: pruning masks act "
                         "through forward pre-hooks of each conv, which equivalent-kernel QAT never calls. Prune "
                         "first (ModelPruning(make_pruning_permanent=True)), then run QAT in a second Trainer")
    if teacher is not None and any(m is teacher for m in pl_module.modules()):
        raise ValueError("the teacher is a submodule of the LightningModule: it would be quantized and saved with "
                         "the student. Pass a separate FP32 copy, e.g. teacher=copy.deepcopy(module.model).eval()")


def allow_unused_parameters(trainer: Any, schedule: Schedule) -> bool:
    """Under a DDP strategy, let DDP tolerate the parameters that frozen/fused blocks leave without gradient
    (``find_unused_parameters=True``) before the strategy wraps the model; returns whether it was switched on.

    A strategy built with ``find_unused_parameters=False`` explicitly is refused with the fix: DDP would fail at
    the first step after a block freezes or fuses.
    """
    kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict) or not schedule.leaves_branches_unused:
        return False
    if kwargs.get("find_unused_parameters", None) is False:
        raise ValueError("the RepQATCallback schedule freezes or fuses rep blocks, whose branch parameters then get "
                         "no gradient, but the DDP strategy was built with find_unused_parameters=False: use "
                         "DDPStrategy(find_unused_parameters=True) (or strategy='ddp_find_unused_parameters_true'), "
                         "or a schedule that keeps every block in 'qat' (Schedule.all_at_once())")
    if kwargs.get("find_unused_parameters") is True:
        return False
    kwargs["find_unused_parameters"] = True
    return True


def read_callback_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The callback's state from a loaded Lightning checkpoint dict, or ``None`` when it holds none."""
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    return dict(state) if isinstance(state, Mapping) else None
