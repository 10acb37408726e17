"""Running one trial: choose its kind and hand it over (:func:`run_trial`), and the Ray Tune side
of it (:func:`run_tune_trial`: adopt a finished trial, report the result, record a failure).

:func:`run_trial` is plain Python (no Ray needed), so a trial can be run and debugged on its own.
The kind comes from the registry the pre-flight also reads (:func:`search.trials.kinds.kind_for`):
the method's class and the config decide, and the kind names the function that runs it.

A trial's files go to ``<sweep root>/trials/<trial_id>/`` (:mod:`search.storage`);
``trial_result.json`` is written last, so a resumed sweep adopts a trial that has one (or a
FINISHED MLflow run) instead of running it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any, Callable

from search.faults import FaultPlan
from search.formatting import exception_line
from search.space import settings_from_params
from search.storage import SweepStorage, as_storage_error
from search.trials.common import TrialFailed, adopt_finished
from search.trials.context import TrialContext, record_failure
from search.trials.kinds import TrialRequest, config_model_kind, kind_for
from search.trials.mlflow_run import TrialRun

__all__ = ["run_trial", "run_tune_trial"]

log = logging.getLogger("search")


def run_trial(params: dict[str, Any], ctx: TrialContext, *, trial_id: str = "local",
              trial_dir: str | os.PathLike | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one trial and return its flat result (metrics, settings, masks path).

    Args:
        params: the sampled parameters (``{"method": ..., "METHOD.KEY": value}``).
        ctx: the sweep's fixed context.
        trial_id: a unique name (Ray's trial id in a sweep).
        trial_dir: where the trial's files go (default: a temporary directory).
        report: where intermediate results go (Ray's ``tune.report`` in a sweep).

    Raises:
        TrialFailed: the run produced NaN loss or accuracy, or no trial kind runs this method
            on this model.
        ObjectiveNotLoggedError: an objective was never reported (a user's module did not log it).
    """
    mlflow_run = TrialRun.start(ctx, trial_id, params)  # the child run exists (RUNNING) from the start
    start = time.perf_counter()
    method_name, settings, overrides = settings_from_params(ctx.space, params)
    method_class = ctx.space.spaces[method_name].method_class()
    kind = kind_for(method_class, ctx.data, ctx.model)
    if kind is None:
        what = "Hugging Face text models" if config_model_kind(ctx.data, ctx.model) == "hf" else "this model"
        raise TrialFailed(f"trial {trial_id}: method {method_name!r} does not prune {what}")
    # The trial's settings, parsed once here (with its sampled trial.* values) and read typed below.
    request = TrialRequest(params=params, ctx=ctx, method_name=method_name, settings=settings, overrides=overrides,
                           trial=ctx.settings_for(overrides), trial_id=trial_id, trial_dir=trial_dir,
                           report=report, start=start, mlflow_run=mlflow_run)
    return kind.runner()(request)


_WATCHING: set[int] = set()


def _watch_driver(driver: Mapping[str, Any] | None, interval_s: float = 2.0) -> None:
    """Stop this worker process when the sweep's driver (on this host) is gone.

    Ray stops a dead driver's workers on its own when it notices; this covers the time until it
    does and local clusters whose head outlives a killed driver: no orphan keeps training.
    """
    if not driver or driver.get("host") != socket.gethostname() or int(driver["pid"]) in _WATCHING:
        return
    import psutil

    pid, created = int(driver["pid"]), driver.get("create_time")
    _WATCHING.add(pid)

    def alive() -> bool:
        try:
            proc = psutil.Process(pid)
            return (created is None or abs(proc.create_time() - float(created)) < 1.0) and \
                proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def loop() -> None:
        while alive():
            time.sleep(interval_s)
        log.warning("the sweep's driver (pid %d) is gone; stopping this worker", pid)
        os._exit(1)

    threading.Thread(target=loop, name="prunesearch-driver-watch", daemon=True).start()


def run_tune_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The body of the Ray Tune trainable (:func:`search.trials.context.ray_trainable`): runs
    :func:`run_trial` and reports its final result.

    A trial that already finished (resume) is adopted, not run again. A failing trial logs a
    FAILED child run with its reason before re-raising, so MLflow and Optuna both record the
    failure while the sweep goes on, and leaves its exception line in its folder
    (:func:`search.trials.context.record_failure`): the failure is deterministic, so Tune's retry
    (meant for dead workers) raises it again at once instead of running the trial a second time.
    """
    from ray import tune

    context = tune.get_context()
    trial_id = context.get_trial_id() or "trial"
    _watch_driver(ctx.driver)
    adopted = adopt_finished(ctx, trial_id)
    if adopted is not None:
        print(f"trial {trial_id} had finished before the sweep was interrupted; adopting its result", flush=True)
        tune.report({**adopted, "final_result": True, "adopted": True})
        return
    import torch

    cpus = int(max(1, ctx.trial_settings.cpus))
    torch.set_num_threads(cpus)  # several trials share the machine's cores
    try:
        if ctx.sweep_root:
            with SweepStorage(ctx.sweep_root).trial_dir(trial_id) as trial_dir:
                row = run_trial(params, ctx, trial_id=trial_id, trial_dir=trial_dir, report=tune.report)
        else:
            row = run_trial(params, ctx, trial_id=trial_id, trial_dir=context.get_trial_dir(), report=tune.report)
    except Exception as exc:
        # A write the storage refused (any trial kind, any writer) reaches the driver as a
        # StorageError, which stops the sweep instead of letting the next trial fill the disk; a
        # resume runs that trial again, so it is not recorded as a deterministic failure.
        failure = as_storage_error(exc)
        if failure is not None and failure is not exc:
            exc = failure
        if failure is None:
            # Any other exception came from the trial's own code (a stopped trial exits with
            # SystemExit, a dead worker raises nothing): record it before anything else can fail.
            record_failure(ctx, trial_id, exception_line(exc))
        if ctx.tracking:
            try:
                from search.tracking import log_trial_run

                live = TrialRun.pop(trial_id)
                if live is not None:
                    live.close({})
                log_trial_run(ctx.tracking["uri"], ctx.tracking["experiment_id"],
                              ctx.tracking["parent_run_id"], trial_id,
                              params=dict(params) if live is None else {},  # a started run has them
                              metrics={}, status="FAILED",
                              error="".join(traceback.format_exception(exc))[-5000:])
            except Exception:  # tracking trouble must not hide the trial's own error
                log.exception("could not log the failed trial %s to MLflow", trial_id)
        if failure is not None:
            raise failure from None
        raise
    plan = FaultPlan.from_config(ctx.trial_settings.faults)
    if plan is not None:
        plan.record_completion(trial_id)
    import ray

    node = ray.get_runtime_context().get_node_id()
    tune.report({**row, "node_id": node, "final_result": True})
