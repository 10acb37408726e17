"""The front on MLflow: plots uploaded only when the front changes and at the end, metrics
(raw and normalised hypervolume) at every step, the FrontCallback's work off Tune's loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from search.tracking import SweepTracker, check_tracking  # noqa: E402

OBJ = [("val_acc", "max"), ("flops_effective", "min")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("front_store")
    uri = f"sqlite:///{root}/mlflow.db"
    check_tracking(uri)
    return {"uri": uri, "root": root}


@pytest.fixture
def uploads(monkeypatch):
    """Every artifact upload to the parent run's ``front/`` directory, as the list of files sent."""
    sent: list[list[str]] = []
    original = MlflowClient.log_artifacts

    def counting(self, run_id, local_dir, artifact_path=None):
        if artifact_path == "front":
            sent.append(sorted(p.name for p in Path(local_dir).iterdir()))
        return original(self, run_id, local_dir, artifact_path=artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", counting)
    return sent


def _row(tid: str, acc: float | None, flops: float | None, status: str = "ok") -> dict:
    row = {"trial_id": tid, "status": status, "method": "magnitude", "flops_dense": 1000.0}
    if acc is not None:
        row.update(val_acc=acc, flops_effective=flops)
    return row


def test_plots_are_uploaded_when_the_front_changes_and_at_the_end(store, uploads):
    tracker = SweepTracker(store["uri"], "front-logging")
    parent = tracker.start_parent("plots", {}, {})
    rows = [_row("a", 0.9, 600.0)]
    assert tracker.log_front(rows, OBJ, step=1)["plotted"]
    rows.append(_row("b", 0.5, 700.0))  # dominated: same front
    assert not tracker.log_front(rows, OBJ, step=2)["plotted"]
    rows.append(_row("c", 0.8, 300.0))  # a new front point
    third = tracker.log_front(rows, OBJ, step=3)
    assert third["plotted"] and third["front_size"] == 2
    rows.append(_row("d", None, None, status="failed"))
    assert not tracker.log_front(rows, OBJ, step=4)["plotted"]
    assert len(uploads) == 2
    final = tracker.log_front(rows, OBJ, step=4, final=True)  # rows changed since the last plots
    assert final["plotted"] and not tracker.log_front(rows, OBJ, step=4, final=True)["plotted"]
    assert len(uploads) == 3 and uploads[-1] == ["front.csv", "front.html", "front.png", "trials.csv"]

    client = MlflowClient(tracking_uri=store["uri"])
    raw = sorted((m.step, m.value) for m in client.get_metric_history(parent, "hypervolume"))
    norm = sorted((m.step, m.value) for m in client.get_metric_history(parent, "hypervolume_normalised"))
    # reference box (accuracy 0 .. 1) x (dense 1000 .. 0 FLOPs): 0.9 * 400, then + 0.8 * 300
    assert raw == [(1, pytest.approx(360.0)), (2, pytest.approx(360.0)), (3, pytest.approx(600.0)),
                   (4, pytest.approx(600.0))]
    assert norm == [(s, pytest.approx(v / 1000.0)) for s, v in raw]
    tags = client.get_run(parent).data.tags
    assert json.loads(tags["prunesearch.hv_box"]) == {"worst": [0.0, 1000.0], "best": [1.0, 0.0]}
    trials_csv = Path(client.download_artifacts(parent, "front/trials.csv", str(store["root"])))
    assert trials_csv.read_text().count("\n") == 5  # header + the 4 trials of the final upload


class _Trial:
    """What FrontCallback reads of a Ray Tune Trial."""

    def __init__(self, i: int, acc: float, flops: float) -> None:
        self.trial_id = f"t{i:03d}"
        self.status = "RUNNING"
        self.config = {"method": "magnitude"}
        self.error_file = None
        self.last_result = {"val_acc": acc, "flops_effective": flops, "flops_dense": 1000.0,
                            "final_result": True, "wall_s": 0.1, "param.sparsity": 1 - flops / 1000}


def test_front_callback_prints_every_trial_and_uploads_plots_only_for_new_fronts(store, uploads, capsys):
    from search.tune_callbacks import make_front_callback_class as _make_callback_class

    tracker = SweepTracker(store["uri"], "front-logging")
    parent = tracker.start_parent("callback", {}, {})
    tracking = {"uri": store["uri"], "experiment": "front-logging", "parent_run_id": parent}
    callback = _make_callback_class()(OBJ, 8, tracking, None)
    # accuracy and FLOPs per trial: the front changes at trials 0, 1, 4 and 6
    points = [(0.80, 500.0), (0.90, 600.0), (0.70, 700.0), (0.85, 650.0), (0.60, 100.0), (0.50, 200.0),
              (0.95, 900.0), (0.10, 990.0)]
    trials = [_Trial(i, a, f) for i, (a, f) in enumerate(points)]
    for trial in trials:
        callback.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    callback.on_experiment_end(trials)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split()[0] for line in lines] == [f"[{i}/8]" for i in range(1, 9)]
    assert "front 4" in lines[-1] and "of the box)" in lines[-1]
    assert len(uploads) == 5  # 4 new fronts + the final one with every trial
    assert callback.unlogged == []
    history = MlflowClient(tracking_uri=store["uri"]).get_metric_history(parent, "front_size")
    assert sorted((m.step, m.value) for m in history)[-1] == (8, 4.0)


def test_a_stopped_trial_line_shows_what_the_rung_judged_and_the_seconds_it_ran(capsys):
    """A trial mo_asha stopped before its cut: the line gives the projected accuracy and FLOPs the
    rung compared (not the dense model's) and the trial's run time (it has no end-of-trial timer)."""
    from search.tune_callbacks import make_front_callback_class as _make_callback_class

    callback = _make_callback_class()(OBJ, 2, None, None)
    finished, stopped = _Trial(0, 0.80, 500.0), _Trial(1, 0.82, 1000.0)
    stopped.last_result = {"val_acc": 0.82, "flops_effective": 1000.0, "flops_dense": 1000.0, "epoch": 2,
                           "projected_val_acc": 0.61, "projected_flops_effective": 200.0,
                           "time_total_s": 3.7, "final_result": False, "param.sparsity": 0.8}
    trials = [finished, stopped]
    for trial in trials:
        callback.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    callback.flush()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert "stopped" not in lines[0] and "0.8000" in lines[0] and "0.1s" in lines[0]
    assert "stopped at epoch 2 (projected)" in lines[1]
    assert "val_acc 0.6100" in lines[1] and "(20% of dense)" in lines[1] and "3.7s" in lines[1]
    assert "0.8200" not in lines[1]


def test_a_changed_front_is_drawn_at_most_every_plot_interval_and_at_the_end(store, uploads):
    tracker = SweepTracker(store["uri"], "front-logging")
    tracker.start_parent("throttled", {}, {})
    rows = [_row("a", 0.9, 600.0)]
    assert tracker.log_front(rows, OBJ, step=1, plot_interval_s=3600.0)["plotted"]  # the first front
    rows.append(_row("b", 0.8, 300.0))  # a new front point, within the interval: metrics only
    second = tracker.log_front(rows, OBJ, step=2, plot_interval_s=3600.0)
    assert not second["plotted"] and second["front_size"] == 2
    assert len(uploads) == 1
    final = tracker.log_front(rows, OBJ, step=2, final=True, plot_interval_s=3600.0)
    assert final["plotted"] and len(uploads) == 2  # the end draws what the interval held back
    rows.append(_row("c", 0.95, 200.0))
    assert tracker.log_front(rows, OBJ, step=3, plot_interval_s=0.0)["plotted"]  # 0: every change
