"""The sweep's Ray (search/ray_session.py): quiet starts, and a cluster that refuses the driver's
authentication token is one line, not Ray's retry log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from search.ray_session import runtime_env_for
from tests.conftest import free_port


def test_a_local_sweep_ships_no_runtime_env_and_a_cluster_gets_the_launch_directory(tmp_path):
    assert runtime_env_for({"kind": "local"}, tmp_path) is None  # Ray passes the driver's sys.path itself
    env = runtime_env_for({"kind": "ray"}, tmp_path)
    assert env["working_dir"] == str(tmp_path) and "outputs/" in env["excludes"]
    assert runtime_env_for({"kind": "ray", "runtime_env": {}}, tmp_path) is None
    assert runtime_env_for({"kind": "local", "runtime_env": {"pip": ["x"]}}, tmp_path) == {"pip": ["x"]}


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


@pytest.mark.slow
def test_a_cluster_that_refuses_the_token_is_one_line_and_exit_2(tmp_path):
    """A Ray head of this test's own, with token authentication; the sweep joins it with the wrong
    token."""
    port = free_port()
    # Ray's sockets live under its temp dir, whose path must stay short (a Unix socket path
    # has at most 107 bytes): not under pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 32, "HOME": str(tmp_path)}
    head = subprocess.Popen([_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block", f"--temp-dir={temp_dir}"],
                            env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the test's Ray head did not start")
        driver_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "b" * 32, "HOME": str(tmp_path)}
        proc = subprocess.run([sys.executable, "-m", "search", "+method=magnitude", "cluster=ray",
                               f"cluster.address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path}/run",
                               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                              cwd=tmp_path, env=driver_env, capture_output=True, text=True, timeout=300)
    finally:
        _kill_tree(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, "\n".join(out[-30:])
    assert len(out) == 1, "\n".join(out[-30:])  # Ray's repeated InvalidAuthToken lines are not shown
    assert out[0].startswith("config error: cluster.address: the Ray cluster at 127.0.0.1:")
    assert "refused this driver's authentication token" in out[0] and "RAY_AUTH_MODE=token" in out[0]
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked


def _idle_ray_workers(expected: int, timeout_s: float = 60.0) -> set[int]:
    """The pids of this process's Ray workers that wait for work (``ray::IDLE``), once there are
    ``expected`` of them."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        idle = set()
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.cmdline()[:1] == ["ray::IDLE"]:
                    idle.add(proc.pid)
            except psutil.Error:
                continue
        if len(idle) >= expected or time.monotonic() > deadline:
            return idle
        time.sleep(0.2)


def _one_trial_pid(storage: Path) -> tuple[int, str | None, bool]:
    """Tune runs one trial; returns its worker's pid, its ``PL_DISABLE_FORK``, and whether the
    worker had imported a training trial's modules before the trial started."""
    from ray import tune

    def trainable(config):
        import sys

        tune.report({"pid": os.getpid(), "fork": os.environ.get("PL_DISABLE_FORK"),
                     "preloaded": "search.trials.training" in sys.modules})

    result = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(storage), verbose=0)).fit()[0]
    return int(result.metrics["pid"]), result.metrics["fork"], bool(result.metrics["preloaded"])


def test_a_local_rays_workers_import_a_trials_modules_when_at_least_half_will_run_trials(monkeypatch):
    import search.ray_session as ray_session
    from search.ray_session import preload_trial_imports
    from search.settings import ClusterSettings

    monkeypatch.setattr(ray_session, "_cpus_ray_detects", lambda: 64)  # no cluster.num_cpus: Ray's own count
    assert not preload_trial_imports(ClusterSettings(), 4)
    assert preload_trial_imports(ClusterSettings(), 32)

    assert preload_trial_imports(ClusterSettings(num_cpus=2), 2)
    assert preload_trial_imports(ClusterSettings(num_cpus=2), 1)  # one of two idle
    assert preload_trial_imports(ClusterSettings(num_cpus=8), 4)
    assert not preload_trial_imports(ClusterSettings(num_cpus=8), 3)  # five of eight would hold it unused
    assert not preload_trial_imports(ClusterSettings(num_cpus=2), None)  # not a sweep
    assert not preload_trial_imports(ClusterSettings(kind="ray", address="10.0.0.1:6379"), 64)


@pytest.mark.slow
def test_a_local_sweeps_trials_start_on_the_workers_ray_prestarted(tmp_path):
    import ray

    from search.ray_session import init_ray, trials_on_prestarted_workers
    from search.settings import ClusterSettings

    init_ray(ClusterSettings(num_cpus=2), tmp_path, concurrency=2)
    try:
        prestarted = _idle_ray_workers(2)
        assert prestarted
        with trials_on_prestarted_workers() as without_runtime_env:
            assert without_runtime_env
            pid, fork, preloaded = _one_trial_pid(tmp_path / "a")
        assert pid in prestarted and fork == "1"  # Tune's variable, from the environment Ray inherited
        assert preloaded  # Lightning and the trial's modules came in while the worker waited
        # Tune's own runtime_env (what a sweep did before): a worker started for the trial.
        pid, fork, _ = _one_trial_pid(tmp_path / "b")
        assert pid not in prestarted and fork == "1"
    finally:
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False)  # a Ray this module did not start: Tune's way
    try:
        with trials_on_prestarted_workers() as without_runtime_env:
            assert not without_runtime_env
            _, _, preloaded = _one_trial_pid(tmp_path / "c")
        assert not preloaded  # its workers import nothing ahead: the trial imports what it uses
    finally:
        ray.shutdown()
