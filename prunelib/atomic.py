"""Atomic writes: a reader sees the old file (or directory) or the new one, never a partial one.

:func:`atomic_save` (a file) and :func:`atomic_save_dir` (a directory, e.g. a Hugging Face
``save_pretrained``) are the one implementation: prunelib's writers call them, and
``search.storage.atomic_write`` wraps :func:`atomic_save` to report a full disk as a
``StorageError``. Imports nothing beyond the standard library (the sweep's driver uses it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_save", "atomic_save_dir"]


def _new_temporary(path: Path) -> str:
    """An empty new file beside ``path`` (a bounded name: a long target name still fits), with
    the mode a plain ``open`` gives (mkstemp's 0600 would hide the file from other users)."""
    while True:
        tmp = str(path.with_name(f".{path.name[:100]}.{os.getpid()}.{os.urandom(4).hex()}.tmp"))
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike, write: Callable[[Path], Any],
                check: Callable[[Path], Any] | None = None) -> Path:
    """prunelib's one atomic file write: ``write(tmp)`` fills a temporary file beside ``path``,
    which is fsynced, checked with ``check(tmp)`` (a reader loads it back) and renamed over ``path``.

    A crash or a full disk leaves the previous file (if any) and no temporary file: on any
    failure the temporary file is removed and the exception (an ``OSError`` such as ENOSPC)
    propagates unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(Path(tmp))
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors) may have made it 0600
        _fsync(tmp)  # the bytes are on disk before the name points at them
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_save_dir(path: str | os.PathLike, write: Callable[[Path], Any],
                    check: Callable[[Path], Any] | None = None) -> Path:
    """prunelib's one atomic directory write (a Hugging Face ``save_pretrained``): ``write(tmp)``
    fills a new temporary directory beside ``path``; its files are fsynced, checked with
    ``check(tmp)`` and the directory takes ``path``'s name (an existing ``path`` is moved aside
    first and removed once the new one is in place).

    A crash or a full disk leaves the previous directory (if any) and never a partial one under
    ``path``: on any failure the temporary directory is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the model from other users
    old = None
    try:
        write(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(file)  # the bytes are on disk before the name points at them
        if check is not None:
            check(tmp)
        if path.exists():
            old = path.with_name(f"{tmp.name[:-4]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # the previous directory back under its name
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
