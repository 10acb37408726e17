"""The rungs of the sweep's early stopping (``search.scheduler``, ``search.asha``): settings,
bookkeeping and decisions, in plain Python (no Ray). :class:`~search.mo_asha.MultiObjectiveASHA`
(the Ray Tune scheduler) feeds a :class:`RungBook` each trial's progress; :mod:`search.schedulers`
is the public face of both and says how the decisions are made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.errors import ConfigError

__all__ = ["SCHEDULERS", "TIE_BREAKS", "RungSettings", "RungDecision", "RungBook",
           "scheduler_kind", "rung_settings", "PROJECTED_PREFIX", "STATE_FILE"]


SCHEDULERS = ("none", "asha", "mo_asha")
TIE_BREAKS = ("hypervolume", "crowding")
STATE_FILE = "mo_asha_state.json"
PROJECTED_PREFIX = "projected_"


@dataclass(frozen=True)
class RungSettings:
    """Where the rungs are and how many trials pass each.

    Attributes:
        grace_period: epochs before the first rung (no trial stops earlier).
        reduction_factor: rung ``k`` sits at ``grace_period * reduction_factor ** k`` epochs
            (rounded up); about ``1 / reduction_factor`` of the trials at a rung pass it by rank
            (the non-dominated ones always pass).
        tie_break: ``"hypervolume"`` (exclusive hypervolume contribution within a rank) or
            ``"crowding"`` (NSGA-II crowding distance within a rank).
    """

    grace_period: int = 2
    reduction_factor: float = 3.0
    tie_break: str = "hypervolume"

    def __post_init__(self) -> None:
        g = self.grace_period
        if isinstance(g, bool) or not isinstance(g, (int, float)) or int(g) != g or g < 1:
            raise ValueError(f"grace_period must be an integer >= 1 (epochs), got {self.grace_period!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or not self.reduction_factor > 1.0:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor!r}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {list(TIE_BREAKS)}, got {self.tie_break!r}")

    def milestones_upto(self, epoch: float) -> list[int]:
        """The rungs (epochs, increasing) at or below ``epoch``."""
        out: list[int] = []
        k = 0
        while True:
            m = int(math.ceil(self.grace_period * self.reduction_factor ** k - 1e-9))
            if m > epoch:
                return out
            if not out or m > out[-1]:
                out.append(m)
            k += 1


@dataclass(frozen=True)
class RungDecision:
    """One rung decision (also what the state file and the log keep).

    Attributes:
        trial_id: the trial judged.
        milestone: the rung, in epochs.
        keep: continue (True) or stop (False).
        rank: the trial's non-dominated rank among the ``size`` trials at the rung (0 = front).
        position: its place (0 = best) in the rung's order (rank, then tie-break).
        size: trials at the rung, itself included.
        quota: how many of them pass by order (``ceil(size / reduction_factor)``).
        repeated: the trial was judged at this rung before (restarted after a resume): the
            earlier decision stands.
    """

    trial_id: str
    milestone: int
    keep: bool
    rank: int
    position: int
    size: int
    quota: int
    repeated: bool = False

    def reason(self) -> str:
        """One line saying why."""
        if self.repeated:
            return f"stopped at epoch {self.milestone} before the sweep was resumed"
        if self.rank == 0:
            return f"non-dominated among the {self.size} trials at epoch {self.milestone}"
        verdict = "within" if self.keep else "outside"
        return (f"front {self.rank + 1}, place {self.position + 1} of the {self.size} trials at epoch "
                f"{self.milestone}: {verdict} the best {self.quota}")


class RungBook:
    """The rungs of a multi-objective successive-halving run: records and decisions.

    Plain Python (no Ray): :class:`MultiObjectiveASHA` feeds it each trial's progress.

    Args:
        objectives: ``[(metric, "max"|"min"), ...]``, the sweep's.
        settings: rung placement and tie-break.
    """

    def __init__(self, objectives: list[tuple[str, str]], settings: RungSettings) -> None:
        self.objectives = [(str(m), str(d)) for m, d in objectives]
        self.settings = settings
        #: milestone -> trial id -> {"values": [...], "keep": bool}, in arrival order.
        self.rungs: dict[int, dict[str, dict[str, Any]]] = {}
        self.stopped: list[str] = []

    def on_progress(self, trial_id: str, epoch: float, values: list[float]) -> RungDecision | None:
        """A trial reports ``values`` (one per objective; NaN = not measured) after ``epoch``
        epochs; returns the decision when this reaches a rung, else None (continue)."""
        milestones = self.settings.milestones_upto(epoch)
        if not milestones:
            return None
        milestone = milestones[-1]
        recorded = self.rungs.setdefault(milestone, {})
        if trial_id in recorded:
            if recorded[trial_id]["keep"]:
                return None  # already passed this rung
            return RungDecision(trial_id, milestone, False, -1, -1, len(recorded), 0, repeated=True)
        recorded[trial_id] = {"values": [float(v) for v in values], "keep": True}
        decision = self.decide(milestone, trial_id)
        recorded[trial_id]["keep"] = decision.keep
        if not decision.keep:
            self.stopped.append(trial_id)
        return decision

    def decide(self, milestone: int, trial_id: str) -> RungDecision:
        """Judge ``trial_id`` against every trial recorded at ``milestone`` (see module doc)."""
        recorded = self.rungs[milestone]
        ids = list(recorded)
        values = np.array([recorded[i]["values"] for i in ids], dtype=float)
        me = ids.index(trial_id)
        # Objectives the trial did not report (measured at the end only) are left out of this
        # comparison; other trials missing one that is used rank last.
        cols = [j for j in range(values.shape[1]) if math.isfinite(values[me, j])]
        size = len(ids)
        quota = max(1, math.ceil(size / float(self.settings.reduction_factor)))
        if not cols:
            return RungDecision(trial_id, milestone, True, 0, 0, size, quota)
        vals = values[:, cols]
        dirs = [self.objectives[j][1] for j in cols]
        from search import pareto  # not at import: checking a config's rungs needs none of it

        ranks = pareto.non_dominated_ranks(vals, dirs)
        score = self._tie_break_scores(vals, dirs, ranks)
        order = sorted(range(size), key=lambda i: (ranks[i], -score[i], i))
        position = order.index(me)
        keep = bool(ranks[me] == 0 or position < quota)
        return RungDecision(trial_id, milestone, keep, int(ranks[me]), position, size, quota)

    def _tie_break_scores(self, vals: np.ndarray, dirs: list[str], ranks: np.ndarray) -> np.ndarray:
        from search import pareto

        score = np.zeros(vals.shape[0], dtype=float)
        finite = np.isfinite(vals).all(axis=1)
        if not finite.any():
            return score
        reference = _rung_reference(vals[finite], dirs)
        for rank in np.unique(ranks[finite]):
            members = np.flatnonzero((ranks == rank) & finite)
            if self.settings.tie_break == "crowding":
                lo, hi = vals[finite].min(axis=0), vals[finite].max(axis=0)
                span = np.where(hi > lo, hi - lo, 1.0)
                score[members] = pareto.crowding_distance((vals[members] - lo) / span)
            else:
                score[members] = pareto.hypervolume_contributions(vals[members], dirs, reference)
        return score

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """A JSON-friendly copy of the records (for the state file)."""
        return {"objectives": self.objectives, "rungs": {str(m): r for m, r in self.rungs.items()},
                "stopped": list(self.stopped)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the records with a saved :meth:`state`."""
        self.rungs = {int(m): {t: {"values": [float(v) for v in rec["values"]], "keep": bool(rec["keep"])}
                               for t, rec in r.items()} for m, r in state.get("rungs", {}).items()}
        self.stopped = list(state.get("stopped", []))


def _rung_reference(vals: np.ndarray, dirs: list[str]) -> list[float]:
    """A hypervolume reference just past the worst value of each objective at a rung (10 % of
    the range, so the extreme trials still contribute)."""
    ref = []
    for j, d in enumerate(dirs):
        col = vals[:, j]
        span = float(col.max() - col.min())
        pad = 0.1 * span if span > 0 else max(0.1 * abs(float(col.max())), 1e-12)
        ref.append(float(col.min()) - pad if d == "max" else float(col.max()) + pad)
    return ref


def scheduler_kind(search: dict[str, Any]) -> str:
    """``none``, ``asha`` or ``mo_asha`` from ``search.scheduler`` (``null`` = ``asha`` when
    the older ``search.asha.enabled`` is true, else ``none``)."""
    kind = search.get("scheduler")
    enabled = bool((search.get("asha") or {}).get("enabled"))
    if kind is None:
        return "asha" if enabled else "none"
    if kind not in SCHEDULERS:
        raise ConfigError(f"search.scheduler: {kind!r} is not one of {list(SCHEDULERS)}")
    if enabled and kind != "asha":
        raise ConfigError(f"search.asha.enabled: true asks for the accuracy-only ASHA but search.scheduler is "
                          f"{kind!r}; drop one of them")
    return str(kind)


def rung_settings(search: dict[str, Any]) -> RungSettings:
    """The ``search.asha`` rung settings (ConfigError naming the key when one is bad)."""
    asha = search.get("asha") or {}
    factor = asha.get("reduction_factor", 3)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ConfigError(f"search.asha.reduction_factor: {factor!r} is not a number")
    try:
        return RungSettings(grace_period=asha.get("grace_period", 2), reduction_factor=float(factor),
                            tie_break=asha.get("tie_break", "hypervolume"))
    except (TypeError, ValueError) as exc:
        key = str(exc).split(" ", 1)[0]
        raise ConfigError(f"search.asha.{key}: {exc}") from exc

