"""Atomic writes: a file or a whole directory appears under its final name complete, or not at all.

Every artifact writer in :mod:`qat_rep.export` goes through these helpers, so an interrupted export (an exception,
a killed process) never leaves a half-written ``model.onnx`` or a deploy directory without its metadata under the
name a user (or a loader) will look for. Temporary files live next to the target (same file system, so
``os.replace`` is a rename) and are removed when the write fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["ArtifactWriteError", "atomic_file", "atomic_directory", "write_bytes_atomic"]


class ArtifactWriteError(OSError):
    """The artifact cannot be written where it was asked to go (missing, read-only or not a directory)."""


def _writable_parent(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactWriteError(
            f"cannot write {str(target)!r}: its folder {str(parent)!r} cannot be created ({e.strerror or e}); "
            "choose a path inside a writable directory"
        ) from e
    if not parent.is_dir():
        raise ArtifactWriteError(f"cannot write {str(target)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactWriteError(f"cannot write {str(target)!r}: the directory {str(parent)!r} is not writable")
    return parent


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it to ``target``, on failure delete it.

    ``with atomic_file("model.onnx") as tmp: write(tmp)`` — readers never see a partial ``model.onnx``.
    """
    target = Path(target)
    if target.is_dir():
        raise ArtifactWriteError(f"cannot write the file {str(target)!r}: a directory of that name exists")
    parent = _writable_parent(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise ArtifactWriteError(f"cannot write {str(target)!r}: {e.strerror or e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a written artifact is an ordinary readable file
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (temp file + rename) and return the final path."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically (temp file + rename) and return the final path."""
    return write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], marker: str) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target``, on failure it is deleted.

    ``target`` may already exist only if it is empty or a previous artifact (it contains ``marker``); the old
    directory is swapped out and deleted only after the new one is in place. Anything else under ``target`` is
    refused rather than deleted.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ArtifactWriteError(f"cannot write the artifact directory {str(target)!r}: a file of that name exists")
        entries = list(target.iterdir())
        if entries and not (target / marker).is_file():
            raise ArtifactWriteError(
                f"refusing to overwrite {str(target)!r}: it is not empty and holds no {marker!r}, so it is not a "
                "qat-rep artifact; choose a new or empty directory"
            )
    parent = _writable_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ArtifactWriteError(f"cannot write {str(target)!r}: {e.strerror or e}") from e
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
