"""Tests for search.tracking against a real MLflow 3 sqlite store."""

from __future__ import annotations

import socket
import threading
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


def test_a_rerun_trial_retires_its_earlier_attempt_and_the_sweep_ends_unfinished_runs(sweep):
    from search.tracking import TAG_SUPERSEDED_BY, end_unfinished_trial_runs, start_trial_run

    uri, parent, exp = sweep["uri"], sweep["parent"], sweep["tracker"].experiment_id
    client = MlflowClient(tracking_uri=uri)
    first = start_trial_run(uri, exp, parent, "rerun_me", {"method": "magnitude", "sparsity": 0.5})
    assert client.get_run(first).info.status == "RUNNING"  # its driver is killed here, say
    second = start_trial_run(uri, exp, parent, "rerun_me", {"method": "magnitude", "sparsity": 0.5})
    old = client.get_run(first)
    assert second != first and old.info.status == "KILLED" and old.info.lifecycle_stage == "deleted"
    assert old.data.tags[TAG_SUPERSEDED_BY] == second
    assert [r["run_id"] for r in find_trial_runs(uri, parent) if r["trial_id"] == "rerun_me"] == [second]
    assert client.get_run(second).data.params == {"method": "magnitude", "sparsity": "0.5"}
    # The sweep is over and the trial never ended its run: it is ended KILLED with the reason.
    assert end_unfinished_trial_runs(uri, parent, "stopped early") == ["rerun_me"]
    run = client.get_run(second)
    assert run.info.status == "KILLED" and run.data.tags["prunesearch.error"] == "stopped early"
    assert end_unfinished_trial_runs(uri, parent, "again") == []
    # A finished trial's run is reused, never replaced.
    done = sweep["children"]["trial_00000"]
    assert start_trial_run(uri, exp, parent, "trial_00000", {}) == done


def test_parent_has_one_git_tag_and_the_ui_link_opens_the_training_runs_view(sweep):
    from search.tracking import ui_url

    tags = MlflowClient(tracking_uri=sweep["uri"]).get_run(sweep["parent"]).data.tags
    assert [k for k, v in tags.items() if "git" in k.lower()] in ([], ["mlflow.source.git.commit"])
    assert ui_url(sweep["uri"], "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("http://mlflow:8080/", "7", "abc") == \
        "http://mlflow:8080/#/experiments/7/runs/abc?workflowType=machine_learning"


def _tracked_ctx(cfg: dict, uri: str, tracker: SweepTracker, parent: str, objectives: list) -> object:
    from search.config import build_search_space
    from search.trial import TrialContext

    options = {k: cfg["tracking"][k] for k in ("epoch_metrics", "log_model", "system_metrics_s")}
    return TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                        objectives=objectives,
                        tracking={"uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent,
                                  **options})


def test_a_trial_run_lives_from_start_to_end_with_one_entry_per_epoch(sweep, tmp_path):
    from search.trial import run_trial
    from tests.conftest import compose

    uri, tracker, parent = sweep["uri"], sweep["tracker"], sweep["parent"]
    # Long enough (~3 s) that the run's fixed cost of starting and ending is well inside 20 %.
    cfg = compose(["+method=gmp", "trial.epochs=29", "trial.finetune_epochs=1", "data.limit_train=1000",
                   "tracking.system_metrics_s=0.2"])
    ctx = _tracked_ctx(cfg, uri, tracker, parent, [("val_acc", "max"), ("flops_effective", "min")])
    client = MlflowClient(tracking_uri=uri)
    out: dict = {}
    trial = threading.Thread(target=lambda: out.update(run_trial({"method": "gmp", "gmp.sparsity": 0.8}, ctx,
                                                                 trial_id="curves", trial_dir=tmp_path)))
    trial.start()
    seen = set()  # the trial's run as seen from outside while the trial trains
    while trial.is_alive():
        seen |= {(r["mlflow_status"], "val_acc" in r) for r in find_trial_runs(uri, parent) if r["trial_id"] == "curves"}
        time.sleep(0.3)
    trial.join()
    row = out
    assert ("RUNNING", True) in seen  # listed while running, with its first epochs' metrics
    run = client.get_run(row["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    duration_s = (run.info.end_time - run.info.start_time) / 1000
    assert duration_s == pytest.approx(row["trial_wall_s"], rel=0.2)
    epochs = int(row["epochs"])
    assert epochs == 30
    history = {k: sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
               for k in ("val_acc", "val_loss", "train_loss", "sparsity")}
    for key, entries in history.items():
        assert [m.step for m in entries] == list(range(epochs)), key  # one entry per epoch
    # The last epoch's entry is the trial's result; the latest value is what the sweep reads.
    assert history["val_acc"][-1].value == pytest.approx(row["val_acc"]) == run.data.metrics["val_acc"]
    sparsity = [m.value for m in history["sparsity"]]
    assert sparsity == sorted(sparsity) and sparsity[0] < 0.5 * sparsity[-1]  # the schedule's ramp
    assert sparsity[-1] == pytest.approx(row["sparsity"])
    assert all(m.value > 0 for m in history["train_loss"])
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # system metrics on
    assert Path(row["masks_path"]).is_file()


def test_a_structured_trial_logs_its_surgered_model_which_loads_back(sweep, tmp_path):
    import mlflow
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from prunelib.surgery import load_surgered
    from search.trial import run_trial
    from tests.conftest import compose

    uri, tracker, parent = sweep["uri"], sweep["tracker"], sweep["parent"]
    cfg = compose(["+method=polarization", "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400",
                   "tracking.system_metrics_s=0"])
    ctx = _tracked_ctx(cfg, uri, tracker, parent, [("val_acc", "max"), ("flops_physical", "min")])
    row = run_trial({"method": "polarization"}, ctx, trial_id="structured", trial_dir=tmp_path)
    run = MlflowClient(tracking_uri=uri).get_run(row["mlflow_run_id"])
    [output] = run.outputs.model_outputs
    with _use_tracking_uri(uri):
        logged = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    surgered = load_surgered(tmp_path / "surgered").eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(logged.eval()(x), surgered(x), atol=1e-5)
    assert sum(p.numel() for p in logged.parameters()) == row["params_physical"] < row["params_dense"]


def test_a_trial_whose_tracking_is_unreachable_finishes_and_keeps_its_result(tmp_path, monkeypatch):
    import json

    from search.config import build_search_space
    from search.trial import TrialContext, run_trial
    from tests.conftest import compose

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = compose(["+method=magnitude", "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=200"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")],
                       tracking={"uri": f"http://127.0.0.1:{_free_port()}", "experiment_id": "1",
                                 "parent_run_id": "0" * 32, "system_metrics_s": 0.2})
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="offline", trial_dir=tmp_path)
    assert row["mlflow_unlogged"] and "mlflow_run_id" not in row
    kept = json.loads((tmp_path / "trial_result.json").read_text())
    assert kept["val_acc"] == pytest.approx(row["val_acc"]) and Path(kept["masks_path"]).is_file()


def test_mlflow_info_lines_are_off_unless_asked_for():
    import logging

    import search.tracking  # noqa: F401  (quiets MLflow when imported)

    assert logging.getLogger("mlflow").getEffectiveLevel() >= logging.WARNING
    record = logging.LogRecord("mlflow.pytorch", logging.WARNING, "", 0, "Saving pytorch model by Pickle or ...",
                               None, None)
    assert not all(f.filter(record) for f in logging.getLogger("mlflow.pytorch").filters)
