"""The old home of one trial, kept for imports (``from search.trial import run_trial``): the
trial protocol lives in :mod:`search.trials` (this module only re-exports its public names).

Nothing in ``search`` imports this module (new code imports :mod:`search.trials`); it stays
for the tests, benchmarks and users' code that import the old path."""

from search.trials.common import (ObjectiveNotLoggedError, TrialFailed, adopt_finished, collapse_metrics,
                                  measure_latency_ms, record_trial, trial_output_dir, wants_latency)
from search.trials.context import TrialContext
from search.trials.run import run_trial, run_tune_trial
from search.trials.training import DOCUMENTED_MODULE_KEYS, build_module, get_datamodule, module_args

__all__ = ["DOCUMENTED_MODULE_KEYS", "ObjectiveNotLoggedError", "TrialContext", "TrialFailed", "adopt_finished",
           "build_module", "collapse_metrics", "get_datamodule", "measure_latency_ms", "module_args", "record_trial",
           "run_trial", "run_tune_trial", "trial_output_dir", "wants_latency"]
