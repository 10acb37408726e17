"""Early stopping for sweeps: accuracy-only ASHA (Ray's) and multi-objective ASHA (``mo_asha``).

``search.scheduler`` picks one: ``none``, ``asha`` (Ray's :class:`ASHAScheduler` on the first
objective alone, today's ``search.asha.enabled=true``) or ``mo_asha``
(:class:`~search.mo_asha.MultiObjectiveASHA`, the Ray Tune scheduler, built by
:func:`~search.mo_asha.build_scheduler`). Both read their rungs from ``search.asha``: a first rung after
``grace_period`` epochs, then one every ``reduction_factor`` times as many epochs.

Multi-objective successive halving (asynchronous, like ASHA): when a trial reaches a rung it
is compared with every trial that reached the same rung before it, on the sweep's objectives
(accuracy up, FLOPs down by default). It continues when

* it is non-dominated among them (a cheap, slightly less accurate trial stays), or
* it is within the best ``ceil(n / reduction_factor)`` of the ``n`` trials ordered by
  non-dominated rank, ties within a rank broken by hypervolume contribution
  (``tie_break: hypervolume``) or NSGA-II crowding distance (``tie_break: crowding``);

otherwise it stops. The objectives are read from the trial's per-epoch report; a
``projected_<metric>`` value, when the report carries one, is used instead of ``<metric>``:
methods whose sparsity ramps during training (or is cut at the end) report the FLOPs of the
masks they are heading for (:meth:`prunelib.methods.base.PruningMethod.projected_masks`), and
the validation accuracy of the model with those masks applied now, so a rung compares where
trials are going, and both objectives describe one model (a dense model's accuracy at a
sparse one's FLOPs would make the sparsest one-shot trial dominate all its siblings). That
accuracy is before any recovery: pessimistic for methods that recover after a cut.

Resume: the rungs are kept in ``mo_asha_state.json``, written after every decision into the
driver's copy of the Ray experiment directory, which Tune uploads with its experiment state
and downloads on restore (so the rungs and Tune's trial states are saved together); a trial
that reaches a rung it was already judged at (restarted after the driver died) gets the same
decision again.

Where things are: the rungs' settings, bookkeeping and decisions in :mod:`search.rungs` (plain
Python, what checking a config needs), the Ray Tune schedulers in :mod:`search.mo_asha` (loaded on
first use of their names here, so checking a config does not import Ray Tune).
"""

from __future__ import annotations

from typing import Any

from search.rungs import (PROJECTED_PREFIX, SCHEDULERS, STATE_FILE, TIE_BREAKS, RungBook, RungDecision, RungSettings,
                          rung_settings, scheduler_kind)

__all__ = ["PROJECTED_PREFIX", "SCHEDULERS", "STATE_FILE", "TIE_BREAKS", "MultiObjectiveASHA", "RungBook",
           "RungDecision", "RungSettings", "build_scheduler", "rung_settings", "scheduler_kind"]


def __getattr__(name: str) -> Any:
    if name in ("MultiObjectiveASHA", "build_scheduler"):
        from search import mo_asha

        return getattr(mo_asha, name)
    raise AttributeError(f"module 'search.schedulers' has no attribute {name!r}")
