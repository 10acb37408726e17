"""The progress board a sweep's trials write and its driver reads: Ray's key-value store under one
key per trial, and the line formats both sides share (seconds; no Lightning, no Ray import).

:mod:`search.progress` (the driver's display) and :mod:`search.trials.progress` (the trial's
callback) both import from here, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from search.formatting import format_metric

__all__ = ["NAMESPACE", "SEND_AFTER_S", "SEND_INTERVAL_S", "board_name", "fetch", "forget", "format_duration",
           "format_epoch_line", "publish"]

#: A trial sends no live record before this (seconds), then at most one per SEND_INTERVAL_S.
SEND_AFTER_S = 1.0
SEND_INTERVAL_S = 1.0
NAMESPACE = "prunesearch"


def board_name(sweep_root: str) -> str:
    """The key prefix of a sweep's progress board (the same for the driver, its workers and a
    resumed driver: it is made from the sweep's storage root)."""
    return "prunesearch-progress-" + hashlib.sha1(str(sweep_root).encode()).hexdigest()[:12]


def format_duration(seconds: float | None) -> str:
    """``8s``, ``1m05s``, ``2h03m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _value(name: str, value: Any) -> str:
    return "-" if value is None else format_metric(name, value)


def format_epoch_line(record: Mapping[str, Any]) -> str:
    """One line per finished epoch (``trial.verbose``): the validation metric only when that
    epoch was validated (ASHA sweeps validate every epoch)."""
    metric = record.get("metric") or "val_acc"
    validated = record.get("value_epoch") == record.get("epoch")
    val = f"  {metric} {_value(metric, record.get('value'))}" if validated else ""
    return (f"  {record['trial']} {str(record.get('method') or '?'):<10} {str(record.get('phase') or ''):<8} "
            f"epoch {record.get('epoch', 0)}/{record.get('epochs', 0)}  loss {_value('loss', record.get('loss'))}"
            f"{val}  sparsity {_value('sparsity', record.get('sparsity'))}  {format_duration(record.get('elapsed_s'))}")


def _kv() -> Any:
    """Ray's internal key-value store (in the cluster's GCS; what Ray Tune's own registry
    uses), or None when this process is not connected to Ray."""
    if "ray" not in sys.modules:
        return None
    from ray.experimental import internal_kv

    return internal_kv if internal_kv._internal_kv_initialized() else None


def publish(board: str, trial_id: str, state: Mapping[str, Any]) -> bool:
    """Store a trial's progress ``state`` (``{"live": record, "epochs": [records]}``) under the
    sweep's board; False when Ray is not reachable from here."""
    kv = _kv()
    if kv is None:
        return False
    kv._internal_kv_put(f"{board}/{trial_id}", json.dumps(state, default=float), True, namespace=NAMESPACE)
    return True


def fetch(board: str, trial_id: str | None = None) -> dict[str, dict[str, Any]]:
    """The progress states on the board: every trial's, or one trial's; ``{trial id: state}``."""
    kv = _kv()
    if kv is None:
        return {}
    keys = ([f"{board}/{trial_id}".encode()] if trial_id is not None
            else kv._internal_kv_list(f"{board}/", namespace=NAMESPACE))
    out = {}
    for key in keys:
        raw = kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw:
            out[key.decode().rsplit("/", 1)[-1]] = json.loads(raw)
    return out


def forget(board: str, trial_id: str | None = None) -> None:
    """Remove a trial's progress (or the whole board's) from the store."""
    kv = _kv()
    if kv is not None:
        kv._internal_kv_del(f"{board}/{trial_id}" if trial_id is not None else f"{board}/",
                            del_by_prefix=trial_id is None, namespace=NAMESPACE)
