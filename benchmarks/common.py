"""Shared helpers for the benchmark scripts: timing, machine stamp, atomic table/JSON writing, FP32 training recipes.

A benchmark fed only by models its methods were developed on is not evidence, so the FP32 models come from named
training recipes (:data:`RECIPES`): the PTQ benchmark's own (AdamW one-cycle, 4 epochs at 16×16) and independent ones
(SGD with momentum, cosine decay, random shifts, 32×32). Trained weights are cached by (model, recipe, seed) so that
several benchmarks score the same models.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from qat_rep.export.atomic import atomic_file
from qat_rep.export.atomic import write_text_atomic as write_atomic

RESULTS = Path(__file__).resolve().parent / "results"
#: trained FP32 weights, shared between benchmark runs (``QAT_REP_BENCH_CACHE`` overrides; never committed)
CACHE = Path(os.environ.get("QAT_REP_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))


def median_time(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stamp() -> dict[str, Any]:
    """Commit, date and machine, for every result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import torch

    return {
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
    }


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table: one header row, one row per ``rows`` entry (cells through ``str``), no trailing newline.

    ``align`` holds one letter per column, ``l`` or ``r`` (default ``l`` for every column). A row of another length
    than ``headers`` is refused: it would render as a broken table.
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({len(headers)}), got {align!r}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)




def write_results(name: str, payload: dict[str, Any], table_md: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (table plus stamp)."""
    info = stamp()
    write_atomic(RESULTS / f"{name}.json", json.dumps({**info, **payload}, indent=2) + "\n")
    header = f"_commit {info['commit']}, {info['date']}, {info['machine']}_\n\n"
    write_atomic(RESULTS / f"{name}.md", header + table_md + "\n")


@dataclasses.dataclass(frozen=True)
class FP32Recipe:
    """How a float model is trained before it is quantized (optimizer, schedule, input size, augmentation)."""

    name: str
    image_size: int
    epochs: int
    optimizer: str  # "adamw" (one-cycle schedule) or "sgd" (momentum 0.9, cosine decay)
    lr: float
    weight_decay: float = 1e-4
    batch_size: int = 64
    shift: int = 0  # random ±shift-pixel translations of every training image (0: none)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")


RECIPES: dict[str, FP32Recipe] = {
    # the PTQ benchmark's own recipe, on which its methods were developed
    "adamw16": FP32Recipe("adamw16", image_size=16, epochs=4, optimizer="adamw", lr=2e-3, batch_size=32),
    # independent recipes: SGD with momentum, cosine decay, ±3-pixel shifts, 32×32 inputs
    "sgd32": FP32Recipe("sgd32", image_size=32, epochs=12, optimizer="sgd", lr=0.05, shift=3),
    # longer training at a smaller input and a lower learning rate
    "sgd16-long": FP32Recipe("sgd16-long", image_size=16, epochs=30, optimizer="sgd", lr=0.02, shift=2),
}


def shift_batch(x: "torch.Tensor", shift: int, gen: "torch.Generator") -> "torch.Tensor":
    """Translate every image by its own random (dy, dx) in ``[-shift, shift]``; the border pixels are repeated."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_fp32(model_name: str, recipe: FP32Recipe | str, seed: int, *, cache: Path | None = CACHE,
               log: Callable[[str], None] | None = None) -> "torch.nn.Module":
    """A ``model_name`` classifier (small_input, 10 classes) trained on the embedded digits with ``recipe``.

    Deterministic for a (model, recipe, seed); the weights are cached in ``cache`` (``None``: no cache) and loaded
    with ``weights_only=True``. Returns the model in eval mode.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from qat_rep import DataSpec, create_model, load_dataset

    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10, small_input=True)
    path = None if cache is None else Path(cache) / f"{model_name}_{recipe.name}_s{seed}.pt"
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train_set, _, _ = load_dataset(DataSpec("digits", image_size=recipe.image_size))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, generator=gen)
    steps = recipe.epochs * len(loader)
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.time()
    model.train()
    for _ in range(recipe.epochs):
        for x, y in loader:
            if recipe.shift:
                x = shift_batch(x, recipe.shift, gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if log is not None:
        log(f"trained {model_name} with {recipe.name}, seed {seed}, in {time.time() - t0:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return model.eval()


def digits_accuracy(model: "torch.nn.Module", image_size: int) -> float:
    """Top-1 % of ``model`` on the embedded digits' validation split at ``image_size``."""
    import torch

    from qat_rep import DataSpec, load_dataset

    _, val_set, _ = load_dataset(DataSpec("digits", image_size=image_size))
    x, y = val_set.tensors
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(y), 256)])
    return 100.0 * float((pred == y).float().mean())
