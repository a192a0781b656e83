"""FP32 vs equivalent-kernel QAT accuracy of RepVGG and QARepVGG on the embedded digits data, over several seeds.

For every (model, seed): train the float multi-branch model, then for every quantization setting start from a copy
of it, ``prepare`` → ``calibrate`` (PTQ accuracy of the converted model is recorded too) → a short QAT fine-tune
(AdamW at a small learning rate, cosine) → ``convert`` → accuracy of the *deployable fused INT model*. The table
reports mean ± spread (max − min over seeds, halved) and the drop against FP32. Results are written after every
(model, seed), so an interrupted run leaves a valid partial table.

    python benchmarks/qat_accuracy.py                       # writes benchmarks/results/qat_accuracy.{json,md}
    python benchmarks/qat_accuracy.py --seeds 0 1 2 3 4 --fp32-epochs 8
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
    "W8A8": QuantConfig(w_bits=8, a_bits=8),
    "W6A6 per-tensor": QuantConfig(w_bits=6, a_bits=6, w_granularity="per_tensor"),
    "W4A4": QuantConfig(w_bits=4, a_bits=4),
}
TARGET_DROP = {"W8A8": 0.1, "W4A4": 1.0}


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
    out = {"model": name, "seed": seed, "fp32": accuracy(model, val_loader), "settings": {}}
    for label, cfg in SETTINGS.items():
        torch.manual_seed(seed)
        q = copy.deepcopy(model)
        prepare(q, cfg)
        calibrate(q, train_loader)
        ptq = accuracy(convert(copy.deepcopy(q)), val_loader)
        epochs = args.qat_epochs_low if cfg.w_bits < 8 else args.qat_epochs
        train(q, train_loader, epochs, args.lr * args.qat_lr_factor, args.wd)
        out["settings"][label] = {"ptq": ptq, "qat": accuracy(convert(q), val_loader), "qat_epochs": epochs}
    out["seconds"] = time.time() - t0
    return out


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for name in sorted({r["model"] for r in runs}):
        rs = [r for r in runs if r["model"] == name]

        def stat(vals):
            return statistics.mean(vals), (max(vals) - min(vals)) / 2

        fp = [r["fp32"] for r in rs]
        m_fp, s_fp = stat(fp)
        rows.append({"model": name, "setting": "FP32", "seeds": len(rs), "ptq": None, "acc": m_fp, "spread": s_fp,
                     "drop": 0.0})
        for label in SETTINGS:
            qat = [r["settings"][label]["qat"] for r in rs]
            ptq = [r["settings"][label]["ptq"] for r in rs]
            drops = [r["fp32"] - r["settings"][label]["qat"] for r in rs]
            m, s = stat(qat)
            rows.append({"model": name, "setting": label, "seeds": len(rs), "ptq": statistics.mean(ptq),
                         "acc": m, "spread": s, "drop": statistics.mean(drops),
                         "target_drop": TARGET_DROP.get(label)})
    return rows




def render(rows: list[dict], args, console: Console | None = None) -> str:
    head = ("model", "setting", "seeds", "PTQ top-1", "QAT top-1 (mean ± spread)", "drop vs FP32", "target")
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = Table(title=f"digits {args.image_size}x{args.image_size}: FP32 vs equivalent-kernel QAT (deploy form)")
    for h in head:
        table.add_column(h, justify="left" if h in ("model", "setting") else "right")
    for r in rows:
        tgt = r.get("target_drop")
        verdict = "" if tgt is None else (f"≤ {tgt}: {'met' if r['drop'] <= tgt else 'NOT met'}")
        cells = (r["model"], r["setting"], str(r["seeds"]), "" if r["ptq"] is None else f"{r['ptq']:.2f}",
                 f"{r['acc']:.2f} ± {r['spread']:.2f}", f"{r['drop']:+.2f}" if r["setting"] != "FP32" else "",
                 verdict)
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    if console is not None:
        console.print(table)
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["repvgg_a0", "qarepvgg_a0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=8, help="digits are 8x8 originally: 8 loses nothing")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--fp32-epochs", type=int, default=5)
    ap.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs at 8 bits")
    ap.add_argument("--qat-epochs-low", type=int, default=2, help="QAT epochs below 8 bits")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--qat-lr-factor", type=float, default=0.03)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
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
                          + " ".join(f"{k}: ptq {v['ptq']:.2f} qat {v['qat']:.2f}" for k, v in r["settings"].items())
                          + f" ({r['seconds']:.0f}s)")
            rows = summarize(runs)
            meta = {"args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
                    "settings": {k: v.to_dict() for k, v in SETTINGS.items()}}
            _atomic_write(os.path.join(args.out, "qat_accuracy.json"),
                          json.dumps({"meta": meta, "runs": runs, "summary": rows}, indent=2))
            cmd = "python benchmarks/qat_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
            _atomic_write(os.path.join(args.out, "qat_accuracy.md"),
                          f"Command: `{cmd.strip()}`\n\n" + render(rows, args))
    render(summarize(runs), args, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
