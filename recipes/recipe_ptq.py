"""The shared driver of the PTQ recipes (``ptq_cfws.py``, ``ptq_mrecg.py``): one trained FP32 classifier, several
:func:`qat_rep.ptq.quantize_ptq` methods at several bit-widths, one table, one plot, one report, and the best
model of the main method exported to QDQ ONNX and checked in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import recipe_common as common
from recipe_common import (ImageDataModule, ResultRow, Stopwatch, check_common_args, console, evaluate_accuracy,
    plot_accuracy, prepare_run, results_markdown, results_table, train_or_load_fp32)

import torch

from qat_rep.ptq import quantize_ptq
from qat_rep.quant import QuantConfig

log = logging.getLogger("qat_rep.recipes")

__all__ = ["PTQMethod", "ptq_parser", "parse_ptq_args", "run_ptq_recipe", "ONNX_8BIT_ONLY"]

#: why models below 8 bits get no ONNX file: opset-13 QuantizeLinear/DequantizeLinear take int8/uint8 only
ONNX_8BIT_ONLY = "not exported: ONNX QDQ (opset 13) holds 8-bit integers only; below 8 bits the model is simulated"


@dataclass(frozen=True)
class PTQMethod:
    """One column of a PTQ comparison: a label, the ``quantize_ptq`` method and its options (``options_fn`` gets
    the parsed arguments and returns the options, so flags such as ``--iters`` reach the method)."""

    label: str
    method: str
    options_fn: Callable[[argparse.Namespace], dict[str, Any]] = field(default=lambda args: {})
    calibrator: str = "max"


def ptq_parser(description: str, *, out: str, bits: str, block: str) -> argparse.ArgumentParser:
    """The common recipe flags (no ``--qat-epochs``) plus the PTQ-specific ones."""
    p = common.base_parser(description, epochs=6, qat_epochs=None, out=out, bits=bits, block=block)
    p.add_argument("--model", default=None,
                   help="model variant of the RepVGG family (a0, a1, a2, b0, …); default b0 (a0 with --fast); "
                        "ignored when --ckpt is a Lightning checkpoint (it records its model)")
    p.add_argument("--lr", type=float, default=3e-3, help="FP32 peak learning rate (AdamW) when training (no --ckpt)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of training and calibration")
    p.add_argument("--calib-batches", type=int, default=4,
                   help="calibration batches for the calibration-only methods (minmax, entropy, cfws)")
    p.add_argument("--export-method", default=None,
                   help="which method's model to export to ONNX and check in ONNX Runtime (default: the recipe's "
                        "main method)")
    return p


def parse_ptq_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    check_common_args(args, parser)
    return args


def run_ptq_recipe(name: str, title: str, methods: Sequence[PTQMethod], main_method: str,
                   args: argparse.Namespace, notes: str) -> dict[str, Any]:
    """FP32 model → every method at every ``--bits`` → table/plot/report; returns the results dict."""
    from qat_rep.export import export_onnx, verify_onnx

    out = prepare_run(args)
    sw = Stopwatch()
    limit = 2 if args.fast else None
    dm = ImageDataModule.from_args(args)
    fp32 = train_or_load_fp32(args, dm, out, sw, limit_batches=limit)
    if not common.finish_distributed():
        return {}
    val = dm.val_dataloader()
    model_name = fp32.hparams.model_name
    if args.fast:  # smoke test: the baseline and the recipe's own method only, coarser activation histograms
        methods = [m for m in methods if m.label in ("minmax", main_method)]
    bins = 512 if args.fast else 2048
    console.print(f"[bold]{name}[/]: {model_name} on {args.data!r}, methods "
                  f"{', '.join(m.label for m in methods)} at W/A {', '.join(map(str, args.bits))} → {out}")
    with sw("FP32 evaluation"):
        fp32_model = fp32.model.eval()
        fp32_acc = evaluate_accuracy(fp32_model, val)
    rows = [ResultRow("FP32", "FP32", fp32_acc, None, "PyTorch")]
    results: dict[str, Any] = {"recipe": name, "model": model_name, "data": args.data, "fp32_acc": fp32_acc,
                               "ptq": {}}
    export_label = args.export_method or main_method
    to_export: dict[int, torch.nn.Module] = {}
    calib_loader = dm.train_dataloader()
    for b in args.bits:
        for m in methods:
            cfg = QuantConfig(w_bits=b, a_bits=b, calibrator=m.calibrator, calib_batches=args.calib_batches)
            with sw(f"PTQ {m.label} W{b}A{b}"):
                qmodel, report = quantize_ptq(copy.deepcopy(fp32_model), calib_loader, cfg, m.method,
                                              progress=True, bins=bins, **m.options_fn(args))
                acc = evaluate_accuracy(qmodel, val)
            results["ptq"][f"{m.label}/w{b}a{b}"] = {"accuracy": acc, "seconds": report.seconds,
                                                     "report": report.to_dict()}
            rows.append(ResultRow(m.label, f"W{b}A{b}", acc, None,
                                  f"Δ vs FP32 {acc - fp32_acc:+.2f}; {report.seconds:.1f} s"))
            if m.label == export_label:
                to_export[b] = qmodel
    example = torch.zeros(1, *tuple(dm.val_set[0][0].shape))
    with sw("ONNX export + ONNX Runtime"):
        for b, qmodel in to_export.items():
            if b < 8:  # QuantizeLinear of ONNX opset 13 holds 8-bit ranges only: W<8 stays simulated in PyTorch
                results["ptq"][f"{export_label}/w{b}a{b}"]["onnx_skipped"] = ONNX_8BIT_ONLY
                continue
            path = out / f"{name}_{export_label}_w{b}a{b}.onnx"
            try:
                export_onnx(qmodel, path, example)
                ver = verify_onnx(path, qmodel, val)
            except (ValueError, TypeError, RuntimeError) as e:  # report, do not hide: the table says why
                log.error("ONNX export of %s W%dA%d failed: %s", export_label, b, e)
                results["ptq"][f"{export_label}/w{b}a{b}"]["onnx_error"] = str(e)
                continue
            results["ptq"][f"{export_label}/w{b}a{b}"].update(
                onnx=path.name, ort_acc=100.0 * ver.ort_accuracy, ort_agreement=100.0 * ver.agreement)
            rows.append(ResultRow(f"ORT {export_label}", f"W{b}A{b}", 100.0 * ver.ort_accuracy, None,
                                  f"agreement with PyTorch {100.0 * ver.agreement:.2f}%"))
    table_title = f"{name}: {model_name} on {args.data} ({len(dm.val_set)} validation images)"
    console.print(results_table(rows, table_title))
    plot_accuracy([r for r in rows if not r.method.startswith("ORT")], out / "accuracy.png", table_title)
    results["rows"] = [r.to_dict() for r in rows]
    skipped = [b for b in to_export if b < 8]
    onnx_note = f"\n\nW{'/'.join(map(str, skipped))}: ONNX {ONNX_8BIT_ONLY}." if skipped else ""
    common.finish_run(out, results, f"{name}: {title}", [
        ("Results", results_markdown(rows) + "\n\n![accuracy per bit-width and method](accuracy.png)" + onnx_note),
        ("What was run", notes),
    ], args, sw)
    return results
