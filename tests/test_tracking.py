"""Tests for search.tracking against a real MLflow 3 sqlite store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from search.tracking import (  # noqa: E402
    MAX_ERROR_CHARS,
    SweepTracker,
    TrackingUnavailableError,
    check_tracking,
    find_trial_runs,
    log_trial_run,
)

OBJ = [("val_acc", "max"), ("flops_effective", "min")]


def _trial(i: int, acc: float, flops: float) -> tuple[dict, dict]:
    params = {"sparsity": 0.1 * i, "schedule": {"kind": "cubic", "steps": 3}}
    metrics = {"val_acc": acc, "flops_effective": flops, "flops_dense": 1000.0, "sparsity": 0.05 * i,
               "method": "magnitude" if i % 2 else "bingo", "epochs": 2}
    return params, metrics


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sqlite store, one parent run and three children (one failed), shared by the tests:
    initialising an MLflow sqlite database takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    check_tracking(uri)
    tracker = SweepTracker(uri, "test-sweep", artifact_location=str(root / "artifacts"))
    config = {"model": {"name": "mlp", "hidden": [64, 32]}, "search": {"n_trials": 3},
              "long": "x" * 7000, "k" * 300: 1, "optim": {"betas[0]": 0.9}}
    parent = tracker.start_parent("sweep-1", config, {"dataset": "digits"})
    rows = []
    children = {}
    for i, (acc, flops) in enumerate([(0.9, 600.0), (0.8, 300.0)]):
        params, metrics = _trial(i, acc, flops)
        tid = f"trial_{i:05d}"
        children[tid] = log_trial_run(uri, tracker.experiment_id, parent, tid, params, metrics)
        rows.append({**metrics, **{f"param.{k}": v for k, v in params.items()}, "trial_id": tid, "status": "ok"})
    children["trial_00002"] = log_trial_run(
        uri, tracker.experiment_id, parent, "trial_00002", {"sparsity": 0.99}, {"val_acc": float("nan")},
        status="FAILED", error="RuntimeError: boom\n" + "y" * 9000)
    rows.append({"trial_id": "trial_00002", "status": "failed"})
    return {"uri": uri, "root": root, "tracker": tracker, "parent": parent, "children": children, "rows": rows}


def test_children_linked_to_parent(sweep):
    client = MlflowClient(tracking_uri=sweep["uri"])
    for tid, run_id in sweep["children"].items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == sweep["parent"]
        assert run.data.tags["prunesearch.trial_id"] == tid
    failed = client.get_run(sweep["children"]["trial_00002"])
    assert failed.info.status == "FAILED"
    assert failed.data.tags["prunesearch.error"].startswith("RuntimeError: boom")
    assert len(failed.data.tags["prunesearch.error"]) <= MAX_ERROR_CHARS
    ok = client.get_run(sweep["children"]["trial_00000"])
    assert ok.info.status == "FINISHED"
    assert ok.data.metrics["val_acc"] == pytest.approx(0.9)
    assert ok.data.params["schedule.kind"] == "cubic"  # nested params flattened with dots
    assert "method" not in ok.data.metrics and ok.data.tags["prunesearch.info.method"] == "bingo"


def test_parent_params_flattened_and_truncated(sweep):
    run = MlflowClient(tracking_uri=sweep["uri"]).get_run(sweep["parent"])
    params = run.data.params
    assert params["model.name"] == "mlp" and params["search.n_trials"] == "3"
    assert len(params["long"]) <= 6000 and params["long"].endswith("]")
    assert all(len(k) <= 250 for k in params)
    assert params["optim.betas_0_"] == "0.9"  # characters MLflow rejects in keys are replaced
    assert run.data.tags["dataset"] == "digits" and "1 multiply-add = 2 FLOPs" in run.data.tags[
        "prunesearch.conventions"]
    assert "flops_deployed" in run.data.tags["prunesearch.conventions"]  # the default objective, declared
    artifact_uri = run.info.artifact_uri
    assert artifact_uri.startswith((sweep["root"] / "artifacts").as_uri())


def test_logging_a_trial_twice_reuses_the_child(sweep):
    params, metrics = _trial(1, 0.85, 300.0)
    run_id = log_trial_run(sweep["uri"], sweep["tracker"].experiment_id, sweep["parent"], "trial_00001",
                           params, metrics)
    assert run_id == sweep["children"]["trial_00001"]
    trials = find_trial_runs(sweep["uri"], sweep["parent"])
    assert sorted(t["trial_id"] for t in trials) == ["trial_00000", "trial_00001", "trial_00002"]
    by_id = {t["trial_id"]: t for t in trials}
    assert by_id["trial_00001"]["val_acc"] == pytest.approx(0.85)  # latest value wins
    assert by_id["trial_00000"]["status"] == "ok" and by_id["trial_00000"]["method"] == "bingo"
    assert by_id["trial_00000"]["param.schedule.steps"] == 3  # parsed back to int
    assert by_id["trial_00002"]["status"] == "failed" and by_id["trial_00002"]["error"].startswith("RuntimeError")


def test_trial_artifacts(sweep, tmp_path):
    mask = tmp_path / "masks.safetensors"
    mask.write_bytes(b"\0" * 64)
    run_id = log_trial_run(sweep["uri"], sweep["tracker"].experiment_id, sweep["parent"], "trial_00000",
                           {}, {"test_acc": 0.88}, artifacts={"masks": str(mask)})
    assert run_id == sweep["children"]["trial_00000"]
    client = MlflowClient(tracking_uri=sweep["uri"])
    assert [f.path for f in client.list_artifacts(run_id, "masks")] == ["masks/masks.safetensors"]
    with pytest.raises(FileNotFoundError):
        log_trial_run(sweep["uri"], sweep["tracker"].experiment_id, sweep["parent"], "trial_x", {}, {},
                      artifacts={"masks": str(tmp_path / "missing")})


def test_log_front_artifacts_and_hypervolume_history(sweep):
    tracker, rows = sweep["tracker"], sweep["rows"]
    first = tracker.log_front(rows[:1], OBJ, step=1)
    second = tracker.log_front(rows, OBJ, step=3)
    # Reference (0 accuracy, dense 1000 FLOPs): 0.9*400 = 360, then + 0.8*(700-400) = 600.
    assert first["hypervolume"] == pytest.approx(360.0) and first["front_size"] == 1
    assert second["hypervolume"] == pytest.approx(600.0) and second["front_size"] == 2
    client = MlflowClient(tracking_uri=sweep["uri"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(sweep["parent"], "hypervolume"))
    assert history == [(1, pytest.approx(360.0)), (3, pytest.approx(600.0))]
    sizes = sorted((m.step, m.value) for m in client.get_metric_history(sweep["parent"], "front_size"))
    assert sizes == [(1, 1.0), (3, 2.0)]
    files = {Path(f.path).name: f.file_size for f in client.list_artifacts(sweep["parent"], "front")}
    assert set(files) == {"front.csv", "trials.csv", "front.png", "front.html", "accuracy_vs_sparsity.png"}
    assert all(size and size > 0 for size in files.values())
    front_csv = Path(client.download_artifacts(sweep["parent"], "front/front.csv", str(sweep["root"])))
    assert front_csv.read_text().count("\n") == 3  # header + 2 front rows: overwritten, not the first


def test_resume_and_finish(sweep):
    tracker = SweepTracker(sweep["uri"], "test-sweep")
    run_id = tracker.start_parent("sweep-1", {"model": {"name": "CHANGED"}, "new_key": 5}, {"resumed": "yes"},
                                  resume_run_id=sweep["parent"])
    assert run_id == sweep["parent"] and tracker.experiment_id == sweep["tracker"].experiment_id
    tracker.finish("FINISHED")
    run = MlflowClient(tracking_uri=sweep["uri"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mlp" and run.data.params["new_key"] == "5"
    assert run.data.tags["resumed"] == "yes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_tracking_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        check_tracking(uri, timeout_s=5)
    assert time.monotonic() - t0 < 5
    assert uri in str(err.value) and "mlflow server --host 127.0.0.1 --port 5000" in str(err.value)


def test_check_tracking_local_stores(tmp_path):
    check_tracking(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
    check_tracking((tmp_path / "mlruns").as_uri())
    assert (tmp_path / "mlruns").is_dir()
    # A regular file where the database directory should be: not creatable, even as root.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(TrackingUnavailableError, match="cannot create directory"):
        check_tracking(f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(TrackingUnavailableError, match="not_a_dir"):
        check_tracking((blocker / "mlruns").as_uri())
