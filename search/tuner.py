"""The sweep: Ray Tune runs trials, Optuna samples them multi-objective, MLflow tracks them.

:func:`run_sweep` takes the resolved config (a plain dict) and an output directory, and:

1. validates the config and checks the tracking store before anything starts;
2. creates the MLflow parent run (or re-opens it on resume) and starts / joins Ray;
3. runs ``Tuner(OptunaSearch(define-by-run space, metric=[...], mode=[...]))`` with a
   concurrency limit, per-trial resources, actor reuse and optional ASHA;
4. after every finished trial prints one line and logs the recomputed front to MLflow;
5. at the end prints the front, copies its masks and configs to ``<output>/front/`` and
   logs them as artifacts.

Resume: ``sweep.json`` in the output directory records the Ray experiment path and the
parent run id; ``search.resume=true`` restores that Tuner, so finished trials are neither
lost nor repeated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from search import pareto
from search.commands import export_command, shell_command
from search.config import build_search_space, check_data_available, validate_config
from search.space import ConfigError
from search.trial import TrialContext, ray_trainable

__all__ = ["SweepInterrupted", "SweepResult", "run_sweep", "find_resume_dir", "make_sampler"]

log = logging.getLogger("search")
STATE_FILE = "sweep.json"


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before all its trials ended (Ctrl-C); it can be resumed."""


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


def objectives_of(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(metric, mode), ...]``: a pinned method's own ``objectives`` (KEN: FLOPs do not move,
    so it trades accuracy against the reverted fraction), else ``search.objectives``."""
    objectives = (cfg.get("method") or {}).get("objectives") or cfg["search"]["objectives"]
    return [(o["metric"], o["mode"]) for o in objectives]


def make_sampler(search: dict[str, Any]) -> Any:
    """The Optuna sampler named by ``search.sampler`` (seeded by ``search.seed``).

    NSGA-II's population defaults to a quarter of the budget (at least 4): Optuna's default
    of 50 would make every trial of a small sweep random.
    """
    import optuna

    seed = int(search.get("seed", 0))
    kind = search["sampler"]
    if kind == "mo_tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search.get("n_startup_trials", 4)),
                                          multivariate=True, group=True, constant_liar=True)
    if kind == "nsga2":
        pop = search.get("population_size") or max(4, int(search["n_trials"]) // 4)
        return optuna.samplers.NSGAIISampler(population_size=int(pop), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"search.sampler: {kind!r} is not one of ['mo_tpe', 'nsga2', 'random']")


def _fmt_flops(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}" if v == int(v) else f"{v:.4g}"  # fractions (reverted_fraction) stay readable


def _settings_text(row: dict[str, Any], limit: int = 3) -> str:
    items = [(k[len("param."):], v) for k, v in row.items() if k.startswith("param.")]
    # The settings that say most about a trial first; other searched settings fill the rest.
    first = ("sparsity", "target", "keep_fraction", "conv_ratio", "dense_ratio", "layers", "distribution",
             "scope", "rounds", "num_partitions", "rewind", "at")
    keep = sorted(items, key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first))[:limit]
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in keep)


def trial_rows(trials: list[Any], ended: Any = None, ended_status: str = "TERMINATED") -> list[dict[str, Any]]:
    """Rows (one per ended trial) from Ray Tune ``Trial`` objects, for the front.

    ``ended`` is the trial a callback is being told about: Tune calls the callback before it
    updates that trial's status, so its status is taken as ``ended_status``.
    """
    rows = []
    for t in trials:
        status = ended_status if t is ended else t.status
        if status not in ("TERMINATED", "ERROR"):
            continue
        result = dict(t.last_result or {})
        row = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        row.setdefault("method", (t.config or {}).get("method"))
        row["trial_id"] = t.trial_id
        if status == "ERROR":
            row["status"] = "failed"
            row["error"] = str(getattr(t, "error_file", "") or "error")
        else:
            row["status"] = "ok" if result.get("final_result") else "early_stopped"
        rows.append(row)
    return rows


def _make_callback_class() -> type:
    from ray.tune import Callback

    class FrontCallback(Callback):
        """Prints one line per ended trial and logs the recomputed front to MLflow.

        Holds only strings and numbers, so Ray can pickle it into the experiment state and
        restore it on resume; the rows are rebuilt from Tune's trial list each time.
        """

        def __init__(self, objectives: list[tuple[str, str]], n_trials: int,
                     tracking: dict[str, str] | None, reference: list[float] | None) -> None:
            self.objectives = objectives
            self.n_trials = n_trials
            self.tracking = tracking
            self.reference = reference
            self._tracker: Any = None
            self._executor: Any = None
            self.unlogged: list[str] = []

        def __getstate__(self) -> dict[str, Any]:
            state = dict(self.__dict__)
            state["_tracker"] = None
            state["_executor"] = None
            return state

        def _log_front(self, rows: list[dict[str, Any]]) -> None:
            # Runs on a background thread: plotting and MLflow writes stay off Tune's loop.
            try:
                if self._tracker is None:
                    from search.tracking import SweepTracker

                    self._tracker = SweepTracker(self.tracking["uri"], self.tracking["experiment"])
                    self._tracker.run_id = self.tracking["parent_run_id"]
                self._tracker.log_front(rows, self.objectives, step=len(rows), reference=self.reference)
            except Exception as exc:  # a tracking outage must not stop the sweep
                self.unlogged.append(f"front after {len(rows)} trials: {exc}")
                log.warning("could not log the front to MLflow: %s", exc)

        def _front(self, trials: list[Any], ended: Any, status: str) -> tuple[list[dict[str, Any]], int, float | None]:
            rows = trial_rows(trials, ended, status)
            if self.tracking:
                if self._executor is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="front-log")
                self._executor.submit(self._log_front, [dict(r) for r in rows])
            ok = [r for r in rows if r.get("status") in ("ok", "early_stopped")]
            if not ok:
                return rows, 0, None
            front = pareto.pareto_front(ok, self.objectives)
            ref = self.reference or pareto.default_reference(self.objectives, ok)
            hv = pareto.hypervolume(front[[m for m, _ in self.objectives]].to_numpy(dtype=float),
                                    [d for _, d in self.objectives], ref)
            return rows, len(front), float(hv)

        def flush(self) -> None:
            """Wait for pending front logging (called at the end of the experiment)."""
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            self.flush()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            rows, size, hv = self._front(trials, trial, "TERMINATED")
            row = next((r for r in rows if r["trial_id"] == trial.trial_id), {})
            acc_key, flops_key = self.objectives[0][0], self.objectives[-1][0]
            dense = row.get("flops_dense")
            share = (f" ({100 * float(row[flops_key]) / float(dense):.0f}% of dense)"
                     if dense and flops_key in row and flops_key.startswith("flops") else "")
            hv_text = f"  hv {hv:.4g}" if hv is not None else ""
            print(f"[{len(rows)}/{self.n_trials}] {trial.trial_id} {row.get('method', '?'):<10} "
                  f"{_settings_text(row):<34} {acc_key} {float(row.get(acc_key, float('nan'))):.4f}  "
                  f"{flops_key} {_fmt_flops(row.get(flops_key))}{share}  "
                  f"{float(row.get('trial_wall_s', row.get('wall_s', 0.0))):.1f}s  front {size}{hv_text}",
                  flush=True)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            rows, _, _ = self._front(trials, trial, "ERROR")
            print(f"[{len(rows)}/{self.n_trials}] {trial.trial_id} {(trial.config or {}).get('method', '?'):<10} "
                  f"FAILED: {str(trial.error_file or 'see Ray logs')}", flush=True)

    return FrontCallback


def _make_budget_limiter_class() -> type:
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class BudgetLimiter(ConcurrencyLimiter):
        """A concurrency limit that also counts trials Tune's last checkpoint missed.

        Tune saves its experiment state every few seconds, so a driver killed hard (SIGKILL,
        a lost node) can leave finished trials in MLflow that the restored Tuner never heard
        of; it would then sample replacements and overrun ``search.n_trials``. After a
        restore this searcher counts those "orphans" (children of the parent run whose trial
        id it never suggested) against the budget. Holds only strings, numbers and sets, so
        Tune saves it with the experiment state.
        """

        def __init__(self, searcher: Any, max_concurrent: int, n_trials: int,
                     tracking: dict[str, str] | None) -> None:
            super().__init__(searcher, max_concurrent=max_concurrent)
            self.n_trials = n_trials
            self.tracking = tracking
            self.suggested_ids: set[str] = set()
            self.orphan_ids: list[str] | None = None

        def set_state(self, state: dict[str, Any]) -> None:
            super().set_state(state)
            self.orphan_ids = None  # recount against the store after every restore

        def _count_orphans(self) -> list[str]:
            return sorted({r["trial_id"] for r in _logged_trials(self.tracking)} - self.suggested_ids)

        def suggest(self, trial_id: str) -> dict | str | None:
            if self.orphan_ids is None:
                self.orphan_ids = self._count_orphans()
                if self.orphan_ids:
                    print(f"{len(self.orphan_ids)} trial(s) finished after Tune's last checkpoint "
                          f"({', '.join(self.orphan_ids)}); counted against the budget", flush=True)
            if len(self.suggested_ids) + len(self.orphan_ids) >= self.n_trials:
                return Searcher.FINISHED
            suggestion = super().suggest(trial_id)
            if suggestion not in (None, Searcher.FINISHED):
                self.suggested_ids.add(trial_id)
            return suggestion

    return BudgetLimiter


def find_resume_dir(output_root: Path) -> Path | None:
    """The newest sweep under ``output_root`` that has a state file and did not finish."""
    candidates = []
    for state in output_root.rglob(STATE_FILE):
        try:
            data = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not data.get("finished"):
            candidates.append((state.stat().st_mtime, state.parent))
    return max(candidates)[1] if candidates else None


def _init_ray(cluster: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": bool(cluster.get("log_to_driver", False))}
    if cluster.get("kind") == "ray":
        ray.init(address=cluster.get("address") or "auto", **kwargs)
    else:
        for key in ("num_cpus", "num_gpus"):
            if cluster.get(key) is not None:
                kwargs[key] = cluster[key]
        ray.init(**kwargs)


def _auto_gpu_fraction(cfg: dict[str, Any]) -> float:
    """``trial.gpus=auto``: probe the model on one GPU of the cluster (see search.packing)."""
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        print("trial.gpus=auto: no GPU in the Ray cluster; trials run on CPU", flush=True)
        return 0.0
    from search.packing import probe_gpu_fraction

    probe = ray.remote(num_gpus=1)(probe_gpu_fraction)
    report = ray.get(probe.remote(cfg["data"], cfg["model"], cfg["trial"]))
    times = ", ".join(f"x{m}: {1000 * t:.2f} ms" for m, t in report["step_seconds"].items())
    print(f"trial.gpus=auto on {report['gpu']}: step time by batch multiple {times}; peak "
          f"{report['peak_bytes'] / 2**20:.0f} MiB of {report['total_bytes'] / 2**30:.0f} GiB -> "
          f"{report['trials_per_gpu']} trials per GPU (trial.gpus={report['fraction']:.4g})", flush=True)
    total_gpus = int(ray.cluster_resources().get("GPU", 0))
    wanted = report["trials_per_gpu"] * total_gpus
    if int(cfg["search"].get("concurrency", 1)) < wanted:
        print(f"hint: search.concurrency={wanted} would keep all {total_gpus} GPU(s) packed", flush=True)
    return float(report["fraction"])


def _tracking_uri(tracking: dict[str, Any]) -> str:
    uri = tracking.get("uri")
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    return str(uri)


def _export_front(front: pd.DataFrame, rows: list[dict[str, Any]], out_dir: Path,
                  tracking: dict[str, str] | None) -> list[Path]:
    """Copy the front's masks and settings under ``out_dir``; returns the masks paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, (_, row) in enumerate(front.iterrows()):
        name = f"{rank:02d}_{row.get('method', 'trial')}_{row['trial_id']}"
        src = Path(str(row.get("masks_path", "")))
        dst = out_dir / f"{name}.safetensors"
        if src.is_file():
            shutil.copyfile(src, dst)
        elif tracking and isinstance(row.get("mlflow_run_id"), str):
            import mlflow

            mlflow.set_tracking_uri(tracking["uri"])
            local = mlflow.artifacts.download_artifacts(run_id=row["mlflow_run_id"],
                                                        artifact_path="masks/masks.safetensors")
            shutil.copyfile(local, dst)
        else:
            continue
        settings = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                    if isinstance(v, (str, int, float, bool)) or hasattr(v, "item")}
        (out_dir / f"{name}.json").write_text(json.dumps(settings, indent=1, default=str))
        written.append(dst)
    pd.DataFrame(rows).to_csv(out_dir / "trials.csv", index=False)
    front.to_csv(out_dir / "front.csv", index=False)
    return written


def print_front(front: pd.DataFrame, objectives: list[tuple[str, str]]) -> None:
    """A table of the front, cheapest first."""
    if front.empty:
        print("front: no finished trial", flush=True)
        return
    cols = ["trial_id", "method"] + [m for m, _ in objectives] + [
        c for c in ("sparsity", "test_acc", "epochs", "wall_s") if c in front.columns]
    # Settings that differ across the front say what the points are; constant ones are noise.
    cols += [c for c in front.columns if c.startswith("param.") and c != "param.sparsity"
             and front[c].nunique(dropna=True) > 1][:4]
    table = front[[c for c in dict.fromkeys(cols) if c in front.columns]].copy()
    for c in table.columns:
        if c.startswith("flops") or c.startswith("params"):
            table[c] = table[c].map(_fmt_flops)
        elif table[c].dtype.kind == "f":
            table[c] = table[c].map(lambda v: f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else v)
    print(f"\nPareto front ({len(front)} points; " + ", ".join(f"{m} {d}" for m, d in objectives) + "):")
    print(table.to_string(index=False), flush=True)


def _last_line(error: Any) -> str:
    """The exception line of a traceback text (what a person needs first), at most 200 chars."""
    lines = [line.strip() for line in str(error or "").strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no reason recorded"


def _logged_trials(tracking: dict[str, str] | None) -> list[dict[str, Any]]:
    """The sweep's trials already in MLflow ([] without tracking, or when the store is unreachable)."""
    if not tracking:
        return []
    from search.tracking import find_trial_runs

    try:
        return find_trial_runs(tracking["uri"], tracking["parent_run_id"])
    except Exception as exc:  # an unreachable store must not stop the sweep
        log.warning("could not read the trials already in MLflow: %s", exc)
        return []


def _orphan_rows(tracking: dict[str, str] | None, known_ids: set[str]) -> list[dict[str, Any]]:
    """Finished trials logged in MLflow that the restored Tuner does not know (see BudgetLimiter)."""
    return [{**r, "final_result": True} for r in _logged_trials(tracking)
            if r["status"] == "ok" and str(r["trial_id"]) not in known_ids]


def run_sweep(cfg: dict[str, Any], output_dir: str | os.PathLike) -> SweepResult:
    """Run (or resume) a sweep described by a resolved config; see the module docstring.

    Args:
        cfg: the resolved Hydra config as a plain dict.
        output_dir: the sweep's directory (Hydra's output dir); the Ray experiment, the front's
            masks and ``sweep.json`` go there. On resume, the directory of the interrupted sweep.
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from search.budget import Budget, BudgetLedger, BudgetSearcher
    from search.schedulers import build_scheduler, scheduler_kind

    validate_config(cfg)
    check_data_available(cfg["data"])
    space = build_search_space(cfg)
    objectives = objectives_of(cfg)
    search = cfg["search"]
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path = output_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    resuming = bool(state) and bool(search.get("resume"))
    if state and not resuming:
        raise ConfigError(f"search.resume: {output_dir} already holds a sweep; pass search.resume=true "
                          "to continue it, or choose another output directory")

    tracking_cfg = dict(cfg.get("tracking") or {})
    tracking: dict[str, str] | None = None
    if tracking_cfg.get("kind", "sqlite") != "none":
        from search.tracking import SweepTracker, check_tracking

        uri = _tracking_uri(tracking_cfg)
        check_tracking(uri)  # fails fast, before Ray or any training starts
        tracker = SweepTracker(uri, tracking_cfg.get("experiment", "prunesearch"),
                               tracking_cfg.get("artifact_location"))
        method_label = cfg["method"]["name"] if cfg.get("method") else "all"
        run_name = state.get("name") or cfg.get("sweep_name") or \
            f"{method_label}-{cfg['data']['name']}-{datetime.now():%Y%m%d-%H%M%S}"
        parent = tracker.start_parent(
            run_name, params=cfg,
            tags={"prunesearch.data": cfg["data"]["name"], "prunesearch.model": cfg["model"]["name"],
                  "prunesearch.methods": ",".join(space.method_names),
                  "prunesearch.objectives": json.dumps(objectives),
                  "prunesearch.output_dir": str(output_dir)},
            resume_run_id=state.get("parent_run_id"))
        tracking = {"uri": uri, "experiment": tracking_cfg.get("experiment", "prunesearch"),
                    "experiment_id": tracker.experiment_id, "parent_run_id": parent}
    else:
        tracker = None
        run_name = state.get("name") or cfg.get("sweep_name") or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"

    name = state.get("name") or run_name
    storage = output_dir / "ray"
    state = {"name": name, "storage_path": str(storage), "parent_run_id": tracking and tracking["parent_run_id"],
             "experiment_id": tracking and tracking["experiment_id"], "finished": False,
             "started": state.get("started", datetime.now().isoformat(timespec="seconds"))}
    state_path.write_text(json.dumps(state, indent=1))

    _init_ray(cfg.get("cluster") or {})
    if cfg["trial"].get("gpus") == "auto":
        cfg = {**cfg, "trial": {**cfg["trial"], "gpus": _auto_gpu_fraction(cfg)}}
    ctx = TrialContext(data=dict(cfg["data"]), model=dict(cfg["model"]), trial=dict(cfg["trial"]),
                       space=space, objectives=objectives, tracking=tracking,
                       report_every_epoch=scheduler_kind(search) != "none")
    resources = {"cpu": float(cfg["trial"].get("cpus", 1)), "gpu": float(cfg["trial"].get("gpus", 0) or 0)}
    budget = Budget.from_config(search, cfg["trial"])
    trainable = tune.with_resources(tune.with_parameters(ray_trainable, ctx=ctx), resources)
    n_trials = int(search["n_trials"])
    experiment_path = storage / name
    start = time.perf_counter()
    print(f"sweep {name}: {n_trials} trials over {', '.join(space.method_names)} on "
          f"{cfg['data']['name']}/{cfg['model']['name']}, {search['sampler']} sampler, "
          f"concurrency {search.get('concurrency', 1)}" + (" (resumed)" if resuming else ""), flush=True)
    if tracking:
        print(f"tracking: {tracking['uri']} (experiment {tracking['experiment']}, parent run "
              f"{tracking['parent_run_id']})", flush=True)

    callback = None
    if resuming and experiment_path.exists():
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=True)
    else:
        dense_ref = None
        searcher = OptunaSearch(space=space, metric=[m for m, _ in objectives],
                                mode=[d for _, d in objectives], sampler=make_sampler(search))
        searcher = _make_budget_limiter_class()(searcher, int(search.get("concurrency", 1)), n_trials, tracking)
        searcher = BudgetSearcher(searcher, BudgetLedger(budget, resources["cpu"], resources["gpu"]))
        scheduler = build_scheduler(search, objectives)
        callback = _make_callback_class()(objectives, n_trials, tracking, dense_ref)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[callback], verbose=0,
                failure_config=tune.FailureConfig(max_failures=int(cfg["trial"].get("max_retries", 0)))),
        )
    results = tuner.fit()

    rows = []
    configs: dict[str, dict[str, Any]] = {}  # trial id -> sampled params (for seed reruns)
    ledger = BudgetLedger(budget, resources["cpu"], resources["gpu"])  # from the results: also right on resume
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, (dict, list))}
        row = {**metrics, "trial_id": metrics.get("trial_id") or (result.path or "").rsplit("/", 1)[-1]}
        configs[str(row["trial_id"])] = dict(result.config or {})
        ledger.record(str(row["trial_id"]), metrics)
        row.setdefault("method", (result.config or {}).get("method"))
        if result.error is not None:
            row["status"], row["error"] = "failed", str(result.error)[:2000]
        else:
            row["status"] = "ok" if metrics.get("final_result") else "early_stopped"
        rows.append(row)
    rows = [r for r in rows if r["status"] == "failed" or "final_result" in r]
    orphans = _orphan_rows(tracking, {str(r["trial_id"]) for r in rows}) if resuming else []
    rows += orphans
    # Tune counts trials that ended (finished, stopped early or failed); fewer than asked for
    # means Ctrl-C stopped the sweep.
    ended_count = results.num_terminated + results.num_errors + len(orphans)
    interrupted = ended_count < n_trials and not ledger.exhausted
    ended = rows
    ok_rows = [r for r in rows if r["status"] in ("ok", "early_stopped")]
    front = pareto.pareto_front(ok_rows, objectives) if ok_rows else pd.DataFrame()
    reference = pareto.default_reference(objectives, ok_rows) if ok_rows else None
    hv = (pareto.hypervolume(front[[m for m, _ in objectives]].to_numpy(dtype=float),
                             [d for _, d in objectives], reference) if len(front) else 0.0)
    print_front(front, objectives)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} trial(s) failed: " + "; ".join(
            f"{r['trial_id']}: {_last_line(r.get('error'))}" for r in failed), flush=True)
    unlogged = [r for r in rows if r.get("mlflow_unlogged")]
    if unlogged or (callback is not None and callback.unlogged):
        print(f"MLflow was unreachable for {len(unlogged)} trial(s) and "
              f"{len(callback.unlogged) if callback is not None else 0} front update(s); those trials' "
              "results stay beside their masks:\n" + "\n".join(
                  f"  {r['trial_id']}: {Path(str(r.get('masks_path', ''))).parent / 'trial_result.json'} "
                  f"({r['mlflow_unlogged'][:120]})" for r in unlogged), flush=True)
    front_dir = output_dir / str((cfg.get("export") or {}).get("front_dir", "front"))
    exported = _export_front(front, rows, front_dir, tracking) if len(front) else []
    print(f"\n{len(rows)} trials in {time.perf_counter() - start:.0f}s; hypervolume {hv:.5g}; "
          f"front masks in {front_dir}", flush=True)
    if ledger.exhausted:
        print(f"budget spent: {ledger.describe()}; no trial started after that ({len(rows)} trials ran, "
              f"search.n_trials={n_trials})", flush=True)
    front_seeds = None
    if int(search.get("seeds", 1)) > 1 and not interrupted and len(front):
        from search.seeds import rerun_front

        front_seeds = rerun_front(front, configs, ctx, seeds=int(search["seeds"]), objectives=objectives,
                                  output_dir=output_dir, front_dir=front_dir, resources=resources,
                                  concurrency=int(search.get("concurrency", 1)), tracking=tracking)
    if tracker is not None and not interrupted:
        try:
            tracker.client.log_artifacts(tracker.run_id, str(front_dir), artifact_path="front_export")
            tracker.client.log_metric(tracker.run_id, "final_hypervolume", float(hv))
            tracker.finish("FINISHED")
            print(f"MLflow: {shell_command(['mlflow', 'ui', '--backend-store-uri', tracking['uri']])}  (parent run "
                  f"{tracking['parent_run_id']})", flush=True)
            print("export one point: " + export_command(tracking["parent_run_id"], "knee", "masks.safetensors",
                                                         tracking["uri"]), flush=True)
        except Exception as exc:
            print(f"warning: could not log the final front to MLflow ({exc}); it is in {front_dir}",
                  file=sys.stderr, flush=True)
    if interrupted:
        # Ctrl-C: Tune saved its state and returned early; keep the sweep resumable.
        print(f"\ninterrupted after {len(ended)} of {n_trials} trials; continue with:\n"
              f"  python -m search <same overrides> search.resume=true search.resume_dir={output_dir}",
              flush=True)
        state.update({"finished": False, "n_trials": len(rows)})
        state_path.write_text(json.dumps(state, indent=1))
        raise SweepInterrupted(f"{len(ended)} of {n_trials} trials finished")
    state.update({"finished": True, "n_trials": len(rows), "exported": [str(p) for p in exported],
                  "cost": ledger.totals(), "budget_spent": ledger.exhausted})
    state_path.write_text(json.dumps(state, indent=1))
    return SweepResult(rows=rows, front=front, parent_run_id=tracking and tracking["parent_run_id"],
                       output_dir=output_dir, hypervolume=float(hv), cost=ledger.totals(),
                       budget_spent=ledger.exhausted, front_seeds=front_seeds)
