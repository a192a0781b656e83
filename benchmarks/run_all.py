"""Run every benchmark, then rewrite the README's results section from what they wrote.

    python benchmarks/run_all.py                      # every benchmarks/*.py, then recipes/qat_b0.py, then README
    python benchmarks/run_all.py --only fuse_speed    # one benchmark (others keep their last results)
    python benchmarks/run_all.py --no-run             # only rebuild the README section from benchmarks/results/

Each benchmark script prints its own table and writes ``benchmarks/results/<name>.json`` and ``<name>.md``
(stamped with commit, date and machine). The ``qat_b0`` entry runs ``recipes/qat_b0.py`` with its defaults into
``out/benchmarks/qat_b0`` and copies its table (``qat_b0.md``), ``qat_b0.json`` and plot (``qat_b0.png``) into
``benchmarks/results``. The README section between ``<!-- qat-rep:results:start -->`` and
``<!-- qat-rep:results:end -->`` is then replaced (atomically) by every ``results/*.md`` in a fixed order, each
under its own heading, with the plot; the section is appended when the markers are missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from qat_rep.export.atomic import atomic_file
from qat_rep.export.atomic import write_text_atomic as _atomic_write

from common import markdown_table

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
START = "<!-- qat-rep:results:start -->"
END = "<!-- qat-rep:results:end -->"
#: the README's opening "problem" table (RepVGG vs QARepVGG under plain PTQ), built from ptq_accuracy.json
PROBLEM_START = "<!-- qat-rep:problem:start -->"
PROBLEM_END = "<!-- qat-rep:problem:end -->"
#: the README Quickstart's figure and numbers, built from qat_b0.json (the default run of recipes/qat_b0.py)
QUICKSTART_START = "<!-- qat-rep:quickstart:start -->"
QUICKSTART_END = "<!-- qat-rep:quickstart:end -->"
PROBLEM_COLUMNS = {("FP32", "fp32"): "FP32", ("W8A8-pt", "minmax"): "W8A8 per-tensor min-max",
                   ("W8A8", "minmax"): "W8A8 min-max", ("W6A6-pt", "minmax"): "W6A6 per-tensor min-max",
                   ("W8A8-pt", "cfws"): "W8A8 per-tensor CFWS", ("W8A8", "cfws"): "W8A8 CFWS",
                   ("W6A6-pt", "cfws"): "W6A6 per-tensor CFWS"}
#: README order and headings; benchmarks not listed here follow in alphabetical order under their file name
ORDER = {
    "qat_accuracy": "QAT routes, accuracy per cost: equivalent-kernel, fuse-first, progressive and the default fused "
                    "schedule (embedded digits, shifted views)",
    "qat_b0": "`python recipes/qat_b0.py` with defaults",
    "det_accuracy": "YOLOv6-N detection mAP: FP32 / plain PTQ / QAT / ONNX Runtime INT8 (embedded detection set)",
    "ptq_accuracy": "Post-training quantization: every method vs ONNX Runtime's quantize_static (embedded digits)",
    "qat_speed": "QAT step time and memory: equivalent-kernel QAT, the default fused schedule, fuse-first",
    "fuse_speed": "Multi-branch vs fused FP32 latency (PyTorch)",
    "deploy_speed": "INT8 deploy latency in ONNX Runtime (CPU)",
}
NOT_BENCHMARKS = {"run_all", "common"}

log = logging.getLogger("qat_rep.benchmarks")


def benchmark_scripts() -> list[str]:
    """Names of the runnable benchmarks: every ``benchmarks/*.py`` except helpers, plus the ``qat_b0`` recipe."""
    names = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    return names + ["qat_b0"]


def _stamp() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"commit {commit}{' (with uncommitted changes)' if dirty else ''}, {date}, {platform.machine()} "
            f"{platform.system()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")




def run_one(name: str, extra: Sequence[str] = ()) -> float:
    """Run one benchmark in a subprocess from the repository root; returns its wall time. Raises on failure."""
    t0 = time.perf_counter()
    if name == "qat_b0":
        out = ROOT / "out" / "benchmarks" / "qat_b0"
        cmd = [sys.executable, "recipes/qat_b0.py", "--out", str(out), *extra]
    else:
        cmd = [sys.executable, f"benchmarks/{name}.py", *extra]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {name!r} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    if name == "qat_b0":
        collect_recipe(ROOT / "out" / "benchmarks" / "qat_b0", "qat_b0")
    return time.perf_counter() - t0


def collect_recipe(out: Path, name: str) -> None:
    """Copy a recipe run's table (the report's Results section), JSON and plot into ``benchmarks/results``."""
    report = (out / "report.md").read_text(encoding="utf-8")
    section = report.split("## Results", 1)[1].split("\n## ", 1)[0].strip()
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    secs = results.get("seconds", {})
    results["stamp"] = _stamp()
    note = (f"_{results['stamp']}; wall time {secs.get('process', secs.get('total', float('nan'))):.0f} s, CPU time "
            f"{secs.get('cpu', float('nan')):.0f} s_")
    _atomic_write(RESULTS / f"{name}.md", note + "\n\n" + table + f"\n\n![{name}](benchmarks/results/{name}.png)\n")
    _atomic_write(RESULTS / f"{name}.json", json.dumps(results, indent=2) + "\n")
    with atomic_file(RESULTS / f"{name}.png") as tmp:
        shutil.copyfile(out / "accuracy.png", tmp)


def results_section(results_dir: Path = RESULTS) -> str:
    """The markdown of the README's results section, from every ``<name>.md`` in ``results_dir``."""
    found = {p.stem: p for p in results_dir.glob("*.md")}
    if not found:
        raise FileNotFoundError(f"no benchmark results in {str(results_dir)!r}; run python benchmarks/run_all.py first")
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    parts = [START, "", f"_Generated by `python benchmarks/run_all.py` — {_stamp()}._", ""]
    for n in names:
        parts += [f"### {ORDER.get(n, n)}", "", found[n].read_text(encoding="utf-8").strip(), ""]
    parts.append(END)
    return "\n".join(parts)


def problem_table(results_dir: Path = RESULTS) -> str | None:
    """The README's opening table — plain PTQ of RepVGG vs QARepVGG, one row per FP32 training recipe — from
    ``ptq_accuracy.json`` (None if absent)."""
    path = results_dir / "ptq_accuracy.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    summary = data["summary"]
    recipes = list(dict.fromkeys(s["recipe"] for s in summary))
    cell = {(s["recipe"], s["model"], s["bits"], s["method"]): s for s in summary}
    seeds = {r: sorted({x["seed"] for x in data["rows"] if x["recipe"] == r}) for r in recipes}
    info = data["meta"].get("recipes", {})
    names = {"repvgg_a0": "RepVGG-A0", "qarepvgg_a0": "QARepVGG-A0"}
    head = list(PROBLEM_COLUMNS.values())

    def describe(r: str) -> str:
        rc = info.get(r, {})
        if not rc:
            return f"`{r}`"
        shift = f", ±{rc['shift']} px shifts" if rc.get("shift") else ""
        return (f"`{r}` ({rc['epochs']} epochs {rc['optimizer'].upper()} at {rc['image_size']}×{rc['image_size']}"
                f"{shift}; seeds {', '.join(map(str, seeds[r]))})")

    lines = [PROBLEM_START,
             "The problem, from our own benchmark (`python benchmarks/ptq_accuracy.py`: A0 models trained on the "
             "embedded digits with " + " and ".join(describe(r) for r in recipes) + "; top-1 % on the validation "
             "split, mean over seeds; CFWS is the fix for plain PTQ):", ""]
    rows = []
    for model in ("repvgg_a0", "qarepvgg_a0"):
        for r in recipes:
            vals = []
            for b, m in PROBLEM_COLUMNS:
                s = cell.get((r, model, b, m))
                vals.append("n/a" if s is None else f"{s['acc_mean']:.2f}")
            rows.append([names[model], r, *vals])
    lines += [markdown_table(["top-1 %", "recipe", *head], rows), PROBLEM_END]
    return "\n".join(lines)


def _model_title(name: str) -> str:
    """``"qarepvgg_a0"`` → ``"QARepVGG-A0"``."""
    block, _, variant = name.partition("_")
    return {"repvgg": "RepVGG", "qarepvgg": "QARepVGG"}.get(block, block) + (f"-{variant.upper()}" if variant else "")


def quickstart_section(results_dir: Path = RESULTS) -> str | None:
    """The README Quickstart's figure, its one-sentence caption and the measured numbers, from ``qat_b0.json`` (the
    default run of ``recipes/qat_b0.py`` collected by :func:`collect_recipe`); None without a two-model result.

    Numbers: plain PTQ's drop for each block type at the "collapsing setting" (the plain-PTQ setting above 4 bits
    where RepVGG loses most), QAT W4A4 vs FP32 for both, and ONNX Runtime's agreement at W8A8."""
    path = results_dir / "qat_b0.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    models = data.get("models", {})
    rep, qarep = (next((n for n in models if n.startswith(p)), None) for p in ("repvgg_", "qarepvgg_"))
    if rep is None or qarep is None:
        return None
    a, b = models[rep], models[qarep]
    drop = {n: {k.split("/", 1)[1]: acc - models[n]["fp32_acc"] for k, acc in models[n]["ptq"].items()
                if k.startswith(("max/", "minmax/"))} for n in (rep, qarep)}
    above4 = [s for s in drop[rep] if not s.startswith(("W2", "W3", "W4"))]
    collapse = min(above4, key=lambda s: drop[rep][s])
    cfws = {n: models[n]["ptq"].get(f"cfws/{collapse}") for n in (rep, qarep)}
    low = {n: models[n]["qat"].get("w4a4") for n in (rep, qarep)}
    agree = {n: models[n]["qat"].get("w8a8", {}).get("ort_agreement") for n in (rep, qarep)}
    secs = data.get("seconds", {})
    wall = secs.get("process", secs.get("total"))
    ra, qa = _model_title(rep), _model_title(qarep)
    lines = [QUICKSTART_START, "", f"![{ra} vs {qa}: top-1 accuracy against bit-width](benchmarks/results/qat_b0.png)",
             "",
             f"Top-1 accuracy on the digits' {data.get('validation_images', '?')} validation images against bit-width "
             "for plain PTQ (max calibration), CFWS and QAT, one panel per block type "
             f"({' left, '.join(_model_title(n) for n in models)} right; same FP32 recipe and seed), with the FP32 "
             "accuracy dashed and ONNX Runtime's INT8 run of the W8A8 QAT model as open diamonds.", "",
             f"Measured by that run ({data.get('stamp', 'unstamped')}"
             + (f"; {wall:.0f} s wall, {secs.get('cpu', float('nan')):.0f} s CPU" if wall is not None else "") + "):",
             "",
             f"- plain PTQ (max calibration) at {collapse}, where RepVGG loses most above 4 bits: {ra} "
             f"{drop[rep][collapse]:+.2f} points, {qa} {drop[qarep][collapse]:+.2f}"
             + (f" (CFWS there: {cfws[rep] - a['fp32_acc']:+.2f} and {cfws[qarep] - b['fp32_acc']:+.2f})"
                if cfws[rep] is not None and cfws[qarep] is not None else "")
             + "; at W4A4 "
             f"{drop[rep].get('W4A4', float('nan')):+.2f} and {drop[qarep].get('W4A4', float('nan')):+.2f};"]
    if low[rep] and low[qarep]:
        lines.append(f"- QAT W4A4 vs FP32: {ra} {low[rep]['fakequant_acc'] - a['fp32_acc']:+.2f} points "
                     f"({a['fp32_acc']:.2f} → {low[rep]['fakequant_acc']:.2f}), {qa} "
                     f"{low[qarep]['fakequant_acc'] - b['fp32_acc']:+.2f} ({b['fp32_acc']:.2f} → "
                     f"{low[qarep]['fakequant_acc']:.2f});")
    if agree[rep] is not None and agree[qarep] is not None:
        lines.append(f"- ONNX Runtime INT8 (W8A8) vs PyTorch, same predictions on {agree[rep]:.2f} % ({ra}) and "
                     f"{agree[qarep]:.2f} % ({qa}) of the validation images.")
    lines += ["", QUICKSTART_END]
    return "\n".join(lines)


def rewrite_readme(readme: Path, section: str, start: str = START, end: str = END, append: bool = True) -> bool:
    """Replace the text between the markers (inclusive) with ``section``; append a Results section if absent (and
    ``append``). Returns True when the markers were found."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if start in text and end in text:
        if text.index(start) > text.index(end):
            raise ValueError(f"{readme}: {end!r} comes before {start!r}; fix the README markers")
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        _atomic_write(readme, head + section + tail)
        return True
    if append:
        _atomic_write(readme, text.rstrip() + "\n\n## Results\n\n" + section + "\n")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help=f"run only these benchmarks (available: {', '.join(benchmark_scripts())})")
    p.add_argument("--skip", nargs="+", default=(), metavar="NAME", help="benchmarks not to run")
    p.add_argument("--no-run", action="store_true", help="run nothing; only rebuild the README section")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to rewrite")
    p.add_argument("--keep-going", action="store_true", help="continue after a failing benchmark (exit code 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    available = benchmark_scripts()
    for name in [*(args.only or ()), *args.skip]:
        if name not in available:
            p.error(f"unknown benchmark {name!r}; available: {', '.join(available)}")
    failed: list[str] = []
    times: dict[str, float] = {}
    if not args.no_run:
        for name in (args.only or available):
            if name in args.skip:
                continue
            try:
                times[name] = run_one(name)
            except RuntimeError as e:
                if not args.keep_going:
                    raise
                log.error("%s", e)
                failed.append(name)
    found = rewrite_readme(args.readme, results_section())
    problem = problem_table()
    if problem is not None:
        rewrite_readme(args.readme, problem, PROBLEM_START, PROBLEM_END, append=False)
    quickstart = quickstart_section()
    if quickstart is not None:
        rewrite_readme(args.readme, quickstart, QUICKSTART_START, QUICKSTART_END, append=False)
    if times or failed:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="benchmarks/run_all.py")
        table.add_column("benchmark")
        table.add_column("seconds", justify="right")
        table.add_column("status")
        for name in (args.only or available):
            if name in times or name in failed:
                table.add_row(name, f"{times.get(name, 0):.0f}", "failed" if name in failed else "ok")
        Console().print(table)
    log.info("README results section %s: %s", "replaced" if found else "appended", args.readme)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
