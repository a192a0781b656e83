"""benchmarks/det_accuracy.py: its table, the targets it checks on the seed means, and which finished runs it reuses
(synthetic run results: the benchmark must not call a missed target met, nor reuse a run made with other settings)."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "det_accuracy.py"
STAGES = ("fp32", "ptq_w8a8_per_channel", "ptq_w8a8_per_tensor", "qat_w8a8", "ort_int8")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_det_accuracy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _run(block, seed, fp32, pc, pt, qat, ort, qdq=(71, 71), violations=()):
    maps = dict(zip(STAGES, (fp32, pc, pt, qat, ort)))
    return {"block": block, "seed": seed, "map": {k: {"map": v, "map_50": min(1.0, v + 0.2)} for k, v in maps.items()},
            "shared_scale_violations": list(violations), "trt_convs_with_qdq": list(qdq)}


def _by_target(checks):
    return {c["target"]: c["holds"] for c in checks}


def test_targets_hold_and_fail_on_the_means(bench):
    runs = {"repvgg": [_run("repvgg", 0, 0.600, 0.500, 0.300, 0.597, 0.596),
                       _run("repvgg", 1, 0.620, 0.520, 0.320, 0.615, 0.614)],
            "qarepvggv2": [_run("qarepvggv2", 0, 0.600, 0.595, 0.590, 0.590, 0.580),
                           _run("qarepvggv2", 1, 0.610, 0.605, 0.600, 0.600, 0.590)]}
    t = _by_target(bench.targets(runs))
    assert t["repvgg: QAT W8A8 within 0.5 of FP32"] is True  # gap 0.40 points
    assert t["repvgg: ONNX Runtime INT8 within 0.2 of fake quant"] is True  # 0.10
    assert t["qarepvggv2: QAT W8A8 within 0.5 of FP32"] is False  # gap 1.0 point
    assert t["qarepvggv2: ONNX Runtime INT8 within 0.2 of fake quant"] is False  # 1.0
    assert t["PTQ W8A8 per-tensor: repvgg loses more than qarepvggv2 (FP32 − PTQ)"] is True  # 30 vs 1 points
    assert t["PTQ W8A8 per-channel: repvgg loses more than qarepvggv2 (FP32 − PTQ)"] is True  # 10 vs 0.5
    runs["repvgg"][1] = _run("repvgg", 1, 0.620, 0.700, 0.900, 0.615, 0.614, qdq=(69, 71),
                             violations=("Concat_3",))
    t = _by_target(bench.targets(runs))
    per_tensor = "PTQ W8A8 per-tensor: repvgg loses more than qarepvggv2 (FP32 − PTQ)"
    assert t[per_tensor] is False  # -4 vs 1
    # a lower FP32 model is not a larger PTQ loss: repvgg below qarepvggv2 in absolute terms, same drop
    low = {"repvgg": [_run("repvgg", 0, 0.500, 0.495, 0.490, 0.5, 0.5)],
           "qarepvggv2": [_run("qarepvggv2", 0, 0.600, 0.595, 0.590, 0.6, 0.6)]}
    assert _by_target(bench.targets(low))[per_tensor] is False
    assert t["repvgg: TensorRT layout without shared-scale violations, every conv with Q/DQ"] is False
    assert t["qarepvggv2: TensorRT layout without shared-scale violations, every conv with Q/DQ"] is True


def test_table_is_mean_and_half_spread_in_points(bench):
    runs = {"repvgg": [_run("repvgg", 0, 0.600, 0.5, 0.3, 0.597, 0.596),
                       _run("repvgg", 1, 0.620, 0.5, 0.3, 0.617, 0.6)]}
    md = bench.markdown(runs, "settings line")
    fp32_row = next(line for line in md.splitlines() if line.startswith("| FP32 "))
    assert "61.0 ± 1.0 / 81.0 ± 1.0" in fp32_row
    assert "(n=2)" in md and "settings line Runs made on commit unknown." in md and "holds: repvgg: QAT W8A8 within 0.5 of FP32" in md


def test_reuses_only_runs_with_the_same_settings(bench, tmp_path):
    args = argparse.Namespace(epochs=12, qat_epochs=2)
    folder = tmp_path / "repvgg-seed0"
    folder.mkdir()
    res = _run("repvgg", 0, 0.6, 0.5, 0.3, 0.6, 0.6)
    res["args"] = {"model": "yolov6_n", "block": "repvgg", "seed": 0, "epochs": 12, "qat_epochs": 2, "fast": False,
                   "data": "digits", "ckpt": None, "threads": 1}
    (folder / "results.json").write_text(json.dumps(res))
    assert bench.reusable(folder / "results.json", "repvgg", 0, args) is None  # no run.json: not this benchmark's
    (folder / "run.json").write_text(json.dumps({"commit": "abc1234", "wall_seconds": 10.0}))
    got = bench.reusable(folder / "results.json", "repvgg", 0, args)
    assert got is not None and got["commit"] == "abc1234"
    assert bench.reusable(folder / "results.json", "repvgg", 1, args) is None
    assert bench.reusable(folder / "results.json", "repvgg", 0, argparse.Namespace(epochs=3, qat_epochs=2)) is None
