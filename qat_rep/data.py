"""Image-classification data with no downloads: an embedded default, a user's image folder, CIFAR-10 on disk.

The default is scikit-learn's handwritten digits (1,797 8×8 images shipped inside the installed package),
upsampled to 32×32 with 3 channels, split once with a fixed seed, normalized with the training-split statistics.
The same :class:`DataSpec` points the code at a folder of images (one subfolder per class) or at CIFAR-10's python
batches already on disk.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DataSpec", "load_dataset", "make_loaders", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SPLIT_SEED = 20210111  # fixed: the train/val split never changes between runs


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how they are shaped.

    ``source``: ``"digits"`` (embedded default), a folder with one subfolder per class, or a CIFAR-10
    ``cifar-10-batches-py`` folder. ``val_fraction`` applies to digits and image folders (CIFAR-10 has its own
    test batch).
    """

    source: str = "digits"
    image_size: int = 32
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _normalize(train: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std


def _digits(spec: DataSpec) -> tuple[Tensor, Tensor, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = _resize(x, spec.image_size).repeat(1, 3, 1, 1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return x, y, [str(c) for c in bunch.target_names]


def _image_folder(root: Path, spec: DataSpec) -> tuple[Tensor, Tensor, list[str]]:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from e
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(root / cls)):
            files += [(Path(dirpath) / f, label) for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(
            f"data folder {str(root)!r} has no images: expected one subfolder per class holding "
            f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} files"
        )
    images = []
    for path, _ in files:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((spec.image_size, spec.image_size), Image.BILINEAR)
            images.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return x, y, classes


def _cifar10(root: Path, spec: DataSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(root / name, "rb") as f:  # the user's own files on disk: CIFAR-10's documented pickle format
            d = pickle.load(f, encoding="latin1")
        return d["data"], np.asarray(d["labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = batch("test_batch")
    meta = root / "batches.meta"
    classes = [str(i) for i in range(10)]
    if meta.exists():
        with open(meta, "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")["label_names"])

    def to_tensor(a: np.ndarray) -> Tensor:
        return _resize(torch.from_numpy(a.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0), spec.image_size)

    return (to_tensor(xtr), torch.from_numpy(ytr.astype(np.int64)), to_tensor(xte),
            torch.from_numpy(yte.astype(np.int64)), classes)


def load_dataset(spec: DataSpec | str = "digits") -> tuple[TensorDataset, TensorDataset, list[str]]:
    """Return ``(train, val, class_names)`` as normalized ``TensorDataset`` s of ``(image[3,H,W], label)``."""
    if isinstance(spec, str):
        spec = DataSpec(source=spec)
    if spec.source == "digits":
        x, y, classes = _digits(spec)
    else:
        root = Path(spec.source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data folder {str(root)!r} does not exist; pass 'digits' for the embedded data set, a folder with "
                "one subfolder per class, or a CIFAR-10 'cifar-10-batches-py' folder"
            )
        if (root / "data_batch_1").exists() and (root / "test_batch").exists():
            xtr, ytr, xva, yva, classes = _cifar10(root, spec)
            xtr, xva = _normalize(xtr, xva)
            return TensorDataset(xtr, ytr), TensorDataset(xva, yva), classes
        x, y, classes = _image_folder(root, spec)
    train_idx, val_idx = _split(len(y), spec.val_fraction)
    xtr, xva = _normalize(x[train_idx], x[val_idx])
    return TensorDataset(xtr, y[train_idx]), TensorDataset(xva, y[val_idx]), classes


def make_loaders(spec: DataSpec | str = "digits", batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0) -> tuple[DataLoader, DataLoader, list[str]]:
    """Train (shuffled with ``seed``) and validation loaders over :func:`load_dataset`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, val, classes = load_dataset(spec)
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers),
        DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers),
        classes,
    )
