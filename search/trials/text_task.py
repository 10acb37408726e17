"""What kind of text sweep a config is (Hugging Face text trials or not; language modelling or
classification) and the objectives such a sweep defaults to. A leaf of ``search``: the settings,
the pre-flight and the trial kinds read it, and it imports none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from prunelib.data.text import TextDataError, read_text_records
from search.paths import resolve_launch_path
from search.trials.metrics import FLOPS_DEPLOYED, VAL_ACC, VAL_PPL

__all__ = ["default_text_objectives", "is_text_config", "is_missing", "text_task"]


def is_text_config(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> bool:
    """Whether a sweep runs Hugging Face text trials (``model=hf`` or ``data=text``)."""
    return (model_cfg or {}).get("name") == "hf" or (data_cfg or {}).get("name") == "text"


def text_task(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None) -> str | None:
    """``"lm"`` (language modelling: a causal LM) or ``"classification"`` for a text config;
    None when it cannot be told yet (a missing file: the pre-flight names ``data.path`` later).

    ``model.task`` or ``data.task`` when set, else ``data.task=auto``'s rule: a table with the
    label column is classification, plain text (or a table without it) is language modelling.
    """
    model_task = (model_cfg or {}).get("task", "auto")
    if model_task in ("causal_lm", "classification"):
        return "lm" if model_task == "causal_lm" else "classification"
    task = (data_cfg or {}).get("task", "auto")
    if task in ("lm", "classification"):
        return str(task)
    path = (data_cfg or {}).get("path")
    if is_missing(path):
        return None
    return _records_task(str(resolve_launch_path(str(path))), str(data_cfg.get("text_column", "text")),
                         data_cfg.get("label_column", "label"))


@functools.lru_cache(maxsize=16)
def _records_task(path: str, text_column: str, label_column: str | None) -> str | None:
    try:
        records = read_text_records(path, text_column, label_column)
    except (TextDataError, OSError):
        return None
    return "lm" if records.labels is None else "classification"


def default_text_objectives(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None
                            ) -> list[dict[str, str]]:
    """The objectives of a text sweep that names none (``search.objectives: null``): perplexity
    (``val_ppl``, min) of a causal LM, accuracy (``val_acc``, max) of a classifier, each against
    ``flops_deployed`` (min)."""
    first = {"metric": VAL_PPL, "mode": "min"} if text_task(data_cfg, model_cfg) == "lm" else \
        {"metric": VAL_ACC, "mode": "max"}
    return [first, {"metric": FLOPS_DEPLOYED, "mode": "min"}]


def is_missing(value: Any) -> bool:
    return value is None or value == "???" or value == ""
