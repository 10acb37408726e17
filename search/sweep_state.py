"""A sweep's state on disk: ``sweep.json`` (written atomically, mirrored in the MLflow parent
run), its identity on resume, the newest unfinished sweep to resume, and the abort request a
trial leaves for the driver (``abort.json``, kept in memory first: the disk may be what failed).

Used by :mod:`search.tuner` (the sweep) and :mod:`search.tune_callbacks` (Tune's callbacks ask
for an abort here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.formatting import _last_line
from search.errors import ConfigError
from search.storage import StorageError, SweepStorage, atomic_write_text

if TYPE_CHECKING:
    from search.settings import SweepSettings, TrackingSettings

__all__ = ["ABORT_FILE", "STATE_FILE", "STATE_KEYS", "drop_truncated_tune_state", "find_resume_dir",
           "interrupt_tune", "read_abort", "read_state", "record_identity", "request_abort", "state_from_mlflow",
           "write_state"]

log = logging.getLogger("search")

STATE_FILE = "sweep.json"


ABORT_FILE = "abort.json"


#: What every ``sweep.json`` holds (written by :func:`_run_locked` before any trial starts).
STATE_KEYS = ("name", "sweep_root", "finished")


def write_state(path: Path, state: dict[str, Any], tracker: Any = None) -> None:
    """``sweep.json``, atomically; with ``tracker``, also its copy in the parent run
    (:data:`~search.tracking.SWEEP_STATE_ARTIFACT`): a store outage costs that copy only (a warning)."""
    text = json.dumps(state, indent=1, default=str)
    atomic_write_text(path, text)
    if tracker is not None:
        from search.tracking import SWEEP_STATE_ARTIFACT

        try:
            tracker.client.log_text(tracker.run_id, text, SWEEP_STATE_ARTIFACT)
        except Exception as exc:
            print(f"warning: could not copy {path.name} to the MLflow parent run ({_last_line(str(exc))})",
                  file=sys.stderr, flush=True)


def state_from_mlflow(tracking: TrackingSettings, output_dir: Path) -> dict[str, Any]:
    """The state of the sweep in ``output_dir`` as its MLflow parent run (in the store the
    ``tracking`` settings name) holds it (:data:`~search.tracking.SWEEP_STATE_ARTIFACT`), written
    back to ``sweep.json``; {} when there is no such copy."""
    from search.tracking import saved_sweep_state

    found = saved_sweep_state(tracking, output_dir)
    if found is None:
        return {}
    run_id, state = found
    write_state(output_dir / STATE_FILE, state)
    print(f"note: {output_dir / STATE_FILE} was missing; restored from MLflow parent run {run_id}", flush=True)
    return state


def read_state(path: Path, key: str = "search.resume_dir") -> dict[str, Any]:
    """The sweep's ``sweep.json`` ({} when there is none).

    Raises:
        ConfigError: naming ``key`` and the file, when it is unreadable, not JSON, not a JSON
            object or lacks one of :data:`STATE_KEYS`.
    """
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"{key}: {path} is not readable JSON ({_last_line(str(exc))}); it is not a sweep's "
                          "state (restore it, or start a new sweep)") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {path} holds a JSON {type(state).__name__}, not a sweep's state (restore it, "
                          "or start a new sweep)")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ConfigError(f"{key}: {path} lacks {missing}; it is not a sweep's state (restore it, or start a "
                          "new sweep)")
    return state


def find_resume_dir(output_root: Path) -> Path | None:
    """The newest sweep under ``output_root`` that has a readable state file and did not finish;
    an unreadable one is skipped with a printed note."""
    candidates = []
    for state in output_root.rglob(STATE_FILE):
        try:
            data = read_state(state, "search.resume")
        except ConfigError as exc:
            print(f"note: skipped {state.parent}: {str(exc).split(': ', 1)[-1]}", flush=True)
            continue
        if not data.get("finished"):
            candidates.append((state.stat().st_mtime, state.parent))
    return max(candidates)[1] if candidates else None


def record_identity(composed: dict[str, Any], output_dir: Path, state: dict[str, Any], resuming: bool,
                    settings: SweepSettings | None = None) -> dict[str, Any]:
    """``state`` with this run's identity (:mod:`search.identity`); a resume whose config differs
    from the recorded one is refused, unless ``search.resume_accept`` names every change (then
    the changes are recorded). A sweep recorded before identities were is adopted with a note.

    Args:
        composed: the resolved config as a dict (the identity is its keys: :func:`sweep_identity`).
        settings: ``composed`` parsed (the sweep's :class:`~search.settings.SweepSettings`);
            parsed here when a caller holds only the dict.

    Raises:
        ConfigError: ``search.resume``, naming every key that differs.
    """
    from search.identity import accepted_keys, check_resume_identity, sweep_identity
    from search.settings import SweepSettings

    settings = settings if settings is not None else SweepSettings.from_dict(composed)
    accept = accepted_keys(settings.search)
    identity = sweep_identity(composed, output_dir, settings)
    state = dict(state)
    if resuming and isinstance(state.get("identity"), dict):
        accepted = check_resume_identity(state, identity, accept, output_dir)
        if accepted:
            stamp = datetime.now().isoformat(timespec="seconds")
            state["accepted_changes"] = [*state.get("accepted_changes", []), *({**a, "at": stamp} for a in accepted)]
            print("note: resuming with accepted changes: " + ", ".join(
                f"{a['key']} ({a['old']} -> {a['new']})" for a in accepted), flush=True)
    elif resuming:
        print(f"note: {output_dir / STATE_FILE} predates recorded identities; this config is recorded as the "
              "sweep's now (not compared)", flush=True)
    state["identity"] = identity
    return state


# Abort requests of this driver, by abort file: the file may be on the disk that is full.
_ABORTS: dict[str, dict[str, Any]] = {}


def request_abort(abort_file: str, request: dict[str, Any]) -> None:
    """Ask the running sweep to stop every trial (read by the AbortStopper and after Tune ends):
    kept in memory first, then in ``abort.json`` when the disk takes it."""
    _ABORTS.setdefault(str(abort_file), request)
    try:
        atomic_write_text(abort_file, json.dumps(_ABORTS[str(abort_file)]))
    except (StorageError, OSError) as exc:  # the disk is what failed; memory holds the request
        log.info("could not write %s (%s); the sweep stops anyway", abort_file, exc)


def read_abort(abort_file: str) -> dict[str, Any] | None:
    """The abort request of this sweep (this driver's, or ``abort.json``), or None."""
    if str(abort_file) in _ABORTS:
        return _ABORTS[str(abort_file)]
    if not os.path.exists(abort_file):
        return None
    try:
        request = json.loads(Path(abort_file).read_text())
    except (OSError, json.JSONDecodeError):
        request = {}
    return request if isinstance(request, dict) else {}


def interrupt_tune() -> bool:
    """Stop Tune's loop as Ctrl-C does (SIGUSR1 to Tune's own handler, which ``tune.run``
    installs on the main thread); False, sending nothing, where that handler is not installed
    (SIGUSR1's default action would end the process)."""
    import signal

    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    if not callable(handler) or getattr(handler, "__name__", "") != "signal_interrupt_tune_run":
        return False
    os.kill(os.getpid(), signal.SIGUSR1)
    return True


def drop_truncated_tune_state(storage: SweepStorage, experiment_path: str) -> bool:
    """Remove Tune's experiment-state files a full disk truncated (Tune writes them in place);
    returns whether a whole one is left. Without one a resume starts a new Tuner, which adopts
    the finished trials from their files and MLflow. Remote roots are left as they are (True)."""
    if not storage.is_local:
        return True
    whole = False
    for path in Path(experiment_path).glob("experiment_state-*.json"):
        try:
            json.loads(path.read_text())
            whole = True
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("removed %s: truncated by a full disk", path)
    return whole

