"""``RepQATCallback``: quantization-aware training of any LightningModule, rep blocks or not, in one line.

All model surgery happens in ``setup`` — for every stage, before Lightning restores a checkpoint and before the
optimizer and the DDP wrapper exist (FACTS.md §4) — and depends only on the constructor arguments, so the QAT
structure is always there when weights arrive. The module's ``forward`` is never wrapped; the parameter set never
changes after ``setup`` (schedule phases only change how a rep block computes its output).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from qat_rep import __version__ as _QAT_REP_VERSION
from qat_rep.blocks import RepBlock
from qat_rep.export import TARGETS as ONNX_TARGETS
from qat_rep.export import VerifyResult, export_onnx, save_quantized, verify_onnx
from qat_rep.export.atomic import write_text_atomic
from qat_rep.quant import (
    NotCalibratedError,
    QuantConfig,
    Schedule,
    apply_schedule,
    calibrate,
    convert,
    get_config,
    is_calibrated,
    prepare,
)
from qat_rep.quant.insert import CONFIG_ATTR, is_prepared

from ._compat import CALLBACK_BASES, is_instance_of_any
from .distill import DistillConfig, Distiller, _get_submodule
from .metrics import SideBySideAccuracy, is_logits_output, quantizers_disabled

__all__ = ["RepQATCallback", "STATE_KEY", "ONNX_FILE", "VERIFY_FILE", "config_mismatch", "read_callback_state"]

log = logging.getLogger(__name__)

#: the key of this callback's state in a Lightning checkpoint's ``"callbacks"`` dict (one per Trainer)
STATE_KEY = "RepQATCallback"
_STATE_VERSION = 1
#: the QDQ ONNX file and its ONNX Runtime verification, written into ``export_dir`` at fit end
ONNX_FILE = "model_int8.onnx"
VERIFY_FILE = "onnx_verify.json"
#: below this top-1 agreement with PyTorch the fit-end verification warns (the #5 acceptance bar)
_MIN_AGREEMENT = 0.995


def config_mismatch(saved: Mapping[str, Any], current: QuantConfig) -> dict[str, tuple[Any, Any]]:
    """Fields where a checkpoint's saved ``QuantConfig`` dict differs from ``current``: name → (saved, current)."""
    now = current.to_dict()
    keys = sorted(set(saved) | set(now))
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def read_callback_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """This callback's state from a loaded Lightning checkpoint dict, or ``None`` when it holds none."""
    cbs = checkpoint.get("callbacks") or {}
    state = cbs.get(STATE_KEY)
    return dict(state) if isinstance(state, Mapping) else None


def _is_quant_key(key: str) -> bool:
    return "_quantizer." in key or ".rep_quant." in key or key.startswith("rep_quant.")


def _check_same_config(saved: Mapping[str, Any], current: QuantConfig, where: str) -> None:
    diff = config_mismatch(saved, current)
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs callback {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{where} was saved with a different QuantConfig ({shown}). Build the callback with the checkpoint's "
            "config — RepQATCallback(config=QuantConfig.from_dict(checkpoint['callbacks']['RepQATCallback']"
            "['config'])) — or start a new QAT run without ckpt_path"
        )


def _first_input(loader: Iterable[Any]) -> Tensor | None:
    """One sample of the first batch's input (``batch`` or ``batch[0]``) on the CPU, to trace the ONNX export with;
    ``None`` when the batch holds no floating-point tensor there."""
    batch = next(iter(loader), None)
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        return None
    return x[:1].detach().cpu().float()


def _first_loader(loaders: Any) -> Any:
    """The first loader of what Lightning holds (one loader, a list or a dict of them); ``None`` for none."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)) and not loaders:
        return None
    if isinstance(loaders, Sequence) and not isinstance(loaders[0], Tensor) and \
            all(hasattr(x, "__iter__") for x in loaders):
        return loaders[0]
    return loaders


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), Python and NumPy RNG states on exit: reading calibration batches must not
    shift the random stream of training (a resumed run, which skips calibration, must see the same stream)."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)


class _RepQATImpl:
    """The flavor-independent implementation; :class:`RepQATCallback` adds the Lightning ``Callback`` bases."""

    def __init__(
        self,
        config: QuantConfig | Mapping[str, Any] | None = None,
        schedule: Schedule | Mapping[str, Any] | None = None,
        calib_batches: int | None = None,
        calib_forward: Callable[[nn.Module, Any], Any] | None = None,
        teacher: nn.Module | None = None,
        distill: DistillConfig | Mapping[str, Any] | None = None,
        export_dir: str | os.PathLike[str] | None = None,
        export_module: str = "auto",
        compare_fp32: bool = True,
        progress: bool = True,
        onnx: str | None = "onnxruntime",
        verify_batches: int = 8,
    ) -> None:
        if config is None:
            config = QuantConfig()
        elif isinstance(config, Mapping):
            config = QuantConfig.from_dict(config)
        elif not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a qat_rep.quant.QuantConfig (or its dict), got {type(config).__name__}")
        if calib_batches is not None:
            if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
                raise ValueError(f"calib_batches must be a positive integer or None, got {calib_batches!r}")
            config = dataclasses.replace(config, calib_batches=calib_batches)
        if schedule is None:
            schedule = Schedule.all_at_once()
        elif isinstance(schedule, Mapping):
            schedule = Schedule.from_dict(schedule)
        elif not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a qat_rep.quant.Schedule (e.g. Schedule.shallow_to_deep()) or its dict, got "
                f"{type(schedule).__name__}"
            )
        if calib_forward is not None and not callable(calib_forward):
            raise TypeError(f"calib_forward must be a callable (module, batch) -> output, got {calib_forward!r}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module (the FP32 model), got {type(teacher).__name__}")
        if isinstance(distill, Mapping):
            distill = DistillConfig(**distill)
        elif distill is not None and not isinstance(distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig (or its dict), got {type(distill).__name__}")
        if distill is not None and teacher is None:
            raise ValueError("distill=... needs a teacher: RepQATCallback(teacher=fp32_model, distill=DistillConfig())")
        if teacher is not None and distill is None:
            distill = DistillConfig()
        if export_dir is not None and not isinstance(export_dir, (str, os.PathLike)):
            raise TypeError(f"export_dir must be a path (str or os.PathLike) or None, got {type(export_dir).__name__}")
        if not isinstance(export_module, str):
            raise TypeError(f"export_module must be a module name, '' (the LightningModule) or 'auto', "
                            f"got {export_module!r}")
        for name, value in (("compare_fp32", compare_fp32), ("progress", progress)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if onnx is not None and onnx not in ONNX_TARGETS:
            raise ValueError(f"onnx must be one of {', '.join(map(repr, ONNX_TARGETS))} (the QDQ layout of the "
                             f"fit-end ONNX file) or None for no ONNX file, got {onnx!r}")
        if onnx == "tensorrt" and config.unsigned_activations:
            raise ValueError("onnx='tensorrt' cannot carry QuantConfig(unsigned_activations=True): TensorRT has no "
                             "UINT8 activations. Use onnx='onnxruntime', or a config without unsigned_activations")
        if isinstance(verify_batches, bool) or not isinstance(verify_batches, int) or verify_batches < 0:
            raise ValueError(f"verify_batches must be an integer >= 0 (0: do not run the ONNX file in ONNX Runtime), "
                             f"got {verify_batches!r}")

        self.config: QuantConfig = config
        self.schedule: Schedule = schedule
        self.calib_forward = calib_forward
        self.teacher = teacher
        self.distill: DistillConfig | None = distill
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.export_module = export_module
        self.compare_fp32 = compare_fp32
        self.progress = progress
        self.onnx = onnx
        self.verify_batches = verify_batches

        # run state (not constructor arguments)
        self.position: tuple[int, int] = (0, 0)  # (epoch, global step) of the last applied schedule
        self.phases: dict[str, str] = {}
        self.calibrated_by_checkpoint = False
        self._loaded_position: tuple[int, int] | None = None
        self.calib_report: Any = None
        self.metrics: dict[str, float] = {}
        self.export_path: Path | None = None
        self.onnx_path: Path | None = None
        self.verify_result: VerifyResult | None = None  # the fit-end ONNX file in ONNX Runtime vs PyTorch
        self._distiller: Distiller | None = None
        self._accuracy = SideBySideAccuracy()
        self._record_handle: Any = None
        self._load_handle: Any = None
        self._calibrated = False
        self._recording = False
        self._last_call: tuple[tuple, dict, Any] | None = None
        self._sanity_ctx: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return STATE_KEY

    # ------------------------------------------------------------------------------------------------ overridable
    def should_calibrate(self, trainer: Any, pl_module: nn.Module) -> bool:
        """Calibrate at fit start unless the model already holds calibrated quantizers (resume, second fit)."""
        return not (self.calibrated_by_checkpoint or is_calibrated(pl_module))

    def should_export(self, trainer: Any, pl_module: nn.Module) -> bool:
        """Export at fit end on global rank zero when ``export_dir`` is set and the fit was not interrupted."""
        return self.export_dir is not None and trainer.is_global_zero and not trainer.interrupted

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Insert the quantizers (all stages), before checkpoint restore, optimizer and DDP setup."""
        for cb in trainer.callbacks:
            if is_instance_of_any(cb, "callbacks.ModelPruning"):
                raise ValueError(
                    "RepQATCallback cannot be combined with ModelPruning in one Trainer: pruning re-parameterizes "
                    "`weight` through forward pre-hooks of each conv, but equivalent-kernel QAT reads the branch "
                    "weights without calling those convs, so masks would be silently ignored. Prune first (fit with "
                    "ModelPruning(make_pruning_permanent=True)), then run QAT in a second Trainer"
                )
        if self.teacher is not None and any(m is self.teacher for m in pl_module.modules()):
            raise ValueError(
                "the teacher is a submodule of the LightningModule: it would be quantized and saved with the "
                "student. Pass a separate FP32 copy, e.g. teacher=copy.deepcopy(module.model).eval()"
            )
        if is_prepared(pl_module):
            used = getattr(pl_module, CONFIG_ATTR, None)
            if used is not None:
                used = used if isinstance(used, QuantConfig) else QuantConfig.from_dict(used)
                _check_same_config(used.to_dict(), self.config, f"{type(pl_module).__name__} (prepared earlier)")
        else:
            if not any(isinstance(m, (nn.Conv2d, nn.Linear, RepBlock)) for m in pl_module.modules()):
                raise ValueError(
                    f"{type(pl_module).__name__} has no nn.Conv2d, nn.Linear or rep block: there is nothing to "
                    "quantize. Build the network in __init__ (or configure_model) so RepQATCallback can find it"
                )
            report = prepare(pl_module, self.config)
            self._log(trainer, f"RepQATCallback: {str(report).splitlines()[0]}")
        target = self._export_target(pl_module)
        if target is not pl_module and getattr(target, CONFIG_ATTR, None) is None:
            setattr(target, CONFIG_ATTR, self.config)  # lets save_quantized/export_onnx run on the submodule
        if self._record_handle is None:
            self._record_handle = self._student(pl_module).register_forward_hook(self._record, with_kwargs=True)
        if self._load_handle is None:
            self._load_handle = pl_module.register_load_state_dict_pre_hook(self._check_incoming_state)

    def _check_incoming_state(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: a QAT state dict whose quantizer keys or shapes differ from this model's was
        saved with another QuantConfig. Raise that, instead of Lightning's generic size-mismatch error (the
        callback's own state, with the exact config, only arrives after the weights)."""
        own = {k: v for k, v in module.state_dict().items() if _is_quant_key(k)}
        theirs = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and _is_quant_key(k)}
        if not theirs:
            return  # a float state dict (e.g. pretrained weights): not a QAT checkpoint
        missing = sorted(set(own) - set(theirs))
        extra = sorted(set(theirs) - set(own))
        shapes = sorted(k for k in set(own) & set(theirs)
                        if isinstance(theirs[k], Tensor) and tuple(theirs[k].shape) != tuple(own[k].shape))
        if missing or extra or shapes:
            detail = "; ".join(f"{what}: {keys[:3]}{' …' if len(keys) > 3 else ''}"
                               for what, keys in (("missing", missing), ("unexpected", extra),
                                                  ("different shape", shapes)) if keys)
            raise ValueError(
                "the checkpoint was saved with a different QuantConfig: its quantizer state does not match this "
                f"model's ({detail}); or it holds another form of the model (e.g. converted for deployment). "
                "Build RepQATCallback with the checkpoint's config: QuantConfig.from_dict("
                "torch.load(path, weights_only=False)['callbacks']['RepQATCallback']['config'])"
            )

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        for attr in ("_record_handle", "_load_handle"):
            handle = getattr(self, attr)
            if handle is not None:
                handle.remove()
                setattr(self, attr, None)
        if self._sanity_ctx is not None:
            self._sanity_ctx.close()
            self._sanity_ctx = None

    # ------------------------------------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        epoch, step = self._loaded_position or (0, 0)
        self._apply(pl_module, epoch, step)
        if self.teacher is not None:
            self.teacher.to(device=pl_module.device).eval()
            self.teacher.requires_grad_(False)
            self._distiller = Distiller(self.teacher, self.distill, grad_scale=lambda: self._kd_grad_scale(trainer))
            self._distiller.attach(pl_module)

    def on_sanity_check_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # Calibration reads training batches, which Lightning loads after the sanity check: until then an
        # uncalibrated model validates in floating point (the sanity check is not logged).
        if not is_calibrated(pl_module) and not self.calibrated_by_checkpoint:
            self._sanity_ctx = contextlib.ExitStack()
            self._sanity_ctx.enter_context(quantizers_disabled(pl_module))

    def on_sanity_check_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._sanity_ctx is not None:
            self._sanity_ctx.close()
            self._sanity_ctx = None

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._apply(pl_module, trainer.current_epoch, trainer.global_step, trainer.optimizers)
        if self.should_calibrate(trainer, pl_module):
            self._calibrate(trainer, pl_module)
        self._calibrated = True

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        self._apply(pl_module, trainer.current_epoch, trainer.global_step, trainer.optimizers)
        if self._distiller is not None:
            self._distiller.begin_batch()

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._distiller is not None:
            losses = dict(self._distiller.last_losses)
            self._distiller.end_batch()
            for name, value in losses.items():
                pl_module.log(f"qat/{name}", value, on_step=True, on_epoch=True, rank_zero_only=True)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        if self.should_export(trainer, pl_module):
            self.export_path = self._export(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ evaluation
    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._eval_start(trainer, pl_module)

    def _eval_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._accuracy.reset()
        if trainer.state.fn == "fit":
            return
        if self._loaded_position is not None:
            self._apply(pl_module, *self._loaded_position)
        if not is_calibrated(pl_module) and not self.calibrated_by_checkpoint:
            raise NotCalibratedError(
                f"{type(pl_module).__name__} holds uncalibrated quantizers: evaluate a QAT checkpoint with "
                "trainer.test(model, ckpt_path=...) (or validate/predict), or fit with RepQATCallback first"
            )

    def on_validation_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._begin_record()

    def on_test_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._begin_record()

    def on_validation_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._update_accuracy(pl_module, outputs)

    def on_test_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._update_accuracy(pl_module, outputs)

    def on_validation_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log_accuracy(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log_accuracy(trainer, pl_module, "test")

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "qat_rep_version": _QAT_REP_VERSION,
            "config": self.config.to_dict(),
            "schedule": self.schedule.to_dict(),
            "epoch": int(self.position[0]),
            "global_step": int(self.position[1]),
            "phases": dict(self.phases),
            "calibrated": bool(self.calibrated_by_checkpoint or self._calibrated),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "config" in state_dict:
            _check_same_config(state_dict["config"], self.config, "the checkpoint")
        saved_schedule = state_dict.get("schedule")
        if saved_schedule is not None and saved_schedule != self.schedule.to_dict():
            warnings.warn(
                "resuming with a different RepQATCallback schedule than the checkpoint's: phases from now on follow "
                f"the new one (checkpoint: {saved_schedule}, callback: {self.schedule.to_dict()})",
                UserWarning, stacklevel=2,
            )
        self._loaded_position = (int(state_dict.get("epoch", 0)), int(state_dict.get("global_step", 0)))
        self.position = self._loaded_position
        self.phases = dict(state_dict.get("phases", {}))
        self.calibrated_by_checkpoint = bool(state_dict.get("calibrated", False))

    # ------------------------------------------------------------------------------------------------ internals
    def _apply(self, pl_module: nn.Module, epoch: int, step: int, optimizers: Any = ()) -> None:
        # a block entering the "fused" phase is collapsed here and its rewritten parameters' optimizer state dropped
        self.phases = apply_schedule(pl_module, self.schedule, int(epoch), int(step), optimizers)
        self.position = (int(epoch), int(step))

    def _log(self, trainer: Any, message: str) -> None:
        if trainer.is_global_zero:
            log.info(message)

    def _student(self, pl_module: nn.Module) -> nn.Module:
        name = self.distill.student if self.distill is not None else ""
        return _get_submodule(pl_module, name, "student module (DistillConfig.student)")

    def _export_target(self, pl_module: nn.Module) -> nn.Module:
        if self.export_module != "auto":
            if not self.export_module:
                return pl_module
            try:
                return pl_module.get_submodule(self.export_module)
            except AttributeError:
                raise ValueError(
                    f"export_module={self.export_module!r} is not a submodule of {type(pl_module).__name__}; "
                    f"children: {[n for n, _ in pl_module.named_children()]}"
                ) from None
        with_spec = [m for _, m in pl_module.named_modules() if isinstance(getattr(m, "qat_rep_spec", None), dict)]
        return with_spec[0] if len(with_spec) == 1 else pl_module

    def _kd_grad_scale(self, trainer: Any) -> float:
        scale = 1.0 / max(1, int(trainer.accumulate_grad_batches))
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            scale *= float(scaler.get_scale())
        return scale

    def _calib_loader(self, trainer: Any) -> Iterable[Any]:
        """The train loader (Lightning's, with its distributed sampler); the first one of a collection of loaders."""
        return _first_loader(trainer.train_dataloader)

    def _calibrate(self, trainer: Any, pl_module: nn.Module) -> None:
        loader = self._calib_loader(trainer)
        wanted = self.config.calib_batches
        available = len(loader) if hasattr(loader, "__len__") else None
        if available is not None and available < wanted and trainer.is_global_zero:
            warnings.warn(
                f"calib_batches={wanted} but the train loader has only {available} batch(es); calibrating on "
                f"{available}", UserWarning, stacklevel=2,
            )
        forward = self.calib_forward
        strategy = trainer.strategy

        def batches() -> Iterator[Any]:
            with Progress(TextColumn("[bold]calibrating[/bold] {task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                          disable=not (self.progress and trainer.is_global_zero)) as bar:
                task = bar.add_task(self.config.calibrator, total=min(wanted, available or wanted))
                for i, batch in enumerate(loader):
                    if i >= wanted:
                        break
                    yield strategy.batch_to_device(batch)
                    bar.advance(task)

        with _isolated_rng():
            self.calib_report = calibrate(pl_module, batches(), self.config, forward=forward)
        self._log(trainer, f"RepQATCallback: {self.calib_report}")

    # metrics ------------------------------------------------------------------------------------------------------
    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording:
            self._last_call = (args, kwargs, output)

    def _begin_record(self) -> None:
        self._recording = True
        self._last_call = None

    def _update_accuracy(self, pl_module: nn.Module, outputs: Any) -> None:
        self._recording = False
        if not is_logits_output(outputs):
            return
        fp32 = None
        if self.compare_fp32 and self._last_call is not None:
            args, kwargs, out = self._last_call
            if isinstance(out, Tensor) and out.shape == outputs["logits"].shape:
                with torch.no_grad(), quantizers_disabled(pl_module):
                    fp32 = self._student(pl_module)(*args, **kwargs)
        self._accuracy.update(outputs["logits"], outputs["target"], fp32)
        self._last_call = None

    def _log_accuracy(self, trainer: Any, pl_module: nn.Module, prefix: str) -> None:
        values = self._accuracy.compute()
        self._accuracy.reset()
        if trainer.sanity_checking or not values:
            return
        for name, value in values.items():
            self.metrics[f"{prefix}_{name}"] = value
            pl_module.log(f"qat/{prefix}_{name}", value, rank_zero_only=True)

    # export -------------------------------------------------------------------------------------------------------
    def _export(self, trainer: Any, pl_module: nn.Module) -> Path:
        target = self._export_target(pl_module)
        directory = Path(self.export_dir)
        still_float = sorted(n for n, phase in self.phases.items() if phase == "float")
        if still_float:
            warnings.warn(
                f"RepQATCallback: {len(still_float)} rep block(s) were still float multi-branch when the fit ended "
                f"(e.g. {still_float[0]}): the schedule never moved them to QAT, yet the deploy checkpoint and the "
                "ONNX file quantize them, so expect lower INT8 accuracy than the fake-quant metrics show. Train until "
                "every block has entered QAT (see the Schedule), then export", UserWarning, stacklevel=2)
        loader, source = self._verify_loader(trainer)
        example = _first_input(loader) if loader is not None else None
        if isinstance(getattr(target, "qat_rep_spec", None), dict):
            shape = tuple(example.shape) if example is not None and example.dim() == 4 else None
            path = save_quantized(target, directory, input_shape=shape)
            self._log(trainer, f"RepQATCallback: deploy checkpoint written to {path}")
        else:
            path = self._export_fused_state(trainer, target, directory)
        for stale in (ONNX_FILE, VERIFY_FILE):  # a previous run's: must not sit beside these weights
            (directory / stale).unlink(missing_ok=True)
        if self.onnx is not None:
            self._export_onnx(trainer, target, directory, example, loader, source)
        if self.progress and trainer.is_global_zero:
            Console().print(self._export_table(Path(path), source))
        return Path(path)

    def _export_table(self, path: Path, source: str) -> Table:
        """The fit-end report: what was written, and how the ONNX file ran in ONNX Runtime."""
        table = Table(title="RepQATCallback: INT8 artifacts", show_header=False)
        table.add_column("item", style="bold")
        table.add_column("value")
        table.add_row("deploy checkpoint", str(path))
        table.add_row("QDQ ONNX", f"{self.onnx_path} ({self.onnx} layout)" if self.onnx_path else "not written")
        if self.verify_result is not None:
            table.add_row("ONNX Runtime check", f"{source} data, precise INT8 session")
            for name, value in self.verify_result.rows():
                table.add_row(name, value)
        return table

    def _export_fused_state(self, trainer: Any, target: nn.Module, directory: Path) -> Path:
        """A model qat_rep cannot rebuild by name: write the fused (converted) state dict and the config."""
        from safetensors.torch import save_file

        work = copy.deepcopy(target).cpu().eval()
        if getattr(work, CONFIG_ATTR, None) is None:
            setattr(work, CONFIG_ATTR, self.config)
        convert(work)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in work.state_dict().items()}
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / "fused_state_dict.safetensors"
        tmp = weights.with_name(weights.name + ".tmp")
        save_file(state, str(tmp), metadata={"qat_rep_quant_config": json.dumps(get_config(work).to_dict())})
        os.replace(tmp, weights)
        write_text_atomic(directory / "qat_rep_callback.json", json.dumps(
            {"quant_config": self.config.to_dict(), "form": "converted", "module": type(target).__name__,
             "qat_rep_version": _QAT_REP_VERSION}, indent=2) + "\n")
        self._log(trainer, f"RepQATCallback: {type(target).__name__} has no qat_rep_spec, so it cannot be saved as a "
                           f"deploy artifact; wrote its fused state dict to {weights}")
        return weights

    def _verify_loader(self, trainer: Any) -> tuple[Any, str]:
        """The first validation loader (else the training loader) and which one it is."""
        val = _first_loader(getattr(trainer, "val_dataloaders", None))
        if val is not None:
            return val, "validation"
        return self._calib_loader(trainer), "training"

    def _export_onnx(self, trainer: Any, target: nn.Module, directory: Path, example: Tensor | None, loader: Any,
                     source: str) -> None:
        """Write the QDQ ONNX file of ``target`` and run it in ONNX Runtime next to the fake-quant model.

        Failures here warn instead of raising: training has finished and the deploy checkpoint is written."""
        bits = (self.config.w_bits, self.config.a_bits)
        if bits != (8, 8):
            self._log(trainer, f"RepQATCallback: no ONNX file for W{bits[0]}A{bits[1]}: QuantizeLinear (opset 13) "
                               "carries 8-bit integers only; the deploy checkpoint keeps the simulated network")
            return
        if example is None:
            warnings.warn(
                f"RepQATCallback: no ONNX file: the first {source} batch holds no floating-point input tensor "
                "(a tensor, or a tuple/list starting with one) to trace the model with. Export it yourself with "
                "qat_rep.export_onnx(model, path, example_input), or pass onnx=None", UserWarning, stacklevel=2)
            return
        path = directory / ONNX_FILE
        try:
            export_onnx(target, path, example, target=self.onnx)
        except Exception as e:  # noqa: BLE001 - reported, and the deploy checkpoint is already written
            warnings.warn(f"RepQATCallback: the ONNX export failed ({type(e).__name__}: {e}); the deploy checkpoint "
                          "is written. Pass onnx=None to skip the ONNX file", UserWarning, stacklevel=2)
            return
        self.onnx_path = path
        self._log(trainer, f"RepQATCallback: QDQ ONNX ({self.onnx} layout) written to {path}")
        if self.verify_batches == 0:
            return
        try:
            result = verify_onnx(path, target, loader, max_batches=self.verify_batches)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"RepQATCallback: could not run {path.name} in ONNX Runtime on the {source} data "
                          f"({type(e).__name__}: {e}); pass verify_batches=0 to skip the check", UserWarning,
                          stacklevel=2)
            return
        self.verify_result = result
        write_text_atomic(directory / VERIFY_FILE, json.dumps(
            {"onnx": ONNX_FILE, "layout": self.onnx, "data": source, "max_batches": self.verify_batches,
             **result.to_dict()}, indent=2) + "\n")
        self._log(trainer, f"RepQATCallback: ONNX Runtime vs PyTorch on {result.samples} {source} samples: {result}")
        metrics = {"qat/onnx_max_diff_steps": result.max_diff_steps}
        if result.agreement is not None:
            metrics["qat/onnx_agreement"] = result.agreement
        for logger in getattr(trainer, "loggers", []) or []:
            logger.log_metrics(metrics, step=trainer.global_step)
        if result.agreement is not None and result.agreement < _MIN_AGREEMENT:
            warnings.warn(
                f"RepQATCallback: ONNX Runtime agrees with the PyTorch model on only {100 * result.agreement:.2f}% "
                f"of {result.samples} {source} samples (max logit difference {result.max_diff_steps:.2f} output "
                f"steps): {path.name} does not run the network that was trained. See {VERIFY_FILE}", UserWarning,
                stacklevel=2)


class RepQATCallback(_RepQATImpl, *CALLBACK_BASES):  # type: ignore[misc]
    """Quantization-aware training for any LightningModule; equivalent-kernel QAT for its rep blocks.

    Derives from the ``Callback`` of every installed Lightning flavor, so the same object works with
    ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.

    Args:
        config: what to quantize and how (:class:`qat_rep.quant.QuantConfig` or its dict); default W8A8 per channel.
        schedule: when each rep block is ``float`` / ``qat`` / ``frozen`` (:class:`qat_rep.quant.Schedule`);
            default: every block in QAT from the first step.
        calib_batches: training batches read to calibrate activation ranges (overrides ``config.calib_batches``).
        calib_forward: ``fn(module, batch)`` that runs the LightningModule on a batch during calibration;
            default ``module(batch[0])`` for tuple/list batches, else ``module(batch)``. Give one for models whose
            forward takes several arguments. Must be picklable for ``ddp_spawn`` (a module-level function).
        teacher: an FP32 model for distillation (not a submodule of the LightningModule); called with the same
            arguments as the student.
        distill: :class:`~qat_rep.callbacks.DistillConfig` (temperature, weights, feature pairs, student name).
        export_dir: where ``on_fit_end`` (global rank 0) writes the deploy checkpoint (``save_quantized``, with the
            input shape of one sample); a model without ``qat_rep_spec`` gets ``fused_state_dict.safetensors`` +
            ``qat_rep_callback.json`` instead. Beside it, for a W8A8 config, the QDQ ONNX file ``model_int8.onnx``
            and its ONNX Runtime check ``onnx_verify.json`` (see ``onnx``); those of an earlier run are removed first.
            Blocks still ``float`` at fit end (the schedule never reached them) are exported quantized, with a warning.
        export_module: the submodule to export: ``"auto"`` (the one submodule built by ``qat_rep.create_model``,
            else the LightningModule), a module name, or ``""`` for the LightningModule.
        compare_fp32: in validation/test, also measure the FP32-equivalent accuracy (one extra forward per batch).
        progress: rich console output on global rank 0: a progress bar while calibrating and the fit-end report
            of the artifacts (paths and the ONNX Runtime check).
        onnx: the QDQ layout of the fit-end ONNX file — ``"onnxruntime"`` (default; the file is verified in ONNX
            Runtime) or ``"tensorrt"`` (pytorch-quantization's layout, for ``trtexec``) — or ``None`` for no ONNX file.
            Traced with one sample of the first validation batch (``batch`` or ``batch[0]``); skipped below 8 bits,
            which opset-13 QDQ cannot carry. An export failure warns; the deploy checkpoint is written regardless.
        verify_batches: validation batches (training batches without a validation loader) run through the ONNX
            file in ONNX Runtime and through the fake-quant model (:func:`qat_rep.verify_onnx`): top-1 agreement,
            max logit difference in output quantization steps and accuracy are logged (``qat/onnx_agreement``,
            ``qat/onnx_max_diff_steps``), kept in :attr:`verify_result` and written to ``onnx_verify.json``; below
            99.5 % agreement the callback warns. ``0`` skips the check.

    Lifecycle: ``setup`` (every stage) inserts the quantizers; ``on_fit_start`` sets the schedule phases and
    attaches the teacher; ``on_train_start`` calibrates on the first ``calib_batches`` training batches on every
    rank (ranges max-reduced across ranks; skipped when the model or the checkpoint is already calibrated; the RNG
    state is restored afterwards); every training batch re-applies the schedule at ``(epoch, global_step)``;
    ``on_fit_end`` exports on global rank 0 (deploy checkpoint, ONNX file, ONNX Runtime check). A sanity check,
    which Lightning runs before the training batches are loaded, validates an uncalibrated model in floating point.

    Checkpoint policy: the Lightning checkpoint keeps the QAT form (branch weights + quantizer ``amax``) and this
    callback's state (``config``, ``schedule``, schedule position, ``calibrated``) under ``"RepQATCallback"``.
    Resuming with another config is refused before the weights load; the live module is never converted, so
    ``test(ckpt_path=...)`` and a second ``fit`` keep working. Load a checkpoint elsewhere with
    :func:`qat_rep.callbacks.load_qat_checkpoint`.

    Metrics: when ``validation_step``/``test_step`` return ``{"logits": [N, C], "target": [N]}``, the callback
    logs ``qat/val_acc_fakequant`` and ``qat/val_acc_fp32`` (``test_`` in test), rank zero only, and keeps them in
    :attr:`metrics`. With a teacher, ``qat/kd_logit`` / ``qat/kd_feature`` are logged.

    Not supported: ``ModelPruning`` in the same Trainer (refused in ``setup``). DDP with a schedule that freezes
    blocks needs ``DDPStrategy(find_unused_parameters=True)``. With ``ddp_spawn`` the module in the launching process
    does not get the QAT structure; load the checkpoint with :func:`~qat_rep.callbacks.load_qat_checkpoint`.

    Example::

        qat = RepQATCallback(QuantConfig(w_bits=8, a_bits=8), schedule=Schedule.shallow_to_deep(every=1))
        trainer = Trainer(max_epochs=10, callbacks=[qat])
        trainer.fit(module, train_loader, val_loader)
    """

