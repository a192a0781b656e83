"""The ``qat-rep`` command: export, verify, inspect and benchmark INT8 deploy artifacts.

    qat-rep inspect  ART_DIR                          per-layer table of an artifact (bits, scales, shapes)
    qat-rep export   ART_DIR --out model.onnx         QDQ ONNX (and --fp32 PATH for the fused FP32 network)
    qat-rep verify   model.onnx --artifact ART_DIR    ONNX Runtime vs the PyTorch fake-quant model on a data set
    qat-rep bench    ART_DIR                          ONNX Runtime CPU latency, INT8 vs FP32, one interleaved run

Every sub-command has ``--help``. Errors in the input (a missing artifact, a corrupted file, a bad shape) print one
line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _console():
    from rich.console import Console

    return Console()


def _input_shape(meta: dict, override: Sequence[int] | None, batch: int | None = None) -> tuple[int, int, int, int]:
    if override is not None:
        shape = [int(s) for s in override]
        if len(shape) == 3:
            shape = [1, *shape]
        if len(shape) != 4:
            raise ValueError(f"--input-shape takes C H W or N C H W, got {override}")
    elif meta.get("input_shape"):
        shape = list(meta["input_shape"])
    else:
        size = 32 if meta["model"].get("small_input") else 224
        shape = [1, 3, size, size]
    if batch is not None:
        shape[0] = batch
    return tuple(shape)  # type: ignore[return-value]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .export import artifact_layers, load_quantized, read_metadata

    meta = read_metadata(args.artifact)
    model = load_quantized(args.artifact)
    rows = artifact_layers(model)
    if args.json:
        layers = [{k: (None if isinstance(v, float) and v != v else v)  # NaN is not JSON
                   for k, v in (r.__dict__ | {"input_scale": r.input_scale}).items()} for r in rows]
        sys.stdout.write(json.dumps({"metadata": meta, "layers": layers}, indent=2, allow_nan=False) + "\n")
        return 0
    console = _console()
    spec = ", ".join(f"{k}={v}" for k, v in meta["model"].items())
    console.print(f"[bold]{args.artifact}[/bold]: {meta['format']} v{meta['format_version']}, {spec}")

    def seen(values: set) -> str:  # what the layers' quantizers hold, not what the header claims
        return "/".join(map(str, sorted(values)))

    console.print(f"W{seen({r.w_bits for r in rows})}A{seen({r.a_bits for r in rows})} "
                  f"{seen({r.granularity for r in rows})} (from the layers), "
                  f"sha256 {meta['sha256'][:16]}…, input {meta.get('input_shape')}, "
                  f"written with torch {meta.get('versions', {}).get('torch')}")
    table = Table(title=f"{len(rows)} quantized layers")
    for col in ("layer", "kind", "weight", "W bits", "A bits", "weights", "input amax", "input scale",
                "weight amax min..max"):
        table.add_column(col, justify="left" if col in ("layer", "kind", "weights") else "right")
    for r in rows:
        table.add_row(r.name, r.kind, "x".join(map(str, r.weight_shape)), str(r.w_bits),
                      f"{r.a_bits}{'u' if r.a_unsigned else ''}",
                      r.granularity, f"{r.input_amax:.4g}", f"{r.input_scale:.4g}",
                      f"{r.weight_amax_min:.4g}..{r.weight_amax_max:.4g}")
    console.print(table)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx, load_quantized, read_metadata

    meta = read_metadata(args.artifact)
    model = load_quantized(args.artifact)
    example = torch.zeros(_input_shape(meta, args.input_shape))
    console = _console()
    report = export_onnx(model, args.out, example, opset=args.opset, dynamic_batch=not args.static_batch,
                         target=args.target)
    console.print(f"wrote {report}")
    if args.fp32 is not None:
        report = export_onnx(model, args.fp32, example, opset=args.opset, dynamic_batch=not args.static_batch,
                             quantized=False)
        console.print(f"wrote {report}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from rich.table import Table
    from torch.utils.data import DataLoader

    from .data import DataSpec, load_dataset
    from .export import load_quantized, read_metadata, verify_onnx

    meta = read_metadata(args.artifact)
    model = load_quantized(args.artifact)
    size = args.image_size or _input_shape(meta, None)[-1]
    _, val, _ = load_dataset(DataSpec(source=args.data, image_size=size))
    loader = DataLoader(val, batch_size=args.batch_size, shuffle=False)
    kwargs = {"min_agreement": args.min_agreement} if args.min_agreement is not None else {}
    result = verify_onnx(args.onnx, model, loader, max_batches=args.max_batches, max_steps=args.max_diff_steps,
                         **kwargs)
    if args.json is not None:
        from .export.atomic import write_bytes_atomic

        write_bytes_atomic(args.json, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    table = Table(title=f"{args.onnx} in ONNX Runtime (CPU) vs PyTorch, {args.data} validation split")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in result.rows():
        table.add_row(k, v)
    _console().print(table)
    if not result.ok:
        if args.min_agreement is not None:  # a gate: the check fails the command
            _console().print(f"[red]check failed:[/red] {' '.join(result.failures)}", highlight=False)
            return 1
        _console().print(f"[yellow]warning:[/yellow] {' '.join(result.failures)}", highlight=False)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from .export import export_onnx, load_quantized, ort_latency, read_metadata

    meta = read_metadata(args.artifact)
    model = load_quantized(args.artifact)
    shape = _input_shape(meta, args.input_shape)
    example = torch.zeros(shape)
    with tempfile.TemporaryDirectory(prefix="qat_rep_bench_") as tmp:
        files = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8.onnx"}
        export_onnx(model, files["fp32"], example, quantized=False)
        export_onnx(model, files["int8"], example, target=args.target)
        results = ort_latency(files, shape[1:], args.batch, args.threads, repeats=args.repeats,
                              precise_int8=not args.fast_int8)
    by_batch: dict[int, dict[str, float]] = {}
    for r in results:
        by_batch.setdefault(r.batch, {})[r.label] = r.median_ms
    table = Table(title=f"ONNX Runtime CPU, {args.threads} thread(s), input {tuple(shape[1:])}, median of "
                        f"{args.repeats}")
    for col in ("batch", "FP32 ms", "INT8 ms", "INT8/FP32"):
        table.add_column(col, justify="right")
    rows = []
    for b, v in sorted(by_batch.items()):
        ratio = v["int8"] / v["fp32"]
        rows.append({"batch": b, "fp32_ms": v["fp32"], "int8_ms": v["int8"], "int8_over_fp32": ratio})
        table.add_row(str(b), f"{v['fp32']:.2f}", f"{v['int8']:.2f}", f"{ratio:.2f}")
    _console().print(table)
    if args.json is not None:
        from .export.atomic import write_bytes_atomic

        write_bytes_atomic(args.json, (json.dumps({"rows": rows, "raw": [r.to_dict() for r in results]},
                                                  indent=2) + "\n").encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qat-rep`` (sub-commands ``inspect``, ``export``, ``verify``, ``bench``)."""
    from .export import TARGETS

    parser = argparse.ArgumentParser(
        prog="qat-rep", description="INT8 deploy artifacts of re-parameterized CNNs (qat-rep).",
        epilog="Artifacts are directories written by qat_rep.save_quantized(model, dir).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="print the per-layer quantization table of an artifact",
                       description="Print an artifact's metadata and one row per quantized layer "
                                   "(bits, granularity, input amax and scale, weight amax range).")
    p.add_argument("artifact", type=Path, help="artifact directory (model.safetensors + qat_rep.json)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="export an artifact to a QDQ ONNX file (optionally also FP32)",
                       description="Load an artifact (no pickle) and write the fused network as ONNX with "
                                   "QuantizeLinear/DequantizeLinear around every quantized layer.")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.add_argument("--out", type=Path, required=True, help="path of the INT8 QDQ .onnx file to write")
    p.add_argument("--fp32", type=Path, default=None, help="also write the fused FP32 network here")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="DIM",
                   help="C H W or N C H W of the example input (default: recorded in the artifact)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (>= 13; default 13)")
    p.add_argument("--target", choices=TARGETS, default="onnxruntime",
                   help="QDQ layout: onnxruntime (INT8 weights, fusable by ORT) or tensorrt (Q/DQ on float "
                        "weights, as TensorRT documents)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis instead of making it dynamic")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("verify", help="compare an ONNX file in ONNX Runtime with the artifact's PyTorch model",
                       description="Run the ONNX file in ONNX Runtime (CPU) on a validation split and report top-1 "
                                   "agreement with the PyTorch fake-quant model, the max logit difference in "
                                   "output quantization steps and both accuracies.")
    p.add_argument("onnx", type=Path, help="the .onnx file (from qat-rep export)")
    p.add_argument("--artifact", type=Path, required=True, help="the artifact the file was exported from")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded), an image folder (one subfolder per class) or a CIFAR-10 folder")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the artifact's input)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--min-agreement", type=float, default=None,
                   help="exit with status 1 when the check fails: top-1 agreement below this fraction (e.g. 0.995; "
                        "ties count as disagreement), max logit difference above --max-diff-steps or constant "
                        "outputs (without it, a failed check only warns)")
    p.add_argument("--max-diff-steps", type=float, default=4.0,
                   help="bound on the max logit difference, in output quantization steps (default 4)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("bench", help="ONNX Runtime CPU latency of an artifact, INT8 vs FP32",
                       description="Export the artifact as INT8 QDQ and as fused FP32 ONNX (temporary files) and "
                                   "time both in ONNX Runtime, interleaved in one run.")
    p.add_argument("artifact", type=Path, help="artifact directory")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="DIM",
                   help="C H W of one input (default: recorded in the artifact)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per file and batch size (default 20)")
    p.add_argument("--target", choices=TARGETS, default="onnxruntime", help="QDQ layout of the INT8 file")
    p.add_argument("--fast-int8", action="store_true",
                   help="use ORT's default U8S8 kernels (can saturate on CPUs without VNNI) instead of the "
                        "precise mode")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qat-rep`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:  # OSError: missing, unreadable or misplaced paths
        text = " ".join(str(e).split())  # one line, whatever the message holds
        _console().print(f"[red]qat-rep {args.command}: error:[/red] {text}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
