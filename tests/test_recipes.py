"""The recipes end to end: each runs with ``--fast`` in a subprocess from the repository root (as a user runs it),
then every artifact it wrote is loaded back and checked against the numbers the recipe reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recipe_common as common  # recipes/ is on sys.path (tests/conftest.py), as it is for a recipe script

ROOT = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_recipe(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, f"recipes/{script}", *args, "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def qat_b0_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qat_b0")
    run_recipe("qat_b0.py", "--fast", "--out", str(out))
    return out


def _fast_data(results: dict) -> "common.ImageDataModule":
    """The data the --fast run used (its image size, 128 training and 128 validation images)."""
    return common.ImageDataModule("digits", results["image_size"], 64, 0, limit=128, val_limit=128)


@pytest.mark.slow
def test_qat_b0_fast_runs_both_block_types_and_every_cell(qat_b0_run: Path) -> None:
    """Defaults: RepVGG and QARepVGG side by side; every PTQ, CFWS and QAT cell is in results.json, the report and
    the table rows, and each number is what the saved artifacts give when loaded back."""
    import onnx

    import qat_b0
    from qat_rep.callbacks import load_qat_checkpoint
    from qat_rep import MinMaxConfig
    from qat_rep.export import load_quantized, verify_onnx
    from qat_rep.export.artifact import read_metadata
    from qat_rep.quant.calibrate import is_calibrated
    from qat_rep.quant.insert import get_config, quant_layers

    out = qat_b0_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["repvgg_a0", "qarepvgg_a0"]
    dm = _fast_data(results)
    val = dm.val_dataloader()
    settings = qat_b0.ptq_settings(1)
    # the cells the default run must hold: plain max PTQ at W8A8, W8A8 per-tensor weights, W6A6, W4A4 (CFWS below)
    labels = {(s.method.name, s.label) for s in settings}
    assert {("max", "W8A8"), ("max", "W8A8 per-tensor W"), ("max", "W6A6"), ("max", "W4A4")} <= labels
    report = (out / "report.md").read_text()
    for name, res in results["models"].items():
        d = out / name
        fp32 = common.load_classifier(d / "fp32.ckpt")
        assert fp32.hparams.model_name == name
        assert common.evaluate_accuracy(fp32.model, val) == pytest.approx(res["fp32_acc"], abs=1e-9)
        plain = {k.split("/", 1)[1]: v for k, v in res["ptq"].items() if k.startswith("max/")}
        assert set(plain) == {s.label for s in settings}
        # one CFWS cell, at the setting above 4 bits where plain PTQ lost most
        worst = min((s for s in settings if s.config.w_bits > 4), key=lambda s: plain[s.label]).label
        assert qat_b0.collapse_setting(settings, plain).label == worst
        assert set(res["ptq"]) == {f"max/{s.label}" for s in settings} | {f"cfws/{worst}"}
        w6 = next(s for s in settings if (s.method, s.label) == (MinMaxConfig(), "W6A6"))
        calib = common.collect_batches(dm.train_dataloader(), 1)
        assert qat_b0.plain_ptq(fp32.model, calib, val, w6) == pytest.approx(res["ptq"]["max/W6A6"], abs=1e-9)
        assert set(res["qat"]) == {"w8a8", "w4a4"}

        qat = load_qat_checkpoint(common.ImageClassifier, d / "qat_w8a8.ckpt", map_location="cpu").eval()
        assert is_calibrated(qat) and quant_layers(qat)
        assert common.evaluate_accuracy(qat.model, val) == pytest.approx(res["qat"]["w8a8"]["fakequant_acc"], abs=1e-9)
        for tag, bits in (("w8a8", 8), ("w4a4", 4)):
            assert read_metadata(d / f"deploy_{tag}")["w_bits"] == bits
            deployed = load_quantized(d / f"deploy_{tag}")
            assert common.evaluate_accuracy(deployed, val) == pytest.approx(res["qat"][tag]["deploy_acc"], abs=1e-9)
        assert "onnx_skipped" in res["qat"]["w4a4"] and not (d / "deploy_w4a4" / "model_int8.onnx").exists()
        low = load_qat_checkpoint(common.ImageClassifier, d / "qat_w4a4.ckpt", map_location="cpu")
        assert low.hparams.amax_lr_scale == pytest.approx(qat_b0.build_parser().get_default("amax_lr_scale"))
        assert get_config(low).unsigned_activations and get_config(low).learn_amax

        onnx_int8 = d / "deploy_w8a8" / "model_int8.onnx"
        for path in (onnx_int8, d / "model_fp32.onnx"):
            onnx.checker.check_model(onnx.load(str(path)))
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(onnx_int8)).graph.node}
        deployed = load_quantized(d / "deploy_w8a8")
        ver = verify_onnx(onnx_int8, deployed, val)
        assert 100 * ver.ort_accuracy == pytest.approx(res["qat"]["w8a8"]["ort_acc"], abs=1e-9)
        assert set(res["ort_latency_ms_batch1"]) == {"FP32 (fused)", "INT8 W8A8"}
        assert all(v > 0 for v in res["ort_latency_ms_batch1"].values())
        for row in (f"| {name} | QAT fake-quant | W8A8 |", f"| {name} | ORT INT8 | W8A8 |",
                    f"| {name} | QAT fake-quant | W4A4 |", f"| {name} | PTQ CFWS |", f"| {name} | PTQ max | W4A4 |"):
            assert row in report
        assert f"{res['fp32_acc']:.2f}" in report
        # the caption names both latencies of every model
        assert f"{name} FP32 {res['ort_latency_ms_batch1']['FP32 (fused)']:.2f} ms" in report
    check_png(out / "accuracy.png")
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"FP32", "PTQ max", "PTQ CFWS", "QAT fake-quant", "ORT INT8"}
    assert len(results["rows"]) == 2 * (1 + len(settings) + 1 + 2 + 1)  # FP32, PTQ, CFWS, 2 QAT, 1 ORT per model
    assert results["seconds"]["process"] >= results["seconds"]["total"] > 0
    assert "wall time of the whole run" in report


def _artifact_set(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.endswith(".log")}


@pytest.mark.slow
def test_qat_b0_ddp_two_processes_writes_the_same_artifacts(qat_b0_run: Path, tmp_path: Path) -> None:
    """``--block qarepvgg --bits 8`` is the single-model run; under DDP it writes what the one-process run writes for
    that model."""
    from qat_rep.export import load_quantized, verify_onnx

    out = tmp_path / "ddp"
    run_recipe("qat_b0.py", "--fast", "--block", "qarepvgg", "--bits", "8", "--devices", "2", "--strategy", "ddp",
               "--out", str(out))
    expected = {p for p in _artifact_set(qat_b0_run) if not p.startswith("repvgg_a0/") and "w4a4" not in p}
    assert _artifact_set(out) == expected
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["qarepvgg_a0"] and list(results["models"]["qarepvgg_a0"]["qat"]) == ["w8a8"]
    res = results["models"]["qarepvgg_a0"]
    val = _fast_data(results).val_dataloader()
    deployed = load_quantized(out / "qarepvgg_a0" / "deploy_w8a8")
    assert common.evaluate_accuracy(deployed, val) == pytest.approx(res["qat"]["w8a8"]["deploy_acc"], abs=1e-9)
    ver = verify_onnx(out / "qarepvgg_a0" / "deploy_w8a8" / "model_int8.onnx", deployed, val)
    assert ver.agreement >= 0.995


@pytest.mark.slow
def test_qat_b0_onnxruntime_target_is_integer_from_conv_to_conv(tmp_path: Path) -> None:
    """The ONNX Runtime target on a model that decides: three FP32 epochs and one QAT epoch on the full digits.

    ORT and the PyTorch model compute the same integers except where a requantized value lies within float32
    rounding of a .5 tie (ORT: the exact int32 accumulator times one float32 multiplier; PyTorch: a float32 conv of
    the dequantized tensors): measured 2 of 1.5 M stem outputs on one 128-image batch. That moves the logits by up to
    about one output step, which flips the top-1 of images whose two best logits are closer than that: on the
    ``--fast`` model (chance accuracy, max |logit| 0.38: 2.3 output steps, or one flip in 128) and after one epoch each
    (62 %, a fifth of the margins below 0.1: 2 flips in 359); after three FP32 epochs (94 %) 100 % and 0.80 steps."""
    import onnx

    from qat_rep.export import load_quantized, verify_onnx
    from qat_rep.export.bench import ort_op_counts

    out = tmp_path / "ort"
    run_recipe("qat_b0.py", "--block", "qarepvgg", "--bits", "8", "--deploy-target", "onnxruntime", "--epochs", "3",
               "--qat-epochs", "1", "--out", str(out))
    d = out / "qarepvgg_a0"
    deployed = load_quantized(d / "deploy_w8a8")
    assert deployed.qat_rep_artifact["quant_config"]["unsigned_activations"] is True
    graph = onnx.load(str(d / "deploy_w8a8" / "model_int8.onnx")).graph
    assert not any(n.op_type == "Relu" for n in graph.node)  # folded into UINT8 quantizers
    ops = ort_op_counts(d / "deploy_w8a8" / "model_int8.onnx", threads=1)
    assert ops.get("QLinearConv") == 22 and ops.get("QGemm") == 1 and "Relu" not in ops
    results = json.loads((out / "results.json").read_text())
    dm = common.ImageDataModule("digits", results["image_size"], 64, 0)
    ver = verify_onnx(d / "deploy_w8a8" / "model_int8.onnx", deployed, dm.val_dataloader())
    assert ver.samples == results["validation_images"] > 300
    assert ver.torch_accuracy > 0.8  # the logits decide (chance: 0.1), so the bar below measures the arithmetic
    assert ver.agreement >= 0.995 and ver.max_diff_steps <= 1.0
    assert 100 * ver.agreement == pytest.approx(results["models"]["qarepvgg_a0"]["qat"]["w8a8"]["ort_agreement"])


@pytest.mark.slow
@pytest.mark.parametrize("script,main_method,bits", [("ptq_cfws.py", "cfws", 8), ("ptq_mrecg.py", "mrecg", 8)])
def test_ptq_recipes_on_a_trained_checkpoint(qat_b0_run: Path, tmp_path: Path, script: str, main_method: str,
                                             bits: int) -> None:
    from qat_rep.export import ort_session

    out = tmp_path / "ptq"
    base = json.loads((qat_b0_run / "results.json").read_text())
    size = str(base["image_size"])
    run_recipe(script, "--fast", "--ckpt", str(qat_b0_run / "qarepvgg_a0" / "fp32.ckpt"), "--block", "qarepvgg",
               "--bits", str(bits), "--image-size", size, "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    # the same checkpoint was loaded
    assert results["fp32_acc"] == pytest.approx(base["models"]["qarepvgg_a0"]["fp32_acc"], abs=1e-9)
    key = f"{main_method}/w{bits}a{bits}"
    assert key in results["ptq"] and 0.0 <= results["ptq"][key]["accuracy"] <= 100.0
    onnx_file = out / results["ptq"][key]["onnx"]
    sess = ort_session(onnx_file)  # precise INT8 kernels, as verify_onnx runs them
    dm = common.ImageDataModule("digits", base["image_size"], 64, 0, val_limit=128)
    correct = total = 0
    for x, y in dm.val_dataloader():
        pred = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].argmax(1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    assert 100.0 * correct / total == pytest.approx(results["ptq"][key]["ort_acc"], abs=1e-9)
    assert f"| {main_method} | W{bits}A{bits} |" in (out / "report.md").read_text()
    check_png(out / "accuracy.png")


@pytest.mark.slow
def test_qat_yolov6_backbone_fast(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qat_rep.export import ort_session

    import qat_yolov6_backbone as y6

    out = tmp_path / "y6"
    run_recipe("qat_yolov6_backbone.py", "--fast", "--out", str(out))
    results = json.loads((out / "results.json").read_text())

    keyed = load_file(str(out / "fp32_yolov6_keys.safetensors"))
    assert "backbone.stem.rbr_dense.conv.weight" in keyed and "backbone.ERBlock_5.2.cv2.bn.running_var" in keyed
    assert "backbone.ERBlock_2.1.conv1.rbr_1x1.weight" in keyed and "backbone.ERBlock_2.0.bn.weight" in keyed
    module = y6.SegModule("n", "qarepvgg")
    assert y6.load_yolov6_keyed(module, out / "fp32_yolov6_keys.safetensors") == []
    dm = y6.CanvasDataModule(64, 32, 32, 0)
    val = dm.val_dataloader()
    assert y6.mean_iou(module.net, val) == pytest.approx(results["fp32_miou"], abs=1e-6)

    x = next(iter(val))[0][:4]
    sess = ort_session(out / "model_w8a8.onnx")
    logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert logits.shape == (4, y6.NUM_CLASSES, y6.CANVAS, y6.CANVAS) and np.isfinite(logits).all()
    assert y6.mean_iou(y6.ort_runner(out / "model_w8a8.onnx"), val) == pytest.approx(results["ort_int8_miou"],
                                                                                     abs=1e-6)
    fused = load_file(str(out / "deploy" / "model.safetensors"))
    assert "backbone.stem.rbr_reparam.weight" in fused and not any("rbr_dense" in k for k in fused)
    assert (out / "qat.ckpt").stat().st_size > 0
    assert "| ORT INT8 | W8A8 |" in (out / "report.md").read_text()
    check_png(out / "miou.png")


# ------------------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("module_name,flags", [
    ("qat_b0", ("--epochs", "--qat-epochs", "--bits", "--data", "--devices", "--strategy", "--out", "--ckpt",
                "--fast", "--seed", "--block", "--model", "--lr", "--qat-lr", "--calibrator", "--deploy-target",
                "--image-size", "--warmup", "--qat-epochs-low", "--qat-lr-low", "--amax-lr-scale")),
    ("qat_yolov6_backbone", ("--epochs", "--qat-epochs", "--bits", "--data", "--devices", "--strategy", "--out",
                             "--ckpt", "--fast", "--seed", "--block", "--size")),
])
def test_help_documents_every_flag(module_name: str, flags: tuple[str, ...]) -> None:
    mod = __import__(module_name)
    parser = mod.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    for flag in flags:
        assert flag in text


def test_ptq_recipes_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    import ptq_cfws
    import ptq_mrecg

    for mod, extra in ((ptq_cfws, ()), (ptq_mrecg, ("--iters", "--num-samples", "--k", "--qdrop"))):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for flag in ("--epochs", "--bits", "--data", "--devices", "--strategy", "--out", "--ckpt", "--fast",
                     "--seed", "--block", *extra):
            assert flag in text


@pytest.mark.parametrize("argv,message", [
    (["--bits", "9"], r"--bits values must be in 2\.\.8"),
    (["--bits", "eight"], r"comma-separated integers"),
    (["--epochs", "0"], r"--epochs 0 needs --ckpt"),
    (["--epochs", "-1"], r"--epochs must be >= 0"),
    (["--devices", "0"], r"--devices must be >= 1"),
    (["--ckpt", "/nonexistent/fp32.ckpt"], r"is not a file"),
    (["--block", "qarepvggv2"], r"invalid choice: 'qarepvggv2'"),  # no classifier family with V2 blocks
    (["--calib-batches", "0"], r"--calib-batches must be >= 1"),
    (["--image-size", "4"], r"--image-size must be >= 8"),
    (["--warmup", "1"], r"--warmup must be in \[0, 1\)"),
    (["--amax-lr-scale", "0"], r"--amax-lr-scale must be > 0"),
    (["--qat-epochs-low", "-1"], r"--qat-epochs-low must be >= 0"),
    (["--ckpt", __file__], r"--ckpt holds one trained model: pass its --block"),
])
def test_qat_b0_rejects_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    import qat_b0

    with pytest.raises(SystemExit, match="2"):
        qat_b0.parse_args(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_yolov6_recipe_rejects_bad_flags(capsys: pytest.CaptureFixture) -> None:
    import qat_yolov6_backbone as y6

    with pytest.raises(SystemExit, match="2"):
        y6.parse_args(["--data", "/some/folder"])
    assert "only 'digits' is supported" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        y6.parse_args(["--train-canvases", "8"])
    assert "must be >= --batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        y6.parse_args(["--bits", "4"])
    assert "holds 8-bit integers only" in capsys.readouterr().err


def test_mrecg_recipe_rejects_bad_flags(capsys: pytest.CaptureFixture) -> None:
    import ptq_mrecg

    with pytest.raises(SystemExit, match="2"):
        ptq_mrecg.main(["--iters", "0"])
    assert "--iters must be >= 1" in capsys.readouterr().err


def test_loaders_and_glue_raise_clear_errors(tmp_path: Path) -> None:
    import qat_yolov6_backbone as y6

    with pytest.raises(ValueError, match="lr must be > 0"):
        common.ImageClassifier(model_name="qarepvgg_a0", lr=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        common.ImageDataModule(batch_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_classifier(tmp_path / "missing.ckpt")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint type '.npz'"):
        common.load_classifier(bad)
    with pytest.raises(ValueError, match="empty loader"):
        common.evaluate_accuracy(torch.nn.Identity(), [])
    from safetensors.torch import save_file

    headless = tmp_path / "not_yolov6.safetensors"
    save_file({"stem.weight": torch.zeros(1)}, str(headless))
    with pytest.raises(ValueError, match="no 'backbone.\\*' keys"):
        y6.load_yolov6_keyed(y6.SegModule("n"), headless)


@pytest.mark.parametrize("name", ["fp32.ckpt", "weights.pt", "yolov6.pt"])
def test_crafted_checkpoint_never_runs_its_payload(tmp_path: Path, name: str, monkeypatch) -> None:
    """``--ckpt`` files are read with weights_only=True, even when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks otherwise."""
    import qat_yolov6_backbone as y6
    from helpers import PicklePayload

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": PicklePayload(marker)}, path)
    with pytest.raises(ValueError, match=r"holds a '(posix|os)\.system' object.*weights_only=True") as err:
        if name == "yolov6.pt":
            y6.load_yolov6_keyed(y6.SegModule("n"), path)
        else:
            common.load_classifier(path)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_state_dict_checkpoint_loads_in_any_form(tmp_path: Path) -> None:
    """``--ckpt`` also takes a bare state dict — train form or fused, with or without a ``model.`` prefix."""
    from safetensors.torch import save_file

    from qat_rep import reparameterize

    src = common.ImageClassifier(model_name="qarepvgg_a0").eval()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    ref = src(x)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "train_form.pt")
    fused = common.ImageClassifier(model_name="qarepvgg_a0")
    fused.load_state_dict(src.state_dict())
    reparameterize(fused.model, fold_post_bn=True)
    save_file({k: v.contiguous() for k, v in fused.model.state_dict().items()}, str(tmp_path / "fused.safetensors"))
    a = common.load_classifier(tmp_path / "train_form.pt", model_name="qarepvgg_a0").eval()
    torch.testing.assert_close(a(x), ref)
    with pytest.raises(ValueError, match="fused kernel cannot be split back"):
        common.load_classifier(tmp_path / "fused.safetensors", model_name="qarepvgg_a0")


def test_canvases_label_every_ink_pixel_with_its_digit() -> None:
    import qat_yolov6_backbone as y6

    ds = y6.make_canvases("val", 16, seed=3)
    x, y = ds.tensors
    assert x.shape == (16, 3, y6.CANVAS, y6.CANVAS) and y.shape == (16, y6.CANVAS, y6.CANVAS)
    raw = x[:, 0] * y6._STD + y6._MEAN
    assert torch.all(raw[y > 0] > 0.35)  # labelled pixels are ink
    assert y.max() <= 10 and (y > 0).float().mean() > 0.02
    again = y6.make_canvases("val", 16, seed=3)
    assert torch.equal(again.tensors[1], y) and not torch.equal(y6.make_canvases("val", 16, seed=4).tensors[1], y)


def test_plot_and_report_writers(tmp_path: Path) -> None:
    rows = [common.ResultRow("FP32", "FP32", 98.0), common.ResultRow("PTQ", "W8A8", 97.5),
            common.ResultRow("PTQ", "W4A4", 60.0, 1.5, "note")]
    check_png(common.plot_accuracy(rows, tmp_path / "p.png", "t"))
    md = common.results_markdown(rows)
    assert "| PTQ | W4A4 | 60.00 | 1.50 | note |" in md
    path = common.write_report(tmp_path / "r.md", "T", [("A", md)])
    assert path.read_text().startswith("# T\n\n## A\n") and not list(tmp_path.glob(".*"))
    assert [r.wbits for r in rows] == [None, 8, 4]


def test_warmup_cosine_schedule() -> None:
    total, warmup, final = 100, 10, 0.01
    f = [common.warmup_cosine(i, total, warmup, final) for i in range(total + 5)]
    assert f[0] == pytest.approx(1 / 11) and f[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup + 1]))  # rising during the warm-up
    assert all(a >= b for a, b in zip(f[warmup:total], f[warmup + 1:total + 1]))  # then falling
    assert f[total] == pytest.approx(final) and f[-1] == pytest.approx(final)
    assert common.warmup_cosine(0, total, 0, final) == pytest.approx(1.0)  # no warm-up: cosine from the start
    with pytest.raises(ValueError, match="warmup_ratio"):
        common.ImageClassifier(model_name="qarepvgg_a0", warmup_ratio=1.0)
    with pytest.raises(ValueError, match="amax_lr_scale"):
        common.ImageClassifier(model_name="qarepvgg_a0", amax_lr_scale=0.0)


def test_learned_ranges_get_their_own_learning_rate_and_an_mse_start() -> None:
    """Below 8 bits qat_b0 trains the learned ranges at ``amax_lr_scale · lr`` without weight decay, and starts the
    weight ranges from an MSE search instead of max|W| (never above it)."""
    import qat_b0
    from qat_rep.quant import calibrate, prepare
    from qat_rep.quant.insert import quantizers, refresh_weight_amax

    module = common.ImageClassifier(model_name="repvgg_a0", small_input=True, lr=1e-3, amax_lr_scale=10.0)
    assert len(module.optimizer_groups()) == 2  # no learned ranges yet: no third group
    cfg, _, _ = qat_b0.qat_config(qat_b0.parse_args([]), 4)
    assert cfg.learn_amax and cfg.unsigned_activations and cfg.w_bits == cfg.a_bits == 4
    prepare(module, cfg)
    x = torch.randn(16, 3, 16, 16)
    calibrate(module, [(x, torch.zeros(16, dtype=torch.long))], cfg)
    groups = module.optimizer_groups()
    amax = {id(p) for n, p in module.named_parameters() if n.endswith("._amax")}
    assert amax and {id(p) for p in groups[2]["params"]} == amax
    assert groups[2]["lr"] == pytest.approx(1e-2) and groups[2]["weight_decay"] == 0.0
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in module.parameters())

    after = {n: q.amax.detach().clone() for n, q in quantizers(module, "weight") if q.learn_amax}
    refresh_weight_amax(module, "max")
    before = {n: q.amax.detach().clone() for n, q in quantizers(module, "weight") if q.learn_amax}
    assert len(after) == len(before) > 0 and cfg.weight_calibrator == "mse"
    assert all(bool((after[n] <= before[n] * (1 + 1e-6)).all()) for n in before)
    assert any(bool((after[n] < 0.99 * before[n]).any()) for n in before)  # 4-bit kernels: some ranges shrink
    assert module(x).shape == (16, 10)
    name, q = next((n, q) for n, q in quantizers(module, "weight") if q.learn_amax)
    with torch.no_grad():
        q.amax.view(-1)[0] = -0.01  # an optimizer step overshot a small range
    module.on_train_batch_end(None, None, 0)
    kept = q.amax.detach()
    assert float(kept.min()) == pytest.approx(module.AMAX_MIN) and float(kept.view(-1)[1]) > module.AMAX_MIN
