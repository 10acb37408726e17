"""A sweep killed mid-way resumes without losing or repeating trials; a two-node Ray cluster runs one.

Slow: each test starts its own Ray. Run with `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.tracking import find_trial_runs
from tests.conftest import compose

pytestmark = pytest.mark.slow


def _sweep_cmd(tmp: Path, *extra: str, run_dir: str = "run") -> list[str]:
    return [sys.executable, "-m", "search", "+method=magnitude", "search.n_trials=6", "search.concurrency=1",
            "trial.epochs=40", "trial.finetune_epochs=2", "data.limit_train=800", "cluster.num_cpus=2",
            f"hydra.run.dir={tmp}/{run_dir}", f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra]


def _wait_for_children(tmp: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    state = tmp / "run" / "sweep.json"
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        if state.is_file():
            parent = json.loads(state.read_text())["parent_run_id"]
            runs = [r for r in find_trial_runs(f"sqlite:///{tmp}/mlflow.db", parent) if r["status"] == "ok"]
            if len(runs) >= n:
                return runs
        time.sleep(1.0)
    raise AssertionError(f"fewer than {n} trials finished within {timeout}s")


def _stop_leftover_ray(tmp: Path) -> None:
    # A SIGKILLed driver can leave its local Ray processes behind; they run in the
    # driver's process group (started as a new session), so killing the group is enough.
    subprocess.run(["pkill", "-9", "-f", str(tmp)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(tmp_path, sig):
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        before = _wait_for_children(tmp_path, 2, proc)
        time.sleep(2.5)  # past Tune's 1 s experiment-state checkpoint
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if sig == signal.SIGKILL:
            time.sleep(1)
            _stop_leftover_ray(tmp_path)
    state = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert not state["finished"]
    parent = state["parent_run_id"]
    finished_before = {r["trial_id"]: r["run_id"] for r in before}

    resumed = subprocess.run(_sweep_cmd(tmp_path, "search.resume=true", f"search.resume_dir={tmp_path}/run",
                                        run_dir="second"),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the sweep" in resumed.stdout
    runs = find_trial_runs(f"sqlite:///{tmp_path}/mlflow.db", parent)
    ok = [r for r in runs if r["status"] == "ok"]
    ids = [r["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), "a trial was logged twice"
    assert len(ok) == 6, [(r["trial_id"], r["status"]) for r in runs]
    for trial_id, run_id in finished_before.items():
        assert {r["trial_id"]: r["run_id"] for r in ok}[trial_id] == run_id  # kept, not re-run
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["finished"]


def test_two_node_cluster_places_trials_on_both_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from search.tuner import run_sweep

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        cfg = compose(["+method=magnitude", "search.n_trials=4", "search.concurrency=2", "trial.epochs=2",
                       "trial.finetune_epochs=1", "data.limit_train=400", "cluster=ray",
                       f"cluster.address={cluster.address}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        result = run_sweep(cfg, tmp_path / "out")
        nodes = {r["node_id"] for r in result.rows if r["status"] == "ok"}
        assert len(result.rows) == 4
        assert len(nodes) == 2, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
