"""Fault injection for reliability tests and drills: make chosen trials of a sweep fail.

A sweep must survive trials that raise, run out of memory, diverge to NaN or lose their
worker. ``trial.faults`` (off by default) names which trials get which fault, by the order in
which trials start::

    python -m search +method=magnitude search.n_trials=8 \\
        "+trial.faults.plan='2:raise,3:nan,5:oom,6:kill'" +trial.faults.state_dir=/tmp/faults

(the inner quotes keep Hydra from reading the plan as a list).

Ordinals count from 1 in start order, shared by every worker through ``state_dir`` (a local
or shared directory): each starting trial claims the next free ordinal with an exclusive file
create, and a retried trial keeps its ordinal. ``attempts-<trial id>`` counts a trial's
starts and ``completions-<trial id>`` its executions that ran to the end. Faults:

- ``raise``: the trial raises :class:`InjectedFault` before training;
- ``nan``: the learning rate is set to 1e30, so training diverges to NaN and the trial's NaN
  check fails it;
- ``oom``: the trial raises ``torch.OutOfMemoryError`` as a GPU allocation would;
- ``kill``: the worker process kills itself with SIGKILL on the trial's first attempt only,
  so Ray sees a dead worker and Tune retries the trial (``trial.max_retries``);
- ``enospc``: on the trial's first attempt only, every file the trial writes fails at its flush
  (``os.fsync`` raises ``OSError(ENOSPC)``) as on a full disk: the write helpers remove their
  temporary files and the sweep stops with a storage error (exit 3); a resume runs it again.

``raise``, ``nan`` and ``oom`` are deterministic failures: the trial runs once and is not retried
(:mod:`search.trials.context`), so its ``attempts-<trial id>`` holds one mark.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["DISK_FULL_KEY", "FAULT_KINDS", "FaultPlan", "InjectedFault", "disk_full"]

FAULT_KINDS = ("raise", "nan", "oom", "kill", "enospc")
#: The trial setting an ``enospc`` fault sets (read by :func:`disk_full`).
DISK_FULL_KEY = "_fault_disk_full"


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault injects (its message says it was injected)."""


@dataclass(frozen=True)
class FaultPlan:
    """Which trial ordinal (1 = first trial to start) gets which fault.

    Attributes:
        faults: ``{ordinal: kind}`` with kind in :data:`FAULT_KINDS`.
        state_dir: where ordinals are claimed (one empty file per started trial).
    """

    faults: dict[int, str]
    state_dir: Path

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "FaultPlan | None":
        """Parse ``trial.faults`` (``{"plan": "2:raise,3:nan", "state_dir": PATH}``); None when off.

        Raises:
            ValueError: a malformed plan or a missing ``state_dir``, naming the bad entry.
        """
        if not cfg or not cfg.get("plan"):
            return None
        faults: dict[int, str] = {}
        for entry in str(cfg["plan"]).split(","):
            ordinal, sep, kind = entry.strip().partition(":")
            if not sep or not ordinal.strip().isdigit() or int(ordinal) < 1 or kind.strip() not in FAULT_KINDS:
                raise ValueError(f"trial.faults.plan: bad entry {entry!r}; expected ORDINAL:KIND with "
                                 f"ORDINAL >= 1 and KIND one of {list(FAULT_KINDS)}")
            faults[int(ordinal)] = kind.strip()
        if not cfg.get("state_dir"):
            raise ValueError("trial.faults.state_dir: required with a plan (a directory every worker can write)")
        return cls(faults, Path(str(cfg["state_dir"])))

    def claim(self, trial_id: str) -> tuple[int, int]:
        """This trial's ordinal and attempt number (both from 1); a retry keeps its ordinal."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        attempts = self.state_dir / f"attempts-{trial_id}"
        with open(attempts, "a") as f:
            f.write("x")
        attempt = attempts.stat().st_size
        for path in self.state_dir.glob("ordinal-*"):
            if path.read_text() == trial_id:
                return int(path.name.split("-", 1)[1]), attempt
        ordinal = 1
        while True:
            try:
                fd = os.open(self.state_dir / f"ordinal-{ordinal}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                ordinal += 1
                continue
            with os.fdopen(fd, "w") as f:
                f.write(trial_id)
            return ordinal, attempt

    def record_completion(self, trial_id: str) -> int:
        """Count one finished execution of a trial (``completions-<trial_id>``, one byte each);
        returns the count. Drills check with it that no trial runs to the end twice."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"completions-{trial_id}"
        with open(path, "a") as f:
            f.write("x")
        return path.stat().st_size

    def inject(self, trial_id: str, trial_cfg: dict[str, Any]) -> dict[str, Any]:
        """Apply this trial's fault, if any; returns the (possibly changed) trial settings.

        Raises:
            InjectedFault: for ``raise``.
            torch.OutOfMemoryError: for ``oom``.
        """
        ordinal, attempt = self.claim(trial_id)
        kind = self.faults.get(ordinal)
        if kind == "raise":
            raise InjectedFault(f"injected fault: trial #{ordinal} ({trial_id}) raises")
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"injected fault: trial #{ordinal} ({trial_id}) ran out of memory "
                                         "(CUDA out of memory. Tried to allocate 20.00 GiB)")
        if kind == "nan":
            return {**trial_cfg, "lr": 1e30, "finetune_lr": 1e30}
        if kind == "kill" and attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "enospc" and attempt == 1:
            return {**trial_cfg, DISK_FULL_KEY: f"trial #{ordinal} ({trial_id})"}
        return trial_cfg


@contextlib.contextmanager
def disk_full(trial_cfg: Mapping[str, Any]) -> Iterator[None]:
    """While the block runs, make every ``os.fsync`` raise ``OSError(ENOSPC)`` when the trial
    got an ``enospc`` fault (:data:`DISK_FULL_KEY`); a no-op otherwise.

    Every atomic writer (prunelib.atomic, which search.storage.atomic_write wraps) fsyncs its
    temporary file before the rename, so the fault lands where a full disk is felt: after bytes
    were written, before the file takes its name.
    """
    if not trial_cfg.get(DISK_FULL_KEY):
        yield
        return
    real = os.fsync
    who = trial_cfg[DISK_FULL_KEY]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, f"No space left on device (injected fault: {who})")

    os.fsync = full
    try:
        yield
    finally:
        os.fsync = real
