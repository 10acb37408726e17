"""The sweep's Ray: its own local Ray (``cluster=local``) or a configured cluster, started quietly.

A local Ray's workers get the driver's ``sys.path`` (with the launch directory, where a user's
``mycode.py`` lives) from Ray itself; a cluster gets the launch directory as ``working_dir``.

Trials on the workers a local Ray prestarts: Ray starts one idle worker per CPU with the
cluster, but gives an actor only a worker of the same ``runtime_env``, and Tune gives every
trainable actor one of its own (``PL_DISABLE_FORK=1``): its trials never landed on those workers,
each sweep waited for fresh ones. A sweep that starts its own local Ray puts that variable in the
environment Ray's processes inherit, and runs Tune with its actor ``runtime_env`` left empty
(:func:`trials_on_prestarted_workers`): the same variable, set for every worker, and the first
trial starts on a worker that is already up. When at least half of those workers will run
trials (the sweep's concurrency against the local Ray's CPUs), they also import what a trial
imports as they start (:mod:`search.trials.preload`), while the pre-flight runs: about 0.5 GB
and 6-8 s of CPU each, at the low priority Ray gives its workers, that a first trial no longer waits
for. With more idle CPUs than trials they are left bare (each would hold that memory unused).

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from search.formatting import exception_line
from search.errors import ConfigError
from search.settings import ClusterSettings

__all__ = ["auto_gpu_fraction", "init_ray", "preload_trial_imports", "runtime_env_for", "trials_on_prestarted_workers"]

#: What Tune sets in each trainable actor's ``runtime_env`` (ray.tune.execution.class_cache);
#: a local Ray this module starts has it in every worker's environment instead.
_TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}

#: The node id of the local Ray this process started with ``_TUNE_ACTOR_ENV`` in its workers'
#: environment (None: no such Ray, or one started by someone else).
_node_with_tune_env: str | None = None

#: Ray's name for the module each worker of the local Ray imports as it starts.
_PRELOAD_MODULE = "search.trials.preload"

_AUTH_FAILURE_MARKS = ("InvalidAuthToken", "UNAUTHENTICATED", "authentication token", "auth token")


def _typed(cluster: Mapping[str, Any] | ClusterSettings) -> ClusterSettings:
    """The ``cluster`` settings, typed (a caller holding the raw section: a notebook, a test)."""
    return cluster if isinstance(cluster, ClusterSettings) else ClusterSettings.from_dict(cluster)


def runtime_env_for(cluster: ClusterSettings | Mapping[str, Any], launch_dir: Path) -> dict[str, Any] | None:
    """The Ray ``runtime_env`` that brings the user's code to the workers.

    ``cluster.runtime_env`` when set (``{}`` = none). By default: a Ray cluster gets the launch
    directory as ``working_dir`` (uploaded; ``.gitignore`` is honoured and sweep outputs are
    excluded); a local cluster none: its workers share this machine and get the driver's
    ``sys.path`` from Ray.
    """
    cluster = _typed(cluster)
    if cluster.runtime_env is not None:
        return dict(cluster.runtime_env) or None
    if cluster.kind == "ray":
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


def preload_trial_imports(cluster: ClusterSettings, concurrency: int | None) -> bool:
    """Whether the workers of the local Ray ``cluster`` describes import a trial's modules as
    they start: Ray prestarts one per CPU, and at least half of them will run trials
    (``2 * concurrency >= CPUs``). Never on a Ray cluster (its workers are not this sweep's)."""
    if cluster.kind != "local" or concurrency is None:
        return False
    cpus = cluster.num_cpus if cluster.num_cpus is not None else _cpus_ray_detects()
    return 2 * concurrency >= cpus


def _cpus_ray_detects() -> float:
    """The CPUs a local Ray counts (and prestarts a worker for): the container's quota, else the
    machine's count; the machine's count where Ray's helper is missing (never fewer than Ray's:
    an undercount would preload every one of many workers)."""
    try:
        from ray._private.utils import get_num_cpus

        return get_num_cpus(override_docker_cpu_warning=True)
    except Exception:  # noqa: BLE001 (another Ray: the upper bound)
        return os.cpu_count() or 1


def init_ray(cluster: ClusterSettings | Mapping[str, Any], launch_dir: Path,
             concurrency: int | None = None) -> None:
    """Start this sweep's own Ray (``cluster=local``: never an existing one on the machine) or
    join the configured cluster; a Ray already initialised in this process is used as it is.

    Args:
        cluster: the ``cluster`` settings (a raw section is parsed first).
        launch_dir: where the sweep was launched (a cluster's ``working_dir``).
        concurrency: the sweep's trials at once (None: not a sweep); a local Ray's workers
            import a trial's modules as they start when :func:`preload_trial_imports` says so.

    Raises:
        ConfigError: Ray did not start or the cluster refused the connection (one line, naming
            ``cluster.address``, ``cluster.runtime_env`` or ``cluster``).
    """
    import ray

    if ray.is_initialized():
        return
    cluster = _typed(cluster)
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": cluster.log_to_driver}
    env = runtime_env_for(cluster, launch_dir)
    if env:
        kwargs["runtime_env"] = env
    remote = cluster.kind == "ray"
    if not remote:
        for key in ("num_cpus", "num_gpus"):
            if getattr(cluster, key) is not None:
                kwargs[key] = getattr(cluster, key)
        if preload_trial_imports(cluster, concurrency):
            kwargs["_system_config"] = {"preload_python_modules": [_PRELOAD_MODULE]}
        # Inherited by the raylet and so by every worker it starts, the prestarted ones too.
        os.environ.update(_TUNE_ACTOR_ENV)
    logs = io.StringIO()
    try:
        # Ray's own start lines (the token-authentication notice it logs on every local start)
        # are kept aside; on a cluster its C++ client's retries too (a refused token: one line).
        with _quiet_ray_logs(logs), (_stderr_aside(logs) if remote else contextlib.nullcontext()):
            ray.init(address=(cluster.address or "auto") if remote else "local", **kwargs)
    except Exception as exc:  # noqa: BLE001 (any failure to start is one line)
        raise ConfigError(_start_failure(cluster, exc, logs.getvalue())) from exc
    global _node_with_tune_env
    _node_with_tune_env = None if remote else ray.get_runtime_context().get_node_id()
    for line in logs.getvalue().splitlines():  # what Ray said on a successful start, minus its banner
        if " WARNING " in line and "authentication" not in line:
            print(line, flush=True)


@contextlib.contextmanager
def trials_on_prestarted_workers() -> Iterator[bool]:
    """While Tune runs (around ``Tuner.fit``): its trainable actors get no ``runtime_env`` of
    their own when this process started the local Ray they run on (:func:`init_ray` put Tune's
    variables in its workers' environment), so Ray places them on the workers it prestarted.
    Anywhere else (a cluster, a Ray started by someone else, an environment variable Tune
    forwards, a Ray without the class Tune keeps them in) Tune's own ``runtime_env`` is kept.
    Yields whether the actors go without one."""
    import ray

    try:
        from ray.tune.execution import class_cache
    except ImportError:  # another Ray: Tune's behaviour, unchanged
        yield False
        return
    defaults = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    forwarded = [k for k in getattr(class_cache, "ENV_VARS_TO_PROPAGATE", ()) if k in os.environ]
    ours = (ray.is_initialized() and _node_with_tune_env is not None
            and ray.get_runtime_context().get_node_id() == _node_with_tune_env)
    if not ours or defaults != _TUNE_ACTOR_ENV or forwarded:
        yield False
        return
    defaults.clear()
    try:
        yield True
    finally:
        defaults.update(_TUNE_ACTOR_ENV)


def _start_failure(cluster: ClusterSettings, exc: BaseException, logged: str) -> str:
    """The one line for a Ray that did not start (its repeated log lines are not repeated here)."""
    remote = cluster.kind == "ray"
    text = f"{exc}\n{logged}"
    if remote and any(mark in text for mark in _AUTH_FAILURE_MARKS):
        return (f"cluster.address: the Ray cluster at {cluster.address or 'auto'} refused this driver's "
                "authentication token; set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or "
                "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token copied from the head node) where the sweep runs")
    key = "cluster.address" if remote else "cluster"
    if "runtime_env" in str(exc) or "working_dir" in str(exc):
        key = "cluster.runtime_env"
    return f"{key}: Ray did not start ({exception_line(exc)})"


def auto_gpu_fraction(composed: dict[str, Any], concurrency: int) -> float:
    """``trial.gpus=auto``: probe the model on one GPU of the cluster (see search.packing).

    Args:
        composed: the resolved config; its ``data``, ``model`` and ``trial`` dicts go to the
            probe in a Ray worker (Ray's wire format), as a trial's do.
        concurrency: ``search.concurrency`` (a hint is printed when it leaves GPUs idle).
    """
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        print("trial.gpus=auto: no GPU in the Ray cluster; trials run on CPU", flush=True)
        return 0.0
    from search.packing import probe_gpu_fraction

    probe = ray.remote(num_gpus=1)(probe_gpu_fraction)
    report = ray.get(probe.remote(composed["data"], composed["model"], composed["trial"]))
    times = ", ".join(f"x{m}: {1000 * t:.2f} ms" for m, t in report["step_seconds"].items())
    print(f"trial.gpus=auto on {report['gpu']}: step time by batch multiple {times}; peak "
          f"{report['peak_bytes'] / 2**20:.0f} MiB of {report['total_bytes'] / 2**30:.0f} GiB -> "
          f"{report['trials_per_gpu']} trials per GPU (trial.gpus={report['fraction']:.4g})", flush=True)
    total_gpus = int(ray.cluster_resources().get("GPU", 0))
    wanted = report["trials_per_gpu"] * total_gpus
    if concurrency < wanted:
        print(f"hint: search.concurrency={wanted} would keep all {total_gpus} GPU(s) packed", flush=True)
    return float(report["fraction"])

