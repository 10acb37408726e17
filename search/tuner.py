"""The sweep: Ray Tune runs trials, Optuna samples them multi-objective, MLflow tracks them.

:func:`run_sweep` takes the resolved config (a plain dict) and an output directory, and:

1. takes the sweep's lock (one driver per sweep: a rival is refused before its pre-flight),
   then runs the pre-flight's checks that build nothing (:mod:`search.preflight`: every key,
   the methods, the objectives);
2. starts its own Ray (``cluster=local``, :mod:`search.ray_session`) or joins the configured
   cluster (user code shipped by ``runtime_env``) while a thread checks the stores and a
   process of its own builds data, model and module once (this process never imports
   Lightning); then checks the trial's resources against the cluster. A failure is one
   ``ConfigError`` line; nothing is tracked and a Ray this sweep started is shut down;
3. claims the sweep's unique name as its Optuna study (an RDB store, beside the MLflow store by
   default; :func:`search.identity.claim_study_name`), then creates the MLflow parent run (or
   re-opens both on resume);
4. runs ``Tuner(StudySearcher(define-by-run space, objectives))`` (search.study_searcher) with a
   concurrency limit, per-trial resources, actor reuse and optional ASHA; Tune's state and
   every trial's files live under the sweep's root (:mod:`search.storage`);
5. after every ended trial prints one line and logs the recomputed front to MLflow;
6. at the end prints the front, copies its masks and configs to ``<output>/front/`` and
   logs them as artifacts. Any error after the parent run started ends it FAILED with the
   reason; a sweep in which no trial finished raises :class:`SweepFailed`. A write the storage
   refused (a full disk, in a trial or here) stops every trial as Ctrl-C does and raises
   :class:`~search.storage.StorageError` (the parent run ends KILLED; ``sweep.json`` stays
   unfinished, so the sweep resumes once space is freed).

Resume: ``sweep.json`` (written atomically) records the sweep's root, parent run id and
identity (:mod:`search.identity`: a resume with another config is refused before Ray starts,
unless ``search.resume_accept`` names the change); ``search.resume=true`` restores that
Tuner. A trial that finished (its ``trial_result.json``, or a FINISHED MLflow run) is adopted,
never run again, also when Tune's last checkpoint missed it (:class:`BudgetLimiter` counts
those against the budget).

The sweep's parts, by job: :mod:`search.sweep_state` (``sweep.json``, identity, abort requests),
:mod:`search.ray_session` (Ray's start, ``trial.gpus=auto``), :mod:`search.tune_callbacks`
(what runs in Tune's loop: the per-trial line, the budget limiter, the abort stopper, rows from
Tune's trials), :mod:`search.front_report` (the front's table and export). This module wires
them: :func:`run_sweep` -> ``_run_locked`` (Ray, stores, parent run) -> ``_tune`` (the Tuner, then
the rows, the front once, the report). Over 500 lines because the sweep's order of events and
its failure handling read best in one place; each function is under 80 lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import shell_command
from search.formatting import _last_line, exception_line
from search.formatting import format_count as _fmt_flops  # noqa: F401  (the name tests read here)
from search.front_report import export_front, finish_tracking, mark_feasible, print_front, print_problems, print_start
from search.preflight import PreflightResult, check_cluster_resources, preflight
from search.progress import board_name, live_progress, make_progress_callback
from search.ray_session import trials_on_prestarted_workers
from search.sampling import make_sampler
from search.settings import SweepSettings, objectives_of
from search.errors import ConfigError
from search.storage import StorageError, SweepLock, SweepLocked, SweepStorage, storage_errors
from search.sweep_state import (ABORT_FILE, STATE_FILE, _ABORTS, drop_truncated_tune_state, find_resume_dir,
                                read_abort, read_state, record_identity, state_from_mlflow, write_state)
from search.trials.context import TrialContext
from search.trials.trainable import ray_trainable
from search.tune_callbacks import (end_unfinished_runs, logged_trials, make_abort_stopper_class,
                                   make_budget_limiter_class, make_front_callback_class, orphan_rows, quiet_tune,
                                   result_trial_id, result_values, stopped_by_storage, tune_file_loggers)

if TYPE_CHECKING:
    import pandas as pd

    from search.budget import BudgetLedger
    from search.preflight import BuildProcess

# pandas, the front's maths and Ray Tune are imported where they are used: a config refused by
# the pre-flight's first checks never waits for them.

__all__ = ["STATE_FILE", "SweepFailed", "SweepInterrupted", "SweepResult", "exception_line", "find_resume_dir",
           "make_sampler", "objectives_of", "print_front", "run_sweep"]


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before all its trials ended (Ctrl-C); it can be resumed."""


class SweepFailed(RuntimeError):
    """The sweep ran but no trial finished (every trial failed); the message says why."""


@dataclass
class SweepResult:
    """What a finished sweep produced.

    Attributes:
        rows: one dict per trial (metrics, settings, status).
        front: the Pareto-optimal rows (a DataFrame, cheapest first).
        parent_run_id: the MLflow parent run (None without tracking).
        output_dir: where the front's masks and the sweep state were written.
        hypervolume: of the final front, against the default reference.
        cost: what the trials spent, by budget unit (trial_epochs, cpu_seconds, gpu_seconds).
        budget_spent: the sweep stopped starting trials because ``search.budget`` was spent.
        front_seeds: with ``search.seeds > 1``, mean and std of each front point over seeds.
    """

    rows: list[dict[str, Any]]
    front: pd.DataFrame
    parent_run_id: str | None
    output_dir: Path
    hypervolume: float
    cost: dict[str, float] | None = None
    budget_spent: bool = False
    front_seeds: pd.DataFrame | None = None


@dataclass
class SweepRun:
    """One run of a sweep's tuner, as ``_run_locked`` sets it up for ``_tune``.

    Attributes:
        composed: the resolved config as a dict (after the pre-flight: absolute paths, the
            method pool), kept whole for what crosses into Ray (each trial's config, Tune's
            wire format) and the sampler's recipe; everything else reads ``settings``.
        settings: ``composed`` parsed once, by the pre-flight (:class:`~search.settings.SweepSettings`).
        space: the sweep's :class:`~search.space.SearchSpace`.
        objectives: ``[(metric, "max"|"min"), ...]``.
        output_dir: the sweep's directory (``sweep.json``, ``front/``).
        state: what ``sweep.json`` holds (updated and written as the sweep goes).
        resuming: this run continues an earlier one.
        storage: the sweep's root (Tune's state, ``trials/<id>/``).
        tracker: the MLflow parent run's :class:`~search.tracking.SweepTracker` (None: no tracking).
        tracking: what trials need to log to MLflow (None: no tracking).
        abort_file: where a trial's configuration or storage error asks the sweep to stop.
    """

    composed: dict[str, Any]
    settings: SweepSettings
    space: Any
    objectives: list[tuple[str, str]]
    output_dir: Path
    state: dict[str, Any]
    resuming: bool
    storage: SweepStorage
    tracker: Any
    tracking: dict[str, Any] | None
    abort_file: str

    @property
    def state_file(self) -> Path:
        return self.output_dir / STATE_FILE

    @property
    def experiment_path(self) -> str:
        """Tune's experiment directory under the sweep's root."""
        return self.storage.path("ray")


def _driver_identity() -> dict[str, Any]:
    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "create_time": psutil.Process().create_time()}


def run_sweep(cfg: dict[str, Any], output_dir: str | os.PathLike,
              checked: PreflightResult | None = None) -> SweepResult:
    """Run (or resume) a sweep described by a resolved config; see the module docstring.

    Args:
        cfg: the resolved Hydra config as a plain dict.
        output_dir: the sweep's directory (Hydra's output dir): ``sweep.json``, the lock, the
            front's masks and, without ``search.storage``, Tune's state and the trials' files.
            On resume, the directory of the interrupted sweep.
        checked: a pre-flight already run on ``cfg`` (else it runs here).

    Raises:
        ConfigError: the pre-flight failed, another driver runs this sweep, or a configuration
            error surfaced in a trial (nothing was started, or the parent run ends FAILED).
        SweepFailed: no trial finished.
        SweepInterrupted: Ctrl-C; the sweep can be resumed.
        StorageError: a write to the sweep's files failed (full disk...); it can be resumed.
    """
    output_dir = Path(output_dir).resolve()
    # Read from the dict, before the pre-flight parses it: the lock (taken first, see below)
    # depends on it. A bad value is refused by the pre-flight's parse.
    resuming = bool((cfg.get("search") or {}).get("resume"))
    if not resuming:
        output_dir.mkdir(parents=True, exist_ok=True)
    # The lock comes before the pre-flight: a rival driver is refused at once, not after its own
    # pre-flight (which builds the data and model: minutes on a loaded machine). A resume of a
    # directory that does not exist takes no lock and is refused below.
    lock = None
    if output_dir.is_dir():
        try:
            lock = SweepLock(output_dir).acquire()
        except SweepLocked as exc:
            raise ConfigError(f"search.resume_dir: {exc}") from exc
    builder = None
    try:
        if checked is None and "lightning" not in sys.modules:
            # Data, model and module are built once, in a process of their own started now: it
            # runs while this one checks the config and starts Ray (see _start_ray_and_check).
            from search.preflight import BuildProcess

            builder = BuildProcess(cfg)
        # The checks that need nothing built (schema, methods, objectives): a refusal in seconds.
        pre = checked or preflight(cfg, output_dir, build=False, open_stores=False)
        state = _sweep_state(pre, output_dir, resuming)
        return _run_locked(pre, output_dir, state, resuming, builder, built=checked is not None)
    finally:
        if builder is not None:
            builder.stop()
        if lock is not None:
            lock.release()


def _sweep_state(pre: PreflightResult, output_dir: Path, resuming: bool) -> dict[str, Any]:
    """``sweep.json`` of ``output_dir`` (restored from MLflow when a resume lost it) with this
    run's identity; a new sweep over an old one, or a resume of nothing, is refused.

    Raises:
        ConfigError: naming ``search.resume`` or ``search.resume_dir``.
    """
    state = read_state(output_dir / STATE_FILE, "search.resume_dir" if resuming else "search.resume")
    if resuming and not state and output_dir.is_dir():
        state = state_from_mlflow(pre.settings.tracking, output_dir)
    if resuming and not state:
        raise ConfigError(f"search.resume_dir: {output_dir} holds no sweep (no {STATE_FILE}); pass the output "
                          "directory of the sweep to continue")
    if resuming and state.get("finished"):
        raise ConfigError(f"search.resume_dir: the sweep in {output_dir} finished ({state.get('n_trials')} "
                          "trials); nothing to resume")
    if state and not resuming:
        raise ConfigError(f"search.resume: {output_dir} already holds a sweep; pass search.resume=true "
                          "to continue it, or choose another output directory")
    return record_identity(pre.cfg, output_dir, state, resuming, pre.settings)


def _run_locked(pre: PreflightResult, output_dir: Path, state: dict[str, Any], resuming: bool,
                builder: BuildProcess | None = None, built: bool = False) -> SweepResult:
    """Ray and the rest of the pre-flight, the parent run and the Optuna store; then the tuner.
    Holds the sweep's lock."""
    settings = pre.settings  # parsed once, by the pre-flight
    if resuming:
        print(f"resuming the sweep in {output_dir}", flush=True)
    abort_file = output_dir / ABORT_FILE
    abort_file.unlink(missing_ok=True)
    _ABORTS.pop(str(abort_file), None)  # an earlier sweep of this process in the same directory

    import ray

    own_ray = not ray.is_initialized()
    try:
        _start_ray_and_check(pre, settings, output_dir, builder, built)
    except BaseException:
        if own_ray and ray.is_initialized():  # a refusal leaves nothing running
            ray.shutdown()
        raise
    for note in pre.notes:
        print(f"note: {note}", flush=True)

    tracker = None
    if pre.tracking_uri is not None:
        from search.tracking import SweepTracker

        # Only now, with every check passed, is the store written to (created, migrated).
        tracker = SweepTracker(pre.tracking_uri, settings.tracking.experiment, settings.tracking.artifact_location)
    name = state.get("name") or _claim_name(settings, pre.objectives, pre.optuna_storage, tracker)
    storage_root = state.get("sweep_root") or (
        f"{str(settings.search.storage).rstrip('/')}/{name}" if settings.search.storage else str(output_dir))
    storage = SweepStorage(storage_root)
    tracking = _start_parent(pre, settings, name, output_dir, storage, tracker, state) if tracker else None
    state = {"name": name, "sweep_root": storage.root, "storage_path": storage.path("ray"),
             "parent_run_id": tracking and tracking["parent_run_id"],
             "experiment_id": tracking and tracking["experiment_id"], "optuna_storage": pre.optuna_storage,
             "optuna_study": name, "finished": False,
             "started": state.get("started", datetime.now().isoformat(timespec="seconds")),
             **{k: state[k] for k in ("identity", "accepted_changes") if k in state},
             **({"storage_error": state["storage_error"]} if state.get("storage_error") else {})}
    write_state(output_dir / STATE_FILE, state, tracker)
    run = SweepRun(composed=pre.cfg, settings=settings, space=pre.space, objectives=pre.objectives,
                   output_dir=output_dir, state=state, resuming=resuming, storage=storage, tracker=tracker,
                   tracking=tracking, abort_file=str(abort_file))
    try:
        return _tune(run)
    except SweepInterrupted as exc:
        if tracker is not None:
            _end_parent(tracker, "KILLED", f"interrupted: {exc}; resume with search.resume=true "
                                           f"search.resume_dir={output_dir}")
        raise
    except StorageError as exc:
        if tracker is not None:  # resumable, like an interrupted sweep
            _end_parent(tracker, "KILLED", f"storage error: {exc}; free space and resume with "
                                           f"search.resume=true search.resume_dir={output_dir}")
        raise
    except BaseException as exc:
        if tracker is not None:
            _end_parent(tracker, "FAILED", exception_line(exc) if not isinstance(exc, (ConfigError, SweepFailed))
                        else str(exc))
        raise


def _start_parent(pre: PreflightResult, settings: SweepSettings, name: str, output_dir: Path,
                  storage: SweepStorage, tracker: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Start (or re-open, on resume) the sweep's MLflow parent run; returns what the trials need
    to log under it."""
    parent = tracker.start_parent(
        # The composed dict: the parent run's params are the config as the user's overrides
        # resolved it, every key (methods' settings and spaces included).
        name, params=pre.cfg,
        tags={"prunesearch.data": settings.data.name, "prunesearch.model": settings.model.name,
              "prunesearch.methods": ",".join(pre.space.method_names),
              "prunesearch.objectives": json.dumps(pre.objectives),
              "prunesearch.output_dir": str(output_dir), "prunesearch.storage": storage.root,
              "prunesearch.optuna_storage": pre.optuna_storage or "", "prunesearch.optuna_study": name},
        resume_run_id=state.get("parent_run_id"))
    return {"uri": pre.tracking_uri, "experiment": settings.tracking.experiment,
            "experiment_id": tracker.experiment_id, "parent_run_id": parent,
            "front_plots_s": settings.tracking.front_plots_s,  # the front callback's plots
            # What a trial logs while it runs (search.trials.mlflow_run).
            **settings.tracking.trial_logging()}


def _claim_name(settings: SweepSettings, objectives: list[tuple[str, str]], optuna_url: str | None,
                tracker: Any) -> str:
    """A new sweep's name, claimed as its Optuna study (:func:`search.identity.claim_study_name`):
    ``sweep_name`` or ``<method or all>-<data>-<timestamp>``, suffixed ``-2``, ``-3``, ... when a
    study or an MLflow parent run of the experiment already has it (a chosen name that is
    suffixed is printed)."""
    from search.identity import claim_study_name
    from search.sampling import open_optuna_storage

    method_label = settings.method["name"] if settings.method else "all"
    wanted = settings.sweep_name or f"{method_label}-{settings.data.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if not optuna_url:
        return str(wanted)
    taken = tracker.sweep_name_taken if tracker is not None else (lambda n: False)
    directions = ["minimize" if mode == "min" else "maximize" for _, mode in objectives]
    name = claim_study_name(open_optuna_storage(optuna_url), str(wanted), directions, taken)
    if name != wanted and settings.sweep_name:
        print(f"note: sweep_name {wanted!r} is taken in this store; this sweep is {name!r}", flush=True)
    return name


def _start_ray_and_check(pre: PreflightResult, settings: SweepSettings, output_dir: Path,
                         builder: BuildProcess | None, built: bool) -> None:
    """The rest of the pre-flight, around Ray's start: the stores are checked on a thread while
    Ray starts (on this thread: Ray's processes die with the thread that started them), and
    what ``builder`` (:class:`~search.preflight.BuildProcess`, started with the sweep: this
    process never imports Lightning or transformers) found is read once Ray is up. Without a
    builder (a process that already holds Lightning: a notebook, a test) the build runs here.

    Raises:
        ConfigError: a store, Ray, the cluster's resources, or what the build found.
    """
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from search.preflight import apply_build, build_check, open_sweep_stores
    from search.ray_session import init_ray

    cluster = settings.cluster
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stores") as pool:
        stores = pool.submit(open_sweep_stores, pre, output_dir) if not built else None
        try:
            init_ray(cluster, Path.cwd(), settings.search.concurrency)
        finally:
            if stores is not None:
                stores.result()  # its ConfigError first: the store is what the user must fix
    if cluster.kind == "ray":
        check_cluster_resources(settings.trial, ray.cluster_resources(), f"the Ray cluster at {cluster.address}")
    if not built:
        apply_build(pre, builder.result() if builder is not None else build_check(pre.cfg))


def _end_parent(tracker: Any, status: str, reason: str) -> None:
    try:
        tracker.finish(status, reason=reason)
    except Exception as exc:  # the store may be what failed
        print(f"warning: could not mark the MLflow parent run {status} ({exc})", file=sys.stderr, flush=True)


def _tune(run: SweepRun) -> SweepResult:
    """Run (or restore) the Tuner, then collect the rows, compute the front once, print and
    export it."""
    from search import pareto
    from search.budget import BudgetLedger

    # Each trial gets its config as plain dicts (Ray Tune's wire format; a worker parses them once).
    composed, trial = run.composed, run.settings.trial
    if trial.gpus == "auto":
        from search.ray_session import auto_gpu_fraction

        trial = trial.replace(gpus=auto_gpu_fraction(composed, run.settings.search.concurrency))
        composed = {**composed, "trial": {**composed["trial"], "gpus": trial.gpus}}
    ctx = TrialContext(data=dict(composed["data"]), model=dict(composed["model"]), trial=dict(composed["trial"]),
                       space=run.space, objectives=run.objectives, tracking=run.tracking,
                       report_every_epoch=run.settings.search.scheduler_kind != "none",
                       module=dict(composed.get("module") or {}) or None, sweep_root=run.storage.root,
                       resumed=run.resuming, driver=_driver_identity())
    resources = {"cpu": float(trial.cpus), "gpu": float(trial.gpus or 0)}
    budget = run.settings.budget
    start = time.perf_counter()
    print_start(run)
    tuner, callback = _make_tuner(run, ctx, resources, budget)
    results = _fit(run, tuner)
    _raise_on_abort(run)
    rows, configs, ledger = _collect_rows(run, results, BudgetLedger(budget, resources["cpu"], resources["gpu"]))
    n_trials = run.settings.search.n_trials
    # Trials that ended (finished, stopped early or failed, orphans included); fewer than asked
    # for means Ctrl-C stopped the sweep (a trial Tune stopped mid-run has no final result),
    # unless the budget was spent.
    interrupted = len(rows) < n_trials and not ledger.exhausted
    ok_rows = [r for r in rows if r["status"] in ("ok", "early_stopped")]
    # search.constraints: each row says whether it met them; the front is over those that did.
    front_rows = mark_feasible(ok_rows, run.settings.search.constraint_list, run.tracker)
    # The front and its hypervolume, once (the console, front/, MLflow and the result read them).
    summary = pareto.front_summary(front_rows, run.objectives) if front_rows else None
    front = summary.front if summary is not None else _empty_frame()
    hv = summary.hypervolume if summary is not None and len(front) else 0.0
    print_front(front, run.objectives)
    print_problems(rows, callback.unlogged if callback is not None else [], run.storage.trial_location)
    front_dir = run.output_dir / run.settings.export.front_dir
    exported = export_front(front, rows, front_dir, run.tracking) if len(front) else []
    print(f"\n{len(rows)} trials in {time.perf_counter() - start:.0f}s; hypervolume {hv:.5g}; "
          f"front masks in {front_dir}", flush=True)
    if ledger.exhausted:
        print(f"budget spent: {ledger.describe()}; no trial started after that ({len(rows)} trials ran, "
              f"search.n_trials={n_trials})", flush=True)
    if interrupted:
        # Ctrl-C: Tune saved its state and returned early; keep the sweep resumable.
        print(f"\ninterrupted after {len(rows)} of {n_trials} trials; continue with:\n"
              f"  python -m search <same overrides> search.resume=true search.resume_dir={run.output_dir}",
              flush=True)
        run.state.update({"finished": False, "n_trials": len(rows)})
        write_state(run.state_file, run.state, run.tracker)
        raise SweepInterrupted(f"{len(rows)} of {n_trials} trials ended")
    front_seeds = None
    seeds = run.settings.search.seeds
    if seeds > 1 and len(front):
        from search.seeds import rerun_front

        front_seeds = rerun_front(front, configs, ctx, seeds=seeds, objectives=run.objectives,
                                  output_dir=run.output_dir, front_dir=front_dir, resources=resources,
                                  concurrency=run.settings.search.concurrency, tracking=run.tracking)
    run.state.pop("storage_error", None)
    run.state.update({"finished": True, "n_trials": len(rows), "exported": [str(p) for p in exported],
                      "cost": ledger.totals(), "budget_spent": ledger.exhausted})
    write_state(run.state_file, run.state, run.tracker)
    if not ok_rows:
        failed = [r for r in rows if r["status"] == "failed"]
        reasons = sorted({_last_line(r.get("error")) for r in failed})
        raise SweepFailed(f"no trial finished: {len(failed)} of {len(rows)} failed ({'; '.join(reasons)[:400]})")
    finish_tracking(run, front_dir, hv)
    if run.state.get("optuna_storage"):
        print(f"Optuna study {run.state['name']!r}: " + shell_command(["optuna-dashboard", run.state["optuna_storage"]]),
              flush=True)
    return SweepResult(rows=rows, front=front, parent_run_id=run.tracking and run.tracking["parent_run_id"],
                       output_dir=run.output_dir, hypervolume=float(hv), cost=ledger.totals(),
                       budget_spent=ledger.exhausted, front_seeds=front_seeds)


def _empty_frame() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


def _make_tuner(run: SweepRun, ctx: TrialContext, resources: dict[str, float], budget: Any) -> tuple[Any, Any]:
    """The Tuner: restored from Tune's state on resume (unless a full disk truncated it), else a
    new one around the sampler, the budget limiter, the scheduler and the callbacks. Returns
    ``(tuner, front callback or None)``."""
    from ray import tune

    from search.budget import BudgetLedger
    from search.budget_searcher import BudgetSearcher
    from search.mo_asha import build_scheduler
    from search.study_searcher import StudySearcher

    search = run.settings.search
    trainable = tune.with_resources(tune.with_parameters(ray_trainable, ctx=ctx), resources)
    storage_stopped = run.resuming and (bool(run.state.get("storage_error"))
                                        or any(stopped_by_storage(r) for r in logged_trials(run.tracking)))
    # Tune's state truncated by the full disk: a new Tuner, which adopts the finished trials.
    lost_state = storage_stopped and not drop_truncated_tune_state(run.storage, run.experiment_path)
    if run.resuming and not lost_state and tune.Tuner.can_restore(run.experiment_path):
        # After a storage error the trial the full disk stopped is "errored" in Tune's state:
        # run the errored trials again (a trial that failed on its own fails again, once).
        tuner = tune.Tuner.restore(run.experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=storage_stopped)
        return tuner, None
    # Saved by its recipe, never by pickling the sampler (search/sampling.py).
    # The raw ``search`` section: the searcher's recipe for its sampler (a SamplerFactory takes a
    # mapping; Ray Tune pickles the searcher with it).
    searcher = StudySearcher(run.space, run.objectives, run.composed["search"], study_name=run.state["name"],
                             storage_url=run.state.get("optuna_storage") or None, sampler_factory=make_sampler)
    searcher = make_budget_limiter_class()(searcher, search.concurrency, search.n_trials, run.tracking,
                                           run.storage.root)
    searcher = BudgetSearcher(searcher, BudgetLedger(budget, resources["cpu"], resources["gpu"]))
    scheduler = build_scheduler(search, run.objectives)
    callback = make_front_callback_class()(run.objectives, search.n_trials, run.tracking, None, run.abort_file)
    progress = make_progress_callback(board_name(run.storage.root), search.n_trials)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=search.n_trials,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name="ray", storage_path=run.storage.root, callbacks=[progress, callback, *tune_file_loggers()],
            verbose=0, stop=make_abort_stopper_class()(run.abort_file),
            failure_config=tune.FailureConfig(max_failures=run.settings.trial.max_retries)),
    )
    return tuner, callback


def _fit(run: SweepRun, tuner: Any) -> Any:
    """``tuner.fit()`` with the sweep's own progress lines (Tune itself prints nothing); then the
    MLflow runs of trials that ended without a result are closed. Returns Tune's results (None
    when a storage error stopped the sweep before Tune returned them)."""
    results: Any = None
    try:
        with live_progress(run.settings.search.n_trials), quiet_tune(), storage_errors(run.experiment_path), \
                trials_on_prestarted_workers():
            results = tuner.fit()
    except Exception:
        # On a full disk Tune's own files (a trial's error.pkl) may be empty, and reading them
        # back fails: the storage error that stopped the sweep is the reason to give.
        request = read_abort(run.abort_file)
        if request is None or request.get("kind") != "storage":
            raise
    if run.tracking:  # no trial runs now: a run still RUNNING belongs to a trial that ended without a result
        end_unfinished_runs(run.tracking, known={result_trial_id(r) for r in results}
                            if run.resuming and results is not None else None)
    return results


def _raise_on_abort(run: SweepRun) -> None:
    """A trial asked the sweep to stop: a full disk (the sweep stays resumable) or a
    configuration error.

    Raises:
        StorageError: the write a trial or the driver could not make.
        ConfigError: what every trial would have run into.
    """
    abort = read_abort(run.abort_file)
    if abort is None:
        return
    if abort.get("kind") == "storage":
        drop_truncated_tune_state(run.storage, run.experiment_path)
        # Keep the sweep resumable: the resume reruns the trial the disk stopped (Tune marked it errored).
        run.state.update({"finished": False, "storage_error": f"{abort.get('path')}: {abort.get('reason')}"})
        with contextlib.suppress(StorageError):
            write_state(run.state_file, run.state, run.tracker)
        raise StorageError(str(abort.get("path")), str(abort.get("reason")))
    raise ConfigError(abort.get("reason", "a trial hit a configuration error"))


def _collect_rows(run: SweepRun, results: Any,
                  ledger: BudgetLedger) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], BudgetLedger]:
    """One row per ended trial (finished, stopped early, failed; on resume also the orphans
    Tune's last checkpoint missed), the sampled config of each trial (for seed reruns), and
    ``ledger`` with what they spent (counted from the results: also right on resume)."""
    rows = []
    configs: dict[str, dict[str, Any]] = {}  # trial id -> sampled params (for seed reruns)
    for result in results:
        metrics = result_values(result.metrics or {})
        row = {**metrics, "trial_id": result_trial_id(result)}
        configs[str(row["trial_id"])] = dict(result.config or {})
        ledger.record(str(row["trial_id"]), metrics)
        row.setdefault("method", (result.config or {}).get("method"))
        if result.error is not None:
            row["status"], row["error"] = "failed", exception_line(result.error)
        else:
            row["status"] = "ok" if metrics.get("final_result") else "early_stopped"
        rows.append(row)
    rows = [r for r in rows if r["status"] == "failed" or "final_result" in r]
    if run.resuming:
        rows += orphan_rows(run.tracking, run.storage.root, {str(r["trial_id"]) for r in rows})
    return rows, configs, ledger
