"""The sweep's Ray: its own local Ray (``cluster=local``) or a configured cluster, started quietly
and with its workers' imports done before the first trial asks for them.

A local Ray prestarts one Python worker per CPU when it starts. :func:`init_ray` has those
workers import what a trial imports (torch, Lightning, the methods, MLflow: ``preload``) while
the driver goes on with its own start (stores, pre-flight), and gives the job no ``runtime_env``
of its own, so those prestarted workers are the ones Tune's trials land on: Ray puts the
driver's ``sys.path`` (with the launch directory, where a user's ``mycode.py`` lives) on its
workers' path itself. A cluster gets the launch directory as ``working_dir`` instead.

Token authentication: Ray 2.60 turns it on for a new local cluster and says so on every start;
a sweep that starts its own Ray keeps it on and keeps the notice off the console. Joining a
cluster, the user's setting is used as it is (README, "On a cluster"), and a refused token is
one line instead of Ray's retry log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from search.formatting import exception_line
from search.space import ConfigError

__all__ = ["TRIAL_IMPORTS", "TEXT_TRIAL_IMPORTS", "init_ray", "runtime_env_for"]

#: What a trial's worker imports before it can train (search.trial pulls torch, Lightning,
#: prunelib); preloaded by a local Ray's workers as they start.
TRIAL_IMPORTS = ("search.trial", "search.mlflow_trial", "mlflow")
#: A text trial's worker also loads transformers.
TEXT_TRIAL_IMPORTS = (*TRIAL_IMPORTS, "search.llm_trial", "transformers")

_AUTH_FAILURE_MARKS = ("InvalidAuthToken", "UNAUTHENTICATED", "authentication token", "auth token")


def runtime_env_for(cluster: Mapping[str, Any], launch_dir: Path) -> dict[str, Any] | None:
    """The Ray ``runtime_env`` that brings the user's code to the workers.

    ``cluster.runtime_env`` when set (``{}`` = none). By default: a Ray cluster gets the launch
    directory as ``working_dir`` (uploaded; ``.gitignore`` is honoured and sweep outputs are
    excluded); a local cluster none: its workers share this machine and get the driver's
    ``sys.path`` from Ray (a job-level ``runtime_env`` would also keep the trials off the
    workers a local Ray prestarts and preloads).
    """
    env = cluster.get("runtime_env")
    if env is not None:
        return dict(env) or None
    if cluster.get("kind") == "ray":
        return {"working_dir": str(launch_dir),
                "excludes": ["outputs/", "multirun/", "mlruns/", "mlartifacts/", "*.db", "*.db.lock", ".git/",
                             ".venv/", "__pycache__/"]}
    return None


@contextlib.contextmanager
def _quiet_ray_logs(keep: io.StringIO) -> Iterator[None]:
    """Ray's own logger lines during ``ray.init`` go to ``keep`` (shown only if the start fails)."""
    handler = logging.StreamHandler(keep)
    loggers = [logging.getLogger(n) for n in ("ray", "ray._private.authentication.authentication_token_setup")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate


@contextlib.contextmanager
def _stderr_aside(keep: io.StringIO) -> Iterator[None]:
    """File descriptor 2 (where Ray's C++ client logs) goes to a temporary file meanwhile; its
    text is appended to ``keep``. Only while joining a cluster: a local start spawns Ray's
    own processes, which must not inherit the temporary file."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as aside:
        os.dup2(aside.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            aside.seek(0)
            keep.write(aside.read().decode(errors="replace"))


def init_ray(cluster: Mapping[str, Any], launch_dir: Path, preload: Sequence[str] = TRIAL_IMPORTS) -> None:
    """Start this sweep's own Ray (``cluster=local``: never an existing one on the machine) or
    join the configured cluster; a Ray already initialised in this process is used as it is.

    Args:
        cluster: the ``cluster`` config section.
        launch_dir: where the sweep was launched (a cluster's ``working_dir``).
        preload: modules a local Ray's workers import as they start.

    Raises:
        ConfigError: Ray did not start or the cluster refused the connection (one line, naming
            ``cluster.address``, ``cluster.runtime_env`` or ``cluster``).
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": bool(cluster.get("log_to_driver", False))}
    env = runtime_env_for(cluster, launch_dir)
    if env:
        kwargs["runtime_env"] = env
    remote = cluster.get("kind") == "ray"
    if not remote:
        for key in ("num_cpus", "num_gpus"):
            if cluster.get(key) is not None:
                kwargs[key] = cluster[key]
        if preload:
            kwargs["_system_config"] = {"preload_python_modules": list(preload)}
    logs = io.StringIO()
    try:
        # Ray's own start lines (the token-authentication notice it logs on every local start)
        # are kept aside; on a cluster its C++ client's retries too (a refused token: one line).
        with _quiet_ray_logs(logs), (_stderr_aside(logs) if remote else contextlib.nullcontext()):
            ray.init(address=(cluster.get("address") or "auto") if remote else "local", **kwargs)
    except Exception as exc:  # noqa: BLE001 (any failure to start is one line)
        raise ConfigError(_start_failure(cluster, exc, logs.getvalue())) from exc
    for line in logs.getvalue().splitlines():  # what Ray said on a successful start, minus its banner
        if " WARNING " in line and "authentication" not in line:
            print(line, flush=True)


def _start_failure(cluster: Mapping[str, Any], exc: BaseException, logged: str) -> str:
    """The one line for a Ray that did not start (its repeated log lines are not repeated here)."""
    remote = cluster.get("kind") == "ray"
    text = f"{exc}\n{logged}"
    if remote and any(mark in text for mark in _AUTH_FAILURE_MARKS):
        return (f"cluster.address: the Ray cluster at {cluster.get('address') or 'auto'} refused this driver's "
                "authentication token; set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or "
                "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token copied from the head node) where the sweep runs")
    key = "cluster.address" if remote else "cluster"
    if "runtime_env" in str(exc) or "working_dir" in str(exc):
        key = "cluster.runtime_env"
    return f"{key}: Ray did not start ({exception_line(exc)})"
