"""Detection data with no downloads: an embedded set built from the handwritten digits, or a YOLO-format folder.

The embedded set pastes scikit-learn's 8×8 digits (shipped inside the installed package), upscaled to random sizes,
at random non-overlapping positions on dark canvases; each box is the glyph's tight ink box and its label the digit.
Train and validation canvases are drawn from disjoint glyphs (a fixed split of the 1,797 digits) with fixed seeds,
so the set is the same in every run and process.

A YOLO-format folder is what YOLOv6 users already have: ``images/`` and ``labels/`` with one ``<stem>.txt`` per image
holding ``class cx cy w h`` lines (normalized to [0, 1]); either with ``train``/``val`` subfolders or flat (then split
with ``val_fraction``). An image without a label file has no objects. Images are resized to ``image_size`` squares.

Targets are ``(K, 5)`` float tensors ``[class, x1, y1, x2, y2]`` in pixels; :func:`collate_detection` batches them into
one ``(M, 6)`` tensor ``[image index, class, x1, y1, x2, y2]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data import IMAGE_EXTENSIONS

__all__ = ["DetectionSpec", "DetectionDataset", "load_detection", "make_detection_loaders", "collate_detection",
           "glyph_split"]

_GLYPH_SPLIT_SEED = 20240615
_CANVAS_SEEDS = {"train": 1101, "val": 2202}


@dataclass(frozen=True)
class DetectionSpec:
    """Where detection images come from and how they are shaped.

    ``source``: ``"digits"`` (embedded) or a YOLO-format folder. For the embedded set: ``num_train``/``num_val``
    canvases of ``image_size`` pixels with 1 to ``max_objects`` digits of ``min_size``–``max_size`` pixels each.
    ``val_fraction`` splits the glyphs (digits) or the images of a flat YOLO folder.
    """

    source: str = "digits"
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 500
    max_objects: int = 3
    min_size: int = 12
    max_size: int = 30
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the detector's largest stride), got "
                             f"{self.image_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_train < 1 or self.num_val < 1 or self.max_objects < 1:
            raise ValueError("num_train, num_val and max_objects must be >= 1, got "
                             f"{self.num_train}, {self.num_val}, {self.max_objects}")
        if not 4 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError(f"need 4 <= min_size <= max_size <= image_size, got {self.min_size}, {self.max_size}, "
                             f"{self.image_size}")


class DetectionDataset(Dataset):
    """Images ``(N, 3, S, S)`` in [0, 1] and per-image targets ``(K, 5)`` ``[class, x1, y1, x2, y2]`` (pixels)."""

    def __init__(self, images: Tensor, targets: list[Tensor]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} target tensors")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.targets[i]


def collate_detection(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack images; join targets into ``(M, 6)`` ``[image index, class, x1, y1, x2, y2]``."""
    images = torch.stack([b[0] for b in batch])
    targets = [torch.cat([torch.full((len(t), 1), float(i)), t], 1) for i, (_, t) in enumerate(batch)]
    return images, torch.cat(targets) if targets else torch.zeros(0, 6)


# ------------------------------------------------------------------------------------------------ embedded digits
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _paste_canvases(glyphs: np.ndarray, labels: np.ndarray, n: int, spec: DetectionSpec,
                    seed: int) -> DetectionDataset:
    rng = np.random.default_rng(seed)
    size = spec.image_size
    images = np.zeros((n, 3, size, size), dtype=np.float32)
    targets: list[Tensor] = []
    for i in range(n):
        canvas = images[i]
        boxes: list[list[float]] = []
        for _ in range(int(rng.integers(1, spec.max_objects + 1))):
            for _attempt in range(20):  # rejection sampling: objects never overlap
                s = int(rng.integers(spec.min_size, spec.max_size + 1))
                x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                if all(x0 >= b[3] or x0 + s <= b[1] or y0 >= b[4] or y0 + s <= b[2] for b in boxes):
                    break
            else:
                continue
            k = int(rng.integers(len(glyphs)))
            glyph = F.interpolate(torch.from_numpy(glyphs[k])[None, None], size=(s, s), mode="bilinear",
                                  align_corners=False)[0, 0].clamp(0, 1).numpy()
            rows, cols = np.nonzero((glyph > 0.25).any(1))[0], np.nonzero((glyph > 0.25).any(0))[0]
            if len(rows) == 0:
                continue
            colour = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
            patch = canvas[:, y0:y0 + s, x0:x0 + s]
            np.maximum(patch, glyph[None] * colour[:, None, None], out=patch)
            boxes.append([float(labels[k]), x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1.0, y0 + rows[-1] + 1.0])
        targets.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5))
    images += rng.normal(0.0, 0.03, size=images.shape).astype(np.float32)
    return DetectionDataset(torch.from_numpy(images.clip(0, 1)), targets)


def glyph_split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, disjoint ``(train, val)`` index sets over ``n`` glyphs (or flat-folder images)."""
    perm = np.random.default_rng(_GLYPH_SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _digits(spec: DetectionSpec) -> tuple[DetectionDataset, DetectionDataset, list[str]]:
    glyphs, labels = _glyphs()
    train_idx, val_idx = glyph_split(len(labels), spec.val_fraction)
    train = _paste_canvases(glyphs[train_idx], labels[train_idx], spec.num_train, spec, _CANVAS_SEEDS["train"])
    val = _paste_canvases(glyphs[val_idx], labels[val_idx], spec.num_val, spec, _CANVAS_SEEDS["val"])
    return train, val, [str(c) for c in range(10)]


# ------------------------------------------------------------------------------------------------ YOLO folder
def _read_labels(path: Path, size: int) -> Tensor:
    if not path.exists():
        return torch.zeros(0, 5)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            cls, cx, cy, w, h = int(parts[0]), *(float(p) for p in parts[1:])
        except ValueError:
            raise ValueError(f"{path}:{n}: expected 'class cx cy w h' (an integer class and 4 numbers), got "
                             f"{line.strip()!r}") from None
        if cls < 0 or not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise ValueError(f"{path}:{n}: class must be >= 0 and cx cy w h normalized to [0, 1] with w, h > 0, got "
                             f"{line.strip()!r}")
        rows.append([cls, (cx - w / 2) * size, (cy - h / 2) * size, (cx + w / 2) * size, (cy + h / 2) * size])
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    t[:, 1:] = t[:, 1:].clamp(0, size)
    return t


def _yolo_split(images_dir: Path, labels_dir: Path, size: int) -> DetectionDataset:
    from PIL import Image

    files = sorted(Path(d) / f for d, _, names in os.walk(images_dir) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{str(images_dir)!r} holds no images ({'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
    images, targets = [], []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(im, dtype=np.float32) / 255.0)
        targets.append(_read_labels(labels_dir / f.relative_to(images_dir).with_suffix(".txt"), size))
    return DetectionDataset(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), targets)


def _yolo_folder(root: Path, spec: DetectionSpec) -> tuple[DetectionDataset, DetectionDataset, list[str]]:
    images, labels = root / "images", root / "labels"
    if not images.is_dir():
        raise ValueError(f"{str(root)!r} is not a YOLO-format folder: expected 'images/' and 'labels/' (with "
                         "'class cx cy w h' lines per image), optionally split into 'train/' and 'val/'")
    if (images / "train").is_dir() and (images / "val").is_dir():
        train = _yolo_split(images / "train", labels / "train", spec.image_size)
        val = _yolo_split(images / "val", labels / "val", spec.image_size)
    else:
        full = _yolo_split(images, labels, spec.image_size)
        if len(full) < 2:
            raise ValueError(f"{str(images)!r} has {len(full)} image: too few to split into train and val; add "
                             "images or use images/train and images/val")
        train, val = (DetectionDataset(full.images[idx], [full.targets[i] for i in idx])
                      for idx in glyph_split(len(full), spec.val_fraction))
    n_cls = int(max((t[:, 0].max().item() for t in train.targets + val.targets if len(t)), default=-1)) + 1
    names_file = root / "classes.txt"
    names = [s.strip() for s in names_file.read_text().splitlines() if s.strip()] if names_file.exists() else []
    if names and len(names) < n_cls:
        raise ValueError(f"{names_file} names {len(names)} classes but the labels use class {n_cls - 1}")
    return train, val, names or [str(c) for c in range(max(n_cls, 1))]


def load_detection(spec: DetectionSpec | str = "digits") -> tuple[DetectionDataset, DetectionDataset, list[str]]:
    """Return ``(train, val, class_names)`` for the embedded digits set or a YOLO-format folder."""
    if isinstance(spec, str):
        spec = DetectionSpec(source=spec)
    if spec.source == "digits":
        return _digits(spec)
    root = Path(spec.source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"detection data folder {str(root)!r} does not exist; pass 'digits' for the embedded "
                                "set or a YOLO-format folder (images/, labels/*.txt with 'class cx cy w h')")
    return _yolo_folder(root, spec)


def make_detection_loaders(spec: DetectionSpec | str = "digits", batch_size: int = 32, seed: int = 0,
                           num_workers: int = 0) -> tuple[DataLoader, DataLoader, list[str]]:
    """Train (shuffled with ``seed``) and validation loaders yielding ``(images, targets)`` batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, val, names = load_detection(spec)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size, shuffle=True, generator=gen, collate_fn=collate_detection,
                       num_workers=num_workers),
            DataLoader(val, batch_size, shuffle=False, collate_fn=collate_detection, num_workers=num_workers),
            names)
