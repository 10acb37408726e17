"""The old home of KEN's pair, kept for imports (``from search.pair import get_pair``): it lives
in :mod:`search.trials.ken` (this module only re-exports its public names).

Nothing in ``search`` imports this module (new code imports :mod:`search.trials`); it stays
for the tests, benchmarks and users' code that import the old path."""

from search.trials.ken import (PAIR_FORMAT_VERSION, PairError, class_subset, default_cache_dir, finish_ken_trial,
                               get_pair, load_checkpoint, load_checkpoint_pair, pair_key, run_ken_trial)

__all__ = ["PAIR_FORMAT_VERSION", "PairError", "class_subset", "default_cache_dir", "finish_ken_trial", "get_pair",
           "load_checkpoint", "load_checkpoint_pair", "pair_key", "run_ken_trial"]
