"""The main job: RepVGG vs QARepVGG blocks, plain PTQ vs CFWS vs QAT, 8 and 4 bits — one run, one table, one figure.

Run from the repository root::

    python recipes/qat_b0.py                                  # defaults: RepVGG-A0 and QARepVGG-A0 on the digits
    python recipes/qat_b0.py --block qarepvgg --bits 8        # one model, QAT at W8A8 only (the single-model run)
    python recipes/qat_b0.py --model b0 --image-size 32       # the B0 width and depth, larger inputs (much slower)
    python recipes/qat_b0.py --data ~/my_images --devices 2 --strategy ddp

The default sizes (A0 width and depth, 16x16 inputs, 8 FP32 epochs) keep the whole run within ten minutes on two CPU
cores; the file keeps its historical name. (6 FP32 epochs ran in 461 s, but RepVGG-A0 then lost 1.95 points at QAT
W4A4, against 1.11 after 8 — both with the equivalent-kernel schedule; 1.39 with the default fused one.)

For each block type (``--block both``: RepVGG and QARepVGG, same width, depth, FP32 recipe and seed):

1. train an FP32 model on the embedded digits (or load ``--ckpt``);
2. plain post-training quantization (``max`` calibration) at W8A8, W6A6 and W4A4 (per-channel weights) and at W8A8
   and W6A6 with per-tensor weights, then CFWS (:func:`qat_rep.ptq.quantize_ptq` with
   :class:`~qat_rep.ptq.CFWSConfig`) at the setting above 4 bits where plain PTQ lost most;
3. quantization-aware fine-tuning with :class:`qat_rep.callbacks.RepQATCallback` and its default schedule (every
   block collapsed into one trainable conv, ``Schedule.fused()``) at each ``--bits`` (W8A8: a short,
   gentle fine-tune of ``max``-calibrated ranges; below 8 bits: learned ranges that start from MSE searches,
   unsigned activations after a ReLU, first and last layer at 8 bits, a longer run at a higher learning rate);
4. :func:`qat_rep.export.deploy` for every QAT model: the deploy artifact (reloaded without Lightning) and, at 8
   bits, a QDQ ONNX file run in ONNX Runtime on the validation set; an FP32 ONNX file beside it for latency.

Everything lands in ``--out`` (default ``out/qat_b0``): one folder per model (``fp32.ckpt``, ``qat_w8a8.ckpt``,
``deploy_w8a8/`` with ``model.safetensors``, ``qat_rep.json``, ``model_int8.onnx``, ``onnx_verify.json``,
``model_fp32.onnx``), and ``report.md``, ``accuracy.png``, ``results.json`` for the whole run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import recipe_common as common  # recipes/recipe_common.py (python puts this script's folder on sys.path)
from recipe_common import (ImageClassifier, ImageDataModule, ResultRow, Stopwatch, check_common_args,
    collect_batches, console, evaluate_accuracy, finish_distributed, make_trainer, prepare_run, results_markdown,
    results_table, train_or_load_fp32)

import pytorch_lightning as pl
import torch

from qat_rep import CFWSConfig, MinMaxConfig, QuantConfig, quantize_ptq
from qat_rep.ptq import PTQMethodConfig

BLOCKS = ("repvgg", "qarepvgg")


@dataclass(frozen=True)
class PTQSetting:
    """One PTQ cell of the table: a label, the bit-widths and granularity, and the method's config object."""

    label: str
    config: QuantConfig
    method: PTQMethodConfig = MinMaxConfig()


def ptq_settings(calib_batches: int) -> list[PTQSetting]:
    """Plain ``max`` PTQ at 8, 6 and 4 bits, per-channel weights, and per-tensor weights at 8 and 6 bits (where the
    fused rep kernels' channel-varying ranges cost most)."""
    def cfg(bits: int, gran: str = "per_channel") -> QuantConfig:
        return QuantConfig(w_bits=bits, a_bits=bits, w_granularity=gran, calib_batches=calib_batches)

    return [
        PTQSetting("W8A8", cfg(8)),
        PTQSetting("W8A8 per-tensor W", cfg(8, "per_tensor")),
        PTQSetting("W6A6", cfg(6)),
        PTQSetting("W6A6 per-tensor W", cfg(6, "per_tensor")),
        PTQSetting("W4A4", cfg(4)),
    ]


def collapse_setting(settings: Sequence[PTQSetting], accuracy: dict[str, float]) -> PTQSetting:
    """The plain-PTQ setting above 4 bits where the model lost most (``accuracy``: label → top-1 %), as a CFWS
    setting: CFWS splits weights, it cannot give 4-bit activations their range back."""
    above4 = [s for s in settings if isinstance(s.method, MinMaxConfig) and s.config.w_bits > 4]
    worst = min(above4, key=lambda s: accuracy[s.label])
    return PTQSetting(worst.label, worst.config, CFWSConfig())


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__.split("\n\n")[0], epochs=8, qat_epochs=1, out="out/qat_b0", bits="8,4",
                           block="both", blocks=("both",) + BLOCKS, image_size=16)
    p.add_argument("--model", default="a0",
                   help="model variant of the RepVGG family (a0, a1, a2, b0, b1, …); the same for both block types")
    p.add_argument("--lr", type=float, default=2e-3, help="FP32 peak learning rate (AdamW, warm-up, cosine)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of the FP32 training steps with a linear learning-rate warm-up")
    p.add_argument("--qat-lr", type=float, default=3e-5,
                   help="8-bit QAT peak learning rate (a gentle fine-tune, cosine to 1%% of it)")
    p.add_argument("--qat-epochs-low", type=int, default=5, help="QAT epochs below 8 bits")
    p.add_argument("--qat-lr-low", type=float, default=1e-3,
                   help="QAT peak learning rate below 8 bits (learned ranges need a real run)")
    p.add_argument("--amax-lr-scale", type=float, default=5.0,
                   help="below 8 bits: the learned ranges train at this multiple of --qat-lr-low")
    p.add_argument("--calibrator", default="max", choices=["max", "percentile", "entropy", "mse"],
                   help="activation calibrator of the 8-bit QAT initialisation (below 8 bits: mse)")
    p.add_argument("--calib-batches", type=int, default=4, help="batches read to calibrate activation ranges")
    p.add_argument("--deploy-target", default="tensorrt", choices=["tensorrt", "onnxruntime"],
                   help="QAT numerics: tensorrt = signed INT8 activations (QuantConfig()); onnxruntime = "
                        "QuantConfig.for_onnxruntime() (UINT8 after ReLU, quantized global pool: integer from conv to "
                        "conv in ONNX Runtime, not loadable by TensorRT)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size per process")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_args(args, parser)
    if args.qat_epochs_low < 0:
        parser.error(f"--qat-epochs-low must be >= 0, got {args.qat_epochs_low}")
    if not 0.0 <= args.warmup < 1.0:
        parser.error(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.amax_lr_scale <= 0:
        parser.error(f"--amax-lr-scale must be > 0, got {args.amax_lr_scale}")
    if args.fast:
        args.qat_epochs_low = min(args.qat_epochs_low, 1)
    args.blocks = list(BLOCKS) if args.block == "both" else [args.block]
    if args.ckpt and len(args.blocks) > 1:
        parser.error("--ckpt holds one trained model: pass its --block (repvgg or qarepvgg) with it")
    return args


def qat_config(args: argparse.Namespace, bits: int) -> tuple[QuantConfig, int, float]:
    """(config, epochs, peak lr) of the QAT run at ``bits``.

    8 bits: ``--calibrator`` ranges, fixed, a short gentle fine-tune. Below 8 bits (the settings of
    ``benchmarks/qat_accuracy.py``, made to converge on RepVGG too): MSE-calibrated activation ranges, learned ranges
    (LSQ-style), first and last layer at 8 bits, and unsigned activations after a ReLU (LSQ's choice: a signed 4-bit
    grid leaves half its levels unused on ReLU outputs; nothing below 8 bits is exported as integers here, so no
    deploy target constrains it)."""
    make = QuantConfig.for_onnxruntime if args.deploy_target == "onnxruntime" else QuantConfig
    if bits >= 8:
        return (make(w_bits=bits, a_bits=bits, calibrator=args.calibrator, calib_batches=args.calib_batches),
                args.qat_epochs, args.qat_lr)
    return (make(w_bits=bits, a_bits=bits, calibrator="mse", learn_amax=True, weight_calibrator="mse",
                 calib_batches=args.calib_batches, unsigned_activations=True), args.qat_epochs_low, args.qat_lr_low)


def run_qat(args: argparse.Namespace, fp32: ImageClassifier, dm: ImageDataModule, out: Path, bits: int,
            limit_batches: int | None) -> ImageClassifier:
    """QAT fine-tuning of a copy of ``fp32`` with RepQATCallback; saves ``qat_w<b>a<b>.ckpt``.

    With learned ranges (below 8 bits) the model is prepared and calibrated here, before the fit (weight ranges from
    the MSE search of ``weight_calibrator="mse"``); the callback then finds it calibrated and trains it."""
    from qat_rep.callbacks import RepQATCallback
    from qat_rep.quant import calibrate, prepare

    cfg, epochs, lr = qat_config(args, bits)
    # a fresh module with the FP32 weights (a deepcopy would also copy the FP32 run's Trainer reference)
    module = ImageClassifier(**{**fp32.hparams, "lr": lr, "final_lr_ratio": 0.01, "warmup_ratio": 0.0,
                                "amax_lr_scale": args.amax_lr_scale if cfg.learn_amax else 1.0})
    module.load_state_dict(fp32.state_dict())
    if cfg.learn_amax:
        prepare(module, cfg)
        calibrate(module, collect_batches(dm.train_dataloader(), cfg.calib_batches))
    # below 8 bits the weights and ranges are trained for the low-bit grid: their FP32 view says nothing (11-21 % in
    # the default run) and costs a second forward pass per validation batch
    callback = RepQATCallback(config=cfg, compare_fp32=bits >= 8)
    trainer = make_trainer(args, out, max_epochs=epochs, callbacks=[callback], name=f"qat_w{bits}a{bits}",
                           limit_batches=limit_batches)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(str(out / f"qat_w{bits}a{bits}.ckpt"))
    return module


def plain_ptq(fp32: torch.nn.Module, calib: list[Any], val_loader, setting: PTQSetting) -> float:
    """Top-1 % of ``fp32`` after ``setting``'s post-training quantization (on a copy)."""
    qmodel, _ = quantize_ptq(copy.deepcopy(fp32).eval(), calib, setting.config, setting.method)
    return evaluate_accuracy(qmodel, val_loader)


def evaluate_model(args: argparse.Namespace, name: str, fp32: ImageClassifier, qat: dict[int, ImageClassifier],
                   dm: ImageDataModule, out: Path, sw: Stopwatch) -> dict[str, Any]:
    """PTQ baselines, the QAT models' artifacts and their ONNX Runtime check; the model's results dict."""
    from qat_rep.export import deploy, export_onnx, load_quantized
    from qat_rep.export.bench import ort_latency

    val = dm.val_dataloader()
    shape = tuple(dm.val_set[0][0].shape)
    example = torch.zeros(1, *shape)
    res: dict[str, Any] = {"model": name, "ptq": {}, "qat": {}}
    with sw(f"{name}: PTQ baselines"):
        fp32_model = fp32.model.eval()
        res["fp32_acc"] = evaluate_accuracy(fp32_model, val)
        calib = collect_batches(dm.train_dataloader(), args.calib_batches)
        settings = ptq_settings(args.calib_batches)
        plain = {s.label: plain_ptq(fp32_model, calib, val, s) for s in settings}
        res["ptq"] = {f"{s.method.name}/{s.label}": plain[s.label] for s in settings}
        cfws = collapse_setting(settings, plain)  # where plain PTQ collapses
        res["ptq"][f"{cfws.method.name}/{cfws.label}"] = plain_ptq(fp32_model, calib, val, cfws)
    onnx_files = {"FP32 (fused)": out / "model_fp32.onnx"}
    with sw(f"{name}: deploy artifacts + ONNX Runtime"):
        export_onnx(copy.deepcopy(fp32_model), onnx_files["FP32 (fused)"], example, quantized=False)
        for b, module in qat.items():
            tag = f"w{b}a{b}"
            qat_model = module.model.eval()
            r = res["qat"][tag] = {"fakequant_acc": evaluate_accuracy(qat_model, val)}
            # checkpoint, QDQ ONNX (W8A8 only: opset-13 QuantizeLinear holds 8-bit integers) and the ORT check
            report = deploy(qat_model, out / f"deploy_{tag}", example, val, verify_batches=len(val),
                            source="validation")
            deployed = load_quantized(report.out_dir)
            r["deploy_acc"] = evaluate_accuracy(deployed, val)
            if report.onnx_path is None or report.verify is None:
                r["onnx_skipped"] = report.note or "; ".join(report.problems)
                continue
            onnx_files[f"INT8 {tag.upper()}"] = report.onnx_path
            ver = report.verify
            r.update(ort_acc=100.0 * ver.ort_accuracy, ort_agreement=100.0 * ver.agreement,
                     max_diff_steps=ver.max_diff_steps)
        lat = {r.label: r.median_ms for r in ort_latency(onnx_files, shape, batch_sizes=(1,), threads=2)}
    res["ort_latency_ms_batch1"] = lat
    return res


def result_rows(res: dict[str, Any]) -> list[ResultRow]:
    """One model's table rows; ``extra["block"]`` and ``extra["setting"]`` place each in the figure."""
    name, fp32_acc, lat = res["model"], res["fp32_acc"], res["ort_latency_ms_batch1"]

    def row(method: str, setting: str, acc: float, latency: float | None = None, notes: str = "") -> ResultRow:
        bits = setting.split()[0]
        return ResultRow(method, bits, acc, latency, notes, extra={"model": name, "setting": setting})

    rows = [row("FP32", "FP32", fp32_acc, lat.get("FP32 (fused)"), "PyTorch; latency: fused FP32 ONNX")]
    for key, acc in res["ptq"].items():
        method, setting = key.split("/", 1)
        label = {"max": "PTQ max", "minmax": "PTQ max", "cfws": "PTQ CFWS"}[method]
        rows.append(row(label, setting, acc, None, f"Δ vs FP32 {acc - fp32_acc:+.2f}"))
    for tag, r in res["qat"].items():
        setting = tag.upper()
        rows.append(row("QAT fake-quant", setting, r["fakequant_acc"], None,
                        f"Δ vs FP32 {r['fakequant_acc'] - fp32_acc:+.2f}; deploy artifact {r['deploy_acc']:.2f}"))
        if "ort_acc" in r:
            rows.append(row("ORT INT8", setting, r["ort_acc"], lat.get(f"INT8 {setting}"),
                            f"agreement with PyTorch {r['ort_agreement']:.2f}%"))
    return rows


def plot_panels(rows: Sequence[ResultRow], path: Path, title: str, caption: str) -> Path:
    """One panel per model: accuracy per setting (ordered by bit-width), one line per method, FP32 dashed; QAT
    points are filled circles, ONNX Runtime points open diamonds beside them, so neither hides the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.extra["model"] for r in rows))
    order = ["W8A8", "W8A8 per-tensor W", "W6A6", "W6A6 per-tensor W", "W4A4"]
    settings = [s for s in order if any(r.extra["setting"] == s for r in rows)]
    style = {"PTQ max": dict(marker="s", color="tab:red"), "PTQ CFWS": dict(marker="^", color="tab:orange"),
             "QAT fake-quant": dict(marker="o", color="tab:blue", ms=9),
             "ORT INT8": dict(marker="D", color="tab:green", mfc="none", ms=11, mew=2, ls="none")}
    offset = {"ORT INT8": 0.12, "QAT fake-quant": 0.0}
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), dpi=110, sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r.extra["model"] == model and r.accuracy is not None]
        fp32 = next((r.accuracy for r in mine if r.method == "FP32"), None)
        if fp32 is not None:
            ax.axhline(fp32, ls="--", color="gray", lw=1.2, label="FP32")
        for method, st in style.items():
            pts = sorted((settings.index(r.extra["setting"]) + offset.get(method, 0.0), r.accuracy)
                         for r in mine if r.method == method and r.extra["setting"] in settings)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=method, **st)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([s.replace(" per-tensor W", "\nper-tensor W") for s in settings], fontsize=8)
        ax.set_title(model + ("" if fp32 is None else f" (FP32 {fp32:.2f} %)"))
        ax.set_ylim(-2, 102)
        ax.set_xlim(-0.3, len(settings) - 0.6)
        ax.grid(alpha=0.3)
        ax.set_xlabel("bit-width (weights / activations)")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.05),
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.11, 1, 0.95))
    return common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the recipe; returns the results dict on the main process (None on other DDP ranks)."""
    args = parse_args(argv)
    root = prepare_run(args)
    sw = Stopwatch()
    limit = 2 if args.fast else None
    dm = ImageDataModule.from_args(args)
    console.print(f"[bold]qat_b0[/]: {', '.join(f'{b}_{args.model}' for b in args.blocks)} on {args.data!r} "
                  f"({len(dm.train_set)} train / {len(dm.val_set)} val images, {dm.num_classes} classes, "
                  f"{args.image_size}x{args.image_size}), output → {root}")
    trained: dict[str, tuple[ImageClassifier, dict[int, ImageClassifier], Path]] = {}
    for block in args.blocks:
        name = f"{block}_{args.model}"
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        block_args = argparse.Namespace(**{**vars(args), "block": block})
        # the same initial weights and data order for each block type, and as in a one-block run
        pl.seed_everything(args.seed, workers=True, verbose=False)
        fp32 = train_or_load_fp32(block_args, dm, out, sw, limit_batches=limit, label=f"{name}: FP32 training")
        with sw(f"{name}: QAT fine-tuning"):
            qat = {b: run_qat(block_args, fp32, dm, out, b, limit) for b in args.bits}
        trained[name] = (fp32, qat, out)
    if not finish_distributed():
        return None

    results: dict[str, Any] = {"data": args.data, "image_size": args.image_size,
                               "validation_images": len(dm.val_set), "models": {}}
    rows: list[ResultRow] = []
    for name, (fp32, qat, out) in trained.items():
        res = evaluate_model(args, name, fp32, qat, dm, out, sw)
        results["models"][name] = res
        rows += result_rows(res)
    results["rows"] = [r.to_dict() for r in rows]

    title = (f"{' vs '.join(results['models'])} on {args.data}, {len(dm.val_set)} validation images "
             f"(one image = {100 / len(dm.val_set):.2f} points)")
    caption = latency_caption(results["models"])
    console.print(results_table(rows, title, extra_columns=("model",)))
    plot_panels(rows, root / "accuracy.png", title, caption)
    common.finish_run(root, results, f"qat_b0: {', '.join(results['models'])}, W/A {', '.join(map(str, args.bits))}",
                      [("Results", results_markdown(rows, extra_columns=("model",))
                        + f"\n\n![accuracy per setting and method](accuracy.png)\n\n{caption}"),
                       ("What was run", what_was_run(args))], args, sw)
    return results


def latency_caption(models: dict[str, dict[str, Any]]) -> str:
    """ONNX Runtime latency (batch 1, median) of the fused FP32 file and the INT8 W8A8 file of every model."""
    parts = []
    for name, res in models.items():
        lat = res["ort_latency_ms_batch1"]
        int8 = lat.get("INT8 W8A8")
        parts.append(f"{name} FP32 {lat['FP32 (fused)']:.2f} ms"
                     + (f", INT8 {int8:.2f} ms ({lat['FP32 (fused)'] / int8:.2f}x)" if int8 else ""))
    return "ONNX Runtime CPU latency, batch 1, median: " + "; ".join(parts)


def what_was_run(args: argparse.Namespace) -> str:
    """The report's description of the run, from the flags."""
    low = [b for b in args.bits if b < 8]
    high = [b for b in args.bits if b >= 8]
    qat = ([f"W8A8 {args.qat_epochs} epoch(s) at lr {args.qat_lr} ({args.calibrator} ranges)"] if high else []) + (
        [f"{', '.join(f'W{b}A{b}' for b in low)} {args.qat_epochs_low} epoch(s) at lr {args.qat_lr_low} (learned "
         f"ranges at {args.amax_lr_scale:g}x that lr: activations MSE-calibrated and unsigned after a ReLU, "
         "weights from an MSE search; first and last layer 8-bit)"] if low else [])
    return (f"FP32 training ({args.epochs} epochs, AdamW lr {args.lr}, {args.warmup:.0%} warm-up, cosine, batch "
            f"{args.batch_size}, {args.image_size}x{args.image_size}; the same seed for each block type) → plain PTQ "
            "(max calibration; per-channel weights unless named), CFWS where plain PTQ lost most above 4 bits → "
            "RepQATCallback fine-tuning: "
            + "; ".join(qat) + " → deploy artifact → QDQ ONNX at 8 bits → ONNX Runtime (CPU) on the validation set.")


if __name__ == "__main__":
    main(sys.argv[1:])
