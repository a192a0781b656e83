"""FP32 vs equivalent-kernel QAT accuracy of RepVGG and QARepVGG on the embedded digits data, over several seeds.

For every (model, seed): train the float multi-branch model to convergence, then for every quantization setting
start from a copy of it, ``prepare`` → ``calibrate`` (PTQ accuracy of the converted model is recorded too) → a QAT
fine-tune (AdamW, cosine) → ``convert`` → accuracy of the *deployable fused INT model*.

A fair baseline: fine-tuning alone moves accuracy by a sample or two on a 359-image validation set, so every QAT
schedule has an **FP32 control** — the same float model fine-tuned with the same schedule, no quantization. The
reported drop of a setting is measured against the better of the trained FP32 model and its control, per seed, then
averaged (the conservative choice). Spread is (max − min) / 2 over seeds.

Schedules: 8 bits start close to FP32 and need only a gentle fine-tune (``--qat-epochs`` at
``lr × --qat-lr-factor``); per-tensor 6 bits and 4 bits start far away (plain calibration of RepVGG leaves 10–60 %
accuracy) and get a real QAT run (``--qat-epochs-low`` at ``lr × --qat-lr-factor-low``); at 4 bits with LSQ-style
learned ``amax`` initialised by the MSE calibrator. First and last layers stay 8-bit below 8 bits (``QuantConfig.first_last_8bit``, the default).

Results are written after every (model, seed), so an interrupted run leaves a valid partial table.

    python benchmarks/qat_accuracy.py                       # writes benchmarks/results/qat_accuracy.{json,md}
    python benchmarks/qat_accuracy.py --seeds 0 1 2 3 4 --fp32-epochs 12
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qat_rep import DataSpec, create_model, make_loaders  # noqa: E402
from qat_rep.quant import QuantConfig, calibrate, convert, prepare  # noqa: E402
from qat_rep.export.atomic import write_text_atomic as _atomic_write  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETTINGS = {
    "W8A8": (QuantConfig(w_bits=8, a_bits=8), "gentle"),
    "W6A6 per-tensor": (QuantConfig(w_bits=6, a_bits=6, w_granularity="per_tensor"), "full"),
    "W4A4": (QuantConfig(w_bits=4, a_bits=4, calibrator="mse", learn_amax=True), "full"),
}
TARGET_DROP = {"W8A8": 0.1, "W4A4": 1.0}


def schedules(args) -> dict[str, tuple[int, float]]:
    """Schedule name → (epochs, learning rate) of the fine-tune after FP32 training."""
    return {"gentle": (args.qat_epochs, args.lr * args.qat_lr_factor),
            "full": (args.qat_epochs_low, args.lr * args.qat_lr_factor_low)}


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def train(model: nn.Module, loader, epochs: int, lr: float, wd: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)), eta_min=lr * 0.01)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def run_one(name: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    train_loader, val_loader, classes = make_loaders(DataSpec("digits", image_size=args.image_size),
                                                     batch_size=args.batch_size, seed=seed)
    model = create_model(name, num_classes=len(classes), small_input=True)
    t0 = time.time()
    train(model, train_loader, args.fp32_epochs, args.lr, args.wd)
    out = {"model": name, "seed": seed, "fp32": accuracy(model, val_loader), "control": {}, "settings": {}}
    for sched, (epochs, lr) in schedules(args).items():  # the FP32 control of each fine-tune schedule
        torch.manual_seed(seed)
        ctrl = copy.deepcopy(model)
        train(ctrl, train_loader, epochs, lr, args.wd)
        out["control"][sched] = accuracy(ctrl, val_loader)
    for label, (cfg, sched) in SETTINGS.items():
        epochs, lr = schedules(args)[sched]
        torch.manual_seed(seed)
        q = copy.deepcopy(model)
        prepare(q, cfg)
        calibrate(q, train_loader)
        ptq = accuracy(convert(copy.deepcopy(q)), val_loader)
        train(q, train_loader, epochs, lr, args.wd)
        out["settings"][label] = {"ptq": ptq, "qat": accuracy(convert(q), val_loader), "schedule": sched,
                                  "qat_epochs": epochs, "qat_lr": lr}
    out["seconds"] = time.time() - t0
    return out


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for name in sorted({r["model"] for r in runs}):
        rs = [r for r in runs if r["model"] == name]

        def stat(vals):
            return statistics.mean(vals), (max(vals) - min(vals)) / 2

        m_fp, s_fp = stat([r["fp32"] for r in rs])
        rows.append({"model": name, "setting": "FP32", "seeds": len(rs), "ptq": None, "control": None,
                     "acc": m_fp, "spread": s_fp, "drop": 0.0})
        for label, (_, sched) in SETTINGS.items():
            qat = [r["settings"][label]["qat"] for r in rs]
            ref = [max(r["fp32"], r["control"][sched]) for r in rs]
            m, s = stat(qat)
            rows.append({"model": name, "setting": label, "seeds": len(rs),
                         "ptq": statistics.mean(r["settings"][label]["ptq"] for r in rs),
                         "control": statistics.mean(r["control"][sched] for r in rs),
                         "acc": m, "spread": s, "drop": statistics.mean(f - q for f, q in zip(ref, qat)),
                         "target_drop": TARGET_DROP.get(label)})
    return rows


def render(rows: list[dict], args, console: Console | None = None) -> str:
    head = ("model", "setting", "seeds", "PTQ top-1", "FP32 control", "QAT top-1 (mean ± spread)",
            "drop vs FP32", "target")
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = Table(title=f"digits {args.image_size}x{args.image_size}: FP32 vs equivalent-kernel QAT (deploy form)")
    for h in head:
        table.add_column(h, justify="left" if h in ("model", "setting") else "right")
    for r in rows:
        tgt = r.get("target_drop")
        verdict = "" if tgt is None else (f"≤ {tgt}: {'met' if r['drop'] <= tgt else 'NOT met'}")
        cells = (r["model"], r["setting"], str(r["seeds"]), "" if r["ptq"] is None else f"{r['ptq']:.2f}",
                 "" if r["control"] is None else f"{r['control']:.2f}",
                 f"{r['acc']:.2f} ± {r['spread']:.2f}", f"{r['drop']:+.2f}" if r["setting"] != "FP32" else "",
                 verdict)
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    if console is not None:
        console.print(table)
    sched = schedules(args)
    notes = [f"FP32: {args.fp32_epochs} epochs, AdamW lr {args.lr:g}, cosine, batch {args.batch_size}. "
             "FP32 control: the trained FP32 model fine-tuned with the same schedule as the QAT run, unquantized; "
             "drop = mean over seeds of max(FP32, control) − QAT."]
    for label, (cfg, name) in SETTINGS.items():
        epochs, lr = sched[name]
        notes.append(f"{label}: {epochs} QAT epoch(s) at lr {lr:g}; calibrator {cfg.calibrator}, "
                     f"{cfg.w_granularity} weights, learned amax {cfg.learn_amax}, "
                     f"first/last layer 8-bit {cfg.first_last_8bit and (cfg.w_bits < 8 or cfg.a_bits < 8)}.")
    return "\n".join(md) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["repvgg_a0", "qarepvgg_a0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=16, help="digits (8x8 originally) are upsampled to this")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--fp32-epochs", type=int, default=15)
    ap.add_argument("--qat-epochs", type=int, default=2, help="epochs of the gentle schedule (8 bits)")
    ap.add_argument("--qat-epochs-low", type=int, default=10, help="epochs of the full schedule (6 bits per-tensor, 4 bits)")
    ap.add_argument("--lr", type=float, default=3e-3, help="FP32 learning rate")
    ap.add_argument("--qat-lr-factor", type=float, default=0.01, help="gentle schedule lr = lr × this")
    ap.add_argument("--qat-lr-factor-low", type=float, default=0.3, help="full schedule lr = lr × this")
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    runs: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for name in args.models:
            r = run_one(name, seed, args)
            runs.append(r)
            console.print(f"{name} seed {seed}: fp32 {r['fp32']:.2f} "
                          + " ".join(f"control-{k} {v:.2f}" for k, v in r["control"].items()) + " "
                          + " ".join(f"{k}: ptq {v['ptq']:.2f} qat {v['qat']:.2f}" for k, v in r["settings"].items())
                          + f" ({r['seconds']:.0f}s)")
            rows = summarize(runs)
            meta = {"args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
                    "settings": {k: {"config": c.to_dict(), "schedule": n} for k, (c, n) in SETTINGS.items()},
                    "schedules": schedules(args)}
            _atomic_write(os.path.join(args.out, "qat_accuracy.json"),
                          json.dumps({"meta": meta, "runs": runs, "summary": rows}, indent=2))
            cmd = "python benchmarks/qat_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
            _atomic_write(os.path.join(args.out, "qat_accuracy.md"),
                          f"Command: `{cmd.strip()}`\n\n" + render(rows, args))
    render(summarize(runs), args, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
