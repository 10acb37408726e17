"""End to end: `python -m search` config -> Ray Tune + Optuna -> MLflow parent/children -> front -> export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from prunelib.masks import MaskSet
from prunelib.models import build_model
from search.export import export_point
from search.tracking import find_trial_runs
from search.tuner import run_sweep
from tests.conftest import REPO, compose

FAST = ["trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400", "search.concurrency=2"]


@pytest.mark.parametrize("override, key", [
    ("+method=magnitude method.settings.sparsity=1.5", "method[magnitude].settings.sparsity: 1.5"),
    ("trial.epochs=-1", "trial.epochs: -1"),
    ("+method=nonexistent", "method/nonexistent"),
])
def test_cli_rejects_bad_values_before_any_trial(tmp_path, override, key):
    proc = subprocess.run([sys.executable, "-m", "search", *override.split(),
                           f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert key in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "ray").exists()  # no trial started
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked


@pytest.fixture(scope="module")
def pinned_sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = compose(["+method=magnitude", "search.n_trials=3", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *FAST])
    result = run_sweep(cfg, tmp / "out")
    return tmp, cfg, result


def test_pinned_sweep_tracks_parent_children_and_front(pinned_sweep):
    tmp, cfg, result = pinned_sweep
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert len(result.rows) == 3 and all(r["status"] == "ok" for r in result.rows)
    children = find_trial_runs(uri, result.parent_run_id)
    assert sorted(c["trial_id"] for c in children) == sorted(r["trial_id"] for r in result.rows)
    assert all(c["method"] == "magnitude" and 0 < c["val_acc"] <= 1 for c in children)
    for c in children:
        for key in ("test_acc", "flops_dense", "flops_effective", "flops_physical", "flops_deployed",
                    "params_effective", "params_deployed", "artifact", "sparsity", "epochs", "wall_s",
                    "extra_forward_passes"):
            assert key in c, key
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    history = client.get_metric_history(result.parent_run_id, "hypervolume")
    assert sorted(m.step for m in history) == [1, 2, 3]
    names = {a.path for a in client.list_artifacts(result.parent_run_id, "front")}
    assert {"front/front.csv", "front/front.png", "front/front.html", "front/trials.csv"} <= names
    # Every trial's files under the sweep's own directory, none in Ray's temporary folders.
    for row in result.rows:
        assert Path(row["masks_path"]).parent == tmp / "out" / "trials" / row["trial_id"]
        assert (tmp / "out" / "trials" / row["trial_id"] / "trial_result.json").is_file()
    # Each child run lasted its trial (created as it started), with one val_acc entry per epoch,
    # and its artifacts exist where MLflow says they are; Tune wrote no TensorBoard event files.
    rows = {r["trial_id"]: r for r in result.rows}
    for c in children:
        run = client.get_run(c["run_id"])
        assert run.info.status == "FINISHED"
        assert (run.info.end_time - run.info.start_time) / 1000 >= rows[c["trial_id"]]["trial_wall_s"]
        steps = [m.step for m in client.get_metric_history(c["run_id"], "val_acc")]
        assert sorted(steps) == list(range(int(c["epochs"]))), steps
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        assert (artifacts / "masks" / "masks.safetensors").is_file() and Path(c["masks_path"]).is_file()
    assert not list((tmp / "out" / "ray").rglob("events.out.tfevents*"))
    # The Optuna study is stored beside the MLflow store and opens with optuna.load_study.
    import optuna

    state = json.loads((tmp / "out" / "sweep.json").read_text())
    assert state["optuna_storage"] == f"sqlite:///{tmp}/optuna.db"
    study = optuna.load_study(study_name=state["optuna_study"], storage=state["optuna_storage"])
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    # The front's masks were copied under the output directory and load onto the model.
    masks_files = sorted((tmp / "out" / "front").glob("*.safetensors"))
    assert len(masks_files) == len(result.front) >= 1
    model = build_model("mlp", (1, 8, 8), 10)
    for f in masks_files:
        masks = MaskSet.load(f, model)
        assert masks.metadata["method"] == "magnitude"


def test_trials_reuse_their_worker_process(pinned_sweep):
    _tmp, _cfg, result = pinned_sweep
    # Three trials at concurrency 2: two workers, and the third trial runs on one of them (Tune's
    # actor reuse keeps the process: its imports, data and MLflow store stay warm).
    assert len({r["worker_pid"] for r in result.rows}) == 2
    assert sorted(r["worker_trials"] for r in result.rows) == [1, 1, 2]


def test_export_picks_a_point_and_writes_a_loadable_masks_file(pinned_sweep):
    tmp, cfg, result = pinned_sweep
    uri = f"sqlite:///{tmp}/mlflow.db"
    row = export_point(uri, result.parent_run_id, "max_acc", tmp / "best.safetensors")
    assert row["val_acc"] == pytest.approx(max(r["val_acc"] for r in result.rows))
    masks = MaskSet.load(tmp / "best.safetensors", build_model("mlp", (1, 8, 8), 10))
    assert masks.metadata["trial_id"] == row["trial_id"]
    with pytest.raises(ValueError, match="smallest flops_deployed"):  # the default figure selects
        export_point(uri, result.parent_run_id, "flops_le:1", tmp / "none.safetensors")
    proc = subprocess.run([sys.executable, "-m", "search.export", f"run_id={result.parent_run_id}",
                           "select=knee", f"out={tmp}/knee.safetensors", f"tracking.uri={uri}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "artifact=masked" in proc.stdout and "flops_deployed=" in proc.stdout
    assert (tmp / "knee.safetensors").is_file()


def test_unpinned_sweep_explores_several_methods(tmp_path, ray_local):
    cfg = compose(["search.n_trials=6", "search.n_startup_trials=6", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   *FAST])
    result = run_sweep(cfg, tmp_path / "out")
    methods = {r["method"] for r in result.rows}
    assert len(methods) >= 2, methods
    assert result.hypervolume > 0


def test_nsga2_with_asha_and_a_latency_objective(tmp_path, ray_local):
    cfg = compose(["+method=gmp", "search=nsga2", "search.n_trials=4", "search.asha.enabled=true",
                   "search.asha.grace_period=1", "search.asha.reduction_factor=2",
                   "search.objectives=[{metric: val_acc, mode: max}, {metric: latency_ms, mode: min}]",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "trial.epochs=3", *FAST[1:]])
    result = run_sweep(cfg, tmp_path / "out")
    assert len(result.rows) == 4
    assert all(r["status"] in ("ok", "early_stopped") for r in result.rows)
    finished = [r for r in result.rows if r["status"] == "ok"]
    assert finished and all(r["latency_ms"] > 0 for r in finished)
    # ASHA saw per-epoch reports: a finished trial reported every epoch before its final result;
    # a trial ASHA stopped ends on an intermediate report.
    assert all(r["training_iteration"] >= 2 for r in finished)
    assert all(r["final_result"] is False for r in result.rows if r["status"] == "early_stopped")
    # ... and it did stop one (the sweep is seeded: the same trials every run), before its last epoch.
    stopped = [r for r in result.rows if r["status"] == "early_stopped"]
    assert stopped and all(r["training_iteration"] < 3 for r in stopped)
