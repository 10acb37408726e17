"""Reliability under bad input and faults: clear errors before work starts, failed trials
recorded with their reason while the sweep goes on, nothing lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunelib.masks import MaskFileError, MaskMismatchError, MaskSet
from prunelib.models import build_model
from search.config import build_search_space
from search.faults import FaultPlan, InjectedFault
from search.tracking import find_trial_runs
from search.trial import TrialContext, run_trial
from search.tuner import run_sweep
from tests.conftest import REPO, compose, free_port, serve

FAST = ["trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400"]


def _cli(tmp_path: Path, *overrides: str, module: str = "search") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path}/run",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("overrides, message", [
    (["model=nonexistent"], "model/nonexistent"),
    (["+method=magnitude", "data=fashion_mnist", "data.root=/nonexistent/fashion"],
     "data.root: fashion_mnist: the four IDX files were not found in /nonexistent/fashion"),
    (["+method=magnitude", "+trial.faults.plan=first:boom", "+trial.faults.state_dir=/tmp/x"],
     "trial.faults.plan: bad entry 'first:boom'"),
    (["+method=snip", "method.settings.sparsity=-0.2"], "method[snip].settings.sparsity: -0.2"),
])
def test_bad_input_gives_one_message_and_starts_nothing(tmp_path, overrides, message):
    proc = _cli(tmp_path, *overrides)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]  # Hydra's own composition errors too (issue 24)
    assert message in out
    assert "Traceback" not in out  # one clear message, not a stack
    assert not (tmp_path / "run" / "ray").exists()  # no trial started
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked


def test_masks_for_another_model_or_corrupt_file_leave_the_model_untouched(tmp_path):
    lenet = build_model("lenet5", (1, 28, 28), 10)
    mlp = build_model("mlp", (1, 8, 8), 10)
    path = MaskSet.ones_like(lenet).save(tmp_path / "lenet.safetensors", lenet, method="magnitude")
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(MaskMismatchError, match="has no match in MLP"):
        MaskSet.load(path, mlp).apply(mlp)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(MaskFileError, match="corrupt|truncated"):
        MaskSet.load(corrupt, mlp).apply(mlp)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.export", *args], capture_output=True, text=True, timeout=120)


def test_export_checks_the_store_first_and_never_creates_one(tmp_path):
    out = tmp_path / "masks.safetensors"
    proc = _export("run_id=0123456789abcdef", f"out={out}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("export: tracking.uri: ") and "no database at" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not out.exists()  # a wrong path creates no empty store
    t0 = time.monotonic()
    proc = _export("run_id=0123456789abcdef", f"out={out}", f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and "is not reachable" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60  # seconds (interpreter start included), not minutes of retries


def make_store_with_a_corrupt_masks_file(root: Path) -> tuple[str, str]:
    """A sweep store under ``root`` whose one finished trial has a corrupt masks artifact;
    returns ``(tracking uri, parent run id)`` (the reliability drill uses it too)."""
    from search.tracking import SweepTracker, log_trial_run

    uri = f"sqlite:///{root}/mlflow.db"
    tracker = SweepTracker(uri, "export-test")
    parent = tracker.start_parent("sweep", params={}, tags={
        "prunesearch.objectives": json.dumps([["val_acc", "max"], ["flops_effective", "min"]])})
    junk = root / "art" / "masks.safetensors"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\x00not a safetensors file" * 10)
    log_trial_run(uri, tracker.experiment_id, parent, "t0", params={"method": "magnitude"},
                  metrics={"val_acc": 0.9, "flops_effective": 100.0}, artifacts={"masks": str(junk)})
    return uri, parent


@pytest.fixture()
def store_with_a_bad_artifact(tmp_path):
    return make_store_with_a_corrupt_masks_file(tmp_path)


def test_export_writes_atomically_and_refuses_an_unwritable_out(tmp_path, store_with_a_bad_artifact):
    from search.export import export_point

    uri, parent = store_with_a_bad_artifact
    out = tmp_path / "keep" / "masks.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the user's earlier file")
    with pytest.raises(ValueError, match="run_id: the masks of trial t0 are not a valid masks file"):
        export_point(uri, parent, "max_acc", out)
    assert out.read_bytes() == b"the user's earlier file"  # untouched
    assert [p.name for p in out.parent.iterdir()] == ["masks.safetensors"]  # no partial file left
    proc = _export(f"run_id={parent}", "out=/proc/prunesearch/masks.safetensors", f"tracking.uri={uri}")
    assert proc.returncode == 2 and proc.stderr.startswith("export: out: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_same_seed_and_config_give_bit_identical_masks(tmp_path):
    cfg = compose(["+method=magnitude", *FAST])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"],
                       space=build_search_space(cfg), objectives=[("val_acc", "max"), ("flops_effective", "min")])
    params = {"method": "magnitude", "magnitude.sparsity": 0.7}
    rows = [run_trial(params, ctx, trial_id=f"seed{i}", trial_dir=tmp_path / f"t{i}") for i in range(2)]
    a, b = (Path(r["masks_path"]) for r in rows)
    masks_a, masks_b = MaskSet.load(a), MaskSet.load(b)
    assert set(masks_a.masks) == set(masks_b.masks)
    assert all(torch.equal(masks_a.masks[k], masks_b.masks[k]) for k in masks_a.masks)
    assert rows[0]["val_acc"] == rows[1]["val_acc"]


def test_fault_plan_claims_ordinals_once_per_trial(tmp_path):
    plan = FaultPlan.from_config({"plan": "2:raise,3:nan", "state_dir": str(tmp_path)})
    assert plan.claim("a") == (1, 1)
    assert plan.claim("b") == (2, 1)
    assert plan.claim("a") == (1, 2)  # a retry keeps its ordinal
    with pytest.raises(InjectedFault, match="injected fault: trial #2"):
        plan.inject("b", {})
    assert plan.inject("c", {"lr": 0.1})["lr"] == 1e30


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path, ray_local, capsys):
    import optuna

    from search.study_searcher import StudySearcher

    cfg = compose(["+method=magnitude", "search.n_trials=6", "search.concurrency=1", "trial.max_retries=2",
                   "+trial.faults.plan='2:raise,3:nan,4:oom,5:kill'", f"+trial.faults.state_dir={tmp_path}/faults",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST])
    result = run_sweep(cfg, tmp_path / "out")
    by_ordinal = {int(p.name.split("-")[1]): p.read_text() for p in (tmp_path / "faults").glob("ordinal-*")}
    assert sorted(by_ordinal) == [1, 2, 3, 4, 5, 6]
    status = {r["trial_id"]: r["status"] for r in result.rows}
    assert [status[by_ordinal[i]] for i in range(1, 7)] == ["ok", "failed", "failed", "failed", "ok", "ok"]
    assert (tmp_path / "faults" / f"attempts-{by_ordinal[5]}").read_text() == "xx"  # killed once, retried
    # Raise, NaN and out of memory are deterministic: their code ran once, max_retries=2 notwithstanding.
    for ordinal in (2, 3, 4):
        assert (tmp_path / "faults" / f"attempts-{by_ordinal[ordinal]}").read_text() == "x", ordinal
    errors = {r["trial_id"]: r["error"] for r in result.rows if r["status"] == "failed"}
    assert errors[by_ordinal[2]].startswith("InjectedFault: injected fault: trial #2")
    assert errors[by_ordinal[3]].startswith("TrialFailed: ") and "NaN" in errors[by_ordinal[3]]
    out = capsys.readouterr().out
    assert any(by_ordinal[2] in line and "FAILED: InjectedFault: injected fault: trial #2" in line
               for line in out.splitlines()), out

    runs = find_trial_runs(cfg["tracking"]["uri"], result.parent_run_id)
    ids = [r["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == 6, "a trial was logged twice"
    errors = {r["trial_id"]: r["error"] or "" for r in runs}
    assert "injected fault: trial #2" in errors[by_ordinal[2]]
    assert "NaN" in errors[by_ordinal[3]]
    assert "out of memory" in errors[by_ordinal[4]]
    assert {r["trial_id"] for r in runs if r["status"] == "ok"} == {by_ordinal[i] for i in (1, 5, 6)}
    assert set(result.front["trial_id"]) <= {by_ordinal[i] for i in (1, 5, 6)}  # the front ignores failures

    # The searcher Tune saved restores onto the sweep's Optuna study (search/sampling.py), which
    # recorded the three failures.
    searcher = StudySearcher.__new__(StudySearcher)
    searcher.restore_from_dir(str(tmp_path / "out" / "ray"))
    states = [t.state.name for t in searcher.study.trials]
    assert states.count("FAIL") == 3 and states.count("COMPLETE") == 3
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    stored = optuna.load_study(study_name=state["optuna_study"], storage=state["optuna_storage"])
    assert [t.state.name for t in stored.trials] == states


def _start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    return serve([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp}/server.db",
                  "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"], port)


@pytest.mark.slow
def test_tracking_server_lost_mid_sweep_keeps_results_locally(tmp_path):
    port = free_port()
    server = _start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    sweep = subprocess.Popen([sys.executable, "-m", "search", "+method=magnitude", "search.n_trials=5",
                              "search.concurrency=1", "trial.epochs=6", "trial.finetune_epochs=1",
                              "data.limit_train=400", "cluster.num_cpus=2", "tracking=mlflow_server",
                              f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        parent = None
        while time.time() < deadline:
            state = tmp_path / "run" / "sweep.json"
            if parent is None and state.is_file():
                parent = json.loads(state.read_text())["parent_run_id"]
            if parent and any(r["status"] == "ok" for r in find_trial_runs(uri, parent)):
                break
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server goes away mid-sweep
        server.wait(timeout=30)
        out, _ = sweep.communicate(timeout=600)
    finally:
        for proc in (sweep, server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert sweep.returncode == 0, out[-3000:]
    assert "MLflow was unreachable for" in out
    # Lines "  <trial id>: <path>/trial_result.json (<error>)" name the trials MLflow missed.
    unlogged = dict(line.strip().split(" (")[0].split(": ", 1) for line in out.splitlines()
                    if line.strip().endswith(")") and "trial_result.json" in line)
    assert unlogged, out[-3000:]
    for trial_id, path in unlogged.items():
        kept = json.loads(Path(path).read_text())
        assert kept["trial_id"] == trial_id and kept["mlflow_unlogged"] and Path(kept["masks_path"]).is_file()
    server = _start_mlflow_server(tmp_path, port)  # back up: what did it get?
    try:
        logged = {r["trial_id"] for r in find_trial_runs(uri, parent) if r["status"] == "ok"}
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    assert logged and not logged & set(unlogged)
    assert len(logged) + len(unlogged) == 5  # nothing lost


def test_state_files_are_written_atomically(tmp_path):
    import threading

    from search.storage import atomic_write_text

    path = tmp_path / "sweep.json"
    atomic_write_text(path, json.dumps({"n": 0}))
    stop, seen, errors = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["n"])
            except (json.JSONDecodeError, KeyError) as exc:  # an empty or partial file
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(300):
        atomic_write_text(path, json.dumps({"n": i, "pad": "x" * 20000}))
    stop.set()
    reader.join()
    assert not errors and seen and max(seen) <= 299
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_one_driver_per_sweep_and_a_killed_driver_frees_it(tmp_path):
    from search.storage import SweepLock, SweepLocked

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from search.storage import SweepLock; "
        f"lock = SweepLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLocked, match=rf"another driver \(pid {holder.pid} on .*\) is running the sweep"):
            SweepLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with SweepLock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


def test_a_rival_driver_is_refused_before_its_preflight(tmp_path, monkeypatch):
    """The lock is taken first: a second driver on a running sweep's directory gets the refusal
    at once, without building the data and model of its own pre-flight."""
    import search.tuner as tuner
    from search.space import ConfigError
    from search.storage import SweepLock

    def no_preflight(*args, **kwargs):
        raise AssertionError("the pre-flight ran although another driver holds the sweep")

    monkeypatch.setattr(tuner, "preflight", no_preflight)
    out = tmp_path / "run"
    cfg = compose(["+method=magnitude", *FAST, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with SweepLock(out):
        with pytest.raises(ConfigError, match="another driver"):
            run_sweep(cfg, out)
    with pytest.raises(AssertionError, match="the pre-flight ran"):  # free again: the pre-flight runs
        run_sweep(cfg, out)
    missing = compose(["+method=magnitude", *FAST, "search.resume=true"])
    with pytest.raises(AssertionError, match="the pre-flight ran"):
        run_sweep(missing, tmp_path / "never")
    assert not (tmp_path / "never").exists()  # a resume of a missing directory creates nothing


def test_two_sweeps_starting_on_one_fresh_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    code = ("import sys; from search.tracking import SweepTracker; "
            f"t = SweepTracker({uri!r}, 'sweeps'); print(t.start_parent('s' + sys.argv[1], {{'a': 1}}, {{}}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) for i in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [r[1][-1500:] for r in results]
    from mlflow import MlflowClient

    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("sweeps").experiment_id])
    assert len(runs) == 3


@pytest.mark.slow
def test_a_sweep_where_every_trial_fails_exits_nonzero_with_its_parent_failed(tmp_path, ray_local, capsys):
    from mlflow import MlflowClient

    from search.tuner import SweepFailed

    cfg = compose(["+method=magnitude", "search.n_trials=3", "search.concurrency=1", "trial.max_retries=2",
                   "+trial.faults.plan='1:raise,2:raise,3:nan'", f"+trial.faults.state_dir={tmp_path}/faults",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST])
    with pytest.raises(SweepFailed, match="no trial finished: 3 of 3 failed"):
        run_sweep(cfg, tmp_path / "out")
    # Deterministic failures are not retried: each trial's code ran once.
    attempts = [p.read_text() for p in (tmp_path / "faults").glob("attempts-*")]
    assert attempts == ["x"] * 3, attempts
    out = capsys.readouterr().out
    failed_lines = [line for line in out.splitlines() if "FAILED:" in line]
    assert len(failed_lines) == 3, out
    assert sum("InjectedFault: injected fault: trial #" in line for line in failed_lines) == 2, out
    assert sum("TrialFailed: " in line and "NaN" in line for line in failed_lines) == 1, out
    assert "3 trial(s) failed: " in out and "^^^" not in out
    parent_id = json.loads((tmp_path / "out" / "sweep.json").read_text())["parent_run_id"]
    parent = MlflowClient(cfg["tracking"]["uri"]).get_run(parent_id)
    assert parent.info.status == "FAILED" and "no trial finished" in parent.data.tags["prunesearch.error"]


@pytest.mark.slow
def test_an_error_after_the_parent_run_starts_ends_it_failed(tmp_path, ray_local, monkeypatch):
    from mlflow import MlflowClient

    import search.tuner

    def broken_sampler(search):  # noqa: ANN001, ANN202
        raise RuntimeError("the sampler could not be built")

    monkeypatch.setattr(search.tuner, "make_sampler", broken_sampler)
    cfg = compose(["+method=magnitude", "search.n_trials=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST])
    with pytest.raises(RuntimeError, match="the sampler could not be built"):
        run_sweep(cfg, tmp_path / "out")
    parent_id = json.loads((tmp_path / "out" / "sweep.json").read_text())["parent_run_id"]
    parent = MlflowClient(cfg["tracking"]["uri"]).get_run(parent_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["prunesearch.error"] == "RuntimeError: the sampler could not be built"


@pytest.mark.slow
def test_an_objective_the_module_stops_logging_stops_the_sweep_as_a_config_error(tmp_path, ray_local):
    from mlflow import MlflowClient

    from search.space import ConfigError

    cfg = compose(["+method=magnitude", "search.n_trials=3", "search.concurrency=1", "model=custom",
                   "model._target_=tests.user_code.PlainNet", "+model.width=8",
                   "module._target_=tests.user_code.ForgetfulModule", f"+module.marker={tmp_path}/validated-once",
                   "trial.lr=0.003", "trial.max_retries=0",
                   "search.objectives=[{metric: val_f1, mode: max}, {metric: flops_effective, mode: min}]",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *FAST])
    with pytest.raises(ConfigError, match=r"search.objectives: \['val_f1'\] never reported by "
                                          r"module._target_=tests.user_code.ForgetfulModule"):
        run_sweep(cfg, tmp_path / "out")
    parent_id = json.loads((tmp_path / "out" / "sweep.json").read_text())["parent_run_id"]
    runs = find_trial_runs(cfg["tracking"]["uri"], parent_id)
    assert len(runs) < 3  # stopped at the first such trial, not after the whole budget
    assert MlflowClient(cfg["tracking"]["uri"]).get_run(parent_id).info.status == "FAILED"


def test_a_store_left_with_a_hot_journal_by_a_killed_writer_passes_the_check(tmp_path):
    """A driver killed inside an SQLite write leaves a hot journal; the pre-flight's probe
    must roll it back (read-write open), not refuse the store and block the resume."""
    import sqlite3

    from search.tracking import check_sqlite_file

    db = tmp_path / "optuna.db"
    writer = ("import os, signal, sqlite3, sys\n"
              "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "con.execute('CREATE TABLE t (x TEXT)'); con.execute('INSERT INTO t VALUES (1)')\n"
              "con.execute('PRAGMA cache_size=1'); con.execute('BEGIN')\n"
              "for i in range(2000):\n    con.execute('INSERT INTO t VALUES (?)', ('x' * 500,))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", writer, str(db)], check=False)
    assert (tmp_path / "optuna.db-journal").is_file()  # the killed transaction's hot journal
    with pytest.raises(sqlite3.OperationalError):  # what a read-only probe met
        sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT count(*) FROM t").fetchall()
    check_sqlite_file(db, f"sqlite:///{db}", mlflow_store=False)
    assert not (tmp_path / "optuna.db-journal").exists()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)  # rolled back


def test_a_deterministic_failure_is_recorded_so_a_retry_runs_nothing(tmp_path):
    from search.formatting import exception_line
    from search.trial_context import FAILED_FILE, TrialFailedBefore, earlier_failure, record_failure

    ctx = TrialContext(data={}, model={}, trial={}, space=None, objectives=[], sweep_root=str(tmp_path))
    assert earlier_failure(ctx, "t1") is None  # a first attempt (or a dead worker's retry) runs
    line = exception_line(InjectedFault("injected fault: trial #2 (t1) raises"))
    record_failure(ctx, "t1", line)
    assert (tmp_path / "trials" / "t1" / FAILED_FILE).is_file()
    assert earlier_failure(ctx, "t1") == line == "InjectedFault: injected fault: trial #2 (t1) raises"
    assert earlier_failure(ctx, "t2") is None
    # The retry's error reads as the first attempt's line, also wrapped as Ray wraps it.
    try:
        raise RuntimeError("wrapper") from TrialFailedBefore(line)
    except RuntimeError as wrapped:
        assert exception_line(wrapped) == line
    assert exception_line(TrialFailedBefore(line)) == line
