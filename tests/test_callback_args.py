"""RepQATCallback and DistillConfig validate their arguments where they arrive, with errors naming the fix."""

from __future__ import annotations

import pytest
import torch

from qat_rep.callbacks import DistillConfig, RepQATCallback
from qat_rep.callbacks.rep_qat import config_mismatch, read_callback_state
from qat_rep.quant import QuantConfig, Schedule


def test_defaults_and_dict_arguments_build_the_same_callback():
    a = RepQATCallback()
    b = RepQATCallback(config=QuantConfig().to_dict(), schedule=Schedule.fused().to_dict())
    assert a.config == b.config == QuantConfig()
    assert a.schedule == b.schedule == Schedule.fused()
    assert a.state_key == "RepQATCallback"


def test_calib_batches_overrides_the_config():
    cb = RepQATCallback(QuantConfig(calib_batches=4, w_bits=6), calib_batches=7)
    assert cb.config.calib_batches == 7 and cb.config.w_bits == 6


def test_works_as_a_callback_of_both_flavors():
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    cb = RepQATCallback()
    assert isinstance(cb, pl.Callback) and isinstance(cb, lp.Callback)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(config="w8a8"), TypeError, "config must be a qat_rep.quant.QuantConfig"),
    (dict(config={"w_bits": 9}), ValueError, "w_bits must be an integer between 2 and 8"),
    (dict(calib_batches=0), ValueError, r"calib_batches must be an integer >= 1 \(training steps that calibrate\), got 0"),
    (dict(calib_batches=True), ValueError, "calib_batches must be an integer >= 1"),
    (dict(schedule="shallow"), TypeError, "schedule must be a qat_rep.quant.Schedule"),
    (dict(calib_forward=3), TypeError, "calib_forward must be a callable"),
    (dict(teacher="resnet"), TypeError, "teacher must be a torch.nn.Module"),
    (dict(distill=DistillConfig()), ValueError, "distill=... needs a teacher"),
    (dict(teacher=torch.nn.Linear(2, 2), distill=3), TypeError, "distill must be a DistillConfig"),
    (dict(export_dir=5), TypeError, "export_dir must be a path"),
    (dict(export_module=None), TypeError, "export_module must be a module name"),
    (dict(compare_fp32="yes"), TypeError, "compare_fp32 must be a bool"),
    (dict(progress=1), TypeError, "progress must be a bool"),
    (dict(onnx="onnx"), ValueError, "onnx must be one of 'onnxruntime', 'tensorrt'"),
    (dict(onnx=True), ValueError, "or None for no ONNX file, got True"),
    (dict(onnx="tensorrt", config=QuantConfig.for_onnxruntime()), ValueError, "TensorRT has no UINT8 activations"),
    (dict(verify_batches=-1), ValueError, "verify_batches must be an integer >= 0"),
    (dict(verify_batches=2.5), ValueError, "verify_batches must be an integer >= 0"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        RepQATCallback(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0), ValueError, "temperature must be a positive number"),
    (dict(feature_temperature=-1.0), ValueError, "feature_temperature must be a positive number"),
    (dict(logit_weight=-0.5), ValueError, "logit_weight must be a number >= 0"),
    (dict(features={"a": 1}), TypeError, "features must map student module names to teacher module names"),
    (dict(student=None), TypeError, "student must be a module name"),
    (dict(logit_weight=0), ValueError, "distils nothing"),
])
def test_bad_distill_config_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillConfig(**kwargs)


def test_distill_dict_is_accepted():
    cb = RepQATCallback(teacher=torch.nn.Linear(2, 2), distill={"temperature": 2.0, "student": "model"})
    assert cb.distill == DistillConfig(temperature=2.0, student="model")


def test_state_dict_round_trip_and_config_mismatch():
    cb = RepQATCallback(QuantConfig(w_bits=6), schedule=Schedule.shallow_to_deep(every=2))
    state = cb.state_dict()
    assert state["config"] == QuantConfig(w_bits=6).to_dict() and state["schedule"]["stagewise"] == [0, 2, None, None]
    other = RepQATCallback(QuantConfig(w_bits=6), schedule=Schedule.shallow_to_deep(every=2))
    other.load_state_dict({**state, "epoch": 3, "global_step": 30, "calibrated": True})
    assert other.position == (3, 30) and other.calibrated_by_checkpoint
    assert config_mismatch(state["config"], QuantConfig(w_bits=4)) == {"w_bits": (6, 4)}
    with pytest.raises(ValueError, match="w_bits: checkpoint 6 vs callback 8"):
        RepQATCallback().load_state_dict(state)
    with pytest.warns(UserWarning, match="different RepQATCallback schedule"):
        RepQATCallback(QuantConfig(w_bits=6)).load_state_dict(state)
    assert read_callback_state({"callbacks": {"RepQATCallback": state}}) == state
    assert read_callback_state({"callbacks": {}}) is None


def test_ddp_is_told_about_the_branch_parameters_frozen_or_fused_blocks_leave_unused():
    # the default schedule fuses every block: its other branches get no gradient, which DDP refuses unless
    # find_unused_parameters=True; the callback switches that on before the strategy wraps the model
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    from qat_rep.callbacks.options import allow_unused_parameters

    default = RepQATCallback().schedule
    trainer = SimpleNamespace(strategy=DDPStrategy())
    assert allow_unused_parameters(trainer, default) and trainer.strategy._ddp_kwargs["find_unused_parameters"]
    assert not allow_unused_parameters(trainer, default)  # already on: nothing to change
    plain = SimpleNamespace(strategy=DDPStrategy())
    assert not allow_unused_parameters(plain, Schedule.all_at_once()) and plain.strategy._ddp_kwargs == {}
    assert allow_unused_parameters(SimpleNamespace(strategy=DDPStrategy()), Schedule.shallow_to_deep(freeze_after=1))
    assert not allow_unused_parameters(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), default)
    with pytest.raises(ValueError, match="find_unused_parameters=False"):
        allow_unused_parameters(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=False)), default)
