"""Where a sweep keeps its files, and how they are written so that nothing is half-written or lost.

A sweep owns one root: its output directory, or ``<search.storage>/<sweep name>`` when
``search.storage`` names a shared path or a URI that pyarrow understands (``s3://``, ``gs://``,
``hdfs://``, ``file://``). Under the root::

    ray/                    Ray Tune's experiment state (what resume restores)
    trials/<trial_id>/      one trial's files: masks, surgered model, trial_result.json (last)

and, in the local output directory, ``sweep.json`` (written atomically), ``sweep.lock`` (held
by the one driver of the sweep) and ``front/``.

``trial_result.json`` is written last and atomically, so its presence means the trial finished:
a resumed sweep adopts such a trial instead of running it again.

Every file a sweep writes goes through :func:`atomic_write` (text: :func:`atomic_write_text`):
a temporary file in the same directory, flushed and fsynced, checked (a masks or weights file is
loaded back) and renamed over the target. A write the storage refuses (full disk, quota,
read-only or unwritable file system: :data:`STORAGE_ERRNOS`) raises :class:`StorageError`,
after the temporary file is removed; the previous file, if any, is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from prunelib.atomic import atomic_save

__all__ = ["RESULT_FILE", "STORAGE_ERRNOS", "StorageError", "StoreLockTimeout", "SweepLocked", "SweepLock",
           "SweepStorage", "as_storage_error", "atomic_write", "atomic_write_text", "copy_out", "is_uri",
           "storage_errors", "store_creation_lock"]

RESULT_FILE = "trial_result.json"


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a filesystem path."""
    return "://" in str(location)


#: ``errno`` values that mean the storage refused a write (not a bug): full disk, quota,
#: read-only file system, no permission, file too large, I/O error.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                            errno.EIO})


class StorageError(RuntimeError):
    """A write to the sweep's files or stores failed (full disk, quota, read-only, unwritable).

    Nothing was left half-written (the temporary file is removed, a previous file is intact)
    and the sweep can be resumed once the cause is fixed. ``str()`` is ``<path>: <reason>``.
    Picklable (a trial's error crosses from Ray's worker to the driver).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(str(path), str(reason))
        self.path = str(path)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: How writers that are not Python's own (safetensors' Rust code) say a storage errno in words.
_ERRNO_WORDS = {errno.ENOSPC: ("No space left on device", "os error 28"),
                errno.EDQUOT: ("Disk quota exceeded", "os error 122"),
                errno.EROFS: ("Read-only file system", "os error 30")}


def _reason(code: int) -> str:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def as_storage_error(exc: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """``exc`` (or an exception it was raised from) as a :class:`StorageError` when it is a write
    the storage refused (:data:`STORAGE_ERRNOS`, or a library's error that says so in words:
    safetensors raises ``SafetensorError: ... No space left on device (os error 28)``), else None."""
    seen: BaseException | None = exc
    for _ in range(8):  # a library may wrap the OSError (safetensors, torch, pyarrow)
        if seen is None:
            return None
        if isinstance(seen, StorageError):
            return seen
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return StorageError(seen.filename or path or "?", _reason(seen.errno))
        if not isinstance(seen, OSError):
            text = str(seen)
            for code, words in _ERRNO_WORDS.items():
                if any(w in text for w in words):
                    return StorageError(path or "?", _reason(code))
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write the storage refuses inside the block into :class:`StorageError` naming
    ``path`` (or the file the OSError names); other exceptions pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        failure = as_storage_error(exc, path)
        if failure is None:
            raise
        raise failure from None  # the one line names the path and the reason; no OSError chain


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any],
                 check: Callable[[Path], Any] | None = None) -> Path:
    """Write ``path`` atomically (:func:`prunelib.atomic.atomic_save`): ``write(tmp)`` fills a
    temporary file in the same directory, which is fsynced, checked with ``check(tmp)`` (e.g.
    loaded back) and renamed over ``path``; a refused write is reported as :class:`StorageError`.

    A reader sees the old file or the new one, never a partial one. On any failure the temporary
    file is removed and ``path`` is as it was.

    Raises:
        StorageError: the storage refused the write (:data:`STORAGE_ERRNOS`).
        Whatever ``write`` or ``check`` raise otherwise (a check that fails: the file is not written).
    """
    try:
        return atomic_save(path, write, check)
    except StorageError:
        raise
    except Exception as exc:
        failure = as_storage_error(exc, path)
        if failure is None:
            raise
        raise StorageError(path, failure.reason) from None  # the file we were writing, not its temporary


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_write`: a reader sees the old content or
    the new one, never an empty or partial file.

    Raises:
        StorageError: the storage refused the write.
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text))


class SweepLocked(RuntimeError):
    """Another driver holds this sweep's lock."""


class SweepLock:
    """An exclusive lock on a sweep directory (``sweep.lock``, POSIX ``flock``) held by its driver.

    The kernel drops the lock when the holding process dies (even by SIGKILL), so a killed sweep
    never stays locked. The file records the holder's pid and host for the refusal message.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / "sweep.lock"
        self._handle: Any = None

    def acquire(self) -> "SweepLock":
        """Take the lock or raise :class:`SweepLocked` naming the holder."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SweepLocked(f"another driver ({holder}) is running the sweep in {self.path.parent}; "
                              "wait for it to end or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StoreLockTimeout(RuntimeError):
    """A store's creation lock was not free in time."""


@contextlib.contextmanager
def store_creation_lock(db_path: str | os.PathLike, timeout_s: float = 120.0) -> Iterator[None]:
    """Serialise the creation of a file-backed store (an MLflow or Optuna SQLite database):
    two sweeps starting at once on a fresh database would race in its schema migration.

    Holds ``<db>.lock`` (POSIX ``flock``) for the duration; waits up to ``timeout_s`` seconds.
    """
    import fcntl

    lock_path = Path(str(db_path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StoreLockTimeout(f"{lock_path} was held for more than {timeout_s:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


class SweepStorage:
    """A sweep's root (a local directory or a pyarrow URI) and its ``trials/`` folder.

    Picklable (holds only the root string); it is sent to every trial.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(root) if is_uri(str(root)) else str(Path(root).expanduser().absolute())

    @property
    def is_local(self) -> bool:
        """Whether the root is a local directory path (written in place, no upload). URIs,
        ``file://`` included, go through pyarrow's filesystems."""
        return not is_uri(self.root)

    def local_root(self) -> Path | None:
        """The root as a local path, or None for a URI."""
        return None if is_uri(self.root) else Path(self.root)

    def path(self, *parts: str) -> str:
        """A location under the root (a path or URI string)."""
        local = self.local_root()
        return str(local.joinpath(*parts)) if local is not None else _join(self.root, *parts)

    def _fs(self) -> tuple[Any, str]:
        from pyarrow import fs as pafs

        return pafs.FileSystem.from_uri(self.root)

    def check(self) -> None:
        """Create the root and write/remove a probe file: fails fast when it is unusable.

        Raises:
            OSError or ValueError (pyarrow's ArrowInvalid): naming the root.
        """
        local = self.local_root()
        probe = f".prunesearch-probe-{os.getpid()}"
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
            (local / probe).write_text("ok")
            (local / probe).unlink()
            return
        filesystem, base = self._fs()
        filesystem.create_dir(base, recursive=True)
        with filesystem.open_output_stream(_join(base, probe)) as out:
            out.write(b"ok")
        filesystem.delete_file(_join(base, probe))

    # -- trials ----------------------------------------------------------------------------
    def trial_location(self, trial_id: str) -> str:
        """Where a trial's files end up: ``<root>/trials/<trial_id>``."""
        return self.path("trials", str(trial_id))

    @contextlib.contextmanager
    def trial_dir(self, trial_id: str) -> Iterator[Path]:
        """A local directory to write one trial's files in.

        Local roots: the trial's own folder under ``trials/``, written in place. Remote roots: a
        staging directory (the system's temporary folder, not Ray's), uploaded by
        :meth:`publish` and removed on exit.
        """
        local = self.local_root()
        if local is not None:
            folder = local / "trials" / str(trial_id)
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
            return
        staging = Path(tempfile.mkdtemp(prefix=f"prunesearch-{trial_id}-"))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, local_dir: Path, trial_id: str, row: dict[str, Any]) -> dict[str, Any]:
        """Make a finished trial durable: paths in ``row`` point at the storage, the files are
        uploaded (remote roots), and ``trial_result.json`` is written last, atomically.

        Returns the row with its paths rewritten to the storage location.
        """
        dest = self.trial_location(trial_id)
        src = str(local_dir)
        if self.local_root() is None:
            row = {k: (dest + v[len(src):] if isinstance(v, str) and v.startswith(src) else v) for k, v in row.items()}
        text = json.dumps(row, indent=1, default=str)
        local = self.local_root()
        if local is not None and Path(dest) == Path(local_dir):
            atomic_write_text(Path(local_dir) / RESULT_FILE, text)
            return row
        from pyarrow import fs as pafs

        filesystem, base = self._fs()
        target = _join(base, "trials", str(trial_id))
        (local_dir / RESULT_FILE).unlink(missing_ok=True)
        filesystem.create_dir(target, recursive=True)
        pafs.copy_files(str(local_dir), target, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)
        with filesystem.open_output_stream(_join(target, RESULT_FILE + ".tmp")) as out:
            out.write(text.encode())
        filesystem.move(_join(target, RESULT_FILE + ".tmp"), _join(target, RESULT_FILE))
        return row

    def finished_row(self, trial_id: str) -> dict[str, Any] | None:
        """The row a finished trial left in ``trials/<id>/trial_result.json``, or None."""
        try:
            text = self.read_text(f"trials/{trial_id}/{RESULT_FILE}")
        except (FileNotFoundError, OSError):
            return None
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            return None  # never produced by an atomic write; treat the trial as unfinished
        return row if isinstance(row, dict) and str(row.get("trial_id")) == str(trial_id) else None

    def finished_rows(self) -> list[dict[str, Any]]:
        """Every finished trial's row under ``trials/``."""
        local = self.local_root()
        if local is not None:
            ids = [p.name for p in sorted((local / "trials").glob("*")) if (p / RESULT_FILE).is_file()]
        else:
            from pyarrow import fs as pafs

            filesystem, base = self._fs()
            try:
                infos = filesystem.get_file_info(pafs.FileSelector(_join(base, "trials"), allow_not_found=True))
            except OSError:
                return []
            ids = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
        rows = [self.finished_row(i) for i in ids]
        return [r for r in rows if r is not None]

    def write_text(self, relative: str, text: str) -> None:
        """Write a file under the root (atomically on a local root)."""
        local = self.local_root()
        if local is not None:
            atomic_write_text(local / relative, text)
            return
        filesystem, base = self._fs()
        with filesystem.open_output_stream(_join(base, relative + ".tmp")) as out:
            out.write(text.encode())
        filesystem.move(_join(base, relative + ".tmp"), _join(base, relative))

    def delete(self, relative: str) -> bool:
        """Delete a file under the root; False if it was not there."""
        local = self.local_root()
        if local is not None:
            try:
                (local / relative).unlink()
                return True
            except FileNotFoundError:
                return False
        from pyarrow import fs as pafs

        filesystem, base = self._fs()
        if filesystem.get_file_info(_join(base, relative)).type != pafs.FileType.File:
            return False
        filesystem.delete_file(_join(base, relative))
        return True

    def read_text(self, relative: str) -> str:
        """The text of a file under the root."""
        local = self.local_root()
        if local is not None:
            return (local / relative).read_text()
        filesystem, base = self._fs()
        with filesystem.open_input_stream(_join(base, relative)) as stream:
            return stream.read().decode()


def copy_out(location: str, dest: str | os.PathLike) -> bool:
    """Copy one file written under a sweep's storage (a path or URI) to a local path; False if absent."""
    if not is_uri(location):
        src = Path(location)
        if not src.is_file():
            return False
        shutil.copyfile(src, dest)
        return True
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return False
    with filesystem.open_input_stream(path) as stream, open(dest, "wb") as out:
        shutil.copyfileobj(stream, out)
    return True
