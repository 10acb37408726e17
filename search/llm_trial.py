"""The old home of the text-config checks, kept for imports (``from search.llm_trial import
check_text_data``): they live in :mod:`search.trials.text_config`, the text trials in
:mod:`search.trials.text` (this module re-exports the checks only: no training stack).

Nothing in ``search`` imports this module (new code imports :mod:`search.trials`); it stays
for the tests, benchmarks and users' code that import the old path."""

from search.trials.metrics import TEXT_OBJECTIVES
from search.trials.text_config import (HF_MODEL_KEYS, TEXT_DATA_KEYS, check_text_data, is_text_config,
                                       methods_for_model, validate_text_config)

__all__ = ["HF_MODEL_KEYS", "TEXT_DATA_KEYS", "TEXT_OBJECTIVES", "check_text_data", "is_text_config",
           "methods_for_model", "validate_text_config"]
