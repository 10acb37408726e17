"""The Ray Tune trainable the driver hands to Tune (:func:`ray_trainable`): importable without the
training stack; the worker that runs it imports :mod:`search.trials.run`."""

from __future__ import annotations

from typing import Any

from search.trials.context import TrialContext, TrialFailedBefore, earlier_failure

__all__ = ["ray_trainable"]


def ray_trainable(params: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial (:func:`search.trials.run.run_tune_trial`) in a worker.

    Raises:
        TrialFailedBefore: Tune retries a trial that failed deterministically (see the module
            docstring of :mod:`search.trials.context`); nothing of the trial runs again.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id() or "trial"
    line = earlier_failure(ctx, trial_id)
    if line is not None:
        raise TrialFailedBefore(line)
    from search.trials.run import run_tune_trial

    run_tune_trial(params, ctx)
