"""recipes/qat_yolov6.py end to end with ``--fast`` in a subprocess (as a user runs it), then its files checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qat_rep.export.onnx_export import quantized_node_names, shared_scale_violations

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # qat_rep from the install, as for a user
    return subprocess.run([sys.executable, "recipes/qat_yolov6.py", *args, "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fast_run_writes_every_stage(tmp_path):
    proc = _run("--fast", "--epochs", "1", "--qat-epochs", "1", "--batch-size", "16", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["map"]) == {"fp32", "ptq_w8a8_per_channel", "ptq_w8a8_per_tensor", "qat_w8a8", "ort_int8"}
    assert all(0.0 <= v["map"] <= v["map_50"] <= 1.0 for v in res["map"].values())
    assert res["shared_scale_violations"] == []
    trt = tmp_path / "model_trt.onnx"
    assert shared_scale_violations(trt) == []
    graph = onnx.load(str(trt)).graph
    names = {(n.name or n.output[0]): n.op_type for n in graph.node}
    qdq = quantized_node_names(trt)  # every conv, the two upsampling ConvTranspose included, has Q/DQ
    assert [names[k] for k in qdq].count("Conv") == 69 and [names[k] for k in qdq].count("ConvTranspose") == 2
    assert all(v == (True, True) for v in qdq.values())
    assert [o.name for o in graph.output] == ["output0", "output1", "output2"]  # raw outputs: decoding is outside


@pytest.mark.slow
def test_sensitivity_keep_float_and_distillation(tmp_path):
    out = tmp_path / "run"
    proc = _run("--fast", "--epochs", "1", "--qat-epochs", "1", "--batch-size", "16", "--out", str(out),
                "--sensitivity", "16", "--keep-float", "2", "--distill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = res["sensitivity"]
    assert len(rows) == 69  # every Conv2d of the fused detector quantized alone (the 2 upsampling ConvTranspose2d
    # are not post-training-quantization layers)
    drops = [r["map_drop"] for r in rows]
    assert drops == sorted(drops, reverse=True) and all(-1.0 <= d <= 1.0 for d in drops)
    assert res["keep_float"] == [r["skip_name"] for r in rows[:2]]
    # the two kept layers have no quantized weight in the deployed file; every other conv has Q/DQ
    assert res["trt_convs_with_qdq"] == [69, 71]
    assert res["kd_feature"] > 0  # the channel-wise KL against the FP32 teacher was computed and is not trivial
    assert (out / "report.md").read_text().count("| ") > 10 and (out / "map.png").stat().st_size > 0
    # the FP32 weights written beside the run load back, strictly, into a fresh run that skips FP32 training
    again = _run("--fast", "--epochs", "0", "--qat-epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "re"),
                 "--ckpt", str(out / "fp32.safetensors"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "re" / "results.json").read_text())["map"]["fp32"] == res["map"]["fp32"]


@pytest.mark.slow
def test_keep_float_without_sensitivity_exits_2(tmp_path):
    proc = _run("--fast", "--keep-float", "2", "--out", str(tmp_path / "out"), timeout=600)
    assert proc.returncode == 2 and "--keep-float K needs --sensitivity N" in proc.stderr


@pytest.mark.slow
def test_bad_data_folder_exits_2_with_one_line(tmp_path):
    proc = _run("--fast", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), timeout=600)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "does not exist" in lines[0]
