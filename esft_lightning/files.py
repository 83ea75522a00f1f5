"""Atomic writes (temp file or folder + rename): a crash or a failed write never leaves a half-written output."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """Writing an output failed; the message names the path and says the previous version is unchanged."""


def atomic_write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Let ``write`` fill a temp file beside ``path``, flush it to disk, then rename it over ``path``.

    Until the rename, ``path`` keeps its previous content, whatever happens (an exception, a full disk,
    SIGKILL). A failure removes the temp file and raises ``WriteError`` naming ``path``.
    """
    path = Path(path)
    _remove_stale_temps(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file in the same folder, then rename it into place."""
    atomic_write_file(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a temp folder, then swap it in for ``path`` (an existing one is replaced whole).

    The swap is one atomic ``renameat2(RENAME_EXCHANGE)`` where Linux offers it; elsewhere two renames, and
    a crash between them leaves ``.<name>.old``, which the next write (or :func:`recover_dir`) puts back.
    """
    path = Path(path)
    recover_dir(path)
    _remove_stale_temps(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise _write_error(path, err) from err
    old = path.with_name(f".{path.name}.old")
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
            return path
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise
    return path


def recover_dir(path: str | os.PathLike) -> None:
    """Put back ``.<name>.old`` when a crash between the two renames of :func:`atomic_write_dir` lost ``path``."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(path: Path) -> None:
    """Temp files or folders of ``path`` left by a killed writer (one writer per path: ours are gone)."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _write_error(path: Path, err: OSError) -> WriteError:
    reason = err.strerror or str(err)
    return WriteError(err.errno, f"could not write {path}: {reason}; the previous {path.name}, if any, is unchanged")


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0  # EINVAL / ENOSYS on file systems or kernels without it: the caller falls back


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
