"""The sweep's Ray Tune schedulers (see :mod:`search.schedulers`): Ray's ASHA on the first
objective, and :class:`MultiObjectiveASHA` deciding at each rung with a :class:`RungBook`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.settings import SearchSettings
from search.rungs import (
    PROJECTED_PREFIX,
    STATE_FILE,
    RungBook,
    RungSettings,
    rung_settings,
    scheduler_kind,
)

__all__ = ["MultiObjectiveASHA", "build_scheduler"]


class MultiObjectiveASHA(FIFOScheduler):
    """Ray Tune scheduler: asynchronous successive halving on several objectives.

    Trials run in submission order (FIFO); at each rung the :class:`RungBook` decides. Results
    without the progress key (``time_attr``, the per-epoch ``epoch`` count) or marked
    ``final_result`` are not judged.

    Args:
        objectives: the sweep's ``[(metric, mode), ...]``.
        settings: rungs and tie-break.
        time_attr: the result key that counts epochs.
        verbose: print one line per stopped trial.
    """

    def __init__(self, objectives: list[tuple[str, str]], settings: RungSettings, time_attr: str = "epoch",
                 verbose: bool = True) -> None:
        super().__init__()
        self.book = RungBook(objectives, settings)
        self.time_attr = time_attr
        self.verbose = verbose
        self.state_path: str | None = None
        self._loaded = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The objectives come with the scheduler; Tune's single metric/mode do not apply.
        return True

    def _ensure_state(self, trial: Any) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            # The driver's staging copy of the experiment directory: Tune uploads it to the
            # storage path with its own state, and downloads it there again on restore.
            folder = Path(trial.local_experiment_path)
        except Exception:  # a trial without storage (unit tests): keep the rungs in memory
            return
        folder.mkdir(parents=True, exist_ok=True)  # Tune makes it at its first checkpoint
        self.state_path = str(folder / STATE_FILE)
        if os.path.isfile(self.state_path):
            with open(self.state_path) as f:
                self.book.load_state(json.load(f))

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.book.state(), f)
        os.replace(tmp, self.state_path)

    def objective_values(self, result: dict[str, Any]) -> list[float]:
        """The rung's view of a result: ``projected_<metric>`` when reported, else ``<metric>``."""
        out = []
        for metric, _ in self.book.objectives:
            value = result.get(PROJECTED_PREFIX + metric, result.get(metric))
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                out.append(math.nan)
        return out

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._ensure_state(trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._ensure_state(trial)
        if result.get("final_result") or self.time_attr not in result:
            return TrialScheduler.CONTINUE
        decision = self.book.on_progress(trial.trial_id, float(result[self.time_attr]),
                                         self.objective_values(result))
        if decision is None:
            return TrialScheduler.CONTINUE
        self._save()
        if decision.keep:
            return TrialScheduler.CONTINUE
        if self.verbose:
            print(f"mo_asha: stopping {trial.trial_id} after {decision.milestone} epochs "
                  f"({decision.reason()})", flush=True)
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {m}: {len(r)}" for m, r in sorted(self.book.rungs.items()))
        return f"MultiObjectiveASHA: {len(self.book.stopped)} stopped; trials per rung {sizes or 'none yet'}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.book.state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.book.load_state(json.load(f))


def build_scheduler(search: dict[str, Any] | SearchSettings,
                    objectives: list[tuple[str, str]]) -> TrialScheduler | None:
    """The sweep's Tune scheduler (None = run every trial to the end)."""
    if not isinstance(search, dict):  # search.settings.SearchSettings: checked when it was parsed
        kind, rungs = search.scheduler_kind, search.rungs
    else:
        kind, rungs = scheduler_kind(search), None
    if kind == "none":
        return None
    settings = rungs or rung_settings(search)
    if kind == "asha":
        return ASHAScheduler(metric=objectives[0][0], mode=objectives[0][1], time_attr="training_iteration",
                             grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    return MultiObjectiveASHA(objectives, settings)
