"""Example glue shared by the recipes: a LightningModule and a LightningDataModule for image classification,
argument parsing, the output folder, rich tables, the markdown report and the accuracy plot.

This is *example* code. The product's API is :class:`qat_rep.callbacks.RepQATCallback`, which works with any
LightningModule; the classes here only show one way to hold a model and feed it data. Recipes are run from the
repository root (``python recipes/qat_b0.py``) with qat-rep installed (``pip install -e .``): Python puts the
script's folder ``recipes/`` on ``sys.path``, so ``import recipe_common`` works from any working directory.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

#: when the recipe started (before torch and Lightning are imported): the report's wall time counts from here
PROCESS_START = time.perf_counter()

# OpenMP threads spin while they wait for each other. When other processes share the cores, two spinning threads
# made a training step of qarepvgg_a0 about 6x slower than one thread (9.6 s vs 1.6 s per step, batch 64, 16x16,
# load average 10 on 2 cores); passive waiting brought it back to 1.7 s. Set before torch is imported (OpenMP reads
# it once, so this stays above the imports); an OMP_WAIT_POLICY the user exported wins. Recipes only: the library
# leaves the process alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from qat_rep import DataSpec, create_model, load_dataset
from qat_rep.export.atomic import atomic_file, write_text_atomic

log = logging.getLogger("qat_rep.recipes")
console = Console(stderr=False, highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # a log file: tables on one line per row instead of rich's 80-column wrapping

__all__ = [
    "ImageClassifier", "ImageDataModule", "base_parser", "parse_bits", "check_common_args", "prepare_run",
    "make_trainer", "evaluate_accuracy", "collect_batches", "ResultRow", "results_table", "results_markdown",
    "plot_accuracy", "write_report", "finish_run", "atomic_write_text", "atomic_write_json", "Stopwatch", "console",
    "cpu_seconds", "environment_markdown", "load_classifier", "classifier_kwargs", "train_or_load_fp32",
    "finish_distributed", "warmup_cosine", "save_figure", "read_state_dict",
    "write_state_dict",
]


# ------------------------------------------------------------------------------------------------- file writes
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (never half-written)."""
    return write_text_atomic(path, text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=2)``."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------- lightning glue
class ImageClassifier(pl.LightningModule):
    """A registry model trained with cross-entropy; ``forward(x)`` returns logits.

    The logits contract matters for :class:`qat_rep.callbacks.RepQATCallback`: a module whose ``forward`` returns
    class logits (and whose batches are ``(images, labels)``) gets FP32-equivalent and fake-quant accuracy logged
    side by side. AdamW (no decay on biases and norms) with a per-step schedule: a linear warm-up over the first
    ``warmup_ratio`` of the steps, then cosine to ``final_lr_ratio · lr``. Learned quantizer ranges (``*._amax``
    parameters, ``QuantConfig(learn_amax=True)``) train at ``amax_lr_scale · lr`` without weight decay.
    """

    def __init__(self, model_name: str = "qarepvgg_b0", num_classes: int = 10, small_input: bool = False,
                 lr: float = 3e-3, weight_decay: float = 0.01, final_lr_ratio: float = 0.01,
                 model_kwargs: dict[str, Any] | None = None, warmup_ratio: float = 0.0, amax_lr_scale: float = 1.0):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if amax_lr_scale <= 0:
            raise ValueError(f"amax_lr_scale must be > 0, got {amax_lr_scale}")
        self.save_hyperparameters()
        self.model = create_model(model_name, num_classes=num_classes, small_input=small_input,
                                  **(model_kwargs or {}))
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        return {"logits": logits, "target": y}  # lets RepQATCallback log fake-quant and FP32 accuracy side by side

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("test_acc", self.val_acc)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: weights with decay; biases and norms without; learned ranges without decay at
        ``amax_lr_scale · lr`` (a group only when the model has them)."""
        hp = self.hparams
        amax = [p for n, p in self.named_parameters() if n.endswith("._amax")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("._amax")]
        groups = [{"params": [p for p in rest if p.ndim > 1], "weight_decay": hp.weight_decay},
                  {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0}]
        if amax:
            groups.append({"params": amax, "weight_decay": 0.0, "lr": hp.lr * hp.get("amax_lr_scale", 1.0)})
        return groups

    #: learned ranges stay at least this large after every step: an Adam step at ``amax_lr_scale`` times the learning
    #: rate can exceed a small weight range (in a 4-bit RepVGG-A0 run at 10x, one channel of stage3.0, whose ranges
    #: were about 0.04-0.15, went below zero: the scale's clamp then stops its gradient for good, and the deploy
    #: check refuses the artifact)
    AMAX_MIN = 1e-4

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("._amax"):
                    p.clamp_(min=self.AMAX_MIN)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.optimizer_groups(), lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
            warmup_cosine, total=total, warmup=int(total * hp.get("warmup_ratio", 0.0)), final=hp.final_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(step: int, total: int, warmup: int, final: float) -> float:
    """The learning-rate factor at ``step``: linear from ``1/(warmup+1)`` to 1 over ``warmup`` steps, then cosine
    from 1 to ``final`` at step ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = min(step - warmup, total - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


class ImageDataModule(pl.LightningDataModule):
    """Train/val loaders over :func:`qat_rep.load_dataset`: the embedded digits or a user's image folder.

    ``data`` is ``"digits"`` or a folder with one subfolder per class (or a CIFAR-10 ``cifar-10-batches-py``
    folder). ``limit`` / ``val_limit`` keep only the first N training / validation images (``--fast`` uses them).
    """

    def __init__(self, data: str = "digits", image_size: int = 32, batch_size: int = 64, seed: int = 0,
                 limit: int | None = None, num_workers: int = 0, val_limit: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = DataSpec(source=data, image_size=image_size)
        self.batch_size = batch_size
        self.seed = seed
        self.limit = limit
        self.val_limit = val_limit
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = []

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImageDataModule":
        """The data a recipe's parsed arguments name (``--data``, ``--image-size``, ``--batch-size``, ``--seed``;
        128 training and 128 validation images with ``--fast``), already set up."""
        fast = 128 if args.fast else None
        dm = cls(args.data, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed, limit=fast,
                 val_limit=fast)
        dm.setup()
        return dm

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, classes = load_dataset(self.spec)
        if self.limit is not None:
            train = torch.utils.data.Subset(train, range(min(self.limit, len(train))))
        if self.val_limit is not None:
            val = torch.utils.data.Subset(val, range(min(self.val_limit, len(val))))
        self.train_set, self.val_set, self.classes = train, val, classes

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen,
                          num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=256, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ------------------------------------------------------------------------------------------------- arguments
def parse_bits(text: str) -> list[int]:
    """``"8"`` or ``"8,6,4"`` → ``[8, 6, 4]``; each bit-width must be in 2..8."""
    try:
        bits = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be comma-separated integers such as 8 or 8,4; got {text!r}")
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"--bits values must be in 2..8, got {text!r}")
    return bits


def base_parser(description: str, *, epochs: int, qat_epochs: int | None, out: str, bits: str = "8",
                block: str | None = "qarepvgg", blocks: Sequence[str] = ("qarepvgg", "repvgg"),
                image_size: int | None = 32) -> argparse.ArgumentParser:
    """The flags every recipe shares; each one documented for ``--help`` (``qat_epochs=None``: no QAT stage)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=epochs,
                   help="FP32 training epochs (ignored when --ckpt gives a trained model)")
    if qat_epochs is not None:
        p.add_argument("--qat-epochs", type=int, default=qat_epochs, help="quantization-aware fine-tuning epochs")
    p.add_argument("--bits", type=parse_bits, default=parse_bits(bits),
                   help="weight/activation bit-width(s), comma separated (e.g. 8 or 8,6,4); "
                        "each value gives a W<b>A<b> model")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded, no download) or a folder with one subfolder of images per class")
    p.add_argument("--devices", type=int, default=1, help="number of CPU processes (devices) for training")
    p.add_argument("--strategy", default="auto",
                   help="Lightning strategy, e.g. 'ddp' or 'ddp_spawn' with --devices 2 (CPU uses gloo)")
    p.add_argument("--out", default=out, help="output folder for checkpoints, deploy artifact, ONNX and report")
    p.add_argument("--ckpt", default=None,
                   help="start from this trained FP32 checkpoint (Lightning .ckpt or a state-dict file) "
                        "instead of training one")
    p.add_argument("--fast", action="store_true",
                   help="smoke-test mode: tiny model, few batches and epochs (about a minute or two)")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, data order)")
    if image_size is not None:
        p.add_argument("--image-size", type=int, default=image_size,
                       help="input size in pixels (images are resized to it; the embedded digits are 8x8 originally)")
    if block is not None:
        p.add_argument("--block", default=block, choices=list(blocks),
                       help="rep block type: qarepvgg (QARepVGG, quantization-friendly), repvgg (plain RepVGG)"
                            + (", both (one model of each, compared)" if "both" in blocks else "")
                            + (", qarepvggv2 (QARepVGG-V2, with an avg-pool branch)" if "qarepvggv2" in blocks
                               else ""))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: leave PyTorch's default)")
    return p


def check_common_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject impossible values with the flag's name (argparse exits with code 2 and a message), then fill the
    defaults that depend on other flags (``--model`` by ``--fast``, the ``--fast`` sizes, ``--out``'s ``{block}``)."""
    for flag in ("epochs", "qat_epochs"):
        if getattr(args, flag, 0) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt!r} is not a file")
    if args.epochs == 0 and args.ckpt is None:
        parser.error("--epochs 0 needs --ckpt (a trained FP32 model to start from)")
    if getattr(args, "image_size", 32) < 8:
        parser.error(f"--image-size must be >= 8, got {args.image_size}")
    if getattr(args, "calib_batches", 1) < 1:
        parser.error(f"--calib-batches must be >= 1, got {args.calib_batches}")
    if getattr(args, "model", "") is None:
        args.model = "a0" if args.fast else "b0"
    if args.fast:  # the smoke-test sizes every recipe shares
        args.epochs = min(args.epochs, 1)
        if hasattr(args, "qat_epochs"):
            args.qat_epochs = min(args.qat_epochs, 1)
        if hasattr(args, "calib_batches"):
            args.calib_batches = min(args.calib_batches, 1)  # calibration runs inside the first training steps
    if hasattr(args, "block"):
        args.out = args.out.format(block=args.block)


def prepare_run(args: argparse.Namespace) -> Path:
    """Seed everything, set threads, quiet Lightning's routine chatter, create and return the output folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
                 "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")  # --fast's 2-batch epochs
    # an upstream deprecation inside Lightning's own pytree helper (not actionable here); recipes only — the library
    # never filters its users' warnings
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_trainer(args: argparse.Namespace, out: Path, *, max_epochs: int, callbacks: Sequence[Any] = (),
                 name: str = "fit", limit_batches: int | float | None = None,
                 enable_progress: bool = True) -> pl.Trainer:
    """A CPU Trainer writing its CSV logs under ``out/logs/<name>``, no automatic checkpoints (recipes save the
    checkpoints they document), and progress: a rich bar on a terminal, one line per epoch otherwise (a log file)."""
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.loggers import CSVLogger

    cbs = list(callbacks)
    if enable_progress:
        cbs.append(RichProgressBar(leave=False) if console.is_terminal else EpochLines(name))
    kw: dict[str, Any] = {}
    if limit_batches is not None:
        kw.update(limit_train_batches=limit_batches, limit_val_batches=limit_batches)
    return pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=max_epochs,
        callbacks=cbs, logger=CSVLogger(str(out / "logs"), name=name), enable_checkpointing=False,
        enable_model_summary=False, deterministic=False, num_sanity_val_steps=0, log_every_n_steps=5,
        enable_progress_bar=enable_progress and console.is_terminal, **kw,
    )


class EpochLines(pl.Callback):
    """Progress for a log file: one plain line per finished epoch (epoch, time, the logged metrics), rank 0 only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = " ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                           if getattr(v, "numel", lambda: 1)() == 1)
        console.print(f"{self.name}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                      f"({time.perf_counter() - self.t0:.0f} s) {metrics}", soft_wrap=True)


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_accuracy(model: nn.Module | Callable[[Tensor], Tensor], loader: Iterable,
                      max_batches: int | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode, restored afterwards) over ``loader``."""
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            pred = torch.as_tensor(model(x)).argmax(1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    if total == 0:
        raise ValueError("evaluate_accuracy got an empty loader")
    return 100.0 * correct / total


def collect_batches(loader: Iterable, n: int) -> list[Any]:
    """The first ``n`` batches of ``loader`` as a list (calibration data)."""
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append(b)
    return out


class Stopwatch:
    """Named wall-clock sections: ``with sw("fp32 training"): ...``; ``sw.times`` maps name → seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, name: str) -> "_Section":
        return _Section(self, name)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


class _Section:
    def __init__(self, sw: Stopwatch, name: str):
        self.sw, self.name = sw, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        console.rule(f"[bold]{self.name}")

    def __exit__(self, *exc: Any) -> None:
        self.sw.times[self.name] = self.sw.times.get(self.name, 0.0) + time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------------- reporting
@dataclass
class ResultRow:
    """One line of a results table: a method at a bit-width, its accuracy and optional latency and notes."""

    method: str
    bits: str  # "FP32", "W8A8", ...
    accuracy: float | None
    latency_ms: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wbits(self) -> int | None:
        if self.bits.upper().startswith("W"):
            try:
                return int(self.bits[1:].upper().split("A")[0])
            except ValueError:
                return None
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "accuracy": self.accuracy, "latency_ms": self.latency_ms,
                "notes": self.notes, **self.extra}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _columns(rows: Sequence[ResultRow], metric: str, extra_columns: Sequence[str]
             ) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(header, justification) pairs and cell texts shared by the rich and the markdown table."""
    setting = any("setting" in r.extra for r in rows)
    cols = [(c, "left") for c in extra_columns] + [("method", "left"), ("setting" if setting else "bits", "left"),
                                                    (metric, "right"), ("latency ms", "right"), ("notes", "left")]
    cells = [[str(r.extra.get(c, "")) for c in extra_columns]
             + [r.method, str(r.extra.get("setting", r.bits)), _fmt(r.accuracy), _fmt(r.latency_ms), r.notes]
             for r in rows]
    return cols, cells


def results_table(rows: Sequence[ResultRow], title: str, metric: str = "top-1 %",
                  extra_columns: Sequence[str] = ()) -> Table:
    """The rows as a rich table (``extra_columns``: keys of ``ResultRow.extra`` shown first)."""
    t = Table(title=title)
    cols, cells = _columns(rows, metric, extra_columns)
    for col, just in cols:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in cells:
        t.add_row(*c)
    return t


def results_markdown(rows: Sequence[ResultRow], metric: str = "top-1 %", extra_columns: Sequence[str] = ()) -> str:
    """The rows as a GitHub markdown table (``extra_columns``: keys of ``ResultRow.extra`` shown first)."""
    cols, cells = _columns(rows, metric, extra_columns)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "|".join("---:" if j == "right" else "---" for _, j in cols) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[ResultRow], path: str | os.PathLike, title: str,
                  metric: str = "top-1 accuracy (%)") -> Path:
    """A PNG line plot: x = weight bit-width, one line per method; FP32 rows are a dashed horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    by_method: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.accuracy is None:
            continue
        if r.wbits is None:
            ax.axhline(r.accuracy, ls="--", color="gray", lw=1, label=f"{r.method} ({r.accuracy:.2f})")
        else:
            by_method.setdefault(r.method, []).append((r.wbits, r.accuracy))
    all_bits: set[int] = set()
    for method, pts in by_method.items():
        pts.sort()
        all_bits.update(b for b, _ in pts)
        ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=method)
    if all_bits:
        ax.set_xticks(sorted(all_bits))
    ax.set_xlabel("bit-width (weights = activations)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def write_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A markdown report: ``# title`` then one ``## heading`` per ``(heading, body)`` section."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    return atomic_write_text(path, "\n".join(parts))


def finish_run(out: Path, results: dict[str, Any], title: str, sections: Sequence[tuple[str, str]],
               args: argparse.Namespace, sw: "Stopwatch") -> None:
    """The end every recipe shares: stage times into ``results``, ``results.json``, then ``report.md`` (``sections``
    plus the list of files written and the environment), and the report's path on the console."""
    results["seconds"] = dict(sw.times, total=sw.total, process=time.perf_counter() - PROCESS_START, cpu=cpu_seconds())
    atomic_write_json(out / "results.json", results)
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    write_report(out / "report.md", title, [
        *sections,
        ("Files", "\n".join(f"- `{f}`" for f in files)),
        ("Environment and time", environment_markdown(args, sw.times)),
    ])
    console.print(f"report: [bold]{out / 'report.md'}[/]  total {sw.total:.0f} s")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: a load-independent cost measure."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def environment_markdown(args: argparse.Namespace, times: dict[str, float]) -> str:
    """Command line, library versions, machine load and the wall-clock time of each stage."""
    import platform

    import onnxruntime

    lines = [f"- command: `python {' '.join(sys.argv)}`",
             f"- torch {torch.__version__}, pytorch-lightning {pl.__version__}, onnxruntime {onnxruntime.__version__}",
             f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU(s), "
             f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end",
             f"- wall time of the whole run (imports included): {time.perf_counter() - PROCESS_START:.0f} s",
             f"- CPU time of this process: {cpu_seconds():.0f} s", ""]
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines.append(f"| **total** | **{sum(times.values()):.1f}** |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- checkpoints
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` file, read with ``weights_only=True`` (nothing is
    unpickled; a refused object becomes one ``ValueError`` naming it), a ``"state_dict"``/``"model"`` wrapper
    removed."""
    from qat_rep.callbacks.checkpoint import weights_only_errors

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with weights_only_errors(path):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def write_state_dict(module: nn.Module, path: str | os.PathLike, **metadata: str) -> Path:
    """``module``'s state dict as a safetensors file (``metadata`` in its header), written atomically."""
    from safetensors.torch import save

    from qat_rep.export.atomic import write_bytes_atomic

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    return write_bytes_atomic(path, save(state, metadata={"format": "pt", **metadata}))


def load_classifier(path: str | os.PathLike, **module_kwargs: Any) -> ImageClassifier:
    """An :class:`ImageClassifier` from a trained FP32 checkpoint.

    ``.ckpt``: a Lightning checkpoint of :class:`ImageClassifier` (its hyper-parameters rebuild the model).
    ``.safetensors`` / ``.pt`` / ``.pth``: a state dict of the bare model (train or fused form, official RepVGG /
    YOLOv6 key names, optionally nested under ``"state_dict"`` or ``"model"``) loaded into
    ``ImageClassifier(**module_kwargs)``.
    """
    from qat_rep import load_state_dict_any_form
    from qat_rep.callbacks.checkpoint import weights_only_errors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".ckpt":
        with weights_only_errors(path):
            return ImageClassifier.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        with weights_only_errors(path):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    else:
        raise ValueError(f"unsupported checkpoint type {path.suffix!r} for {str(path)!r}; use a Lightning .ckpt, "
                         ".safetensors or a torch state dict (.pt/.pth)")
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    module = ImageClassifier(**module_kwargs)
    load_state_dict_any_form(module.model, state)
    return module


def classifier_kwargs(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """ImageClassifier arguments from the recipe flags (``--model``, ``--block``, ``--lr``, ``--warmup`` when the
    recipe has it, ``--image-size``: below 32 pixels the first block keeps the resolution, as for CIFAR-sized
    inputs)."""
    return dict(model_name=f"{args.block}_{args.model}", num_classes=num_classes,
                small_input=getattr(args, "image_size", 32) < 32, lr=args.lr,
                warmup_ratio=getattr(args, "warmup", 0.0))


def train_or_load_fp32(args: argparse.Namespace, dm: ImageDataModule, out: Path, sw: Stopwatch,
                       limit_batches: int | None = None, label: str = "FP32 training") -> ImageClassifier:
    """The FP32 starting point: ``--ckpt`` when given, else ``--epochs`` of training saved to ``out/fp32.ckpt``."""
    kwargs = classifier_kwargs(args, dm.num_classes)
    if args.ckpt:
        with sw("load FP32 checkpoint"):
            module = load_classifier(args.ckpt, **kwargs)
            console.print(f"loaded FP32 model from [bold]{args.ckpt}[/] ({module.hparams.model_name})")
        return module
    with sw(label):
        module = ImageClassifier(**kwargs)
        trainer = make_trainer(args, out, max_epochs=args.epochs, name="fp32", limit_batches=limit_batches)
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(str(out / "fp32.ckpt"))
    return module


def finish_distributed() -> bool:
    """After the last ``fit``: synchronize the ranks and dissolve the process group; True on the main process.

    The recipes train with DDP but evaluate, calibrate PTQ baselines and export on one process, and
    :func:`qat_rep.quant.calibrate` all-reduces when a process group exists — so the group is closed first and the
    other ranks stop here.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0
