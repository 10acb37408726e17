"""What the dashboard reads from MLflow: sweeps, their trials and fronts, trial artifacts.

Plain functions over an ``MlflowClient`` so they can be tested without a browser or server.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from search import pareto
from search.commands import export_command
from search.tracking import TAG_ROLE, find_trial_runs

__all__ = ["list_sweeps", "sweep_detail", "trial_detail", "artifact_file"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


def _finite(value: Any) -> Any:
    # JSON has no NaN/inf: the browser gets null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def list_sweeps(client: MlflowClient) -> list[dict[str, Any]]:
    """Every sweep (parent run tagged ``prunesearch.role=sweep``), newest first."""
    experiments = client.search_experiments()
    if not experiments:
        return []
    runs = client.search_runs([e.experiment_id for e in experiments],
                              filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=500)
    names = {e.experiment_id: e.name for e in experiments}
    return [{
        "run_id": r.info.run_id,
        "name": r.info.run_name,
        "experiment": names.get(r.info.experiment_id, r.info.experiment_id),
        "status": r.info.status,
        "start_time": r.info.start_time,
        "methods": r.data.tags.get("prunesearch.methods", ""),
        "data": r.data.tags.get("prunesearch.data", ""),
        "model": r.data.tags.get("prunesearch.model", ""),
        "hypervolume": _finite(r.data.metrics.get("final_hypervolume")),
    } for r in runs]


def _objectives(client: MlflowClient, run_id: str) -> list[tuple[str, str]]:
    tag = client.get_run(run_id).data.tags.get("prunesearch.objectives")
    return [tuple(o) for o in json.loads(tag)] if tag else [("val_acc", "max"), ("flops_effective", "min")]


def sweep_detail(client: MlflowClient, uri: str, run_id: str) -> dict[str, Any]:
    """A sweep's objectives, its trials (flat rows) and the Pareto front of each method.

    ``fronts`` maps method -> trial ids on that method's own front; ``front`` is the sweep's
    overall front. Failed trials are listed with their error but are on no front.
    """
    objectives = _objectives(client, run_id)
    rows = find_trial_runs(uri, run_id)
    ok = [r for r in rows if r["status"] == "ok"]
    fronts: dict[str, list[str]] = {}
    for method in sorted({str(r.get("method")) for r in ok}):
        subset = [r for r in ok if str(r.get("method")) == method]
        fronts[method] = [str(t) for t in pareto.pareto_front(subset, objectives)["trial_id"]]
    overall = [str(t) for t in pareto.pareto_front(ok, objectives)["trial_id"]] if ok else []
    keep = {m for m, _ in objectives} | {"val_acc", "test_acc", "sparsity", "flops_dense", "flops_effective",
                                         "flops_physical", "params", "method", "trial_id", "run_id",
                                         "status", "error", "reverted_fraction", "fgsm_acc", "wall_s"}
    trials = [{k: _finite(v) for k, v in r.items() if k in keep or k.startswith("param.")} for r in rows]
    return {"run_id": run_id, "objectives": objectives, "trials": trials, "fronts": fronts, "front": overall}


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def artifact_file(client: MlflowClient, run_id: str, path: str, cache: Path) -> Path:
    """Download one artifact of ``run_id`` (once) and return its local path."""
    # One folder per artifact path: MLflow drops the path's folders when it downloads a file.
    target = cache / run_id / Path(path).parent
    local = target / Path(path).name
    if not local.is_file():
        target.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(run_id, path, str(target)))
    return local


def trial_detail(client: MlflowClient, run_id: str, parent_run_id: str, uri: str,
                 cache: Path | None = None) -> dict[str, Any]:
    """One trial: params, metrics, per-layer sparsity, pictures and its export command."""
    run = client.get_run(run_id)
    cache = cache or Path(tempfile.gettempdir()) / "prunesearch-dashboard"
    paths = _artifact_paths(client, run_id)
    layers: dict[str, float] = {}
    # The trial logs its per-layer sparsity under "layers/" (layer_sparsity.json).
    layer_file = next((p for p in paths if p.endswith("layer_sparsity.json")
                       or (p.startswith("layers/") and p.endswith(".json"))), None)
    if layer_file:
        layers = json.loads(artifact_file(client, run_id, layer_file, cache).read_text())
    trial_id = run.data.tags.get("prunesearch.trial_id", run.info.run_name)
    return {
        "run_id": run_id,
        "trial_id": trial_id,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": {k: _finite(v) for k, v in run.data.metrics.items()},
        "info": {k.split("prunesearch.info.", 1)[1]: v for k, v in run.data.tags.items()
                 if k.startswith("prunesearch.info.")},
        "error": run.data.tags.get("prunesearch.error"),
        "layer_sparsity": layers,
        "images": [p for p in paths if p.lower().endswith(_IMAGE_SUFFIXES)],
        "export_command": export_command(parent_run_id, f"trial:{trial_id}", f"masks-{trial_id}.safetensors", uri),
    }
