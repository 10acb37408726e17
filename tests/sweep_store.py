"""Small MLflow stores for the dashboard's tests, written with the sweep's own tracking code
(SweepTracker, log_trial_run) but without Ray: trials with per-layer sparsity, a picture,
per-epoch history and conditional settings, and a parent run with the dense model's metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from search.tracking import SweepTracker, log_trial_run

OBJECTIVES = [["val_acc", "max"], ["flops_effective", "min"]]
DENSE = {"dense_val_acc": 0.95, "dense_flops": 120400.0, "dense_params": 4000.0}
LAYERS = ("net.1.weight", "net.3.weight")


def start_sweep(uri: str, name: str, dense: dict[str, float] | None = None,
                methods: str = "magnitude,snip") -> tuple[SweepTracker, str]:
    """A sweep's parent run (RUNNING), with ``dense`` logged as its metrics; returns (tracker, run id)."""
    tracker = SweepTracker(uri, "prunesearch")
    parent = tracker.start_parent(name, params={"search": {"n_trials": 5}}, tags={
        "prunesearch.objectives": json.dumps(OBJECTIVES), "prunesearch.methods": methods,
        "prunesearch.data": "digits", "prunesearch.model": "mlp"})
    client = MlflowClient(tracking_uri=uri)
    for key, value in (dense or {}).items():
        client.log_metric(parent, key, value)
    return tracker, parent


def _picture(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def log_trial(uri: str, tracker: SweepTracker, parent: str, tmp: Path, trial_id: str, method: str, acc: float,
              flops: float, sparsity: float, epochs: int = 0, extra: Path | None = None) -> str:
    """One finished trial as the sweep logs it; returns its run id.

    snip trials carry the conditional setting ``scope`` (magnitude trials do not); with
    ``epochs`` the trial also has a per-epoch history (step = epoch) of val_acc, val_loss,
    train_loss and sparsity ending at ``acc`` / ``sparsity``; ``extra`` is logged as the
    artifact folder ``extra/``.
    """
    layers = tmp / f"{trial_id}-layers" / "layer_sparsity.json"
    layers.parent.mkdir(parents=True, exist_ok=True)
    layers.write_text(json.dumps({LAYERS[0]: sparsity, LAYERS[1]: 0.75}))
    artifacts = {"layers": str(layers), "viz": str(_picture(tmp / f"{trial_id}.png"))}
    if extra is not None:
        artifacts["extra"] = str(extra)
    params = {"method": method, "sparsity": sparsity, **({"scope": "layer"} if method == "snip" else {})}
    run_id = log_trial_run(uri, tracker.experiment_id, parent, trial_id, params=params,
                           metrics={"val_acc": acc, "flops_effective": flops, "flops_dense": DENSE["dense_flops"],
                                    "sparsity": sparsity, "method": method}, artifacts=artifacts)
    if epochs:
        ts = int(time.time() * 1000) + 1000  # after the trial's own log, so the epochs are the latest values
        done = [(e + 1) / epochs for e in range(epochs)]
        MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=[
            Metric(name, value, ts + e, e) for e, f in enumerate(done) for name, value in (
                ("val_acc", acc * f), ("val_loss", 2.0 - f), ("train_loss", 2.5 - 1.5 * f), ("sparsity", sparsity * f))])
    return run_id
