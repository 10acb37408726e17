"""The old home of :class:`TrialContext` and the Tune trainable, kept for imports: they live in
:mod:`search.trials.context` (this module only re-exports its public names; no training stack).

Nothing in ``search`` imports this module (new code imports :mod:`search.trials`); it stays
for the tests, benchmarks and users' code that import the old path."""

from search.trials.context import FAILED_FILE, TrialContext, TrialFailedBefore, earlier_failure, record_failure
from search.trials.trainable import ray_trainable

__all__ = ["FAILED_FILE", "TrialContext", "TrialFailedBefore", "earlier_failure", "ray_trainable", "record_failure"]
