"""``RepQATCallback``: QAT of any LightningModule, as Lightning glue over the torch-only core: surgery before any
checkpoint restore, calibration inside the user's own first training steps
(:class:`qat_rep.quant.calibrate.CalibrationSession`), the schedule, FP32-vs-fake-quant metrics, distillation, one
:func:`qat_rep.export.deploy` of a recorded real call.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from rich.console import Console
from torch import nn
from typing_extensions import override

from qat_rep import __version__ as _QAT_REP_VERSION
from qat_rep.blocks import RepBlock
from qat_rep.export import deploy
from qat_rep.export.deploy import DeployReport
from qat_rep.export.verify import VerifyResult
from qat_rep.quant import NotCalibratedError, QuantConfig, Schedule, apply_schedule, calibrate, prepare
from qat_rep.quant.calibrate import CalibrationSession, is_calibrated
from qat_rep.quant.foreign import fuse_foreign_blocks
from qat_rep.quant.insert import CONFIG_ATTR, get_config, is_prepared
from qat_rep.quant.state import check_incoming_state, check_same_config, config_mismatch, quantizers_disabled

from ._compat import CALLBACK_BASES
from .distill import DistillConfig, Distiller, kd_grad_scale
from .loaders import first_loader, isolated_rng
from .metrics import SideBySideAccuracy
from .options import STATE_KEY, RepQATOptions, allow_unused_parameters, check_fit_setup, read_callback_state
from .lazy import defines_configure_model, restore_configure_model, run_after_configure_model
from .recording import CallRecorder, export_candidates
from .scales import SharedScales

_STATE_VERSION = 1


class RepQATCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Quantization-aware training for any LightningModule; equivalent-kernel QAT for its rep blocks.

    Works with ``pytorch_lightning`` and ``lightning.pytorch`` Trainers alike and needs nothing from the module: it
    quantizes what it finds (also a network built in ``configure_model``; foreign rep blocks in their fused form),
    learns how the model is called from the user's own steps, and exports a recorded real call.

    Arguments are documented (and validated) in :class:`~qat_rep.callbacks.options.RepQATOptions`.

    Calibration: the activation quantizers observe (float pass-through) while the user's own ``training_step``
    runs its first ``calib_batches`` steps; quantization switches on after the last one (ranges max-reduced across
    ranks); a resumed or calibrated model skips it. Before that, one trace of the first real call ties the activation
    quantizers that TensorRT needs on one scale (across ``Add``/``Concat``, one tensor read twice). Export: the ONNX file is traced with the first recorded call of
    the exported module (its tensor arguments become named inputs) and checked on the calls of the first
    ``verify_batches`` batches of the last validation. Checkpoints keep the QAT form and this callback's state;
    resuming with another config is refused before the weights load. ``ModelPruning`` in the same Trainer is refused.

    Example: ``Trainer(max_epochs=10, callbacks=[RepQATCallback(export_dir="int8")]).fit(module, train, val)``
    """

    def __init__(self, config: QuantConfig | Mapping[str, Any] | None = None,
                 schedule: Schedule | Mapping[str, Any] | None = None, calib_batches: int | None = None,
                 calib_forward: Callable[[nn.Module, Any], Any] | None = None, teacher: nn.Module | None = None,
                 distill: DistillConfig | Mapping[str, Any] | None = None,
                 export_dir: str | os.PathLike[str] | None = None, export_module: str = "auto",
                 compare_fp32: bool = True, progress: bool = True, onnx: str | None = "onnxruntime",
                 verify_batches: int = 8) -> None:
        options = RepQATOptions(config, schedule, calib_batches, calib_forward, teacher, distill, export_dir,
                                export_module, compare_fp32, progress, onnx, verify_batches)
        vars(self).update(vars(options))  # config, schedule, ..., verify_batches: validated and coerced
        self.config: QuantConfig
        self.schedule: Schedule
        # run state
        self.position: tuple[int, int] = (0, 0)  # (epoch, global step) of the last applied schedule
        self.phases: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.calib_report: Any = None
        self.deploy_report: DeployReport | None = None
        self.calibrated_by_checkpoint = self._calibrated = False
        self._loaded_position: tuple[int, int] | None = None
        self._session: CalibrationSession | None = None
        self._sanity_ctx: contextlib.ExitStack | None = None
        self._distiller: Distiller | None = None
        self._recorder, self._accuracy, self._scales = CallRecorder(), SideBySideAccuracy(), SharedScales()
        self._load_handle: Any = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    @property
    def onnx_path(self) -> Path | None:
        return self.deploy_report.onnx_path if self.deploy_report is not None else None

    @property
    def verify_result(self) -> VerifyResult | None:
        return self.deploy_report.verify if self.deploy_report is not None else None

    def should_calibrate(self, trainer: Any, pl_module: nn.Module) -> bool:
        """Calibrate at fit start unless the model already holds calibrated quantizers (resume, second fit)."""
        return not (self.calibrated_by_checkpoint or is_calibrated(pl_module))

    def should_export(self, trainer: Any, pl_module: nn.Module) -> bool:
        """Export at fit end when ``export_dir`` is set and the fit was not interrupted (rank 0 writes)."""
        return self.export_dir is not None and not trainer.interrupted

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        """Insert the quantizers before checkpoint restore, optimizer and DDP setup (a network built in
        ``configure_model``: right after that hook, which Lightning runs after ``setup``)."""
        check_fit_setup(trainer, pl_module, self.teacher)
        if allow_unused_parameters(trainer, self.schedule):
            rank_zero_info("RepQATCallback: DDP runs with find_unused_parameters=True: frozen or fused rep blocks "
                           "leave their branch parameters without gradient")
        if is_prepared(pl_module) or any(isinstance(m, (nn.Conv2d, nn.Linear, RepBlock)) for m in pl_module.modules()) \
                or not defines_configure_model(pl_module):
            self._prepare(pl_module)
        else:
            run_after_configure_model(pl_module, functools.partial(self._prepare, pl_module))
        if self._load_handle is None:
            self._load_handle = pl_module.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *_: check_incoming_state(module, state, prefix))

    @override
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._apply(pl_module, *(self._loaded_position or (0, 0)))
        if self.teacher is not None:
            self.teacher.to(device=pl_module.device).eval().requires_grad_(False)
            self._distiller = Distiller(self.teacher, self.distill, grad_scale=lambda: kd_grad_scale(trainer))
            self._distiller.attach(pl_module)

    @override
    def on_sanity_check_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not is_calibrated(pl_module) and not self.calibrated_by_checkpoint:  # validate in float until calibrated
            self._sanity_ctx = contextlib.ExitStack()
            self._sanity_ctx.enter_context(quantizers_disabled(pl_module))

    @override
    def on_sanity_check_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._sanity_ctx is not None:
            self._sanity_ctx.close()
            self._sanity_ctx = None

    @override
    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._apply(pl_module, trainer.current_epoch, trainer.global_step, trainer.optimizers)
        if not self.should_calibrate(trainer, pl_module):
            self._calibrated = True
            return self._scales.restore(pl_module)
        # shared scales are tied at the first real call (a tie after DDP wrapped learned amax would orphan them)
        tied = [] if self.config.learn_amax and trainer.world_size > 1 else export_candidates(pl_module)
        if self.calib_forward is None:  # calibrate inside the user's first training steps
            self._session = CalibrationSession(pl_module, self.config)
            self._session.start()
            return self._scales.arm(tied, self._session.restart)
        loader = first_loader(trainer.train_dataloader)
        batches = [trainer.strategy.batch_to_device(b) for b in itertools.islice(loader, self.config.calib_batches)]
        with isolated_rng():
            self._scales.tie_by_calling(tied, lambda: batches and self.calib_forward(pl_module, batches[0]))
            self._finish_calibration(calibrate(pl_module, batches, self.config, forward=self.calib_forward))

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._recorder.reset(self.verify_batches, "training")

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        self._apply(pl_module, trainer.current_epoch, trainer.global_step, trainer.optimizers)
        self._recorder.start()
        if self._distiller is not None:
            self._distiller.begin_batch()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._recorder.stop()
        self._scales.disarm()
        if self._session is not None:
            self._session.count()
            if self._session.batches >= self.config.calib_batches:
                self._finish_calibration(self._session.finish())
        if self._distiller is not None:
            losses = dict(self._distiller.last_losses)
            self._distiller.end_batch()
            for name, value in losses.items():
                pl_module.log(f"qat/{name}", value, on_step=True, on_epoch=True, rank_zero_only=True)

    @override
    def on_validation_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not trainer.sanity_checking:
            self._end_calibration_early()
        self._eval_start(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._recorder.reset(self.verify_batches, "validation")

    @override
    def on_validation_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._recorder.start()

    @override
    def on_validation_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._update_accuracy(pl_module, outputs)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log_accuracy(trainer, pl_module, "val")

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._end_calibration_early()

    @override
    def on_test_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._eval_start(trainer, pl_module)

    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end

    @override
    def on_test_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._log_accuracy(trainer, pl_module, "test")

    on_predict_start = on_test_start

    @override
    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        self._recorder.detach()  # the export copies the module: no hook of this callback may travel with it
        if self.should_export(trainer, pl_module):
            self._export(trainer, pl_module)

    @override
    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if self._distiller is not None:
            self._distiller.detach()
        self._recorder.detach()
        self._scales.disarm()
        for ctx in (self._session, self._sanity_ctx):
            if ctx is not None:
                ctx.close()
        self._session = self._sanity_ctx = None
        if self._load_handle is not None:
            self._load_handle.remove()
            self._load_handle = None
        restore_configure_model(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "qat_rep_version": _QAT_REP_VERSION, "config": self.config.to_dict(),
                "schedule": self.schedule.to_dict(), "epoch": int(self.position[0]),
                "global_step": int(self.position[1]), "phases": dict(self.phases),
                "calibrated": bool(self.calibrated_by_checkpoint or self._calibrated),
                "scale_groups": self._scales.groups}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "config" in state_dict:
            check_same_config(state_dict["config"], self.config, "the checkpoint")
        saved_schedule = state_dict.get("schedule")
        if saved_schedule is not None and saved_schedule != self.schedule.to_dict():
            warnings.warn("resuming with a different RepQATCallback schedule than the checkpoint's: phases from now "
                          f"on follow the new one (checkpoint: {saved_schedule}, callback: {self.schedule.to_dict()})",
                          UserWarning, stacklevel=2)
        self._loaded_position = (int(state_dict.get("epoch", 0)), int(state_dict.get("global_step", 0)))
        self.position = self._loaded_position
        self.phases = dict(state_dict.get("phases", {}))
        self.calibrated_by_checkpoint = bool(state_dict.get("calibrated", False))
        self._scales.groups = state_dict.get("scale_groups")

    # ------------------------------------------------------------------------------------------------ internals
    def _prepare(self, pl_module: nn.Module) -> None:
        if is_prepared(pl_module):
            check_same_config(get_config(pl_module).to_dict(), self.config, f"{type(pl_module).__name__} (prepared)")
        else:
            fused = fuse_foreign_blocks(pl_module)  # foreign rep blocks train in their own fused form
            report = str(prepare(pl_module, self.config)).splitlines()[0]
            rank_zero_info(f"RepQATCallback: {report}; {len(fused)} foreign rep block(s) fused first")
        for sub in (m for _, m in export_candidates(pl_module) if getattr(m, CONFIG_ATTR, None) is None):
            setattr(sub, CONFIG_ATTR, self.config)  # e.g. module.model, saved or exported on its own later
        self._recorder.watch_model(pl_module, self._student_name, self.export_module)

    @property
    def _student_name(self) -> str:
        return self.distill.student if self.distill is not None else ""

    def _finish_calibration(self, report: Any) -> None:
        self._session, self.calib_report, self._calibrated = None, report, True
        rank_zero_info(f"RepQATCallback: {report}")

    def _end_calibration_early(self) -> None:
        if self._session is not None:  # validation or the epoch's end came before calib_batches training steps
            rank_zero_warn(f"calib_batches={self.config.calib_batches} but only {self._session.batches} training "
                           "step(s) ran before validation or the end of the epoch; calibrated on those")
            self._finish_calibration(self._session.finish())

    def _apply(self, pl_module: nn.Module, epoch: int, step: int, optimizers: Any = ()) -> None:
        self.phases = apply_schedule(pl_module, self.schedule, int(epoch), int(step), optimizers)
        self.position = (int(epoch), int(step))

    def _eval_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._accuracy.reset()
        if trainer.state.fn == "fit":
            return
        if self._loaded_position is not None:
            self._apply(pl_module, *self._loaded_position)
        if not is_calibrated(pl_module) and not self.calibrated_by_checkpoint:
            raise NotCalibratedError(f"{type(pl_module).__name__} holds uncalibrated quantizers: evaluate a QAT "
                                     "checkpoint with trainer.test(model, ckpt_path=...) (or validate/predict), or "
                                     "fit with RepQATCallback first")

    def _update_accuracy(self, pl_module: nn.Module, outputs: Any) -> None:
        student = self._student_name
        last = self._recorder.last.get(student)
        self._recorder.stop()
        rerun = (lambda: pl_module.get_submodule(student)(*last[0], **last[1])) if self.compare_fp32 and last else None
        self._accuracy.update_from_step(pl_module, outputs, last[2] if last else None, rerun)

    def _log_accuracy(self, trainer: Any, pl_module: nn.Module, prefix: str) -> None:
        if not trainer.sanity_checking:
            self.metrics.update(self._accuracy.log(pl_module, prefix))
        self._accuracy.reset()

    @rank_zero_only
    def _export(self, trainer: Any, pl_module: nn.Module) -> None:
        still_float = sorted(n for n, phase in self.phases.items() if phase == "float")
        if still_float:
            rank_zero_warn(f"RepQATCallback: {len(still_float)} rep block(s) were still float multi-branch when the "
                           f"fit ended (e.g. {still_float[0]}): the schedule never moved them to QAT, yet the exported "
                           "files quantize them (expect lower INT8 accuracy). Train until every block is in QAT")
        target, calls = self._recorder.export_target(pl_module, self.export_module)
        if not calls:
            rank_zero_warn(f"RepQATCallback: nothing exported: no call of {type(target).__name__} was recorded during "
                           "the fit (no training step ran?); set export_module= to the module your steps call")
            return
        if getattr(target, CONFIG_ATTR, None) is None:
            setattr(target, CONFIG_ATTR, self.config)  # a submodule: deploy() reads the config from it
        self.deploy_report = deploy(target, self.export_dir, calls[0], calls, onnx=self.onnx,
                                    verify_batches=len(calls) if self.verify_batches else 0,
                                    source=self._recorder.source)
        for logger in trainer.loggers:
            logger.log_metrics({f"qat/{k}": v for k, v in self.deploy_report.metrics().items()}, trainer.global_step)
        if self.progress:
            Console().print(self.deploy_report.table("RepQATCallback: INT8 artifacts"))
