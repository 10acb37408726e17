"""The old home of the trial side of a sweep's progress, kept for imports: it lives in
:mod:`search.trials.progress` (re-exported here; :mod:`search.progress` loads that module lazily).

Nothing in ``search`` imports this module (new code imports :mod:`search.trials`); it stays
for the tests, benchmarks and users' code that import the old path."""

from search.trials.progress import TrialProgress, trial_progress

__all__ = ["TrialProgress", "trial_progress"]
