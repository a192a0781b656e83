"""RepQATCallback with real multi-process DDP on CPU (gloo): every rank ends with identical quantizer state and
weights; calibration ranges are reduced (max) across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

import qat_lit_modules as M  # noqa: E402
from qat_rep.callbacks import RepQATCallback  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.slow]  # two-process fits


def _compare_ranks(out_dir):
    r0 = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)
    r1 = torch.load(os.path.join(out_dir, "rank1.pt"), weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["state"].keys() == r1["state"].keys()
    different = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert different == []
    amax = {k: v for k, v in r0["state"].items() if k.endswith("_input_quantizer._amax")}
    assert amax and all(torch.isfinite(v).all() for v in amax.values())
    return r0


def test_ddp_spawn_ranks_end_identical_and_calibration_is_reduced(tmp_path):
    train, val = M.loaders(batch_size=8, n_train=32, n_val=16)
    cb = RepQATCallback(calib_batches=1)
    trainer = M.pl.Trainer(max_epochs=1, callbacks=[cb, M.DumpState(str(tmp_path))],
                           **M.trainer_kwargs(devices=2, strategy="ddp_spawn", enable_checkpointing=False))
    trainer.fit(M.ClassifierPL(), train, val)
    r0 = _compare_ranks(tmp_path)
    # one calibration batch per rank: rank 0 reads samples 0,2,..,14 and rank 1 samples 1,3,..,15 (distributed
    # sampler); the stem's input range must be the max over both shards, not rank 0's own
    x = train.dataset.tensors[0][:16]
    assert x[0::2].abs().max() != x.abs().max()  # the test can tell the two apart
    assert r0["state"]["model.stem.0._input_quantizer._amax"] == pytest.approx(float(x.abs().max()), rel=1e-6)
    assert set(r0["phases"].values()) == {"fused"}  # the default collapses every block; DDP told about unused ones


def test_ddp_standalone_script_ranks_end_identical(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "ddp_fit.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-4000:]
    r0 = _compare_ranks(tmp_path)
    assert set(r0["phases"].values()) == {"frozen"}
    # rank 0 alone exported, and checked the ONNX file on its own shard of the validation set (8 of 16 samples)
    verify = json.loads((tmp_path / "deploy" / "onnx_verify.json").read_text())
    written = sorted(p.name for p in (tmp_path / "deploy").iterdir())
    assert written == ["model.safetensors", "model_int8.onnx", "onnx_verify.json", "qat_rep.json"]
    assert verify["samples"] == 8 and verify["agreement"] >= 0.995
