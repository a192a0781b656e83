"""Deploy speed: our INT8 QDQ ONNX vs the fused FP32 ONNX vs ONNX Runtime's own ``quantize_static``, in ORT on CPU.

    python benchmarks/deploy_speed.py                # qarepvgg_a0, 224x224, batch 1 and 16, 2 threads
    python benchmarks/deploy_speed.py --repeats 40 --out benchmarks/results

What it does, in one run (so the ratios share the machine's load):

1. builds ``qarepvgg_a0`` (1000 classes) with randomized BatchNorm statistics (a stand-in for trained ones: latency
   does not depend on the values, but identical fresh-init biases would be de-duplicated by the exporter),
   ``prepare`` → ``calibrate`` (4 batches) → ``convert``, twice: with ``QuantConfig.for_onnxruntime()`` (UINT8
   activations after ReLU, quantized global-pool input) and with the TensorRT-style default ``QuantConfig()``;
2. writes the files: ``int8_ours.onnx`` (the ONNX Runtime preset, :func:`qat_rep.export_onnx`), ``fp32.onnx``
   (the same fused network, ``quantized=False``), ``int8_quantize_static.onnx`` (ONNX Runtime's
   ``quantize_static`` applied to ``fp32.onnx`` with its defaults — QDQ, per-tensor, MinMax — calibrated on the
   same batches, after ORT's recommended ``quant_pre_process``), and for reference the TensorRT-style model in
   the ONNX Runtime layout (``int8_ours_trt_numerics``) and in the TensorRT layout (``int8_ours_trt_layout``), and
   the preset with per-tensor weights (``int8_ours_per_tensor``, the granularity ``quantize_static`` uses);
3. times every file interleaved (:func:`qat_rep.export.bench.ort_latency`), at batch 1 and 16, with ORT's precise INT8
   mode on (needed for correct results on CPUs without VNNI) and off, and records which kernels ORT runs after graph
   optimization (``QLinearConv`` = integer conv; ``Conv``/``FusedConv`` = float);
4. prints a table and writes ``deploy_speed.json`` and ``deploy_speed.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rich.console import Console
from rich.table import Table

import qat_rep
from qat_rep.export import export_onnx
from qat_rep.export.bench import ort_latency, ort_op_counts
from qat_rep.export.atomic import write_bytes_atomic
from qat_rep.quant import QuantConfig, calibrate, convert, prepare

from common import markdown_table

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _quantize_static(fp32: Path, out: Path, batches: list[torch.Tensor], workdir: Path) -> str:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self._it, None)

    src, note = fp32, "quantize_static defaults (QDQ, QInt8, per-tensor, MinMax)"
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = workdir / "fp32_pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        src, note = pre, note + " after quant_pre_process"
    except Exception as e:  # noqa: BLE001 - the pre-processing step is optional; say so in the table
        note += f" (quant_pre_process failed: {type(e).__name__})"
    quantize_static(str(src), str(out), Reader())
    return note


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qarepvgg_a0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    logging.getLogger("root").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, args.threads))
    console = Console()
    t0 = time.time()

    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, args.size, args.size, generator=g) for _ in range(4)]
    models = {}
    for label, config in (("ort", QuantConfig.for_onnxruntime()), ("trt", QuantConfig()),
                          ("ort_pt", QuantConfig.for_onnxruntime(w_granularity="per_tensor"))):
        model = qat_rep.create_model(args.model, num_classes=1000).eval()
        _randomize_bn(model, 0)
        prepare(model, config)
        calibrate(model, calib)
        models[label] = convert(model)
    model = models["ort"]
    console.log("models prepared, calibrated and converted (ONNX Runtime preset and TensorRT-style default)")
    example = torch.randn(1, 3, args.size, args.size)

    with tempfile.TemporaryDirectory(prefix="qat_rep_deploy_") as tmp:
        tmp = Path(tmp)
        files = {
            "fp32": tmp / "fp32.onnx",
            "int8_ours": tmp / "int8_ours.onnx",
            "int8_quantize_static": tmp / "int8_quantize_static.onnx",
            "int8_ours_trt_numerics": tmp / "int8_ours_trt_numerics.onnx",
            "int8_ours_per_tensor": tmp / "int8_ours_per_tensor.onnx",
            "int8_ours_trt_layout": tmp / "int8_ours_trt.onnx",
        }
        export_onnx(model, files["fp32"], example, quantized=False)
        export_onnx(model, files["int8_ours"], example, target="onnxruntime")
        export_onnx(models["trt"], files["int8_ours_trt_numerics"], example, target="onnxruntime")
        export_onnx(models["ort_pt"], files["int8_ours_per_tensor"], example, target="onnxruntime")
        export_onnx(models["trt"], files["int8_ours_trt_layout"], example, target="tensorrt")
        console.log("exported ours (ONNX Runtime preset; TensorRT-style numerics in both layouts) and FP32")
        qs_note = _quantize_static(files["fp32"], files["int8_quantize_static"], calib, tmp)
        console.log(f"quantize_static done: {qs_note}")
        sizes = {k: os.path.getsize(v) for k, v in files.items()}
        kernels = {k: ort_op_counts(v, args.threads) for k, v in files.items()}
        kernels_fast = {k: ort_op_counts(v, args.threads, precise_int8=False) for k, v in files.items()}
        console.log("timing (interleaved) ...")
        lat = {
            "precise_int8": ort_latency(files, (3, args.size, args.size), args.batches, args.threads,
                                        repeats=args.repeats, precise_int8=True),
            "default_session": ort_latency(files, (3, args.size, args.size), args.batches, args.threads,
                                           repeats=args.repeats, precise_int8=False),
        }

    table: dict[str, dict[int, dict[str, float]]] = {}
    for mode, rows in lat.items():
        for r in rows:
            table.setdefault(mode, {}).setdefault(r.batch, {})[r.label] = r.median_ms
    ratios = {
        mode: {
            b: {
                "ours/fp32": v["int8_ours"] / v["fp32"],
                "ours/quantize_static": v["int8_ours"] / v["int8_quantize_static"],
                "quantize_static/fp32": v["int8_quantize_static"] / v["fp32"],
                "trt_numerics/fp32": v["int8_ours_trt_numerics"] / v["fp32"],
                "per_tensor/quantize_static": v["int8_ours_per_tensor"] / v["int8_quantize_static"],
                "trt_layout/fp32": v["int8_ours_trt_layout"] / v["fp32"],
            }
            for b, v in per_b.items()
        }
        for mode, per_b in table.items()
    }
    result = {
        "model": args.model, "input": [3, args.size, args.size], "threads": args.threads, "repeats": args.repeats,
        "latency_ms": {m: {str(b): v for b, v in d.items()} for m, d in table.items()},
        "ratios": {m: {str(b): v for b, v in d.items()} for m, d in ratios.items()},
        "raw": {m: [r.to_dict() for r in rows] for m, rows in lat.items()},
        "file_bytes": sizes,
        "ort_kernels_precise": kernels,
        "ort_kernels_default": kernels_fast,
        "quantize_static": qs_note,
        "targets": {"ours/fp32": 0.5, "ours/quantize_static": 1.0},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "cpu_flags": _cpu_flags()},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "seconds": round(time.time() - t0, 1),
    }

    out_table = Table(title=f"{args.model} {args.size}x{args.size}, ORT CPU, {args.threads} threads, median ms")
    for col in ("session", "batch", "fp32", "int8 ours", "quantize_static", "TRT numerics", "TRT layout",
                "per-tensor", "ours/fp32", "ours/qs", "per-tensor/qs"):
        out_table.add_column(col, justify="right")
    md_head = ["session", "batch", "FP32 ms", "INT8 ours (ORT preset) ms", "quantize_static ms",
               "ours, TensorRT numerics ms", "ours, TensorRT layout ms", "ours, per-tensor weights ms", "ours/FP32",
               "ours/quantize_static", "per-tensor/quantize_static"]
    md_rows = []
    for mode, per_b in table.items():
        for b, v in per_b.items():
            r = ratios[mode][b]
            cells = [mode, str(b), f"{v['fp32']:.1f}", f"{v['int8_ours']:.1f}", f"{v['int8_quantize_static']:.1f}",
                     f"{v['int8_ours_trt_numerics']:.1f}", f"{v['int8_ours_trt_layout']:.1f}",
                     f"{v['int8_ours_per_tensor']:.1f}", f"{r['ours/fp32']:.2f}", f"{r['ours/quantize_static']:.2f}",
                     f"{r['per_tensor/quantize_static']:.2f}"]
            out_table.add_row(*cells)
            md_rows.append(cells)
    md = markdown_table(md_head, md_rows, align="l" + "r" * 10).split("\n")
    console.print(out_table)
    kt = Table(title="kernels ONNX Runtime runs after graph optimization (precise INT8 session)")
    kt.add_column("file")
    kt.add_column("ops")
    for k, v in kernels.items():
        kt.add_row(k, ", ".join(f"{op}={n}" for op, n in sorted(v.items())))
    console.print(kt)
    md += ["", "Kernels after ORT graph optimization:", ""]
    md += [f"- `{k}`: " + ", ".join(f"{op}={n}" for op, n in sorted(v.items())) for k, v in kernels.items()]
    # The targets are read on ONNX Runtime's default session. The precise-INT8 session is a correctness option for
    # CPUs without VNNI (see qat_rep.export.verify.ort_session); on a VNNI CPU it only costs time.
    vnni = any("vnni" in f for f in result["machine"]["cpu_flags"])
    met = {k: all(ratios["default_session"][b][k] <= t for b in ratios["default_session"])
           for k, t in result["targets"].items()}
    result["targets_met"] = met
    result["targets_session"] = "default_session"
    md += ["", f"quantize_static: {qs_note}. Ours: `QuantConfig.for_onnxruntime()` (per-channel weights, the "
           "default); per-tensor: the same preset with `w_granularity=\"per_tensor\"`; TensorRT numerics: "
           "`QuantConfig()` (signed activations, float global pool). Load average during the run: "
           f"{result['machine']['load_avg']}. This CPU {'has' if vnni else 'lacks'} VNNI: the precise-INT8 session "
           f"{'is not needed for exact results here (it only costs time)' if vnni else 'is needed for exact results'}"
           ". Targets (default session, every batch): ours/FP32 <= 0.5 "
           f"{'met' if met['ours/fp32'] else 'NOT met'}; ours/quantize_static <= 1.0 "
           f"{'met' if met['ours/quantize_static'] else 'NOT met'}."]
    args.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out / "deploy_speed.json", (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(args.out / "deploy_speed.md", ("\n".join(md) + "\n").encode())
    console.print(f"wrote {args.out / 'deploy_speed.json'} and deploy_speed.md in {result['seconds']} s")
    return result


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")) or "vnni" in f)
            break
    return sorted(flags)


if __name__ == "__main__":
    main()
