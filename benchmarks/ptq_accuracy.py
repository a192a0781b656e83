"""PTQ accuracy benchmark: RepVGG vs QARepVGG, every qat_rep.ptq method and ONNX Runtime's quantize_static.

The FP32 models come from named training recipes (``benchmarks/common.py``: ``adamw16``, the recipe the methods
were developed on, and the independent ``sgd32`` — 32x32, SGD with momentum, cosine, ±3 px shifts — and
``sgd16-long``), several seeds each, cached by (model, recipe, seed). Each is evaluated FP32 and with each PTQ
method at W8A8 (per-tensor and per-channel weights), W6A6 per-tensor, W4A8 and W4A4 on the validation split at
the recipe's input size, plus ONNX Runtime's ``quantize_static`` (MinMax, Entropy; QDQ, per-channel INT8). The
calibration set is 4 batches of 64 training images (as YOLOv6). Prints a rich table and writes
``benchmarks/results/ptq_accuracy.{json,md}`` (atomic writes), every recipe side by side.

    python benchmarks/ptq_accuracy.py --quick   # smoke run
    python benchmarks/ptq_accuracy.py           # the reported run: recipes adamw16 sgd32, seeds 0 1 2

Reconstruction methods run at W4A4 only (``--recon-bits``), 100 iterations per unit (published: 20 000) on 512
samples. ``--cached-only`` skips (model, recipe, seed) combinations whose FP32 weights are not in the cache yet.

The outputs are rewritten (atomically) after every (recipe, model, seed), so a run that is stopped keeps what it
finished (``meta.complete`` is false until the end). ``--merge a.json b.json`` combines runs — e.g. one process per
recipe, or a re-run of some cells — into ``--out``; a later file's row replaces an earlier one for the same cell,
only the rows of ``--methods`` are taken, and every run's settings, time and commit are kept in ``meta.runs``. The
table header gives the number of runs and their total time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CACHE, RECIPES, stamp, train_fp32  # noqa: E402
from qat_rep import DataSpec, load_dataset, reparameterize  # noqa: E402
from qat_rep.ptq import quantize_ptq  # noqa: E402
from qat_rep.quant import QuantConfig  # noqa: E402
from qat_rep.export.atomic import write_text_atomic as _atomic_write  # noqa: E402

BITS: dict[str, QuantConfig] = {
    "W8A8-pt": QuantConfig(w_bits=8, a_bits=8, w_granularity="per_tensor"),
    "W8A8": QuantConfig(w_bits=8, a_bits=8),
    "W6A6-pt": QuantConfig(w_bits=6, a_bits=6, w_granularity="per_tensor"),
    "W4A8": QuantConfig(w_bits=4, a_bits=8),
    "W4A4": QuantConfig(w_bits=4, a_bits=4),
}
CALIB_METHODS = ("minmax", "entropy", "cfws", "cfws-kl")  # cfws-kl: improved KL alone (split=False)
RECON_METHODS = ("adaround", "brecq", "mrecg")
ORT_METHODS = ("ort-minmax", "ort-entropy")




@torch.no_grad()
def accuracy(model: torch.nn.Module, val_set) -> float:
    model.eval()
    x, y = val_set.tensors
    correct = 0
    for i in range(0, len(y), 128):
        correct += int((model(x[i:i + 128]).argmax(1) == y[i:i + 128]).sum())
    return 100.0 * correct / len(y)


def ort_quantized_accuracy(fused: torch.nn.Module, calib: list, val_set, method: str) -> float:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    x0 = calib[0][0]
    with tempfile.TemporaryDirectory() as d:
        fp = os.path.join(d, "fp32.onnx")
        q = os.path.join(d, "int8.onnx")
        torch.onnx.export(fused, (x0,), fp, opset_version=13, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter([{"x": b[0].numpy()} for b in calib])

            def get_next(self):
                return next(self.it, None)

        cm = CalibrationMethod.MinMax if method == "ort-minmax" else CalibrationMethod.Entropy
        quantize_static(fp, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm)
        sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
        x, y = val_set.tensors
        pred = np.concatenate([sess.run(None, {"x": x[i:i + 128].numpy()})[0] for i in range(0, len(y), 128)])
    return 100.0 * float((torch.from_numpy(pred).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["repvgg_a0", "qarepvgg_a0"])
    p.add_argument("--recipes", nargs="+", default=["adamw16", "sgd32"], choices=sorted(RECIPES),
                   help="FP32 training recipes (benchmarks/common.py)")
    p.add_argument("--cached-only", action="store_true",
                   help="skip (model, recipe, seed) whose FP32 weights are not cached (no training)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(CALIB_METHODS + RECON_METHODS + ORT_METHODS))
    p.add_argument("--bits", nargs="+", default=list(BITS))
    p.add_argument("--recon-bits", nargs="+", default=["W4A4"], help="bit settings at which reconstruction runs")
    p.add_argument("--recon-seeds", type=int, default=None,
                   help="reconstruction runs on the first N seeds (default: all)")
    p.add_argument("--iters", type=int, default=100, help="reconstruction iterations per unit (published 20000)")
    p.add_argument("--num-samples", type=int, default=512, help="reconstruction calibration samples")
    p.add_argument("--mrecg-k", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(CACHE), help="folder of cached FP32 weights (QAT_REP_BENCH_CACHE)")
    p.add_argument("--quick", action="store_true", help="1 seed, the adamw16 recipe, 30 iterations, W8A8 + W4A4")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ptq_accuracy"))
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge the rows of earlier runs' JSON files into --out (no training; later files win; "
                        "only the rows of --methods)")
    a = p.parse_args()
    if a.merge:
        files = [json.loads(Path(f).read_text()) for f in a.merge]
        # a later file's row replaces an earlier one for the same (recipe, model, seed, bits, method)
        keep = set(a.methods) | {"fp32"}  # --methods also filters what a merge takes from the files
        by_key = {(r["recipe"], r["model"], r["seed"], r["bits"], r["method"]): r
                  for run in files for r in run["rows"] if r["method"] in keep}
        meta = dict(runs=[run for f in files for run in _runs_of(f["meta"])],
                    recipes={k: v for f in files for k, v in f["meta"].get("recipes", {}).items()})
        write_outputs(list(by_key.values()), meta, Path(a.out), sorted({r["model"] for r in by_key.values()}))
        return
    if a.quick:
        a.seeds, a.recipes, a.iters, a.num_samples = a.seeds[:1], ["adamw16"], 30, 128
        a.bits = [b for b in a.bits if b in ("W8A8", "W4A4")]
    if a.recon_seeds is None:
        a.recon_seeds = len(a.seeds)
    if a.recon_seeds < 0 or a.iters < 1 or a.num_samples < 64:
        p.error("--recon-seeds must be >= 0, --iters >= 1, --num-samples >= 64 (one batch)")
    torch.set_num_threads(a.threads)
    unknown = set(a.methods) - set(CALIB_METHODS + RECON_METHODS + ORT_METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}")

    from rich.console import Console

    console = Console()
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    cache = Path(a.cache)
    out = Path(a.out)
    commit = stamp()["commit"]

    def meta(complete: bool) -> dict[str, Any]:
        run = dict(args=vars(a), torch=torch.__version__, threads=a.threads, total_seconds=time.time() - t_start,
                   started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)), complete=complete,
                   commit=commit)
        return dict(runs=[run], recipes={r: dataclasses.asdict(RECIPES[r]) for r in a.recipes})
    for recipe in a.recipes:
        size = RECIPES[recipe].image_size
        train_set, val_set, _ = load_dataset(DataSpec("digits", image_size=size))
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1234))
        xs, ys = train_set.tensors
        calib_small = [(xs[perm[i:i + 64]], ys[perm[i:i + 64]]) for i in range(0, 256, 64)]  # 4 batches, as YOLOv6
        calib_big = [(xs[perm[i:i + 64]], ys[perm[i:i + 64]]) for i in range(0, a.num_samples, 64)]
        for name in a.models:
            for si, seed in enumerate(a.seeds):
                if a.cached_only and not (cache / f"{name}_{recipe}_s{seed}.pt").is_file():
                    console.log(f"{name} {recipe} seed {seed}: not cached, skipped")
                    continue
                t0 = time.time()
                model = train_fp32(name, recipe, seed, cache=cache, log=console.log)
                t_train = time.time() - t0
                fused = copy.deepcopy(model)
                reparameterize(fused)
                fp32 = accuracy(fused, val_set)
                key = dict(recipe=recipe, model=name, seed=seed)
                rows.append(dict(key, bits="FP32", method="fp32", acc=fp32, seconds=t_train))
                console.log(f"{name} {recipe} seed {seed}: FP32 {fp32:.2f}%")
                for method in a.methods:
                    if method in ORT_METHODS:
                        t0 = time.time()
                        acc = ort_quantized_accuracy(fused, calib_small, val_set, method)
                        rows.append(dict(key, bits="W8A8", method=method, acc=acc, seconds=time.time() - t0))
                        console.log(f"  {method} W8A8: {acc:.2f}%")
                        continue
                    for bits in a.bits:
                        if method in RECON_METHODS and (bits not in a.recon_bits or si >= a.recon_seeds):
                            continue
                        opts: dict[str, Any] = {"split": False} if method == "cfws-kl" else {}
                        calib = calib_small
                        extra: dict[str, Any] = {}
                        if method in RECON_METHODS:
                            opts = dict(iters=a.iters, num_samples=a.num_samples)
                            extra = dict(opts)
                            calib = calib_big
                            if method == "mrecg":
                                opts["k"] = a.mrecg_k
                        t0 = time.time()
                        q, rep = quantize_ptq(copy.deepcopy(model), calib, BITS[bits],
                                              method="cfws" if method == "cfws-kl" else method, **opts)
                        secs = time.time() - t0
                        acc = accuracy(q, val_set)
                        fallbacks = sum(c.fell_back for c in rep.act_choice.values())
                        rows.append(dict(key, bits=bits, method=method, acc=acc, seconds=secs,
                                         act_fallbacks=fallbacks, reverted=sum(u.reverted for u in rep.units),
                                         pairs=[list(x[:2]) for x in rep.pairs], **extra))
                        console.log(f"  {method} {bits}: {acc:.2f}% ({secs:.1f} s, {fallbacks} threshold(s) "
                                    "fell back to max)")
                # what is finished survives a stopped run
                write_outputs(rows, meta(False), out, a.models, show=False)

    write_outputs(rows, meta(True), out, a.models)


def _runs_of(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a results file's ``meta`` describes (a merged file lists several; older files were one run)."""
    if "runs" in meta:
        return list(meta["runs"])
    return [dict(args=meta.get("args", {}), threads=meta.get("threads"), total_seconds=meta.get("total_seconds", 0.0),
                 complete=True)]


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, models: list[str],
                  show: bool = True) -> None:
    """Aggregate ``rows`` (mean ± std over seeds, per recipe), check the targets per recipe, write JSON + markdown
    (one column per recipe) atomically; ``show``: print the table and targets."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rank = {name: i for i, name in enumerate(list(RECIPES) + ["FP32"] + list(BITS)
                                              + ["fp32", *CALIB_METHODS, *RECON_METHODS, *ORT_METHODS])}
    rows = sorted(rows, key=lambda r: (rank.get(r["recipe"], 99), r["model"], r["seed"], rank.get(r["bits"], 99),
                                       rank.get(r["method"], 99)))  # one order, whatever order the runs came in
    fp = {(r["recipe"], r["model"], r["seed"]): r["acc"] for r in rows if r["method"] == "fp32"}
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        r["drop"] = fp[(r["recipe"], r["model"], r["seed"])] - r["acc"]
        groups.setdefault((r["recipe"], r["model"], r["bits"], r["method"]), []).append(r)
    summary = []
    for (recipe, model, bits, method), rs in groups.items():
        accs = [r["acc"] for r in rs]
        summary.append(dict(recipe=recipe, model=model, bits=bits, method=method, n=len(rs),
                            seeds=sorted(r["seed"] for r in rs), acc_mean=statistics.mean(accs),
                            acc_std=statistics.pstdev(accs), drop_mean=statistics.mean(r["drop"] for r in rs),
                            drop_max=max(r["drop"] for r in rs),
                            seconds_mean=statistics.mean(r["seconds"] for r in rs)))
    cell = {(s["recipe"], s["model"], s["bits"], s["method"]): s for s in summary}
    per_seed = {(r["recipe"], r["model"], r["seed"], r["bits"], r["method"]): r["acc"] for r in rows}
    recipes = [r for r in RECIPES if any(s["recipe"] == r for s in summary)]

    targets = []

    def target(text: str, ok: bool | None) -> None:
        targets.append(dict(target=text, held=ok))

    def below(recipe: str, model: str, bits: str, method: str, ref: str) -> float | None:
        """Largest per-seed shortfall of ``method`` below ``ref`` (None if either is missing)."""
        gaps = [per_seed[(recipe, model, sd, bits, ref)] - acc for (rc, m, sd, b, me), acc in per_seed.items()
                if (rc, m, b, me) == (recipe, model, bits, method) and (recipe, model, sd, bits, ref) in per_seed]
        return max(gaps) if gaps else None

    qa, rv = "qarepvgg_a0", "repvgg_a0"
    for recipe in recipes:
        s = cell.get((recipe, qa, "W8A8", "minmax"))
        target(f"{recipe}: QARepVGG minmax W8A8 drop <= 0.5 pt", None if s is None else s["drop_mean"] <= 0.5)
        for model in models:
            for bits, limit in (("W8A8-pt", 0.5), ("W8A8", 0.5), ("W6A6-pt", 1.0)):
                s = cell.get((recipe, model, bits, "cfws"))
                target(f"{recipe}: {model} cfws {bits} drop <= {limit} pt (mean of "
                       f"{'?' if s is None else s['n']} seed(s))", None if s is None else s["drop_mean"] <= limit)
            for method in ("entropy", "cfws-kl"):
                for bits in ("W8A8-pt", "W8A8"):
                    gap = below(recipe, model, bits, method, "minmax")
                    if gap is not None:
                        n = sum(1 for k in per_seed if (k[0], k[1], k[3], k[4]) == (recipe, model, bits, method)
                                and (recipe, model, k[2], bits, "minmax") in per_seed)
                        target(f"{recipe}: {model} {method} {bits} never > 0.5 pt below minmax ({n} seed(s))",
                               gap <= 0.5)
        s1, s2 = cell.get((recipe, rv, "W6A6-pt", "cfws")), cell.get((recipe, rv, "W6A6-pt", "minmax"))
        target(f"{recipe}: RepVGG cfws >= minmax + 20 pt at W6A6 per-tensor",
               None if s1 is None or s2 is None else s1["acc_mean"] >= s2["acc_mean"] + 20)
        for model in models:
            m_, b_, d_ = (cell.get((recipe, model, "W4A4", x)) for x in ("mrecg", "brecq", "adaround"))
            if m_ and b_ and d_:
                target(f"{recipe}: {model} W4A4 mrecg >= brecq + 0.3 >= adaround + 0.6",
                       m_["acc_mean"] >= b_["acc_mean"] + 0.3 and b_["acc_mean"] >= d_["acc_mean"] + 0.3)
            if m_:
                target(f"{recipe}: {model} mrecg W4A4 run <= 15 min", m_["seconds_mean"] <= 900)

    _atomic_write(out.with_suffix(".json"), json.dumps(dict(meta=meta, rows=rows, summary=summary,
                                                            targets=targets), indent=1))
    def recipe_text(r: str) -> str:
        rc = RECIPES[r]
        n = sorted({s["n"] for s in summary if s["recipe"] == r and s["method"] == "fp32"})
        return (f"`{r}` = {rc.epochs} epochs {rc.optimizer.upper()} lr {rc.lr:g} at {rc.image_size}x{rc.image_size}"
                f"{f', ±{rc.shift} px shifts' if rc.shift else ''} ({'/'.join(map(str, n))} seed(s))")

    recon = sorted({(r["iters"], r["num_samples"]) for r in rows if r["method"] in RECON_METHODS and "iters" in r})
    recon_text = ("reconstruction " + ", ".join(f"{i} iters/unit on {n} samples" for i, n in recon)
                  + " (published: 20 000 iters)") if recon else "no reconstruction methods in this table"
    runs = meta["runs"]
    stopped = sum(not r.get("complete", True) for r in runs)
    commits = sorted({r["commit"] for r in runs if r.get("commit")})
    run_text = (f"{len(runs)} run(s) on {'/'.join(sorted({str(r['threads']) for r in runs}))} thread(s) each, "
                f"{sum(r['total_seconds'] for r in runs) / 60:.1f} min of run time in all"
                + (f", {stopped} of them stopped early (their finished rows kept)" if stopped else "")
                + (f"; commit(s) {', '.join(commits)}" if commits else ""))
    md = [f"PTQ accuracy on embedded digits, FP32 models from {len(recipes)} training recipes: "
          + "; ".join(recipe_text(r) for r in recipes) + ". Calibration: 4 batches of 64 training images; "
          f"{recon_text}. {run_text}. "
          "Cells: top-1 % mean ± std over seeds (mean drop vs FP32; the worst seed's drop where it exceeds the "
          "mean by more than 0.5 point).",
          "", "| model | bits | method | " + " | ".join(recipes) + " |", "|---|---|---|" + "---|" * len(recipes)]
    table = Table(title="PTQ accuracy (digits val)")
    for col in ["model", "bits", "method"] + recipes:
        table.add_column(col)
    order = {m: i for i, m in enumerate(("fp32",) + CALIB_METHODS + RECON_METHODS + ORT_METHODS)}
    border = {b: i for i, b in enumerate(["FP32"] + list(BITS))}
    keys = sorted({(s["model"], s["bits"], s["method"]) for s in summary},
                  key=lambda k: (k[0], border[k[1]], order[k[2]]))
    for model, bits, method in keys:
        vals = []
        for r in recipes:
            s = cell.get((r, model, bits, method))
            worst = "" if s is None or s["drop_max"] <= s["drop_mean"] + 0.5 else f", worst {s['drop_max']:+.2f}"
            vals.append("" if s is None else f"{s['acc_mean']:.2f} ± {s['acc_std']:.2f} ({s['drop_mean']:+.2f}{worst})"
                        + ("" if s["n"] == 3 else f" n={s['n']}"))
        md.append(f"| {model} | {bits} | {method} | " + " | ".join(vals) + " |")
        table.add_row(model, bits, method, *vals)
    md += ["", "| target | held |", "|---|---|"]
    md += [f"| {t['target']} | {'n/a (not run)' if t['held'] is None else ('yes' if t['held'] else 'NO')} |"
           for t in targets]
    _atomic_write(out.with_suffix(".md"), "\n".join(md) + "\n")
    if not show:
        return
    console.print(table)
    for t in targets:
        console.print(f"{t['target']}: {t['held']}")


if __name__ == "__main__":
    main()
