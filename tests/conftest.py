"""Shared fixtures: Hydra-composed configs and a local Ray that is always shut down."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Cached (pretrained, fine-tuned) pairs of KEN trials: per test session, never the user's cache.
os.environ.setdefault("PRUNESEARCH_CACHE", tempfile.mkdtemp(prefix="prunesearch-test-cache-"))

REPO = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved config `python -m search <overrides>` would run with, as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the test models are tiny and a second thread only fights other
    processes (Ray workers, subprocess sweeps) for the machine's cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 2 CPUs for the module's tests, shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], port: int, cwd: Path | None = None, timeout: float = 90):
    """Start a server process (its own process group) and wait until it listens on ``port``."""
    import signal
    import socket
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{cmd[:4]} exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{cmd[:4]} did not start listening on {port}")


def sampled_settings(space: Any, method: str, n: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Method settings for ``n`` random draws from a pinned search space (as a trial gets them)."""
    import optuna

    from search.space import settings_from_params

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        out.append(settings_from_params(space, {"method": method, **trial.params})[1])
        study.tell(trial, [0.5, 1.0])
    return out
