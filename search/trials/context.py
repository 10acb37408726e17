"""What the sweep's driver hands each trial: :class:`TrialContext` and the Tune trainable.

Both are importable without torch's training stack: the driver builds the context and passes
:func:`search.trials.trainable.ray_trainable` to Tune, and only the worker that runs it imports
:mod:`search.trials.run` (Lightning, the methods, the data).

Retries are for dead workers only. Tune's ``FailureConfig(max_failures=trial.max_retries)``
retries every failed trial, so a trial that fails deterministically (an exception in the user's
or the pruning code, a NaN loss or metric) leaves :data:`FAILED_FILE` in its folder
(:func:`record_failure`); a retried attempt finds it and raises :class:`TrialFailedBefore` at
once, running nothing again. A worker that dies (killed, out of host memory) writes nothing, so
its trial is retried and runs again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.paths import launch_dir, resolve_launch_path  # re-exported: the trial modules import them here
from search.settings import TrialSettings
from search.space import SearchSpace

__all__ = ["FAILED_FILE", "TrialContext", "TrialFailedBefore", "earlier_failure", "launch_dir", "record_failure",
           "resolve_launch_path"]

log = logging.getLogger("search")

#: In ``trials/<trial_id>/``: the exception line of a trial that failed deterministically.
FAILED_FILE = "trial_failed.json"


class TrialFailedBefore(RuntimeError):
    """A retried attempt of a trial that already failed deterministically: raised before any of
    the trial's code runs again. Its message is the first attempt's exception line, shown as it
    is (``line_only``: :func:`search.formatting.exception_line` adds no type name)."""

    line_only = True


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled parameters (picklable, sent once).

    Attributes:
        data: the ``data`` config section (see :func:`prunelib.data.datamodule_from_config`).
        model: the ``model`` config section (``name``, or ``_target_`` and its own keys).
        trial: the ``trial`` config section (epochs, optimizer, resources...) as Tune's wire
            format (a plain dict); read it typed through :attr:`trial_settings`.
        space: the search space, to turn sampled params into method settings.
        objectives: ``[(metric, "max"|"min"), ...]`` reported with every intermediate result.
        tracking: ``{"uri", "experiment_id", "parent_run_id"}`` or None to skip MLflow.
        report_every_epoch: send per-epoch validation results (for ASHA early stopping).
        module: the ``module`` config section (``_target_`` = the user's LightningModule) or None.
        sweep_root: the sweep's storage root (a path or URI); trial files go to its ``trials/``.
        resumed: the sweep is being resumed: trials that finished before are adopted.
        driver: ``{"pid", "host", "create_time"}`` of the driver: a worker on its host stops
            when the driver is gone.
    """

    data: dict[str, Any]
    model: dict[str, Any]
    trial: dict[str, Any]
    space: SearchSpace
    objectives: list[tuple[str, str]]
    tracking: dict[str, str] | None = None
    report_every_epoch: bool = False
    module: dict[str, Any] | None = None
    sweep_root: str | None = None
    resumed: bool = False
    driver: dict[str, Any] | None = None

    @functools.cached_property
    def trial_settings(self) -> TrialSettings:
        """``trial`` parsed and checked once per process (:class:`search.settings.TrialSettings`):
        every default comes from there, none is restated by a reader."""
        return TrialSettings.from_dict(self.trial)

    def settings_for(self, overrides: dict[str, Any]) -> TrialSettings:
        """The trial's settings with the ``trial.*`` values sampled for it (parsed once per trial)."""
        return TrialSettings.from_dict({**self.trial, **overrides}) if overrides else self.trial_settings


def record_failure(ctx: TrialContext, trial_id: str, line: str) -> None:
    """Leave ``trials/<trial_id>/``:data:`FAILED_FILE` with the exception line of a trial that
    failed deterministically, so that Tune's retry does not run it again. A failure to write it
    only costs that retry (logged)."""
    if not ctx.sweep_root:
        return
    from search.storage import SweepStorage

    try:
        SweepStorage(ctx.sweep_root).write_text(f"trials/{trial_id}/{FAILED_FILE}",
                                                json.dumps({"trial_id": str(trial_id), "error": line}))
    except Exception as exc:
        log.warning("trial %s: could not record its failure (%s: %s); a retry will run it again", trial_id,
                    type(exc).__name__, str(exc)[:200])


def earlier_failure(ctx: TrialContext, trial_id: str) -> str | None:
    """The exception line an earlier attempt of this trial recorded (:func:`record_failure`),
    or None: no attempt failed deterministically."""
    if not ctx.sweep_root:
        return None
    from search.storage import SweepStorage

    try:
        record = json.loads(SweepStorage(ctx.sweep_root).read_text(f"trials/{trial_id}/{FAILED_FILE}"))
    except (OSError, ValueError):  # absent (the usual case), or unreadable: run the trial
        return None
    if not isinstance(record, dict) or str(record.get("trial_id")) != str(trial_id):
        return None
    return str(record.get("error") or "the trial failed")
