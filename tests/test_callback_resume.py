"""Checkpoints of a QAT fit: resume equals an uninterrupted fit (across a schedule transition), test(ckpt_path=...)
and load_qat_checkpoint in a fresh process reproduce the fit-end accuracy, a checkpoint of another config is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

import qat_lit_modules as M  # noqa: E402
from qat_rep.callbacks import RepQATCallback, load_qat_checkpoint  # noqa: E402
from qat_rep.quant import PhaseRule, QuantConfig, Schedule  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.slow,  # multi-epoch fits and a fresh process
              pytest.mark.usefixtures("one_thread")]
pl = M.pl

# blocks 2 and 3 run float multi-branch until epoch 3, then QAT; block 0 freezes at epoch 3
SCHEDULE = Schedule(rules=(PhaseRule("model.blocks.0", 0, 3), PhaseRule("model.blocks.2", 3),
                           PhaseRule("model.blocks.3", 3)), default="qat")
PHASES_AT_END = {"model.blocks.0": "frozen", "model.blocks.1": "qat", "model.blocks.2": "qat",
                 "model.blocks.3": "qat"}


def _callback(**kw):
    kw.setdefault("calib_batches", 2)
    return RepQATCallback(schedule=SCHEDULE, **kw)


def _trainer(tmp, max_epochs, cb, **kw):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp, save_top_k=-1, filename="{epoch}")
    return pl.Trainer(max_epochs=max_epochs, callbacks=[cb, ckpt], **M.trainer_kwargs(**kw))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 4-epoch QAT fit with a checkpoint per epoch: (module, callback, checkpoint dir)."""
    tmp = tmp_path_factory.mktemp("full")
    pl.seed_everything(0)
    train, val = M.loaders()
    module, cb = M.ClassifierPL(), _callback()
    _trainer(tmp, 4, cb).fit(module, train, val)
    return module, cb, tmp


def test_resume_mid_schedule_equals_uninterrupted_fit(uninterrupted, tmp_path):
    full, full_cb, _ = uninterrupted
    assert full_cb.phases == PHASES_AT_END
    pl.seed_everything(0)
    train, val = M.loaders()
    first = M.ClassifierPL()
    _trainer(tmp_path, 2, _callback()).fit(first, train, val)
    ckpt = tmp_path / "epoch=1.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["RepQATCallback"]
    assert state["phases"]["model.blocks.2"] == "float" and state["calibrated"] is True

    pl.seed_everything(0)
    resumed, cb = M.ClassifierPL(), _callback()
    _trainer(tmp_path, 4, cb).fit(resumed, train, val, ckpt_path=ckpt)
    assert cb.calib_report is None  # calibration skipped: the checkpoint holds calibrated quantizers
    assert cb.phases == PHASES_AT_END
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # the transition really changed training: a float block's BN statistics moved only while it was float
    assert not torch.equal(a["model.blocks.2.rbr_dense.bn.running_mean"],
                           torch.zeros_like(a["model.blocks.2.rbr_dense.bn.running_mean"]))


def test_test_with_ckpt_path_reproduces_fit_end_accuracy(uninterrupted):
    full, full_cb, tmp = uninterrupted
    _, val = M.loaders()
    cb = _callback()
    trainer = pl.Trainer(callbacks=[cb], **M.trainer_kwargs())
    out = trainer.test(M.ClassifierPL(), val, ckpt_path=tmp / "epoch=3.ckpt", verbose=False)[0]
    assert cb.phases == PHASES_AT_END
    assert cb.metrics["test_acc_fakequant"] == pytest.approx(full_cb.metrics["val_acc_fakequant"], abs=1e-6)
    assert cb.metrics["test_acc_fp32"] == pytest.approx(full_cb.metrics["val_acc_fp32"], abs=1e-6)
    assert out["test_acc"] == pytest.approx(full_cb.metrics["val_acc_fakequant"], abs=1e-6)


def test_validate_and_predict_with_ckpt_path(uninterrupted):
    full, full_cb, tmp = uninterrupted
    _, val = M.loaders()
    cb = _callback()
    pl.Trainer(callbacks=[cb], **M.trainer_kwargs()).validate(M.ClassifierPL(), val, ckpt_path=tmp / "epoch=3.ckpt",
                                                               verbose=False)
    assert cb.metrics["val_acc_fakequant"] == pytest.approx(full_cb.metrics["val_acc_fakequant"], abs=1e-6)
    cb = _callback()
    preds = pl.Trainer(callbacks=[cb], **M.trainer_kwargs()).predict(M.ClassifierPL(), val,
                                                                      ckpt_path=tmp / "epoch=3.ckpt")
    assert cb.phases == PHASES_AT_END
    full.eval()
    with torch.no_grad():
        expected = torch.cat([full(b[0]) for b in val])
    assert torch.equal(torch.cat(preds), expected)


def test_load_qat_checkpoint_in_a_fresh_process(uninterrupted):
    full, full_cb, tmp = uninterrupted
    script = os.path.join(os.path.dirname(__file__), "scripts", "eval_qat_checkpoint.py")
    res = subprocess.run([sys.executable, script, str(tmp / "epoch=3.ckpt")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["class"] == "ClassifierPL"
    assert got["phases"] == PHASES_AT_END
    assert got["acc_fakequant"] == pytest.approx(full_cb.metrics["val_acc_fakequant"], abs=1e-6)
    assert got["acc_fp32"] == pytest.approx(full_cb.metrics["val_acc_fp32"], abs=1e-6)


def test_load_qat_checkpoint_matches_the_trained_module(uninterrupted):
    full, _, tmp = uninterrupted
    loaded = load_qat_checkpoint(M.ClassifierPL, tmp / "epoch=3.ckpt").eval()
    assert type(loaded) is M.ClassifierPL
    a, b = full.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = next(iter(M.loaders()[1]))[0]
    full.eval()
    with torch.no_grad():
        assert torch.equal(full(x), loaded(x))


def test_load_qat_checkpoint_never_unpickles(uninterrupted, tmp_path, monkeypatch):
    """A crafted checkpoint: its payload never runs, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    from helpers import PicklePayload

    _, _, ckpt_dir = uninterrupted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    state = torch.load(ckpt_dir / "epoch=3.ckpt", weights_only=True)
    state["hyper_parameters"]["note"] = PicklePayload(marker)
    torch.save(state, tmp_path / "crafted.ckpt")
    with pytest.raises(ValueError, match=r"crafted.ckpt' holds a '(posix|os)\.system' object") as err:
        load_qat_checkpoint(M.ClassifierPL, tmp_path / "crafted.ckpt")
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(TypeError, match="always loads with weights_only=True"):
        load_qat_checkpoint(M.ClassifierPL, ckpt_dir / "epoch=3.ckpt", weights_only=False)


def test_load_qat_checkpoint_refuses_a_float_checkpoint(tmp_path):
    train, _ = M.loaders(n_train=16)
    trainer = pl.Trainer(max_epochs=1, **M.trainer_kwargs(enable_checkpointing=False))
    module = M.ClassifierPL()
    trainer.fit(module, train)
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    with pytest.raises(ValueError, match="checkpoint has no RepQATCallback state"):
        load_qat_checkpoint(M.ClassifierPL, tmp_path / "float.ckpt")


def test_resume_with_another_granularity_is_refused_before_the_weights_load(uninterrupted, tmp_path):
    _, _, tmp = uninterrupted
    train, val = M.loaders()
    cb = RepQATCallback(QuantConfig(w_granularity="per_tensor"), schedule=SCHEDULE)
    with pytest.raises(ValueError, match="saved with a different QuantConfig: its quantizer state does not match"):
        _trainer(tmp_path, 4, cb).fit(M.ClassifierPL(), train, val, ckpt_path=tmp / "epoch=1.ckpt")


def test_resume_with_another_calibrator_is_refused(uninterrupted, tmp_path):
    _, _, tmp = uninterrupted
    train, val = M.loaders()
    cb = RepQATCallback(QuantConfig(calibrator="percentile", calib_batches=2), schedule=SCHEDULE)
    with pytest.raises(ValueError, match="different QuantConfig .*calibrator: checkpoint 'max' vs callback 'percentile'"):
        _trainer(tmp_path, 4, cb).fit(M.ClassifierPL(), train, val, ckpt_path=tmp / "epoch=1.ckpt")
