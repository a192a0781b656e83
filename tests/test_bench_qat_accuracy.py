"""benchmarks/qat_accuracy.py: its helpers (shifted validation views, result merging, rendering) and one tiny run of
each QAT route, so the benchmark cannot silently measure something else than it says."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from qat_rep import create_model
from qat_rep.quant.rep_qat import RepQuant
from qat_rep.quant.backend import QuantConv2d

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "qat_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_qat_accuracy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_shifted_views_translate_with_repeated_border(bench):
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    v = bench.shifted_views(x, 1)
    assert v.shape == (9 * 2, 1, 4, 4)
    c = bench.view_index(0, 0, 1)
    assert torch.equal(v[c * 2:(c + 1) * 2], x)  # the unshifted block is the original
    right = v[bench.view_index(0, 1, 1) * 2:(bench.view_index(0, 1, 1) + 1) * 2]  # content moves left by one
    assert torch.equal(right[:, :, :, :3], x[:, :, :, 1:])
    assert torch.equal(right[:, :, :, 3], x[:, :, :, 3])  # border repeated
    down = v[bench.view_index(-1, 0, 1) * 2:(bench.view_index(-1, 0, 1) + 1) * 2]
    assert torch.equal(down[:, :, 1:, :], x[:, :, :3, :]) and torch.equal(down[:, :, 0, :], x[:, :, 0, :])
    assert torch.equal(bench.shifted_views(x, 0), x)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        bench.shifted_views(x, -1)


def test_scores_count_all_views_and_the_unshifted_one(bench):
    y = torch.tensor([0, 1])
    val = bench.ValSet(x=torch.zeros(18, 1, 2, 2), y=y.repeat(9), n=2, shift=1)
    pred = y.repeat(9).clone()
    pred[:2] = 5  # the (-1, -1) view is wrong for both images
    s = bench.scores(pred, val)
    assert s["top1"] == pytest.approx(100 * 16 / 18) and s["top1_unshifted"] == 100.0
    pred[bench.view_index(0, 0, 1) * 2] = 7
    assert bench.scores(pred, val)["top1_unshifted"] == 50.0


def test_unknown_route_names_the_valid_ones(bench):
    with pytest.raises(ValueError, match="unknown route 'fused_first'.*eqk, fuse_first"):
        bench.get_route("fused_first")


def _run(recipe, model, seed, setting, route, top1, step_s=0.1):
    return {"recipe": recipe, "model": model, "seed": seed, "setting": setting, "route": route, "top1": top1,
            "top1_unshifted": top1, "qat_model": top1, "agreement": 100.0, "step_s": step_s, "qat_s": 10.0,
            "steps": 5}


def test_merge_replaces_same_key_and_summary_means_and_drops(bench):
    data = {"runs": [], "memory": []}
    fp = [{"recipe": "r", "model": "m", "seed": s, "top1": a, "top1_unshifted": a} for s, a in ((0, 98.0), (1, 96.0))]
    data = bench.merge(data, fp + [_run("r", "m", 0, "W4A4", "eqk", 90.0), _run("r", "m", 1, "W4A4", "eqk", 94.0)])
    data = bench.merge(data, [_run("r", "m", 0, "W4A4", "eqk", 97.0)])  # a re-run replaces, never duplicates
    assert len(data["runs"]) == 4
    rows = {(r["setting"], r["route"]): r for r in bench.summarize(data)}
    assert rows[("FP32", "")]["top1"] == 97.0 and rows[("FP32", "")]["spread"] == 1.0
    eqk = rows[("W4A4", "eqk")]
    assert eqk["top1"] == 95.5 and eqk["spread"] == 1.5
    assert eqk["drop"] == pytest.approx(((98 - 97) + (96 - 94)) / 2)


def test_render_has_costs_beside_accuracy(bench):
    data = {"runs": [{"recipe": "r", "model": "m", "seed": 0, "top1": 98.0, "top1_unshifted": 98.0},
                     _run("r", "m", 0, "W4A4", "eqk", 97.0, step_s=0.2),
                     _run("r", "m", 0, "W4A4", "fuse_first", 96.0, step_s=0.1)],
            "memory": [{"model": "m", "setting": None, "route": "fp32", "image_size": 16, "batch_size": 32,
                        "peak_mib": 100.0, "step_s": 1.0},
                       {"model": "m", "setting": "W4A4", "route": "eqk", "image_size": 16, "batch_size": 32,
                        "peak_mib": 130.0, "step_s": 1.2}],
            "meta": {"val_shift": 1, "batch_size": 32}}
    md = bench.render(data)
    eqk = next(line for line in md.splitlines() if "| eqk |" in line and "W4A4" in line and "97.00" in line)
    assert "| 1.30 |" in eqk and "+1.00" in eqk
    assert "| 2.00 |" in eqk  # step time relative to fuse_first in the same run
    ff = next(line for line in md.splitlines() if "| fuse_first |" in line and "96.00" in line)
    assert "| 1.00 |" in ff
    assert "3231 images" in md and "0.28 point" in md


def test_load_results_refuses_a_foreign_file(bench, tmp_path):
    p = tmp_path / "qat_accuracy.json"
    p.write_text(json.dumps({"summary": []}))
    with pytest.raises(ValueError, match="not a qat_accuracy result file.*--fresh"):
        bench.load_results(p)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["eqk", "fuse_first"])
def test_each_route_quantizes_what_it_says_and_deploys_what_it_trains(bench, route):
    torch.manual_seed(0)
    fp32 = create_model("qarepvgg_a0", num_classes=10, small_input=True).eval()
    setting = bench.Setting("W8A8-pt", bench.default_settings()["W8A8-pt"].config, epochs=1, lr=1e-4)
    probe = copy.deepcopy(fp32)
    bench.get_route(route).build(probe, setting.config)
    blocks = [m for m in probe.modules() if type(m).__name__ == "QARepVGGBlock"]
    if route == "eqk":
        assert all(isinstance(b.rep_quant, RepQuant) and not b.fused for b in blocks)
    else:  # one quantized conv per block, the post-BN kept trainable
        assert all(b.fused and isinstance(b.rbr_reparam, QuantConv2d) and b.bn.weight.requires_grad for b in blocks)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    val = bench.ValSet(x=bench.shifted_views(x[:4], 1), y=y[:4].repeat(9), n=4, shift=1)
    r = bench.run_route(fp32, bench.get_route(route), setting, TensorDataset(x, y), val, batch_size=8, seed=0)
    assert r["steps"] == 2 and r["step_s"] > 0 and 0 <= r["top1"] <= 100
    if route == "eqk":  # the trained model is the deployed arithmetic (both scored on the unshifted view)
        assert r["agreement"] == 100.0 and r["qat_model"] == r["top1_unshifted"]


@pytest.mark.slow
def test_memory_probe_sees_the_gradients_of_a_step(tmp_path):
    env_cmd = [sys.executable, str(SCRIPT), "--memory-probe", "repvgg_a0", "fp32", "-", "--image-size", "16",
               "--batch-size", "8"]
    out = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    n_params = sum(p.numel() for p in create_model("repvgg_a0", num_classes=10, small_input=True).parameters())
    assert m["peak_mib"] >= 0.9 * n_params * 4 / 2**20  # the gradients alone are live at the end of the step
    assert m["step_s"] > 0


def test_compare_calls_a_difference_inside_the_seed_spread_a_tie(bench):
    rows = [{"recipe": "r", "model": "m", "setting": "W4A4", "route": "eqk", "top1": 95.0, "spread": 0.5,
             "step_s": 0.3, "seeds": 3},
            {"recipe": "r", "model": "m", "setting": "W4A4", "route": "fuse_first", "top1": 94.7, "spread": 0.2,
             "step_s": 0.2, "seeds": 3},
            {"recipe": "r", "model": "m", "setting": "W8A8-pt", "route": "eqk", "top1": 90.0, "spread": 0.1,
             "step_s": 0.3, "seeds": 3},
            {"recipe": "r", "model": "m", "setting": "W8A8-pt", "route": "fuse_first", "top1": 91.0, "spread": 0.3,
             "step_s": 0.2, "seeds": 3}]
    got = {c["setting"]: c for c in bench.compare(rows)}
    assert bench.compare([{**r, "seeds": 1} for r in rows])[0]["verdict"] == "one seed: not a result"
    assert got["W4A4"]["verdict"].startswith("tie") and got["W4A4"]["time_ratio"] == pytest.approx(1.5)
    assert got["W8A8-pt"]["verdict"] == "fuse_first better" and got["W8A8-pt"]["diff"] == pytest.approx(-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["W8A8-pt", "W4A4"])
def test_fuse_first_deploys_the_network_it_trained_per_channel(bench, label):
    # the trainable post-BN of a fused QARep block is folded at deploy; with per-channel weights (W4A4: learned
    # amax) the fold is exact up to float rounding, with per-tensor weights the folded kernel gets a new grid
    torch.manual_seed(0)
    model = create_model("qarepvgg_a0", num_classes=10, small_input=True)
    g = torch.Generator().manual_seed(0)
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:  # post-BN scales far from 1
        n = bn.num_features
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
        bn.weight.data.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(n, generator=g))
    cfg = bench.default_settings()[label].config
    bench.get_route("fuse_first").build(model, cfg)
    x = torch.randn(32, 3, 16, 16)
    from qat_rep.quant import calibrate

    calibrate(model, [(x,)])
    model.eval()
    with torch.no_grad():
        trained = model(x)
        shipped = bench.deploy(copy.deepcopy(model)).eval()
        deployed = shipped(x)
    assert all(getattr(m, "bn", None) is None for m in shipped.modules() if hasattr(m, "rbr_reparam"))
    assert torch.isfinite(deployed).all()
    if cfg.per_channel:
        # block by block (on the same input) the fold is exact up to float rounding of W·t / (s·t): measured
        # 0.15 % of the output range on the first stage-1 block; convert() alone, which leaves the learned amax
        # unscaled, ships a different network. (Whole-network top-1 agreement of a random 4-bit network is chaotic:
        # 0.6-1.0 between weight calibrators, so it is not the check.)
        from qat_rep.quant import convert

        plain = convert(copy.deepcopy(model)).eval()
        with torch.no_grad():
            h = model.stage0(x)
            ref = model.stage1[0](h)
            err = float((shipped.stage1[0](h) - ref).abs().max())
            err_plain = float((plain.stage1[0](h) - ref).abs().max())
        assert err <= 0.01 * float(ref.abs().max()) and err_plain > 10 * err


@pytest.mark.slow
@pytest.mark.parametrize("route", ["progressive", "fused"])
def test_schedule_routes_collapse_every_block_and_deploy_what_they_trained(bench, route):
    # progressive: eqk for half the steps, then fused; fused (the callback's default schedule): from the first step
    torch.manual_seed(0)
    fp32 = create_model("repvgg_a0", num_classes=10, small_input=True).eval()
    setting = bench.Setting("W8A8-pt", bench.default_settings()["W8A8-pt"].config, epochs=1, lr=1e-4)
    model = copy.deepcopy(fp32)
    hook = bench.get_route(route).build(model, setting.config)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    from qat_rep.quant import calibrate

    calibrate(model, [(x, y)])
    bench.finetune(model, TensorDataset(x, y), setting, batch_size=8, seed=0, on_step=hook)  # 4 steps
    phases = {b.rep_quant.phase for b in model.modules() if getattr(b, "rep_quant", None) is not None}
    assert phases == {"fused"}
    val = bench.ValSet(x=bench.shifted_views(x[:4], 1), y=y[:4].repeat(9), n=4, shift=1)
    r = bench.run_route(fp32, bench.get_route(route), setting, TensorDataset(x, y), val, batch_size=8, seed=0,
                        shift=1)
    assert r["steps"] == 4 and r["agreement"] == 100.0
