"""Live progress of a sweep (search/progress.py) and the settings shown of a trial (only the active ones)."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from search.progress import (QUIET_S, BoardReader, ProgressDisplay, TrialProgress, format_duration, format_epoch_line,
                             format_sweep_bar, format_trial_line, live_progress)
from search.space import SearchSpace, load_method_configs


def _record(trial="t1", elapsed=3.0, epoch=4, kind="live", **kw):
    return {"trial": trial, "method": "gmp", "kind": kind, "phase": "train", "epoch": epoch, "epochs": 13,
            "done": epoch / 13, "sparsity": 0.5, "metric": "val_acc", "value": 0.91234, "value_epoch": epoch,
            "loss": 0.2, "elapsed_s": elapsed, "eta_s": 75.0, "run": 1.0, **kw}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_say_epoch_phase_sparsity_metric_and_eta():
    line = format_trial_line(_record())
    for part in ("t1", "gmp", "train", "epoch 4/13", "31%", "sparsity 0.5000", "val_acc 0.9123", "loss 0.2000",
                 "3s", "ETA 1m15s"):
        assert part in line, (part, line)
    assert "val_acc -" in format_trial_line(_record(value=None))
    assert "ETA ?" in format_trial_line(_record(eta_s=None))
    measuring = format_trial_line(_record(phase="measure", epoch=13, done=1.0, eta_s=None))
    assert "measure" in measuring and "100%" in measuring and "ETA" not in measuring
    # An epoch line shows the metric only when that epoch was validated.
    assert "val_acc 0.9123" in format_epoch_line(_record())
    assert "val_acc" not in format_epoch_line(_record(value_epoch=2))
    bar = format_sweep_bar(4, 1, 2, 10, front_size=3, hypervolume=0.71234, elapsed_s=92)
    assert bar.startswith("sweep [##########..........] 5/10 ended (1 failed), 2 running")
    assert "front 3  hv 0.7123 of the box  1m32s" in bar
    assert [format_duration(s) for s in (0.4, 65, 7260, None)] == ["0s", "1m05s", "2h01m", "?"]


def test_plain_lines_are_throttled_and_quiet_for_fast_trials():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(10, stream=out, tty=False, quiet_s=2.0, interval_s=5.0, clock=clock)
    display.update([_record("fast", elapsed=1.2)])
    display.tick()
    assert out.getvalue() == ""  # under the quiet threshold: nothing, not even the bar
    display.update([_record("slow", elapsed=2.5)])
    display.tick()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sweep [") and len(lines) == 2 and lines[1].split()[0] == "slow"
    clock.now += 1.0
    display.update([_record("slow", elapsed=3.5, epoch=5)])
    display.tick()
    assert len(out.getvalue().splitlines()) == 2  # not again within the interval
    clock.now += 5.0
    display.tick()
    assert out.getvalue().splitlines()[-1].split()[0] == "slow" and "epoch 5/13" in out.getvalue().splitlines()[-1]
    clock.now += 5.0
    display.tick()
    assert len(out.getvalue().splitlines()) == 4  # no news of the trial: no line
    display.trial_ended("slow")
    display.update([_record("slow", elapsed=9.0)])  # a late record of an ended trial
    clock.now += 5.0
    display.tick()
    assert len(out.getvalue().splitlines()) == 4
    # Epoch records (trial.verbose) are printed as they come, also for fast trials.
    display.update([_record("fast", elapsed=0.3, kind="epoch", epoch=1)])
    assert out.getvalue().splitlines()[-1].split()[:2] == ["fast", "gmp"]


def test_terminal_block_is_redrawn_in_place_and_other_output_goes_above_it():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(4, stream=out, tty=True, quiet_s=2.0, interval_s=1.0, clock=clock)
    display.update([_record("a", elapsed=3.0), _record("b", elapsed=0.5)])
    display.tick()
    first = out.getvalue()
    assert first.count("\n") == 2 and "\x1b[" not in first  # the bar and trial a; b is still quiet
    clock.now += 0.5
    display.update([_record("a", elapsed=3.5)])
    display.tick()
    assert out.getvalue() == first  # too soon to redraw
    clock.now += 1.0
    display.tick()
    assert out.getvalue()[len(first):].startswith("\x1b[2F\x1b[J")  # back up over the block, erase, draw
    before = out.getvalue()
    display.write_through(out, "[1/4] a ended\n")
    assert out.getvalue()[len(before):] == "\x1b[2F\x1b[J[1/4] a ended\n"
    display.tick()  # the block comes back under the line at once
    assert out.getvalue().endswith("epoch 4/13  31%  sparsity 0.5000  val_acc 0.9123  loss 0.2000  4s  ETA 1m15s\n")
    display.close()
    assert out.getvalue().endswith("\x1b[2F\x1b[J")


def test_live_progress_restores_the_streams():
    import sys

    saved = sys.stdout, sys.stderr
    with live_progress(3, stream=io.StringIO()) as display:
        assert not display.tty  # a StringIO is not a terminal: plain lines, streams untouched
        assert (sys.stdout, sys.stderr) == saved

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with pytest.raises(RuntimeError), live_progress(3, stream=term) as display:
        assert display.tty and sys.stdout is not saved[0]
        raise RuntimeError("the sweep failed")
    assert (sys.stdout, sys.stderr) == saved


def test_board_reader_gives_each_epoch_record_once():
    reader = BoardReader()
    state = {"live": _record(epoch=2), "epochs": [_record(kind="epoch", epoch=1), _record(kind="epoch", epoch=2)]}
    first = reader.records({"t1": state})
    assert [(r["kind"], r["epoch"]) for r in first] == [("epoch", 1), ("epoch", 2), ("live", 2)]
    state["epochs"].append(_record(kind="epoch", epoch=3))
    assert [(r["kind"], r["epoch"]) for r in reader.records({"t1": state})] == [("epoch", 3)]  # live: no news
    state["live"] = _record(epoch=3, elapsed=4.0)
    assert [(r["kind"], r["epoch"]) for r in reader.records({"t1": state})] == [("live", 3)]
    retried = {"live": _record(epoch=1, run=2.0), "epochs": [_record(kind="epoch", epoch=1, run=2.0)]}
    assert [r["kind"] for r in reader.records({"t1": retried})] == ["epoch", "live"]


def test_verbose_trial_outside_a_sweep_prints_one_line_per_epoch(capsys):
    """A trial run on its own (no Ray) with trial.verbose: the epoch lines are printed where it runs."""
    from prunelib.data import datamodule_from_config
    from prunelib.methods import METHODS
    from prunelib.models import build_model
    from prunelib.training import TrainConfig, run_pruning

    dm = datamodule_from_config({"name": "digits", "limit_train": 200}, seed=0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = METHODS["gmp"](sparsity=0.5)
    config = TrainConfig(epochs=3, finetune_epochs=1, accelerator="cpu")
    progress = TrialProgress("t9", "gmp", [(p.name, p.epochs) for p in method.plan(3, 1)], verbose=True)
    run_pruning(model, dm, method, config, callbacks=[progress])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("t9 ")]
    assert [line.split()[4] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert [line.split()[2] for line in lines] == ["train", "train", "train", "finetune"]
    assert "sparsity 0.5000" in lines[-1]


# ---------------------------------------------------------------------------------------------
# Only active settings are shown
# ---------------------------------------------------------------------------------------------


def test_active_settings_drop_keys_whose_when_is_false():
    methods = load_method_configs()
    space = SearchSpace({"magnitude": methods["magnitude"], "bingo": methods["bingo"]}, pinned=False)
    magnitude = space.spaces["magnitude"]
    fixed = dict(magnitude.settings)
    assert {"end_protection", "depth_slope"} <= set(fixed)
    uniform = magnitude.active_settings({**fixed, "distribution": "uniform"})
    assert "end_protection" not in uniform and "depth_slope" not in uniform and uniform["distribution"] == "uniform"
    ends = magnitude.active_settings({**fixed, "distribution": "protect_ends", "end_protection": 0.3})
    assert ends["end_protection"] == 0.3 and "depth_slope" not in ends
    # A chain: allocation=damage makes distribution inactive, and with it the distribution's shape.
    bingo = space.spaces["bingo"]
    damage = bingo.active_settings({**bingo.settings, "allocation": "damage", "distribution": "protect_ends"})
    assert "distribution" not in damage and "end_protection" not in damage and damage["allocation"] == "damage"


def test_inactive_setting_is_absent_from_console_rows_mlflow_and_csvs(tmp_path, capsys):
    """Two finished trials of magnitude (uniform, protect_ends) recorded as a sweep records them:
    the uniform one has no end_protection in its row, its MLflow params, trials.csv or the front table."""
    from mlflow import MlflowClient

    from search.tracking import SweepTracker
    from search.trial import TrialContext, record_trial
    from search.front_report import export_front as _export_front
    from search.front_report import print_front
    from search.tune_callbacks import settings_text as _settings_text

    methods = load_method_configs()
    space = SearchSpace({"magnitude": methods["magnitude"]}, pinned=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "progress-test")
    parent = tracker.start_parent("sweep", params={}, tags={})
    ctx = TrialContext(data={"name": "digits"}, model={"name": "mlp"}, trial={}, space=space,
                       objectives=[("val_acc", "max"), ("flops_effective", "min")],
                       tracking={"uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent})
    rows = []
    for trial_id, distribution, acc, flops in (("u1", "uniform", 0.9, 1000.0), ("p1", "protect_ends", 0.95, 2000.0)):
        settings = {**space.spaces["magnitude"].settings, "distribution": distribution, "sparsity": 0.6}
        masks = tmp_path / trial_id / "masks.safetensors"
        masks.parent.mkdir()
        masks.write_bytes(b"")
        rows.append(record_trial(ctx, trial_id, "magnitude", settings, {}, {"val_acc": acc, "flops_effective": flops},
                                 tmp_path / trial_id, extra={"masks_path": str(masks)}, artifacts={}))
    uniform, ends = rows
    assert "param.end_protection" not in uniform and "param.depth_slope" not in uniform
    assert ends["param.end_protection"] == 0.5 and "param.depth_slope" not in ends
    assert "end_protection" not in _settings_text(uniform, limit=10)
    assert json.loads((tmp_path / "u1" / "trial_result.json").read_text()).keys() == uniform.keys()

    client = MlflowClient(tracking_uri=uri)
    params = {r: client.get_run(row["mlflow_run_id"]).data.params for r, row in (("u", uniform), ("p", ends))}
    assert "end_protection" not in params["u"] and "depth_slope" not in params["u"]
    assert params["u"]["distribution"] == "uniform" and params["p"]["end_protection"] == "0.5"

    for row in rows:
        row["status"] = "ok"
    front = pd.DataFrame(rows)
    _export_front(front, rows, tmp_path / "front", None)
    trials = pd.read_csv(tmp_path / "front" / "trials.csv").set_index("trial_id")
    assert pd.isna(trials.loc["u1", "param.end_protection"]) and trials.loc["p1", "param.end_protection"] == 0.5
    assert "param.depth_slope" not in trials.columns
    capsys.readouterr()  # the export's lines: these trials' masks files are empty, so it names each point
    print_front(front, ctx.objectives)
    table = capsys.readouterr().out.splitlines()
    header = table[2].split()
    u1 = next(line.split() for line in table if line.split()[:1] == ["u1"])
    assert u1[header.index("param.end_protection")] == "-"
    assert u1[header.index("flops_effective")] == "1.00k" and u1[header.index("val_acc")] == "0.9000"


# ---------------------------------------------------------------------------------------------
# In a sweep
# ---------------------------------------------------------------------------------------------


def _sweep(tmp_path, capsys, overrides):
    from search.tuner import run_sweep
    from tests.conftest import compose

    cfg = compose(["+method=gmp", "search.n_trials=2", "search.concurrency=2",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])
    capsys.readouterr()
    result = run_sweep(cfg, tmp_path / "out")
    out = capsys.readouterr().out.splitlines()
    return result, out[:next(i for i, line in enumerate(out) if line.startswith("Pareto front"))]  # while it ran


@pytest.mark.slow
def test_sweep_prints_live_lines_of_long_trials_and_epoch_lines_under_verbose(tmp_path, capsys, ray_local,
                                                                             monkeypatch):
    import search.progress

    # About 5 s per trial on an idle 2-core machine (the digits MLP trains ~25 epochs a second).
    # A log line every second (not 5): a trial past the 2 s quiet time then always gets one.
    monkeypatch.setattr(search.progress, "LOG_INTERVAL_S", 1.0)
    result, out = _sweep(tmp_path, capsys, ["trial.epochs=120", "trial.finetune_epochs=1", "trial.verbose=true"])
    long = [r for r in result.rows if r["trial_wall_s"] >= 4.0]
    assert long, [r["trial_wall_s"] for r in result.rows]  # the setting must give trials past the quiet threshold
    assert any(line.startswith("sweep [") for line in out), "\n".join(out)
    for row in result.rows:
        mine = [line for line in out if line.startswith(f"  {row['trial_id']} gmp")]
        live = [line for line in mine if "%" in line]  # live lines say how far the trial is
        epochs = [line.split()[4] for line in mine if "%" not in line]
        assert epochs == [f"{e}/121" for e in range(1, 122)], mine  # each epoch once, in order
        if row in long:
            assert live, out
            end = next(i for i, line in enumerate(out) if line.startswith("[") and row["trial_id"] in line)
            assert all(out.index(line) < end for line in mine)  # progress before the trial's end line


@pytest.mark.slow
def test_sweep_of_fast_trials_prints_no_progress(tmp_path, capsys, ray_local):
    result, out = _sweep(tmp_path, capsys, ["trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400"])
    # A trial is shown once it has run QUIET_S; the digits trials here take well under a second.
    fast = [r["trial_id"] for r in result.rows if r["trial_wall_s"] < QUIET_S]
    assert fast, [r["trial_wall_s"] for r in result.rows]
    for trial_id in fast:
        assert [line for line in out if trial_id in line and not line.startswith("[")] == [], out
    if len(fast) == len(result.rows):
        assert not [line for line in out if line.startswith("sweep [")], out
    assert sum(line.startswith("[") and "/2]" in line for line in out) == 2  # the end lines


def test_trial_verbose_is_a_checked_boolean():
    from search.preflight import validate_schema
    from search.space import ConfigError
    from tests.conftest import compose

    validate_schema(compose(["trial.verbose=true"]))
    with pytest.raises(ConfigError, match=r"trial\.verbose"):
        validate_schema(compose(["trial.verbose=loud"]))
