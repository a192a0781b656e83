"""Atomic writes: a file or a whole directory appears under its final name complete, or not at all.

Every artifact writer in :mod:`qat_rep.export` goes through these helpers, so an interrupted export (an exception,
a killed process) never leaves a half-written ``model.onnx`` or a deploy directory without its metadata under the
name a user (or a loader) will look for. Temporary files live next to the target (same file system, so
``os.replace`` is a rename), named ``.<target>.<8 random characters>.tmp``, and are removed when the write fails.
A writer holds an advisory lock (``flock``) on its temporary file or directory while it writes; one killed with
``kill -9`` leaves it unlocked, and the next write to the same target removes it. Files are written ``0644`` and
directories ``0755``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporaries are recognised by age instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["ArtifactWriteError", "atomic_file", "atomic_directory", "write_bytes_atomic", "write_text_atomic"]

_FILE_MODE = 0o644
_DIR_MODE = 0o755
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.[A-Za-z0-9_]{8}\.(tmp|old)$")  # tempfile's 8 random characters
_STALE_AFTER_S = 24 * 3600.0


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
    _clean_stale_files(parent, target.name)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise ArtifactWriteError(f"cannot write {str(target)!r}: {e.strerror or e}") from e
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a write in progress: not stale for a concurrent cleaner
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; a written artifact is an ordinary readable file
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (temp file + rename) and return the final path."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically (temp file + rename) and return the final path."""
    return write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], marker: str, allowed: Sequence[str] = (),
                     recognise: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target``, on failure it is deleted.

    An existing ``target`` is replaced only when it is empty, or when it is recognisably this project's — it holds
    ``marker`` and ``recognise(target)`` is true (default: the marker is a file) — *and* holds nothing but regular
    files named in ``allowed`` (plus ``marker``) and this module's own hidden temporary files. Anything else is
    refused with an :class:`ArtifactWriteError` that names the foreign entries; nothing is deleted.

    The swap leaves ``target`` a complete directory at every instant: Linux ``renameat2(RENAME_EXCHANGE)``
    exchanges the two directories in one step, then the old copy (now under the temporary name) is emptied file by
    file — only the names it was accepted with — and removed. Where the exchange is unavailable, each new file is
    renamed over its old namesake instead (a reader may meet a new weights file beside the old description for a
    moment, which the artifact hash refuses) and old project files without a new counterpart are removed.
    Temporary directories of writes that were killed (``kill -9``) are cleaned on the next write to ``target``.
    """
    target = Path(target)
    owned = frozenset((marker, *allowed))
    if target.is_symlink():
        raise ArtifactWriteError(f"cannot write the artifact directory {str(target)!r}: it is a symbolic link; "
                                 "pass the real directory")
    if target.exists():
        if not target.is_dir():
            raise ArtifactWriteError(f"cannot write the artifact directory {str(target)!r}: a file of that name exists")
        entries = sorted(target.iterdir())
        ours = (target / marker).is_file() and (recognise is None or recognise(target))
        if entries and not ours:
            raise ArtifactWriteError(
                f"refusing to overwrite {str(target)!r}: it is not empty and holds no valid {marker!r}, so it is not "
                f"an artifact written by qat-rep ({_listing(entries)}); choose a new or empty directory"
            )
        foreign = [e for e in entries if not _owned_entry(e, owned)]
        if foreign:
            raise ArtifactWriteError(
                f"refusing to overwrite the artifact {str(target)!r}: it also holds {_listing(foreign)}, which "
                "qat-rep did not write; move them elsewhere or choose another directory"
            )
    parent = _writable_parent(target)
    _clean_stale_dirs(parent, target.name, owned)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ArtifactWriteError(f"cannot write {str(target)!r}: {e.strerror or e}") from e
    lock = _hold(tmp)
    placed = False  # from here on, the temporary name may hold the *old* artifact: never rmtree it
    try:
        os.chmod(tmp, _DIR_MODE)  # mkdtemp creates 0700; an artifact directory is as readable as its files
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if not target.exists():
            os.rename(tmp, target)
            placed = True
        elif _exchange(tmp, target):
            placed = True
            _fsync_dir(parent)
            _remove_owned(tmp, owned)  # the old artifact, now under the temporary name
        else:
            _replace_files(tmp, target, owned)
            placed = True
        _fsync_dir(parent)
    except BaseException:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(lock)


def _listing(entries: Sequence[Path]) -> str:
    names = [e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in entries]
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _is_temp_name(name: str, base: str | None = None) -> bool:
    m = _TEMP_RE.match(name)
    return m is not None and (base is None or m.group("base") == base)


def _owned_entry(entry: Path, owned: frozenset[str]) -> bool:
    """A regular file this project writes into an artifact directory, or one of its hidden temporary files."""
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.name in owned or _is_temp_name(entry.name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is unavailable."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # a file system (or sandbox) without the exchange: the caller falls back
    raise ArtifactWriteError(f"cannot replace {str(b)!r}: {os.strerror(err)}")


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl builds without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _remove_owned(directory: Path, owned: frozenset[str]) -> None:
    """Empty and remove a directory of this project's files, by name; anything else stays (and so does the
    directory, with a warning naming it)."""
    for entry in list(directory.iterdir()):
        if _owned_entry(entry, owned):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    try:
        directory.rmdir()
    except OSError:
        warnings.warn(f"the previous artifact was moved to {str(directory)!r} and kept there: it holds files qat-rep "
                      "did not write", UserWarning, stacklevel=3)


def _replace_files(new: Path, target: Path, owned: frozenset[str]) -> None:
    """Fallback without an atomic exchange: rename every new file over its namesake, then drop old project files
    that have no new counterpart. ``target`` stays a directory throughout."""
    names = {f.name for f in new.iterdir()}
    for name in sorted(names):
        os.replace(new / name, target / name)
    for entry in list(target.iterdir()):
        if entry.name not in names and _owned_entry(entry, owned):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    new.rmdir()


def _hold(path: Path) -> int | None:
    """Open ``path`` and take an exclusive advisory lock on it, marking a write in progress (None without flock)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _abandoned(path: Path) -> bool:
    """True when no live process writes ``path``: its lock is free (a killed writer's lock died with it); without
    flock, when it is older than a day."""
    if fcntl is None:
        try:
            return time.time() - path.lstat().st_mtime > _STALE_AFTER_S
        except OSError:
            return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _clean_stale_files(parent: Path, base: str) -> None:
    """Remove hidden temporary files that an interrupted write of ``parent/base`` left behind."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if _is_temp_name(entry.name, base) and entry.is_file() and not entry.is_symlink() and _abandoned(entry):
                with contextlib.suppress(OSError):
                    entry.unlink()


def _clean_stale_dirs(parent: Path, base: str, owned: frozenset[str]) -> None:
    """Remove hidden temporary directories that an interrupted write of ``parent/base`` left behind — only when
    they hold nothing but this project's files."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not (_is_temp_name(entry.name, base) and entry.is_dir() and not entry.is_symlink()):
                continue
            if all(_owned_entry(e, owned) for e in entry.iterdir()) and _abandoned(entry):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _remove_owned(entry, owned)
