"""From nothing to a verified INT8 QARepVGG-B0: FP32 training → PTQ baseline → QAT → deploy artifact → ONNX → ORT.

Run from the repository root::

    python recipes/qat_b0.py                      # defaults: QARepVGG-B0 on the embedded digits, W8A8
    python recipes/qat_b0.py --block repvgg       # the same with plain RepVGG blocks
    python recipes/qat_b0.py --bits 8,4 --data ~/my_images --devices 2 --strategy ddp

Steps: (1) train an FP32 model on the embedded digits (or load ``--ckpt``); (2) plain post-training quantization
(``max`` calibration, per-channel weights) at several bit-widths as the baseline; (3) quantization-aware fine-tuning
with :class:`qat_rep.callbacks.RepQATCallback` — every rep block runs one conv of its fake-quantized equivalent
kernel; (4) :func:`qat_rep.export.deploy`: the deploy artifact, reloaded without Lightning, and a QDQ ONNX
file run in ONNX Runtime on the validation set; (5) an FP32 ONNX file beside it for latency.

Everything lands in ``--out`` (default ``out/qat_b0-<block>``): ``fp32.ckpt``, ``qat_w8a8.ckpt``,
``deploy_w8a8/`` (``model.safetensors``, ``qat_rep.json``, ``model_int8.onnx``, ``onnx_verify.json``), ``model_fp32.onnx``,
``report.md``, ``accuracy.png``, ``results.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import recipe_common as common  # recipes/recipe_common.py (python puts this script's folder on sys.path)
from recipe_common import (ImageClassifier, ImageDataModule, ResultRow, Stopwatch, check_common_args,
    collect_batches, console, evaluate_accuracy, finish_distributed, make_trainer, plot_accuracy, prepare_run,
    results_markdown, results_table, train_or_load_fp32)

import torch

from qat_rep.quant import QuantConfig, Schedule, calibrate, prepare

PTQ_BITS = (8, 6, 4)


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__.split("\n\n")[0], epochs=10, qat_epochs=2, out="out/qat_b0-{block}")
    p.add_argument("--model", default=None,
                   help="model variant of the RepVGG family (a0, a1, a2, b0, b1, …); default b0 (a0 with --fast)")
    p.add_argument("--lr", type=float, default=1e-3, help="FP32 peak learning rate (AdamW, cosine)")
    p.add_argument("--qat-lr", type=float, default=3e-5,
                   help="QAT peak learning rate (a few %% of the FP32 rate, cosine to 1%% of that)")
    p.add_argument("--calibrator", default="max", choices=["max", "percentile", "entropy", "mse"],
                   help="activation calibrator for QAT initialisation")
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
    return args


def ptq_minmax(fp32: torch.nn.Module, calib: list[Any], val_loader, bits: int) -> tuple[torch.nn.Module, float]:
    """Plain PTQ: ``max`` calibration, per-channel weights, W``bits``A``bits``; returns (model, accuracy %)."""
    model = copy.deepcopy(fp32).eval()
    cfg = QuantConfig(w_bits=bits, a_bits=bits, calibrator="max", calib_batches=len(calib))
    prepare(model, cfg)
    calibrate(model, calib, cfg)
    return model, evaluate_accuracy(model, val_loader)


def run_qat(args: argparse.Namespace, fp32: ImageClassifier, dm: ImageDataModule, out: Path, bits: int,
            limit_batches: int | None) -> tuple[ImageClassifier, Any]:
    """QAT fine-tuning of a copy of ``fp32`` with RepQATCallback; saves ``qat_w<b>a<b>.ckpt``."""
    from qat_rep.callbacks import RepQATCallback

    # a fresh module with the FP32 weights (a deepcopy would also copy the FP32 run's Trainer reference)
    module = ImageClassifier(**{**fp32.hparams, "lr": args.qat_lr, "final_lr_ratio": 0.01})
    module.load_state_dict(fp32.state_dict())
    make = QuantConfig.for_onnxruntime if args.deploy_target == "onnxruntime" else QuantConfig
    cfg = make(w_bits=bits, a_bits=bits, calibrator=args.calibrator, calib_batches=args.calib_batches)
    callback = RepQATCallback(config=cfg, schedule=Schedule.all_at_once())
    trainer = make_trainer(args, out, max_epochs=args.qat_epochs, callbacks=[callback], name=f"qat_w{bits}a{bits}",
                           limit_batches=limit_batches)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(str(out / f"qat_w{bits}a{bits}.ckpt"))
    return module, trainer


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the recipe; returns the results dict on the main process (None on other DDP ranks)."""
    from qat_rep.export import deploy, export_onnx, load_quantized
    from qat_rep.export.bench import ort_latency

    args = parse_args(argv)
    out = prepare_run(args)
    sw = Stopwatch()
    limit = 2 if args.fast else None
    dm = ImageDataModule(args.data, image_size=32, batch_size=args.batch_size, seed=args.seed,
                         limit=128 if args.fast else None, val_limit=128 if args.fast else None)
    dm.setup()
    console.print(f"[bold]qat_b0[/]: {args.block}_{args.model} on {args.data!r} ({len(dm.train_set)} train / "
                  f"{len(dm.val_set)} val images, {dm.num_classes} classes), output → {out}")

    fp32 = train_or_load_fp32(args, dm, out, sw, limit_batches=limit)
    qat_modules: dict[int, ImageClassifier] = {}
    with sw("QAT fine-tuning"):
        for b in args.bits:
            qat_modules[b], _ = run_qat(args, fp32, dm, out, b, limit)
    if not finish_distributed():
        return None

    val = dm.val_dataloader()
    shape = tuple(dm.val_set[0][0].shape)
    example = torch.zeros(1, *shape)
    rows: list[ResultRow] = []
    with sw("evaluation + PTQ baseline"):
        fp32_model = fp32.model.eval()
        fp32_acc = evaluate_accuracy(fp32_model, val)
        calib = collect_batches(dm.train_dataloader(), args.calib_batches)
        ptq_acc: dict[int, float] = {}
        for b in sorted(set(args.bits) if args.fast else set(PTQ_BITS) | set(args.bits), reverse=True):
            _, ptq_acc[b] = ptq_minmax(fp32_model, calib, val, b)
    results: dict[str, Any] = {"model": f"{args.block}_{args.model}", "data": args.data, "fp32_acc": fp32_acc,
                               "ptq_minmax": {f"w{b}a{b}": a for b, a in ptq_acc.items()}, "qat": {}}
    onnx_files = {"FP32 (fused)": out / "model_fp32.onnx"}
    with sw("export + ONNX Runtime"):
        fused_fp32 = copy.deepcopy(fp32_model)
        export_onnx(fused_fp32, onnx_files["FP32 (fused)"], example, quantized=False)
        for b, module in qat_modules.items():
            tag = f"w{b}a{b}"
            qat_model = module.model.eval()
            qat_acc = evaluate_accuracy(qat_model, val)
            # checkpoint, QDQ ONNX (W8A8 only: opset-13 QuantizeLinear holds 8-bit integers) and the ORT check
            report = deploy(qat_model, out / f"deploy_{tag}", example, val, verify_batches=len(val),
                            source="validation")
            deployed = load_quantized(report.out_dir)
            deploy_acc = evaluate_accuracy(deployed, val)
            results["qat"][tag] = {"fakequant_acc": qat_acc, "deploy_acc": deploy_acc,
                                   "delta_vs_fp32": qat_acc - fp32_acc}
            if report.onnx_path is None or report.verify is None:
                results["qat"][tag]["onnx_skipped"] = report.note or "; ".join(report.problems)
                continue
            onnx_files[f"INT8 {tag.upper()}"] = report.onnx_path
            ver = report.verify
            results["qat"][tag].update(ort_acc=100.0 * ver.ort_accuracy, ort_agreement=100.0 * ver.agreement,
                                       max_diff_steps=ver.max_diff_steps)
        lat = {r.label: r.median_ms for r in ort_latency(onnx_files, shape, batch_sizes=(1,), threads=2)}
    results["ort_latency_ms_batch1"] = lat

    rows.append(ResultRow("FP32", "FP32", fp32_acc, lat.get("FP32 (fused)"), "PyTorch; latency: fused FP32 ONNX"))
    for b, a in ptq_acc.items():
        rows.append(ResultRow("PTQ-minmax", f"W{b}A{b}", a, None, "max calibration, per-channel weights"))
    for b in qat_modules:
        r = results["qat"][f"w{b}a{b}"]
        rows.append(ResultRow("QAT fake-quant", f"W{b}A{b}", r["fakequant_acc"], None,
                              f"Δ vs FP32 {r['delta_vs_fp32']:+.2f}; deploy artifact {r['deploy_acc']:.2f}"))
        if "ort_acc" in r:
            rows.append(ResultRow("ORT INT8", f"W{b}A{b}", r["ort_acc"], lat.get(f"INT8 W{b}A{b}"),
                                  f"agreement with PyTorch {r['ort_agreement']:.2f}%"))
    title = f"{args.block}_{args.model} on {args.data} — {len(dm.val_set)} validation images"
    console.print(results_table(rows, title))
    plot_accuracy(rows, out / "accuracy.png", title)
    results["rows"] = [r.to_dict() for r in rows]
    common.finish_run(out, results, f"qat_b0: {args.block}_{args.model} W/A {', '.join(map(str, args.bits))}", [
        ("Results", results_markdown(rows) + "\n\n![accuracy per bit-width and method](accuracy.png)"),
        ("What was run", "FP32 training → PTQ baseline (max calibration) → RepQATCallback fine-tuning "
                         f"({args.qat_epochs} epoch(s), lr {args.qat_lr}) → deploy artifact → QDQ ONNX → "
                         "ONNX Runtime (CPU) on the validation set."),
    ], args, sw)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
