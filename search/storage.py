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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RESULT_FILE", "StoreLockTimeout", "SweepLocked", "SweepLock", "SweepStorage", "atomic_write_text",
           "copy_out", "is_uri", "store_creation_lock"]

RESULT_FILE = "trial_result.json"


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a filesystem path."""
    return "://" in str(location)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename:
    a reader sees the old content or the new one, never an empty or partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


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
