"""A sweep killed mid-way resumes without losing or repeating trials; one driver per sweep;
a two-node Ray cluster (two `ray start` nodes) runs a sweep of code that lives only in the
driver's working directory.

Slow: each test starts its own Ray. Run with `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from search.tracking import find_trial_runs
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def _sweep_cmd(tmp: Path, *extra: str, epochs: int = 40, n_trials: int = 6) -> list[str]:
    return [sys.executable, "-m", "search", "+method=magnitude", f"search.n_trials={n_trials}", "search.concurrency=1",
            f"trial.epochs={epochs}", "trial.finetune_epochs=2", "data.limit_train=800", "cluster.num_cpus=2",
            "+trial.faults.plan='999:raise'", f"+trial.faults.state_dir={tmp}/faults",  # counts starts and completions
            f"hydra.run.dir={tmp}/run", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra]


def _counts(tmp: Path, kind: str) -> dict[str, int]:
    return {p.name.split("-", 1)[1]: len(p.read_text()) for p in (tmp / "faults").glob(f"{kind}-*")}


def _wait(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the sweep ended before {what}: " + (proc.stdout.read() or "")[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(pid: int) -> list[psutil.Process]:
    """The driver's Ray workers (trial actors, idle workers): not Ray's per-node agents, which
    idle until their process group is cleaned up and train nothing."""
    found = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            title = " ".join(p.cmdline()) or p.name()  # Ray workers retitle themselves ray::ImplicitFunc, ...
            if title.startswith("ray::") and "Agent" not in title:
                found.append(p)
    except psutil.Error:
        pass
    return found


def _kill_driver(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the driver alone; returns its Ray workers, which must then stop by themselves."""
    workers = _workers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return workers


def _assert_gone(workers: list[psutil.Process], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        time.sleep(0.5)
    alive = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers {alive} kept running after their driver was killed"


def _cleanup(proc: subprocess.Popen) -> None:
    # The driver ran in its own session: whatever is left of it (its local Ray) goes with the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_killed_twice_then_resumed_runs_every_trial_exactly_once(tmp_path):
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    popen = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 start_new_session=True)
    resume = ("search.resume=true", f"search.resume_dir={tmp_path}/run")
    cmd = _sweep_cmd(tmp_path, epochs=120)  # a few seconds per trial: the kills land inside the sweep
    # Kill point 1: the moment a trial has written its result (before Tune's checkpoint can know).
    first = subprocess.Popen(cmd, **popen)
    try:
        _wait(lambda: len(_counts(tmp_path, "completions")) >= 1, first, what="a finished trial")
        workers = _kill_driver(first)
        _assert_gone(workers)
    finally:
        _cleanup(first)
    # Kill point 2: mid-trial, after more trials finished. A second driver is refused meanwhile.
    second = subprocess.Popen(cmd + list(resume), **popen)
    try:
        _wait(lambda: len(_counts(tmp_path, "completions")) >= 2, second, what="a trial of the resumed sweep")
        rival = subprocess.run(cmd + list(resume), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert rival.returncode == 2 and "another driver (pid" in rival.stderr, rival.stderr[-2000:]
        _wait(lambda: len(_counts(tmp_path, "completions")) >= 3 and
              set(_counts(tmp_path, "attempts")) - set(_counts(tmp_path, "completions")), second,
              what="a trial in progress after three finished")
        workers = _kill_driver(second)
        _assert_gone(workers)
    finally:
        _cleanup(second)
    state = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert not state["finished"]
    third = subprocess.run(cmd + list(resume), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "resuming the sweep" in third.stdout

    runs = find_trial_runs(f"sqlite:///{tmp_path}/mlflow.db", state["parent_run_id"])
    ids = [r["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), "a trial was logged twice"
    assert len([r for r in runs if r["status"] == "ok"]) == 6, [(r["trial_id"], r["status"]) for r in runs]
    completions = _counts(tmp_path, "completions")
    assert sorted(completions) == sorted(ids) and set(completions.values()) == {1}, completions  # each ran once
    for trial_id in ids:  # every trial's files under the sweep's own directory
        assert (tmp_path / "run" / "trials" / trial_id / "trial_result.json").is_file()
        assert (tmp_path / "run" / "trials" / trial_id / "masks.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["finished"]


def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait(lambda: len(_counts(tmp_path, "completions")) >= 2, proc, what="two finished trials")
        time.sleep(2.5)  # past Tune's 1 s experiment-state checkpoint
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        _cleanup(proc)
    assert proc.returncode == 130, out[-3000:]
    state = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert not state["finished"]
    from mlflow import MlflowClient

    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(state["parent_run_id"])
    assert parent.info.status == "KILLED" and "search.resume=true" in parent.data.tags["prunesearch.error"]
    resumed = subprocess.run(_sweep_cmd(tmp_path, "search.resume=true", f"search.resume_dir={tmp_path}/run"),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = find_trial_runs(f"sqlite:///{tmp_path}/mlflow.db", state["parent_run_id"])
    assert len([r for r in runs if r["status"] == "ok"]) == 6
    assert set(_counts(tmp_path, "completions").values()) == {1}
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "prunesearch.error" not in parent.data.tags  # the interruption's reason went with it (issue 24)


def _ray_start(*args: str, env: dict[str, str]) -> None:
    ports = [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port",
                                                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")]
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args, "--num-cpus=1",
                           "--node-ip-address=127.0.0.1", *ports], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _stop_nodes(temp: str) -> None:
    """Kill (by pid) the processes of the nodes this test started: those that name or hold files
    under its own Ray temp dir. Never `ray stop`: other clusters run on this machine."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if any(temp in part for part in proc.info["cmdline"] or []) or \
                    any(f.path.startswith(temp) for f in proc.open_files()):
                mine.append(proc)
        except psutil.Error:
            continue
    for proc in mine:
        try:
            proc.kill()
        except psutil.Error:
            pass


def test_two_node_cluster_runs_a_model_that_lives_only_in_the_drivers_directory(tmp_path):
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    port = free_port()
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    (driver_dir / "netdef.py").write_text(textwrap.dedent('''
        from torch import nn

        class TinyNet(nn.Module):
            def __init__(self, input_shape, num_classes, hidden: int = 16):
                super().__init__()
                c, h, w = input_shape
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.net(x)
        '''))
    storage = tmp_path / "shared"
    try:
        _ray_start("--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", env=env)
        _ray_start(f"--address=127.0.0.1:{port}", env=env)
        proc = subprocess.run(
            [sys.executable, "-m", "search", "+method=magnitude", "search.n_trials=4", "search.concurrency=2",
             "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400", "cluster=ray",
             f"cluster.address=127.0.0.1:{port}", "model=custom", "model._target_=netdef.TinyNet",
             f"search.storage={storage.as_uri()}", "hydra.run.dir=run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
            cwd=driver_dir, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    finally:
        _stop_nodes(temp)
        shutil.rmtree(temp, ignore_errors=True)
    (sweep_root,) = [p for p in storage.iterdir() if p.is_dir()]
    results = [json.loads(p.read_text()) for p in sweep_root.glob("trials/*/trial_result.json")]
    assert len(results) == 4
    for r in results:  # staged locally, uploaded through pyarrow: paths name the storage URI
        assert r["masks_path"] == f"{storage.as_uri()}/{sweep_root.name}/trials/{r['trial_id']}/masks.safetensors"
        assert (sweep_root / "trials" / r["trial_id"] / "masks.safetensors").is_file()
    assert list((driver_dir / "run" / "front").glob("*.safetensors"))  # the front was read back from the storage
    nodes = {json.loads(line)["node_id"] for p in (sweep_root / "ray").glob("*/result.json")
             for line in p.read_text().splitlines() if '"final_result": true' in line}
    assert len(nodes) == 2, nodes  # trials ran on both nodes, from code shipped with the driver's working dir
    assert not (driver_dir / "run" / "trials").exists()  # nothing beside the driver: all under search.storage
