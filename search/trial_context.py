"""What the sweep's driver hands each trial: :class:`TrialContext` and the Tune trainable.

Both are importable without torch's training stack: the driver builds the context and passes
:func:`ray_trainable` to Tune, and only the worker that runs it imports :mod:`search.trial`
(Lightning, the methods, the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from search.space import SearchSpace

__all__ = ["TrialContext", "ray_trainable"]


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled parameters (picklable, sent once).

    Attributes:
        data: the ``data`` config section (see :func:`prunelib.data.datamodule_from_config`).
        model: the ``model`` config section (``name``, or ``_target_`` and its own keys).
        trial: the ``trial`` config section (epochs, optimizer, resources...).
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
    extra: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] | None = None
    sweep_root: str | None = None
    resumed: bool = False
    driver: dict[str, Any] | None = None


def ray_trainable(params: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial (:func:`search.trial.run_tune_trial`) in a worker."""
    from search.trial import run_tune_trial

    run_tune_trial(params, ctx)
