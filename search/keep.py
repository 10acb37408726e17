"""What a finished trial keeps: its trained, pruned weights and the spec that rebuilds the model.

Every finished trial writes, beside its masks in ``trials/<trial id>/``, the model it was
measured on (:mod:`prunelib.artifact`: the masked weights with the zeros in place, or the
surgered model) and the model spec (the ``model`` section, a user's ``_target_`` with its
arguments, or a LightningModule that builds its own network); its MLflow child run gets the
same model as an MLflow model. ``trial.keep_weights`` says for which trials:

* ``all`` (default): every trial. Disk per trial: the model's state dict (4 bytes per float32
  parameter for a masked trial, the smaller model's for a surgered one): 0.2 MB for the demo's
  mlp, 3.4 MB for resnet56, 4.4 GB for a 1.1B-parameter LLM;
* ``front``: only trials on the current front of the sweep's objectives; a trial that leaves the
  front (a later trial dominates it) loses its weight files and its MLflow model, and its
  manifest records why (:func:`prune_off_front`, run as each trial finishes). The front points
  never lose theirs: a point dominated once stays dominated;
* ``none``: masks only (the previous behaviour); nothing to take home but the masks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunelib.artifact import MANIFEST_FILE, ModelSpec, mark_removed, remove_weights, weight_files
from prunelib.targets import accepted_parameters, resolve_target

__all__ = ["KEEP_WEIGHTS", "model_spec", "prune_off_front"]

log = logging.getLogger("search")

#: The values of ``trial.keep_weights`` (see the module doc).
KEEP_WEIGHTS = ("all", "front", "none")


def model_spec(model_cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int,
               module_cfg: Mapping[str, Any] | None = None, module_args: Mapping[str, Any] | None = None,
               network_is_model: bool = True) -> ModelSpec | None:
    """The spec that rebuilds a trial's original network.

    Args:
        model_cfg: the ``model`` section (``name`` and its keys, or ``_target_`` and its own).
        input_shape / num_classes: what the model was built for.
        module_cfg: the ``module`` section when a user's LightningModule trained it.
        module_args: the documented keys offered to that module (:func:`search.trials.training.build_module`).
        network_is_model: the network pruned is the model built from ``model_cfg`` (False: the
            module built its own).

    Returns:
        A ``"model"`` spec, a ``"module"`` spec (the module's ``_target_`` and the JSON keyword
        arguments it was called with: its own keys and the documented ones it names), or None
        when the network cannot be described (a module that takes ``model`` but trains another
        network); :func:`prunelib.artifact.load_pruned` then needs ``base_model``.
    """
    shape = tuple(int(s) for s in input_shape)
    if network_is_model:
        config = dict(model_cfg)
        if config.get("_target_") is None:
            config.pop("_target_", None)  # a reference model by name
        return ModelSpec("model", json.loads(json.dumps(config, default=str)), shape, int(num_classes))
    if not module_cfg or not module_cfg.get("_target_"):
        return None
    target = str(module_cfg["_target_"])
    named, _ = accepted_parameters(resolve_target(target, "module._target_"))
    if "model" in named:
        return None  # it was handed our model but trains another network: nothing to rebuild it from
    own = {k: v for k, v in module_cfg.items() if k != "_target_"}
    documented = {k: v for k, v in (module_args or {}).items() if k in named and k not in own and k != "model"}
    try:
        kwargs = json.loads(json.dumps({**documented, **own}))
    except TypeError:
        return None
    return ModelSpec("module", {"_target_": target, **kwargs}, shape, int(num_classes))


def _delete_model(tracking: Mapping[str, Any] | None, model_uri: Any) -> None:
    """Delete an MLflow model (``models:/<id>``) and its files; a failure only warns."""
    if not tracking or not isinstance(model_uri, str) or not model_uri.startswith("models:/"):
        return
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient(tracking_uri=tracking["uri"])
    model_id = model_uri[len("models:/"):].split("/", 1)[0]
    try:
        logged = client.get_logged_model(model_id)
        # delete_logged_model only marks it deleted; the weights are what take the disk.
        get_artifact_repository(logged.artifact_location).delete_artifacts()
        client.delete_logged_model(model_id)
    except Exception as exc:
        log.warning("could not delete MLflow model %s (%s: %s)", model_uri, type(exc).__name__, str(exc)[:200])


def _remove_remote(storage: Any, trial_id: str, reason: str) -> list[str]:
    """:func:`prunelib.artifact.remove_weights` for a trial folder under a URI storage root."""
    relative = f"trials/{trial_id}/{MANIFEST_FILE}"
    try:
        manifest = json.loads(storage.read_text(relative))
    except (OSError, ValueError):
        return []
    if manifest.get("weights_removed"):
        return []
    storage.write_text(relative, json.dumps(mark_removed(manifest, reason), indent=1))
    removed = []
    for rel in weight_files(manifest):
        if storage.delete(f"trials/{trial_id}/{rel}"):
            removed.append(rel)
    return removed


def prune_off_front(storage: Any, objectives: list[tuple[str, str]], tracking: Mapping[str, Any] | None,
                    by: str) -> list[str]:
    """``keep_weights=front``: remove the weights of the sweep's trials that are off the front.

    The front is that of the finished trials under the sweep's storage that keep front weights
    (``keep_weights == "front"`` in their row: reruns over seeds keep none and are not sweep
    points), on the sweep's ``objectives``. Each trial off it loses its weight files (masks and
    everything else stay; its manifest says why) and its MLflow model.

    Args:
        storage: the sweep's :class:`~search.storage.SweepStorage`.
        objectives: the sweep's ``[(metric, "max"|"min"), ...]``.
        tracking: the sweep's tracking dict (to delete MLflow models), or None.
        by: the trial whose result prompted this (named in the reason).

    Returns:
        The trial ids whose weights were removed now.
    """
    from search import pareto

    rows = [r for r in storage.finished_rows() if r.get("keep_weights") == "front"]
    if not rows:
        return []
    front = pareto.pareto_front(rows, objectives)
    on_front = {str(t) for t in front["trial_id"]} if len(front) else set()
    removed = []
    for row in rows:
        trial_id = str(row["trial_id"])
        if trial_id in on_front or not row.get("artifact_dir"):
            continue
        reason = f"trial.keep_weights=front: off the front of {[m for m, _ in objectives]} after trial {by}"
        local = storage.local_root()
        files = remove_weights(Path(row["artifact_dir"]), reason) if local is not None else \
            _remove_remote(storage, trial_id, reason)
        if files:
            _delete_model(tracking, row.get("model_uri"))
            removed.append(trial_id)
    return removed
