"""The old home of the trial side of a sweep's progress, kept for :mod:`search.progress` (which
loads it lazily): it lives in :mod:`search.trials.progress` (re-exported here)."""

from search.trials.progress import TrialProgress, trial_progress

__all__ = ["TrialProgress", "trial_progress"]
