"""Image-classification data with no downloads: an embedded default, a user's image folder, CIFAR-10 on disk.

The default is scikit-learn's handwritten digits (1,797 8×8 images shipped inside the installed package),
upsampled to 32×32 with 3 channels, split once with a fixed seed, normalized with the training-split statistics.
The same :class:`DataSpec` points the code at a folder of images (one subfolder per class) or at CIFAR-10's python
batches already on disk.

CIFAR-10's python batches are pickles. They are read with a restricted unpickler that admits only what those files
hold — dicts, lists, str, bytes, numbers and numpy arrays (rebuilt by numpy's own array constructors) — so a crafted
file in a data folder cannot run code: any other global it names is refused before it is called.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle of ``bytes`` written by Python 3 — latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 encoded bytes are allowed")
    return text.encode("latin1")


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array-pickle constructor (protocol < 5), for plain ``np.ndarray`` only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's array-pickle constructor (protocol 5): a copy of the raw buffer in ``dtype``/``shape``."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy arrays are allowed")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only numpy's array/dtype constructors and a latin-1 ``bytes`` rebuild; every other global is refused
    (so ``os.system``, ``builtins.eval`` or any class's ``__reduce__`` payload never runs)."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _np_reconstruct
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _np_frombuffer
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR-10 python batch as a dict with str keys, through :class:`_CifarUnpickler` (no code runs)."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, RecursionError) as e:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); qat-rep reads "
                         "only the dicts, lists and numpy arrays of CIFAR-10's own files — use the files from "
                         "cifar-10-python.tar.gz or an image folder") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: it holds a {type(d).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar10(root: Path, spec: DataSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / name
        d = _read_cifar_pickle(path)
        data, labels = d.get("data"), d.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{str(path)!r} is not a CIFAR-10 batch: 'data' must be a uint8 array of shape (N, 3072)")
        if not isinstance(labels, list) or len(labels) != len(data) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10 for v in labels):
            raise ValueError(f"{str(path)!r} is not a CIFAR-10 batch: 'labels' must be a list of {len(data)} "
                             "integers in 0..9")
        return data, np.asarray(labels, dtype=np.int64)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = batch("test_batch")
    meta = root / "batches.meta"
    classes = [str(i) for i in range(10)]
    if meta.exists():
        names = _read_cifar_pickle(meta).get("label_names")
        if not isinstance(names, list) or len(names) != 10 or not all(isinstance(c, (str, bytes)) for c in names):
            raise ValueError(f"{str(meta)!r} is not CIFAR-10 metadata: 'label_names' must be a list of 10 names")
        classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in names]

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
