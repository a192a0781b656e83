"""Accuracy per cost of the QAT routes for rep blocks: equivalent-kernel QAT vs fuse-first QAT (vs progressive).

Routes (``ROUTES``), all starting from the same FP32 multi-branch model, with the same calibration, optimizer,
schedule and epochs:

* ``eqk`` — this package's route: ``prepare`` the multi-branch model; every block trains its branches through the
  fake-quantized equivalent kernel (one conv per block).
* ``fuse_first`` — the peers' route (super-gradients' ``partial_fusion()`` for QARepVGG, YOLOv6's
  ``switch_to_deploy()``): ``qat_rep.reparameterize(model, fold_post_bn=False)`` collapses every block into one
  float conv — QARepVGG's post-sum BN stays a real, trainable BN after it — then ordinary QAT of that plain network
  (``prepare`` turns each fused conv into a ``QuantConv2d``; ``convert`` folds the post-BN at the end).
* ``progressive`` — equivalent-kernel QAT first, then every block collapsed into one trainable conv for the rest of
  the run (the schedule's ``fused`` phase). Runs only where ``qat_rep.quant.rep_qat.PHASES`` has a ``fused`` phase.

FP32 models come from two training recipes of ``benchmarks/common.py`` (``--recipes``; default the benchmarks' own
AdamW recipe and an independent SGD one), three seeds each. Settings (``SETTINGS``): W8A8 with per-tensor weights
(the setting where RepVGG's weight outliers hurt) and W4A4 (MSE-calibrated activations, learned ``amax``,
per-channel weights); below 8 bits the first and last layers keep 8 bits (``QuantConfig.first_last_8bit``).

Validation: the digits' 359 held-out images are too few to separate routes (one image is 0.28 point), so every
validation image is scored at ``(2·shift+1)²`` fixed translations (``--val-shift 1``: 9 views, 3,231 images; the
border is repeated). The views of one digit are correlated: one view is 0.03 point, one digit (all of its views)
is still 0.28 point — the seed spread is the honest error bar. The unshifted view alone is reported too.

What is scored is what ships: the deployed model (:func:`deploy`: fused, post-BN folded, ``convert``). Its agreement
with the trained fake-quant model (eval mode, same inputs) is reported, because the two routes differ there: the eqk
model is the deployed arithmetic, while folding fuse-first's trainable post-BN after QAT re-quantizes the folded
kernel (exact per channel; per-tensor weights land on a new grid).

Cost, two measures per route:

* step time — the median wall time of the QAT fine-tune's training steps, measured in the run itself (every route
  of one (model, seed) runs back to back, so ratios between routes are fair; absolute numbers follow the machine's
  load) and the whole fine-tune's wall time;
* peak step memory — measured once per (model, setting, route) in a fresh subprocess with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (so every tensor larger than 64 KiB is its own mmap and the resident set
  follows live tensors instead of glibc's free lists): after two warm-up steps (the optimizer state exists),
  ``malloc_trim`` then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and one training step
  runs; peak RSS minus the RSS before the step is that step's transient memory (activations saved for backward,
  gradients, temporaries). The median of three steps is reported, beside the FP32 multi-branch step's; for
  ``progressive`` the measured steps are in its ``fused`` phase (its ``eqk`` phase costs what ``eqk`` costs). This
  needs Linux; elsewhere memory is reported as unavailable.

Results are merged into ``benchmarks/results/qat_accuracy.json`` after every run (under a file lock, keyed by
recipe/model/seed/setting/route), so an interrupted run resumes where it stopped (``--fresh`` starts over) and
several processes (e.g. one per recipe) can fill the same table.

    python benchmarks/qat_accuracy.py --threads 1                      # everything, both recipes
    python benchmarks/qat_accuracy.py --recipes sgd16-long --routes eqk fuse_first
    python benchmarks/qat_accuracy.py --render                         # rebuild the markdown from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import CACHE, RECIPES, markdown_table, shift_batch, stamp, train_fp32
from qat_rep import DataSpec, create_model, load_dataset, reparameterize
from qat_rep.blocks import RepBlock
from qat_rep.fuse import fuse_bn_module
from qat_rep.export.atomic import write_text_atomic
from qat_rep.quant import QuantConfig, Schedule, apply_schedule, calibrate, convert, prepare
from qat_rep.quant.rep_qat import PHASES
from qat_rep.quant.backend import QuantConv2d

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "qat_accuracy"


# ----------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """A quantization setting and its QAT fine-tune (AdamW, cosine to 1 % of ``lr``, batch of the run)."""

    label: str
    config: QuantConfig
    epochs: int
    lr: float
    amax_lr_scale: float = 1.0  # learned ranges train at this multiple of ``lr`` (no weight decay)

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or not self.amax_lr_scale > 0:
            raise ValueError(f"setting {self.label}: epochs must be >= 1, lr and amax_lr_scale > 0, got "
                             f"{self.epochs}, {self.lr}, {self.amax_lr_scale}")


def default_settings(w8_epochs: int = 1, w8_lr: float = 1e-4, w4_epochs: int = 5, w4_lr: float = 1e-3,
                     amax_lr_scale: float = 5.0) -> dict[str, Setting]:
    """W8A8 with per-tensor weights (a gentle fine-tune) and W4A4 (a real one, ``recipes/qat_b0.py``'s low-bit
    recipe): MSE-calibrated activations, weight ranges from the MSE search, both learned at ``amax_lr_scale`` × the
    lr, unsigned activations after a ReLU, first and last layer at 8 bits. ``W4A4-long`` (twice the epochs) is not
    run by default (``--settings W4A4-long``)."""
    return {
        "W8A8-pt": Setting("W8A8-pt", QuantConfig(w_bits=8, a_bits=8, w_granularity="per_tensor"), w8_epochs, w8_lr),
        "W4A4": Setting("W4A4", QuantConfig(w_bits=4, a_bits=4, calibrator="mse", learn_amax=True,
                                            weight_calibrator="mse", unsigned_activations=True), w4_epochs, w4_lr,
                        amax_lr_scale),
        # the same with twice the epochs: where a route stays more than 1 point below FP32 in the W4A4 budget
        "W4A4-long": Setting("W4A4-long", QuantConfig(w_bits=4, a_bits=4, calibrator="mse", learn_amax=True,
                                                      weight_calibrator="mse", unsigned_activations=True),
                             2 * w4_epochs, w4_lr, amax_lr_scale),
    }


# ----------------------------------------------------------------------------------------------------- routes
#: ``on_step(step, total_steps, optimizer)`` — called before every training step (a route's schedule), or ``None``
StepHook = Callable[[int, int, torch.optim.Optimizer], None]
#: the progressive route collapses every block after this fraction of the fine-tune's steps
PROGRESSIVE_FUSE_AT = 0.5


@dataclasses.dataclass(frozen=True)
class Route:
    """One way from a float multi-branch model to a QAT model: ``build(model, config)`` works in place."""

    name: str
    build: Callable[[nn.Module, QuantConfig], StepHook | None]
    available: Callable[[], bool] = lambda: True
    unavailable_reason: str = ""


def _build_fp32(model: nn.Module, config: QuantConfig) -> None:
    """The float multi-branch model, untouched (the cost baseline; never quantized)."""
    return None


def _build_eqk(model: nn.Module, config: QuantConfig) -> None:
    prepare(model, config)
    return None


def _build_fuse_first(model: nn.Module, config: QuantConfig) -> None:
    reparameterize(model, fold_post_bn=False)
    prepare(model, config)
    return None


def _has_fused_phase() -> bool:
    return "fused" in PHASES


def _build_fused(model: nn.Module, config: QuantConfig) -> StepHook:
    """The callback's default schedule, ``Schedule.fused()``: every block collapsed into one trainable conv (QARep:
    plus its post-BN) at the first step, on the multi-branch model ``prepare`` quantized."""
    if not _has_fused_phase():
        raise ValueError(f"the fused route needs the schedule's 'fused' phase; this qat_rep has {PHASES}")
    prepare(model, config)
    schedule = Schedule.fused(unit="step")

    def on_step(step: int, total: int, optimizer: torch.optim.Optimizer) -> None:
        apply_schedule(model, schedule, 0, step, [optimizer])

    return on_step


def _build_progressive(model: nn.Module, config: QuantConfig) -> StepHook:
    """Equivalent-kernel QAT for the first ``PROGRESSIVE_FUSE_AT`` of the steps, then every block collapsed into one
    trainable conv (QARep: plus its post-BN) — ``Schedule.all_at_once(fuse_at=...)`` by step; the collapse drops
    the rewritten parameters' optimizer state."""
    if not _has_fused_phase():
        raise ValueError(f"the progressive route needs the schedule's 'fused' phase; this qat_rep has {PHASES}")
    prepare(model, config)
    schedules: dict[int, Schedule] = {}

    def on_step(step: int, total: int, optimizer: torch.optim.Optimizer) -> None:
        if total not in schedules:
            schedules[total] = Schedule.all_at_once(unit="step", fuse_at=max(1, int(total * PROGRESSIVE_FUSE_AT)))
        apply_schedule(model, schedules[total], 0, step, [optimizer])

    return on_step


ROUTES: dict[str, Route] = {
    "fp32": Route("fp32", _build_fp32),
    "eqk": Route("eqk", _build_eqk),
    "fuse_first": Route("fuse_first", _build_fuse_first),
    "progressive": Route("progressive", _build_progressive, _has_fused_phase,
                         "qat_rep.quant.rep_qat.PHASES has no 'fused' phase in this checkout"),
    "fused": Route("fused", _build_fused, _has_fused_phase,
                   "qat_rep.quant.rep_qat.PHASES has no 'fused' phase in this checkout"),
}
QAT_ROUTES = ("eqk", "fuse_first", "progressive", "fused")


def get_route(name: str) -> Route:
    try:
        return ROUTES[name]
    except KeyError:
        raise ValueError(f"unknown route {name!r}; valid: {', '.join(ROUTES)}") from None


# ----------------------------------------------------------------------------------------------------- data
def shifted_views(x: Tensor, shift: int) -> Tensor:
    """Every image of ``x`` (N, C, H, W) at each translation ``(dy, dx) ∈ [-shift, shift]²`` (border repeated).

    Returns ``((2·shift+1)² · N, C, H, W)``, view-major: the unshifted images are the block at index
    ``view_index(0, 0, shift)``.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return x
    _, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    views = [padded[:, :, shift + dy:shift + dy + h, shift + dx:shift + dx + w]
             for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    return torch.cat(views)


def view_index(dy: int, dx: int, shift: int) -> int:
    """Position of the view translated by ``(dy, dx)`` in :func:`shifted_views`' output (in blocks of N)."""
    n = 2 * shift + 1
    return (dy + shift) * n + (dx + shift)


@dataclasses.dataclass
class ValSet:
    """The validation split at every fixed shift: ``x`` is view-major, ``n`` images per view."""

    x: Tensor
    y: Tensor
    n: int
    shift: int

    @classmethod
    def digits(cls, image_size: int, shift: int) -> "ValSet":
        _, val, _ = load_dataset(DataSpec("digits", image_size=image_size))
        x, y = val.tensors
        views = (2 * shift + 1) ** 2
        return cls(shifted_views(x, shift), y.repeat(views), len(y), shift)


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def scores(pred: Tensor, val: ValSet) -> dict[str, float]:
    """Top-1 % over every view and over the unshifted view alone."""
    ok = (pred == val.y).float()
    c = view_index(0, 0, val.shift) * val.n
    return {"top1": 100.0 * float(ok.mean()), "top1_unshifted": 100.0 * float(ok[c:c + val.n].mean())}


# ----------------------------------------------------------------------------------------------------- training
def finetune(model: nn.Module, train_set, setting: Setting, batch_size: int, seed: int,
             on_step: StepHook | None = None, shift: int = 0) -> list[float]:
    """AdamW + cosine (to 1 % of the lr) for ``setting.epochs``, with the FP32 recipe's random ``shift`` (pixels);
    learned ranges at ``setting.amax_lr_scale`` × the lr without weight decay. Returns every step's wall time."""
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
    total = setting.epochs * len(loader)
    ranges = [p for n, p in model.named_parameters() if n.endswith("_amax")]
    ids = {id(p) for p in ranges}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if ranges:
        groups.append({"params": ranges, "lr": setting.lr * setting.amax_lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=setting.lr, weight_decay=1e-4)
    shift_gen = torch.Generator().manual_seed(seed + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * i / total)))
    times, step = [], 0
    for _ in range(setting.epochs):
        model.train()
        for x, y in loader:
            t0 = time.perf_counter()
            if on_step is not None:
                on_step(step, total, opt)
            if shift:
                x = shift_batch(x, shift, shift_gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - t0)
            step += 1
    return times


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """``convert(model)``, after folding the trainable post-BN of every already-fused block into its quantized conv
    the way the peer route deploys it (TensorRT folds a BN into the conv before it quantizes the weights).

    Per output channel this fold is exact: ``Q(W·t; amax·|t|) = t·Q(W; amax)``, so a learned per-channel ``amax``
    is scaled by ``|t|`` (``convert`` itself leaves a learned ``amax`` of a fused block unscaled when it folds the
    post-BN — the fuse-first route would then ship a different network than it trained). A dynamic ``amax`` is
    recomputed from the folded kernel — for per-tensor weights a new grid, a real cost of fusing first.
    """
    for block in [m for m in model.modules() if isinstance(m, RepBlock)]:
        conv, bn = block.rbr_reparam, getattr(block, "bn", None)
        if not (isinstance(conv, QuantConv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue
        t = fuse_bn_module(torch.ones_like(bn.running_var).reshape(-1, 1, 1, 1), bn)[0].flatten()
        block.fold_post_bn()
        wq = conv._weight_quantizer
        if not wq.learn_amax:
            wq.set_amax(wq.reduce_amax(conv.weight))
        elif wq.axis is not None:
            wq.set_amax(wq.amax.detach().reshape(t.shape) * t.abs())
        else:
            raise ValueError("a learned per-tensor weight amax cannot follow a folded post-BN exactly; "
                             "use per-channel weights with learn_amax")
    return convert(model)


def run_route(fp32: nn.Module, route: Route, setting: Setting, train_set, val: ValSet, batch_size: int,
              seed: int, shift: int = 0) -> dict[str, Any]:
    """One QAT run: build the route on a copy of ``fp32``, calibrate, fine-tune, convert; score both forms."""
    torch.manual_seed(seed)
    model = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    hook = route.build(model, setting.config)
    gen = torch.Generator().manual_seed(seed)
    calib = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen)
    calibrate(model, calib)
    times = finetune(model, train_set, setting, batch_size, seed, hook, shift)
    seconds = time.perf_counter() - t0
    c = view_index(0, 0, val.shift) * val.n  # the trained model is scored on the unshifted view (evaluation cost)
    trained = predictions(model, val.x[c:c + val.n])
    deployed = predictions(deploy(model), val.x)
    return {**scores(deployed, val), "qat_model": 100.0 * float((trained == val.y[c:c + val.n]).float().mean()),
            "agreement": 100.0 * float((trained == deployed[c:c + val.n]).float().mean()),
            "step_s": statistics.median(times[2:] if len(times) > 4 else times), "qat_s": seconds,
            "steps": len(times)}


# ----------------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_memory(model_name: str, route_name: str, setting: Setting | None, image_size: int, batch_size: int,
                repeats: int = 3) -> dict[str, float]:
    """Peak transient memory (MiB) and median time (s) of one training step, in this process.

    Meant for a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (see the module docstring): warm-up,
    then per measured step ``malloc_trim(0)``, reset the peak-RSS counter, run the step, read the peak.
    """
    libc = ctypes.CDLL("libc.so.6")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, small_input=True)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    route = get_route(route_name)
    hook = route.build(model, setting.config) if setting is not None else None
    if route_name != "fp32":
        calibrate(model, [(x, y)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step(i: int) -> None:
        if hook is not None:  # a schedule past its transition after the first warm-up step (progressive: fused)
            hook(i, 2, opt)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for i in range(2):
        opt.zero_grad(set_to_none=True)
        step(i)
    peaks, times = [], []
    for i in range(repeats):
        opt.zero_grad(set_to_none=True)  # the step's gradients count as its memory
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kib("VmHWM") > before + 1024:
            raise RuntimeError("the peak-RSS counter did not reset (/proc/self/clear_refs); cannot measure memory")
        t0 = time.perf_counter()
        step(2 + i)
        times.append(time.perf_counter() - t0)
        peaks.append((_status_kib("VmHWM") - before) / 1024.0)
    return {"peak_mib": statistics.median(peaks), "step_s": statistics.median(times)}


def measure_memory(model_name: str, route_name: str, setting_label: str | None, settings: dict[str, Setting],
                   image_size: int, batch_size: int) -> dict[str, float] | None:
    """:func:`step_memory` in a fresh subprocess (one thread, mmap threshold 64 KiB); ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", model_name, route_name,
           setting_label or "-", "--image-size", str(image_size), "--batch-size", str(batch_size),
           "--settings-json", json.dumps({k: _setting_dict(s) for k, s in settings.items()})]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {model_name}/{route_name}/{setting_label} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- results
def _setting_dict(s: Setting) -> dict[str, Any]:
    return {"label": s.label, "config": s.config.to_dict(), "epochs": s.epochs, "lr": s.lr,
            "amax_lr_scale": s.amax_lr_scale}


def _setting_from(d: dict[str, Any]) -> Setting:
    return Setting(d["label"], QuantConfig.from_dict(d["config"]), d["epochs"], d["lr"], d.get("amax_lr_scale", 1.0))


def run_key(r: dict[str, Any]) -> tuple:
    return r["recipe"], r["model"], r["seed"], r.get("setting"), r.get("route")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path.lock`` (several benchmark processes fill one result file)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"runs": [], "memory": []}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a {NAME} result file (no 'runs' list); move it away or pass --fresh")
    data.setdefault("memory", [])
    return data


def merge(data: dict[str, Any], runs: list[dict[str, Any]] = (), memory: list[dict[str, Any]] = ()
          ) -> dict[str, Any]:
    """``data`` with ``runs``/``memory`` added; an entry with the same key replaces the old one."""
    by_key = {run_key(r): r for r in data["runs"]}
    by_key.update({run_key(r): r for r in runs})
    mem = {(m["model"], m["setting"], m["route"], m["image_size"], m["batch_size"]): m for m in data["memory"]}
    mem.update({(m["model"], m["setting"], m["route"], m["image_size"], m["batch_size"]): m for m in memory})
    return {**data, "runs": sorted(by_key.values(), key=lambda r: tuple(str(v) for v in run_key(r))),
            "memory": list(mem.values())}


def save(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]] = (), memory: list[dict[str, Any]] = ()
         ) -> dict[str, Any]:
    """Merge into ``out/qat_accuracy.json`` under the lock and rewrite the markdown; returns the merged data."""
    path = out / f"{NAME}.json"
    with locked(path):
        data = merge(load_results(path), runs, memory)
        old = data.get("meta", {})
        # settings and recipes accumulate over invocations (one process per recipe, a later extra setting)
        data["meta"] = {**old, **meta, **{k: {**old.get(k, {}), **meta.get(k, {})} for k in ("settings", "recipes")}}
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")
        write_text_atomic(out / f"{NAME}.md", render(data))
    return data


def _spread(vals: list[float]) -> float:
    return (max(vals) - min(vals)) / 2 if vals else float("nan")


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (recipe, model, setting, route): means over seeds; FP32 rows first."""
    runs = data["runs"]
    rows = []
    for recipe in sorted({r["recipe"] for r in runs}):
        for model in sorted({r["model"] for r in runs if r["recipe"] == recipe}):
            fp = [r for r in runs if r["recipe"] == recipe and r["model"] == model and r.get("route") is None]
            fp_by_seed = {r["seed"]: r["top1"] for r in fp}
            if fp:
                acc = [r["top1"] for r in fp]
                rows.append({"recipe": recipe, "model": model, "setting": "FP32", "route": "", "seeds": len(fp),
                             "top1": statistics.mean(acc), "spread": _spread(acc),
                             "top1_unshifted": statistics.mean(r["top1_unshifted"] for r in fp)})
            for setting in sorted({r["setting"] for r in runs if r.get("setting")}, reverse=True):
                for route in QAT_ROUTES:
                    rs = [r for r in runs if r["recipe"] == recipe and r["model"] == model
                          and r.get("setting") == setting and r.get("route") == route]
                    if not rs:
                        continue
                    acc = [r["top1"] for r in rs]
                    drops = [fp_by_seed[r["seed"]] - r["top1"] for r in rs if r["seed"] in fp_by_seed]
                    rows.append({
                        "recipe": recipe, "model": model, "setting": setting, "route": route, "seeds": len(rs),
                        "top1": statistics.mean(acc), "spread": _spread(acc),
                        "top1_unshifted": statistics.mean(r["top1_unshifted"] for r in rs),
                        "drop": statistics.mean(drops) if drops else None,
                        "qat_model": statistics.mean(r["qat_model"] for r in rs),
                        "agreement": statistics.mean(r["agreement"] for r in rs),
                        "step_s": statistics.mean(r["step_s"] for r in rs),
                        "qat_s": statistics.mean(r["qat_s"] for r in rs),
                    })
    return rows


def compare(rows: list[dict[str, Any]], a: str = "eqk", b: str = "fuse_first") -> list[dict[str, Any]]:
    """Route ``a`` against route ``b`` per (recipe, model, setting): accuracy difference of the means, the larger
    of the two seed spreads (a difference inside it is not a result) and the step-time ratio of the same run."""
    by = {(r["recipe"], r["model"], r["setting"], r["route"]): r for r in rows}
    out = []
    for (recipe, model, setting, route), ra in by.items():
        rb = by.get((recipe, model, setting, b))
        if route != a or rb is None:
            continue
        diff, spread = ra["top1"] - rb["top1"], max(ra["spread"], rb["spread"])
        out.append({"recipe": recipe, "model": model, "setting": setting, "diff": diff, "spread": spread,
                    "verdict": "one seed: not a result" if min(ra["seeds"], rb["seeds"]) < 2 else
                    "tie (within the seed spread)" if abs(diff) <= spread else
                    (f"{a} better" if diff > 0 else f"{b} better"),
                    "time_ratio": ra["step_s"] / rb["step_s"], "seeds": min(ra["seeds"], rb["seeds"])})
    return out


def _memory_table(data: dict[str, Any]) -> list[str]:
    mem = data.get("memory", [])
    if not mem:
        return []
    fp = {(m["model"], m["image_size"], m["batch_size"]): m for m in mem if m["route"] == "fp32"}
    head = ["model", "input", "setting", "route", "peak step memory MiB", "× FP32 multi-branch", "step s (probe)",
            "× FP32", "code"]
    cells = []
    order = {r: i for i, r in enumerate(ROUTES)}
    for m in sorted(mem, key=lambda m: (m["model"], m["image_size"], m["setting"] or "", order[m["route"]])):
        base = fp.get((m["model"], m["image_size"], m["batch_size"]))
        ratio = f"{m['peak_mib'] / base['peak_mib']:.2f}" if base else ""
        tratio = f"{m['step_s'] / base['step_s']:.2f}" if base else ""
        cells.append([m["model"], f"{m['image_size']}×{m['image_size']} b{m['batch_size']}", m["setting"] or "—",
                      m["route"], f"{m['peak_mib']:.1f}", ratio, f"{m['step_s']:.3f}", tratio, m.get("commit", "")])
    return markdown_table(head, cells).split("\n")


def render(data: dict[str, Any]) -> str:
    """The markdown: the accuracy-per-cost table, the memory table and the notes."""
    rows = summarize(data)
    meta = data.get("meta", {})
    mem = {(m["model"], m["setting"], m["route"]): m for m in data.get("memory", [])}
    fp_mem = {m["model"]: m for m in data.get("memory", []) if m["route"] == "fp32"}
    head = ["FP32 recipe", "model", "setting", "route", "seeds", "top-1 deployed (mean ± spread)", "drop vs FP32",
            "unshifted view", "trained = deployed", "s/step", "× fuse_first", "QAT wall s", "step memory × FP32"]
    table = []
    ff_step = {(r["recipe"], r["model"], r["setting"]): r["step_s"] for r in rows if r["route"] == "fuse_first"}
    for r in rows:
        if r["setting"] == "FP32":
            cells = [r["recipe"], r["model"], "FP32", "", str(r["seeds"]), f"{r['top1']:.2f} ± {r['spread']:.2f}",
                     "", f"{r['top1_unshifted']:.2f}", "", "", "", "", "1.00"]
        else:
            m, f = mem.get((r["model"], r["setting"], r["route"])), fp_mem.get(r["model"])
            e = ff_step.get((r["recipe"], r["model"], r["setting"]))
            cells = [r["recipe"], r["model"], r["setting"], r["route"], str(r["seeds"]),
                     f"{r['top1']:.2f} ± {r['spread']:.2f}", "" if r["drop"] is None else f"{r['drop']:+.2f}",
                     f"{r['top1_unshifted']:.2f}", f"{r['agreement']:.1f} %",
                     f"{r['step_s']:.3f}", "" if not e else f"{r['step_s'] / e:.2f}", f"{r['qat_s']:.0f}",
                     "" if not (m and f) else f"{m['peak_mib'] / f['peak_mib']:.2f}"]
        table.append(cells)
    md = markdown_table(head, table).split("\n")
    notes = []
    if meta:
        shift = meta.get("val_shift", 1)
        views = (2 * shift + 1) ** 2
        notes.append(f"Validation: the digits' 359 held-out images × {views} fixed shifts (±{shift} px, border "
                     f"repeated) = {359 * views} images at the recipe's input size: one view is "
                     f"{100 / (359 * views):.3f} point, one digit (all its views) 0.28 point. Spread = (max − min) / 2 "
                     "over seeds; drop = mean over seeds of FP32 − deployed QAT (same views).")
        for label, s in meta.get("settings", {}).items():
            c = s["config"]
            ran = sorted({(r.get("epochs"), r.get("lr")) for r in data["runs"] if r.get("setting") == label},
                         key=str)  # what the runs in the table used (the meta is the last invocation's)
            if len(ran) == 1 and None not in ran[0]:
                s = {**s, "epochs": ran[0][0], "lr": ran[0][1]}
            learned = (f"learned amax (weights from {c.get('weight_calibrator', 'max')}, at "
                       f"{s.get('amax_lr_scale', 1.0):g}× the lr)" if c["learn_amax"] else "fixed amax")
            notes.append(f"{label}: {s['epochs']} QAT epoch(s), AdamW lr {s['lr']:g} cosine to 1 %, batch "
                         f"{meta.get('batch_size')}, the FP32 recipe's random shifts; calibrator {c['calibrator']} on "
                         f"{c['calib_batches']} batches, {c['w_granularity']} weights, {learned}, unsigned "
                         f"activations {c.get('unsigned_activations', False)}, first/last 8-bit "
                         f"{c['first_last_8bit'] and (c['w_bits'] < 8 or c['a_bits'] < 8)}.")
        recipes = meta.get("recipes", {})
        for name, rc in recipes.items():
            notes.append(f"FP32 recipe `{name}`: {rc['epochs']} epochs {rc['optimizer']} lr {rc['lr']:g} at "
                         f"{rc['image_size']}×{rc['image_size']}, batch {rc['batch_size']}, ±{rc['shift']} px shifts "
                         "in training (benchmarks/common.py).")
    notes.append("trained = deployed: how often the trained fake-quant model (eval mode) and the converted, fused "
                 "model predict the same class. s/step: median training step of the fine-tune, routes of one seed "
                 "run back to back (× fuse_first is the ratio in the same run); QAT wall s: prepare + calibration + "
                 "fine-tune. Step memory: peak RSS of one training step over the RSS before it, fresh process per "
                 "route (table below).")
    for a in ("eqk", "progressive", "fused"):
        cmp = compare(rows, a)
        if cmp:
            notes.append(f"{a} − fuse_first (deployed top-1, mean over seeds; spread = the larger seed spread; "
                         f"time = {a} s/step ÷ fuse_first s/step): " + "; ".join(
                             f"{c['recipe']} {c['model']} {c['setting']}: {c['diff']:+.2f} ± {c['spread']:.2f} → "
                             f"{c['verdict']}, time × {c['time_ratio']:.2f}" for c in cmp) + ".")
    out = ["\n".join(md), "", "\n".join(f"- {n}" for n in notes)]
    mt = _memory_table(data)
    if mt:
        out += ["", "Peak transient memory and time of one training step (fresh process each, 1 thread, "
                "`MALLOC_MMAP_THRESHOLD_=65536`, median of 3 steps after 2 warm-up steps):", "", "\n".join(mt)]
    stampinfo = meta.get("stamp")
    header = (f"_commit {stampinfo['commit']}, {stampinfo['date']}, {stampinfo['machine']}_\n\n"
              if stampinfo else "")
    return header + "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["repvgg_a0", "qarepvgg_a0"])
    ap.add_argument("--recipes", nargs="+", default=["adamw16", "sgd16-long"], choices=sorted(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["W8A8-pt", "W4A4"])
    ap.add_argument("--routes", nargs="+", default=list(QAT_ROUTES), choices=QAT_ROUTES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--w8-epochs", type=int, default=1)
    ap.add_argument("--w8-lr", type=float, default=1e-4)
    ap.add_argument("--w4-epochs", type=int, default=5)
    ap.add_argument("--w4-lr", type=float, default=1e-3)
    ap.add_argument("--val-shift", type=int, default=1, help="score every validation image at ±this many pixels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-route memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="only the per-route memory subprocesses")
    ap.add_argument("--fresh", action="store_true", help="recompute runs (and memory probes) already in the result file")
    ap.add_argument("--render", action="store_true", help="only rebuild the markdown from the JSON")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=CACHE, help="trained FP32 weights (benchmarks/common.py)")
    ap.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "ROUTE", "SETTING"), help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = default_settings(args.w8_epochs, args.w8_lr, args.w4_epochs, args.w4_lr)
    if args.settings_json:
        settings = {k: _setting_from(v) for k, v in json.loads(args.settings_json).items()}
    if args.memory_probe:
        model, route, label = args.memory_probe
        print(json.dumps(step_memory(model, route, None if label == "-" else settings[label], args.image_size,
                                     args.batch_size)))
        return 0
    unknown = [s for s in args.settings if s not in settings]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; valid: {', '.join(settings)}")
    settings = {k: settings[k] for k in args.settings}
    path = args.out / f"{NAME}.json"
    if args.render:
        write_text_atomic(args.out / f"{NAME}.md", render(load_results(path)))
        return 0
    routes = [get_route(r) for r in args.routes]
    skipped = [r for r in routes if not r.available()]
    for r in skipped:
        print(f"route {r.name} skipped: {r.unavailable_reason}", flush=True)
    routes = [r for r in routes if r.available()]
    meta = {"stamp": stamp(), "batch_size": args.batch_size, "val_shift": args.val_shift, "threads": args.threads,
            "settings": {k: _setting_dict(s) for k, s in settings.items()},
            "recipes": {n: dataclasses.asdict(RECIPES[n]) for n in args.recipes},
            "python": platform.python_version(), "torch": torch.__version__}
    # a run counts as done only if it used the current fine-tune of its setting
    done = set() if args.fresh else {run_key(r) for r in load_results(path)["runs"]
                                     if r.get("setting") is None or r.get("setting") in settings
                                     and (r.get("epochs"), r.get("lr")) == (settings[r["setting"]].epochs,
                                                                            settings[r["setting"]].lr)}
    for recipe_name in args.recipes:
        recipe = RECIPES[recipe_name]
        train_set, _, _ = load_dataset(DataSpec("digits", image_size=recipe.image_size))
        val = ValSet.digits(recipe.image_size, args.val_shift)
        for seed in [] if args.memory_only else args.seeds:
            for model_name in args.models:
                fp32 = train_fp32(model_name, recipe, seed, cache=args.cache, log=print)
                base = {"recipe": recipe_name, "model": model_name, "seed": seed}
                if (recipe_name, model_name, seed, None, None) not in done:
                    save(args.out, meta, runs=[{**base, **scores(predictions(fp32, val.x), val)}])
                for label, setting in settings.items():
                    for route in routes:
                        key = (recipe_name, model_name, seed, label, route.name)
                        if key in done:
                            continue
                        r = run_route(fp32, route, setting, train_set, val, args.batch_size, seed, recipe.shift)
                        save(args.out, meta, runs=[{**base, "setting": label, "route": route.name,
                                                    "epochs": setting.epochs, "lr": setting.lr,
                                                    "commit": meta["stamp"]["commit"], **r}])
                        print(f"{recipe_name} {model_name} s{seed} {label} {route.name}: deployed {r['top1']:.2f} "
                              f"(model {r['qat_model']:.2f}, agree {r['agreement']:.1f} %) "
                              f"{r['step_s']:.3f} s/step, {r['qat_s']:.0f} s", flush=True)
        if args.no_memory:
            continue
        have = {(m["model"], m["setting"], m["route"], m["image_size"], m["batch_size"])
                for m in load_results(path)["memory"]} if not args.fresh else set()
        for model_name in args.models:
            for label, route in [(None, get_route("fp32"))] + [(s, r) for s in settings for r in routes]:
                if (model_name, label, route.name, recipe.image_size, args.batch_size) in have:
                    continue
                m = measure_memory(model_name, route.name, label, settings, recipe.image_size, args.batch_size)
                if m is not None:
                    save(args.out, meta, memory=[{"model": model_name, "setting": label, "route": route.name,
                                                  "image_size": recipe.image_size, "batch_size": args.batch_size,
                                                  "commit": meta["stamp"]["commit"], **m}])
                    print(f"memory {model_name} {label} {route.name}: {m}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
