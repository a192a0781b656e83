"""Detection mAP of YOLOv6-N with RepVGG and QARep blocks on the embedded detection set, over several seeds.

For every (block, seed) this runs ``recipes/qat_yolov6.py`` (FP32 training → plain minmax W8A8 PTQ with per-channel
and per-tensor weights → QAT with the default callback and shared scales → QDQ ONNX → ONNX Runtime) and tabulates
mAP@0.5:0.95 and mAP@0.5 per stage as the mean over seeds with the spread ((max − min) / 2). Results are written
after every run, so an interrupted benchmark leaves a valid partial table.

    python benchmarks/det_accuracy.py                          # writes benchmarks/results/det_accuracy.{json,md}
    python benchmarks/det_accuracy.py --seeds 0 1 2 --epochs 12 --qat-epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import qat_yolov6  # noqa: E402  (recipes/qat_yolov6.py)
from common import markdown_table, write_results  # noqa: E402

STAGES = (("fp32", "FP32"), ("ptq_w8a8_per_channel", "PTQ minmax W8A8, per-channel weights"),
          ("ptq_w8a8_per_tensor", "PTQ minmax W8A8, per-tensor weights"), ("qat_w8a8", "QAT W8A8 (fake quant)"),
          ("ort_int8", "ONNX Runtime INT8"))


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    spread = (max(values) - min(values)) / 2 * 100
    return f"{mean:.1f} ± {spread:.1f}"


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    headers = ["stage"] + [f"{b} mAP@.5:.95 / mAP@.5 (n={len(r)})" for b, r in runs.items()]
    rows = []
    for key, label in STAGES:
        row = [label]
        for r in runs.values():
            row.append(f"{_cell([x['map'][key]['map'] for x in r])} / {_cell([x['map'][key]['map_50'] for x in r])}")
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="+", default=["repvgg", "qarepvggv2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--out", default="out/det_accuracy")
    p.add_argument("--fast", action="store_true",
                   help="the recipe's --fast runs: a smoke test, printed and never written to benchmarks/results/")
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in args.blocks}
    for block in args.blocks:
        for seed in args.seeds:
            rec = ["--block", block, "--seed", str(seed), "--epochs", str(args.epochs), "--qat-epochs",
                   str(args.qat_epochs), "--out", f"{args.out}/{block}-seed{seed}"] + (["--fast"] if args.fast else [])
            runs[block].append(qat_yolov6.main(rec))
            md = table({b: r for b, r in runs.items() if r})
            if args.fast:
                print(md)
            else:
                write_results("det_accuracy", {"args": vars(args), "runs": runs}, md)
    return runs


if __name__ == "__main__":
    main()
