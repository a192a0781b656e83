"""Training-step time of equivalent-kernel QAT against FP32 multi-branch training and per-branch fake quant.

Modes, on each of ``--models`` (default ``qarepvgg_a0`` and ``repvgg_a0``; one training step = forward + backward
+ SGD step):

* ``fp32``        — the float multi-branch model (the baseline, ratio 1.0);
* ``eqk_qat``     — qat-rep's equivalent-kernel QAT (``prepare`` + ``calibrate``): one conv per block;
* ``branch_fq``   — what a generic tool does: a fake quantizer on every conv, including each branch conv
  (stock pytorch-quantization ``QuantConv2d``/``QuantLinear``, its own fake-quant functions);
* ``branch_fq_fused`` — the same per-branch insertion with qat-rep's fused fake-quant kernels (a lower bound
  for any per-branch tool);
* ``eqk_float``   — the equivalent-kernel path with its quantizers disabled: what assembling the kernel from the
  branches costs by itself;
* ``fused_fp32``  — the re-parameterized plain network (one conv per block, post-BN folded, no quantization): the
  floor for any one-conv-per-block training step;
* ``fused_bn_fp32`` — the same with QARepVGG's post-sum BN kept as a training BatchNorm (batch statistics), as
  equivalent-kernel QAT keeps it: the floor for ``eqk_qat`` on QARep blocks;
* ``fuse_first``  — the peers' route (super-gradients' ``partial_fusion``, YOLOv6's ``switch_to_deploy`` before
  QAT): ``reparameterize`` (post-BN kept trainable), then ``prepare`` + ``calibrate`` of the plain network;
* ``eqk_fused``   — the default schedule (``Schedule.fused()``, ``RepQATCallback``'s default): every block collapsed
  into its dense branch's parameters, one trainable conv per block (+ the trainable post-BN);
* ``eqk_qat_recompute``, ``eqk_fused_recompute`` — ``eqk_qat`` and ``eqk_fused`` with
  ``QuantConfig(recompute_post_bn="all")``: every QARep block's trainable post-BN keeps no float input, its conv runs
  again in backward (the default, ``"cheap"``, does so for the stem only; RepVGG blocks have no post-BN: the same
  step as without);
* ``eqk_qat_compiled`` — ``eqk_qat`` under ``torch.compile(model, fullgraph=True)``; the first (compiling) step is
  reported as ``compile_s`` and excluded from the step times.

Peak step memory (``--memory``): each mode runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc
serves every allocation above 64 KiB with its own mmap and returns it at free: the resident set follows the live
tensors instead of a heap high-water mark. After one warm-up step (optimizer state allocated) the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs`` ← 5), one step runs, and the peak (``VmHWM``) minus the resident size
before the step is the step's transient memory (activations kept for backward, gradients, temporaries). Reported
in MB and as a ratio to ``fp32`` (FP32 multi-branch). Linux only; ``eqk_qat_compiled`` is not measured (compiling in
each child would dominate the run).

Modes are interleaved step by step (round robin, the order reversed every other round, so that no mode always
runs right after the same one) so that load on the shared machine hits them alike; the table shows medians and
ratios to ``fp32`` from the same run. Single intra-op thread by default (``--threads``).

    python benchmarks/qat_speed.py            # writes benchmarks/results/qat_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from qat_rep import create_model, reparameterize
from qat_rep.quant import QuantConfig, Schedule, apply_schedule, calibrate, prepare
from qat_rep.quant.backend import (
    PQQuantConv2d,
    PQQuantLinear,
    QuantConv2d,
    QuantLinear,
    TensorQuantizer,
    make_quantizer,
)
from qat_rep.export.atomic import write_text_atomic as _atomic_write

from common import markdown_table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _replace_all(model: nn.Module, make) -> nn.Module:
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                setattr(m, cname, make(child))
    return model


def branch_fq_stock(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every conv/linear (branch convs included) → stock pytorch-quantization modules, max-calibrated."""
    def make(layer):
        if isinstance(layer, nn.Conv2d):
            q = PQQuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None)
        else:
            q = PQQuantLinear(layer.in_features, layer.out_features, layer.bias is not None)
        q.weight, q.bias = layer.weight, layer.bias
        return q
    _replace_all(model, make)
    quantizers = [m for n, m in model.named_modules() if n.endswith("_quantizer")]
    with torch.no_grad():
        for q in quantizers:
            q.disable_quant(), q.enable_calib()
        model.eval()
        model(x)
        for q in quantizers:
            q.load_calib_amax()
            q.disable_calib(), q.enable_quant()
    return model.train()


def branch_fq_fused(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every conv/linear → qat-rep's QuantConv2d/QuantLinear (fused fake-quant kernels), max-calibrated."""
    def make(layer):
        shape = (layer.weight.shape[0],) + (1,) * (layer.weight.dim() - 1)
        iq = make_quantizer(8)
        wq = make_quantizer(8, axis=0, amax_shape=shape, dynamic=True)
        return (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_float(layer, iq, wq)
    _replace_all(model, make)
    with torch.no_grad():
        acts = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a: acts.__setitem__(mod, a[0].abs().amax()))
                 for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        for m in model.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m._input_quantizer.disable()
        model.eval()
        model(x)
        for h in hooks:
            h.remove()
        for m, a in acts.items():
            m._input_quantizer.set_amax(a)
            m._input_quantizer.enable()
    return model.train()


def build(mode: str, x: torch.Tensor, arch: str = "qarepvgg_a0") -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, small_input=x.shape[-1] <= 64)
    if mode == "fuse_first":
        reparameterize(model, fold_post_bn=False)
        prepare(model, QuantConfig())
        calibrate(model, [x])
    elif mode in ("eqk_qat", "eqk_float", "eqk_fused", "eqk_qat_compiled", "eqk_qat_recompute",
                  "eqk_fused_recompute"):
        prepare(model, QuantConfig(recompute_post_bn="all" if mode.endswith("_recompute") else "cheap"))
        calibrate(model, [x])
        if mode in ("eqk_fused", "eqk_fused_recompute"):
            apply_schedule(model, Schedule.fused(), 0, 0)
        if mode == "eqk_float":
            for m in model.modules():
                if isinstance(m, TensorQuantizer):
                    m.disable()
    elif mode == "fused_fp32":
        reparameterize(model)
    elif mode == "fused_bn_fp32":
        reparameterize(model, fold_post_bn=False)
    elif mode == "branch_fq":
        branch_fq_stock(model, x)
    elif mode == "branch_fq_fused":
        branch_fq_fused(model, x)
    return model.train()


def run(arch: str, sizes: list[tuple[int, int]], steps: int, warmup: int, modes: list[str]) -> list[dict]:
    rows = []
    for size, batch in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        models = {m: build(m, x, arch) for m in modes}
        opts = {m: torch.optim.SGD(models[m].parameters(), lr=1e-4, momentum=0.9) for m in modes}
        calls = {m: (torch.compile(models[m], fullgraph=True) if m == "eqk_qat_compiled" else models[m])
                 for m in modes}
        times: dict[str, list[float]] = {m: [] for m in modes}
        compile_s: dict[str, float] = {}
        for m in modes:
            if m == "eqk_qat_compiled":  # the compiling step, timed on its own
                t0 = time.perf_counter()
                _step(calls[m], opts[m], x, y)
                compile_s[m] = time.perf_counter() - t0
        for i in range(warmup + steps):
            for m in (modes if i % 2 == 0 else modes[::-1]):
                t0 = time.perf_counter()
                _step(calls[m], opts[m], x, y)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[m].append(dt)
        base = statistics.median(times["fp32"])
        for m in modes:
            med = statistics.median(times[m])
            rows.append({"model": arch, "size": size, "batch": batch, "mode": m, "median_s": med,
                         "mean_s": statistics.mean(times[m]),
                         "min_s": min(times[m]), "ratio_to_fp32": med / base, "steps": steps,
                         "compile_s": compile_s.get(m)})
    return rows


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(arch: str, mode: str, size: int, batch: int) -> dict:
    """One mode's transient step memory, measured in this (fresh) process; see the module docstring."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    model = build(mode, x, arch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    _step(model, opt, x, y)  # warm-up: optimizer state, lazily allocated buffers
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    _step(model, opt, x, y)
    peak = _status_kb("VmHWM")
    return {"model": arch, "mode": mode, "size": size, "batch": batch, "peak_step_mb": (peak - before) / 1024}


def measure_memory(arch: str, sizes: list[tuple[int, int]], modes: list[str],
                   threads: int) -> dict[tuple[str, int, str], float]:
    """Transient step memory (MB) per (model, size, mode), each in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out: dict[tuple[str, int, str], float] = {}
    for size, batch in sizes:
        for mode in modes:
            if mode == "eqk_qat_compiled":
                continue
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", arch, mode,
                                  str(size), str(batch), "--threads", str(threads)], env=env, capture_output=True,
                                 text=True, check=True)
            out[(arch, size, mode)] = json.loads(res.stdout.strip().splitlines()[-1])["peak_step_mb"]
    return out




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="32x32,224x8", help="comma list of <image size>x<batch>")
    ap.add_argument("--modes", default="fp32,eqk_qat,eqk_qat_recompute,eqk_qat_compiled,eqk_fused,"
                                       "eqk_fused_recompute,fuse_first,branch_fq,branch_fq_fused,eqk_float,fused_fp32,"
                                       "fused_bn_fp32")
    ap.add_argument("--memory", action="store_true", help="also measure peak step memory per mode (fresh processes)")
    ap.add_argument("--models", default="qarepvgg_a0,repvgg_a0", help="comma list of model names")
    ap.add_argument("--memory-child", nargs=4, metavar=("MODEL", "MODE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        arch, mode, size, batch = args.memory_child
        print(json.dumps(memory_child(arch, mode, int(size), int(batch))))
        return 0
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    if "fp32" not in modes:
        ap.error("--modes must include fp32 (the baseline)")
    archs = args.models.split(",")
    rows, memory = [], {}
    for arch in archs:
        rows += run(arch, sizes, args.steps, args.warmup, modes)
        if args.memory:
            memory.update(measure_memory(arch, sizes, modes, args.threads))
    for r in rows:
        mb = memory.get((r["model"], r["size"], r["mode"]))
        base = memory.get((r["model"], r["size"], "fp32"))
        r["peak_step_mb"] = mb
        r["memory_ratio_to_fp32"] = None if mb is None or not base else mb / base
    by = {(r["model"], r["size"], r["mode"]): r for r in rows}
    console = Console()
    table = Table(title="training step (median over interleaved steps)")
    cols = ("model", "input", "mode", "median s/step", "ratio to fp32", "ratio to fuse_first", "peak step MB",
            "memory ratio to fp32", "compile s")
    for c in cols:
        table.add_column(c, justify="right" if c != "mode" else "left")
    md_rows = []
    for r in rows:
        ff = by.get((r["model"], r["size"], "fuse_first"))
        cells = (r["model"], f"{r['size']}x{r['size']} b{r['batch']}", r["mode"], f"{r['median_s']:.4f}",
                 f"{r['ratio_to_fp32']:.2f}", f"{r['median_s'] / ff['median_s']:.2f}" if ff else "-",
                 f"{r['peak_step_mb']:.1f}" if r["peak_step_mb"] is not None else "-",
                 f"{r['memory_ratio_to_fp32']:.2f}" if r["memory_ratio_to_fp32"] is not None else "-",
                 f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-")
        table.add_row(*cells)
        md_rows.append(cells)
    md = markdown_table(cols, md_rows).split("\n")
    console.print(table)
    targets = _targets(by, archs, sizes)
    for name, ok in targets.items():
        console.print(f"target {name}: {'met' if ok else 'NOT met' if ok is not None else 'not measured'}")
    meta = {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
            "load_avg": os.getloadavg(), "models": archs, "targets": targets}
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "qat_speed.json"), json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"- {name}: {'met' if ok else 'NOT met' if ok is not None else 'not measured'}"
             for name, ok in targets.items()]
    _atomic_write(os.path.join(args.out, "qat_speed.md"),
                  "Command: `python benchmarks/qat_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
                  + "`\n\n" + "\n".join(md) + "\n\n"
                  + f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}. "
                  + "Targets (every size):\n\n" + "\n".join(lines) + "\n")
    return 0


def _targets(by: dict, archs: list[str], sizes: list[tuple[int, int]]) -> dict[str, bool | None]:
    """The targets this benchmark checks per model, each over every size (``None`` when a needed row was not run)."""
    def check(arch: str, mode: str, ref: str, key: str, bound: float, op=lambda a, b: a <= b) -> bool | None:
        vals = []
        for size, _ in sizes:
            a, b = by.get((arch, size, mode)), by.get((arch, size, ref))
            if a is None or b is None or a.get(key) is None or b.get(key) is None:
                return None
            vals.append(op(a[key] / b[key], bound))
        return all(vals)

    out: dict[str, bool | None] = {}
    for arch in archs:
        out.update({
            f"{arch}: eqk_qat step <= 1.1x fuse_first": check(arch, "eqk_qat", "fuse_first", "mean_s", 1.1),
            f"{arch}: default schedule (eqk_fused) step <= 1.1x fuse_first": check(arch, "eqk_fused", "fuse_first",
                                                                                  "mean_s", 1.1),
            f"{arch}: eqk_qat memory <= 0.6x fp32": check(arch, "eqk_qat", "fp32", "peak_step_mb", 0.6),
            f"{arch}: eqk_fused memory <= 0.5x fp32": check(arch, "eqk_fused", "fp32", "peak_step_mb", 0.5),
            f"{arch}: eqk_qat_recompute memory <= 0.6x fp32": check(arch, "eqk_qat_recompute", "fp32",
                                                                   "peak_step_mb", 0.6),
            f"{arch}: eqk_fused_recompute memory <= 0.5x fp32": check(arch, "eqk_fused_recompute", "fp32",
                                                                     "peak_step_mb", 0.5),
            f"{arch}: eqk_qat_compiled faster than eqk_qat": check(arch, "eqk_qat_compiled", "eqk_qat", "median_s",
                                                                   1.0, lambda a, b: a < b),
        })
    return out


if __name__ == "__main__":
    raise SystemExit(main())
