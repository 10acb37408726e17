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
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import export_command, shell_command
from search.formatting import _last_line, exception_line, format_metric
from search.formatting import format_count as _fmt_flops
from search.preflight import PreflightResult, check_cluster_resources, preflight
from search.progress import board_name, live_progress, make_progress_callback, note_front
from search.sampling import make_sampler
from search.space import ConfigError
from search.storage import (StorageError, SweepLock, SweepLocked, SweepStorage, atomic_write, atomic_write_text,
                            copy_out, storage_errors)
from search.trial_context import TrialContext, ray_trainable

if TYPE_CHECKING:
    import pandas as pd

    from search import pareto
    from search.preflight import BuildProcess

# pandas, the front's maths and Ray Tune are imported where they are used: a config refused by
# the pre-flight's first checks never waits for them.

__all__ = ["SweepFailed", "SweepInterrupted", "SweepResult", "run_sweep", "find_resume_dir", "make_sampler",
           "exception_line"]

log = logging.getLogger("search")
STATE_FILE = "sweep.json"
ABORT_FILE = "abort.json"


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


def objectives_of(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(metric, mode), ...]``: a pinned method's own ``objectives`` (KEN: FLOPs do not move,
    so it trades accuracy against the reverted fraction), else ``search.objectives``."""
    objectives = (cfg.get("method") or {}).get("objectives") or cfg["search"]["objectives"]
    return [(o["metric"], o["mode"]) for o in objectives]


def _settings_text(row: dict[str, Any], limit: int = 3) -> str:
    items = [(k[len("param."):], v) for k, v in row.items() if k.startswith("param.")]
    # The settings that say most about a trial first; other searched settings fill the rest.
    first = ("sparsity", "target", "keep_fraction", "conv_ratio", "dense_ratio", "layers", "distribution",
             "rounds", "num_partitions", "rewind", "at")
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

    from search import pareto

    class FrontCallback(Callback):
        """Prints one line per ended trial and logs the front to MLflow.

        On Tune's event loop it only snapshots the ended trials' results; the front, the
        hypervolume (raw and normalised by the reference box), the console line and the MLflow
        writes run on one background thread, in the order the trials ended. The front's plots
        are uploaded when the front changes and once more at the end (see
        search.tracking.SweepTracker.log_front).

        Holds only strings and numbers, so Ray can pickle it into the experiment state and
        restore it on resume; the rows are rebuilt from Tune's trial list each time.
        """

        def __init__(self, objectives: list[tuple[str, str]], n_trials: int,
                     tracking: dict[str, str] | None, reference: list[float] | None,
                     abort_file: str | None = None) -> None:
            self.objectives = objectives
            self.n_trials = n_trials
            self.tracking = tracking
            self.reference = reference
            self.abort_file = abort_file  # a configuration error seen in a trial stops the sweep
            self._tracker: Any = None
            self._executor: Any = None
            self.unlogged: list[str] = []

        def __getstate__(self) -> dict[str, Any]:
            state = dict(self.__dict__)
            state["_tracker"] = None
            state["_executor"] = None
            return state

        def _submit(self, rows: list[dict[str, Any]], trial_id: str | None, error: str | None,
                    final: bool = False) -> None:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="front")
            self._executor.submit(self._report, rows, trial_id, error, final)

        def _report(self, rows: list[dict[str, Any]], trial_id: str | None, error: str | None,
                    final: bool) -> None:
            # Runs on the background thread, one call after the other.
            try:
                summary = pareto.front_summary(rows, self.objectives, self.reference)
            except Exception as exc:  # a bad row must not stop the sweep
                log.warning("could not compute the front: %s", exc)
                summary = None
            if not final:
                if summary is not None:
                    note_front(len(summary.front), summary.hypervolume_normalised)
                self._print_line(rows, trial_id, error, summary)
            if self.tracking:
                self._log_front(rows, summary, final)

        def _log_front(self, rows: list[dict[str, Any]], summary: pareto.FrontSummary | None, final: bool) -> None:
            try:
                if self._tracker is None:
                    from search.tracking import SweepTracker

                    self._tracker = SweepTracker(self.tracking["uri"], self.tracking["experiment"])
                    self._tracker.run_id = self.tracking["parent_run_id"]
                self._tracker.log_front(rows, self.objectives, step=len(rows), reference=self.reference,
                                        final=final, summary=summary)
            except Exception as exc:  # a tracking outage must not stop the sweep
                self.unlogged.append(f"front after {len(rows)} trials: {exc}")
                log.warning("could not log the front to MLflow: %s", exc)

        def _print_line(self, rows: list[dict[str, Any]], trial_id: str | None, error: str | None,
                        summary: pareto.FrontSummary | None) -> None:
            row = next((r for r in rows if r["trial_id"] == trial_id), {})
            if error is not None:
                print(f"[{len(rows)}/{self.n_trials}] {trial_id} {row.get('method') or '?':<10} FAILED: {error}",
                      flush=True)
                return
            acc_key, flops_key = self.objectives[0][0], self.objectives[-1][0]
            stopped = row.get("status") == "early_stopped"
            if stopped:
                from search.schedulers import PROJECTED_PREFIX

                # The rung judged the model the method is heading for (projected_*), not the
                # current one (dense for one-shot methods before their cut); show what it judged
                # and the seconds the trial ran (it never reached the end-of-trial timer).
                row = {**row, **{key: row[f"{PROJECTED_PREFIX}{key}"] for key in (acc_key, flops_key)
                                 if f"{PROJECTED_PREFIX}{key}" in row}}
                seconds = row.get("time_total_s", 0.0)
            else:
                seconds = row.get("trial_wall_s", row.get("wall_s", 0.0))
            dense = row.get("flops_dense")
            share = (f" ({100 * float(row[flops_key]) / float(dense):.0f}% of dense)"
                     if dense and flops_key in row and flops_key.startswith("flops") else "")
            size = len(summary.front) if summary is not None else 0
            hv_text = (f"  hv {summary.hypervolume:.4g} ({summary.hypervolume_normalised:.4f} of the box)"
                       if summary is not None and size else "")
            status = (f"stopped at epoch {row.get('epoch', '?')} (projected) " if stopped else "")
            flag = f"  COLLAPSED: {row.get('collapse')}" if row.get("collapsed") else ""  # issue 29
            print(f"[{len(rows)}/{self.n_trials}] {trial_id} {row.get('method', '?'):<10} "
                  f"{_settings_text(row):<34} {status}{acc_key} {float(row.get(acc_key, float('nan'))):.4f}  "
                  f"{flops_key} {_fmt_flops(row.get(flops_key))}{share}  "
                  f"{float(seconds or 0.0):.1f}s  front {size}{hv_text}{flag}",
                  flush=True)

        def flush(self) -> None:
            """Wait for pending lines and front logging (called at the end of the experiment)."""
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            if self.tracking:  # the final plots, with every trial on them
                self._submit(trial_rows(trials), None, None, final=True)
            self.flush()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._submit(trial_rows(trials, trial, "TERMINATED"), trial.trial_id, None)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            rows = trial_rows(trials, trial, "ERROR")
            line = trial_error_line(trial)
            self._submit(rows, trial.trial_id, line)
            if self.abort_file and "ObjectiveNotLoggedError" in line:
                # Every trial would fail the same way: stop now, as a configuration error.
                request_abort(self.abort_file, {"reason": line.split(": ", 1)[-1]})
            self._abort_on_storage_error(trial)

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            # A retry would only fill the disk again (or be told the same refusal): stop now.
            self._abort_on_storage_error(trial)

        def _abort_on_storage_error(self, trial: Any) -> None:
            failure = trial_storage_error(trial)
            if self.abort_file and failure is not None:
                request = {"kind": "storage", "path": failure.path, "reason": failure.reason,
                           "trial_id": trial.trial_id}
                # Stop as Ctrl-C does (Tune saves the running trials as unfinished, the searcher
                # stays open): the sweep resumes where it stopped. The AbortStopper, which ends
                # the searcher, is the fallback where Tune's handler is not installed.
                request["via"] = "interrupt" if _interrupt_tune() else "stopper"
                request_abort(self.abort_file, request)

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
                     tracking: dict[str, str] | None, sweep_root: str | None = None) -> None:
            super().__init__(searcher, max_concurrent=max_concurrent)
            self.n_trials = n_trials
            self.tracking = tracking
            self.sweep_root = sweep_root
            self.suggested_ids: set[str] = set()
            self.orphan_ids: list[str] | None = None

        def set_state(self, state: dict[str, Any]) -> None:
            super().set_state(state)
            self.orphan_ids = None  # recount against the store after every restore

        def _count_orphans(self) -> list[str]:
            # Finished in MLflow or by their own trial_result.json (a tracking outage), unknown here.
            # A run still RUNNING is an attempt its killed driver left behind: it never ended.
            # A run a full disk stopped (StorageError) ended without a result: not counted, so the
            # budget is spent on trials that have one.
            known = {r["trial_id"] for r in _logged_trials(self.tracking)
                     if r["status"] != "running" and not _stopped_by_storage(r)}
            known |= {str(r["trial_id"]) for r in _stored_rows(self.sweep_root)}
            return sorted(known - self.suggested_ids)

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
    """The newest sweep under ``output_root`` that has a readable state file and did not finish;
    an unreadable one is skipped with a printed note."""
    candidates = []
    for state in output_root.rglob(STATE_FILE):
        try:
            data = _read_state(state, "search.resume")
        except ConfigError as exc:
            print(f"note: skipped {state.parent}: {str(exc).split(': ', 1)[-1]}", flush=True)
            continue
        if not data.get("finished"):
            candidates.append((state.stat().st_mtime, state.parent))
    return max(candidates)[1] if candidates else None


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


def _export_front(front: pd.DataFrame, rows: list[dict[str, Any]], out_dir: Path,
                  tracking: dict[str, str] | None) -> list[Path]:
    """Copy the front's masks and settings under ``out_dir``; returns the masks paths.

    Each masks file comes from its trial's folder or, when that is gone, from the trial's MLflow
    run; it is written atomically and loaded back, so ``out_dir`` never holds a truncated file.
    A point found in neither place is named on the console (one line), never dropped silently.

    Raises:
        StorageError: ``out_dir`` refused a write (full disk, read-only...); files already
            there are intact.
    """
    import pandas as pd

    with storage_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, (_, row) in enumerate(front.iterrows()):
        name = f"{rank:02d}_{row.get('method', 'trial')}_{row['trial_id']}"
        dst = out_dir / f"{name}.safetensors"
        source, problem = _front_masks(row, tracking, dst)
        if source is None:
            print(f"front: trial {row['trial_id']}: its masks are in neither its folder nor MLflow ({problem}); "
                  f"left out of {out_dir}", flush=True)
            continue
        if source != "folder":
            print(f"front: trial {row['trial_id']}: its folder is gone ({problem}); masks recovered from {source}",
                  flush=True)
        settings = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                    if isinstance(v, (str, int, float, bool)) or hasattr(v, "item")}
        atomic_write_text(out_dir / f"{name}.json", json.dumps(settings, indent=1, default=str))
        written.append(dst)
    atomic_write_text(out_dir / "trials.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_text(out_dir / "front.csv", front.to_csv(index=False))
    return written


def _front_masks(row: Any, tracking: dict[str, str] | None, dst: Path) -> tuple[str | None, str]:
    """Write one front point's masks to ``dst`` (atomically, loaded back): from the trial's
    folder, else from its MLflow run. Returns ``(source, problem)``: ``"folder"``, ``"MLflow run
    <id>"`` or None, and what went wrong on the way (empty when nothing did).

    Raises:
        StorageError: ``dst`` could not be written.
    """
    from prunelib.masks import MaskSet

    def copy_from(location: str) -> Any:
        def write(tmp: Path) -> None:
            if not copy_out(location, tmp):
                raise FileNotFoundError(f"{location} is missing")
        return write

    def loads(tmp: Path) -> None:
        MaskSet.load(tmp)

    problems = []
    src = str(row.get("masks_path", "") or "")
    if src:
        try:
            atomic_write(dst, copy_from(src), loads)
            return "folder", ""
        except StorageError:
            raise
        except Exception as exc:  # gone, unreadable or truncated: try MLflow
            problems.append(_last_line(str(exc)) or type(exc).__name__)
    else:
        problems.append("no masks path")
    run_id = row.get("mlflow_run_id") or row.get("run_id")
    if not tracking or not isinstance(run_id, str) or not run_id:
        problems.append("no MLflow run")
        return None, "; ".join(problems)
    import tempfile

    import mlflow

    try:
        mlflow.set_tracking_uri(tracking["uri"])
        with tempfile.TemporaryDirectory(prefix="prunesearch-front-") as scratch:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="masks/masks.safetensors",
                                                        dst_path=scratch)
            atomic_write(dst, copy_from(local), loads)
        return f"MLflow run {run_id}", "; ".join(problems)
    except StorageError:
        raise
    except Exception as exc:
        problems.append(f"MLflow run {run_id}: {_last_line(str(exc)) or type(exc).__name__}"[:300])
        return None, "; ".join(problems)


def print_front(front: pd.DataFrame, objectives: list[tuple[str, str]]) -> None:
    """A table of the front, cheapest first."""
    if front.empty:
        print("front: no finished trial", flush=True)
        return
    cols = ["trial_id", "method"] + [m for m, _ in objectives] + [
        c for c in ("sparsity", "test_acc", "epochs", "wall_s") if c in front.columns]
    # Settings that differ across the front say what the points are; constant ones are noise.
    cols += [c for c in front.columns if c.startswith("param.") and c != "param.sparsity"
             and front[c].nunique(dropna=False) > 1][:4]
    table = front[[c for c in dict.fromkeys(cols) if c in front.columns]].copy()
    if "collapsed" in front.columns and front["collapsed"].fillna(False).astype(bool).any():  # issue 29
        table["collapsed"] = ["yes" if v is True or v == 1 else "" for v in front["collapsed"]]
    for c in table.columns:
        # As the dashboard writes them; a setting the point did not use (inactive `when:`) is "-".
        table[c] = [("-" if c.startswith("param.") and _is_missing(v) else format_metric(c, v)) for v in table[c]]
    print(f"\nPareto front ({len(front)} points; " + ", ".join(f"{m} {d}" for m, d in objectives) + "):")
    print(table.to_string(index=False), flush=True)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def trial_error_line(trial: Any) -> str:
    """The exception line of a Tune trial that errored."""
    for getter in ("get_pickled_error", "get_error"):
        try:
            error = getattr(trial, getter)()
        except Exception:
            error = None
        if error is not None:
            return exception_line(error)
    return "see Ray's logs" if not getattr(trial, "error_file", None) else _last_line(
        Path(trial.error_file).read_text() if Path(trial.error_file).is_file() else trial.error_file)


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


def _stored_rows(sweep_root: str | None) -> list[dict[str, Any]]:
    """Finished trials' rows under ``<sweep root>/trials/`` ([] when unreadable)."""
    if not sweep_root:
        return []
    try:
        return SweepStorage(sweep_root).finished_rows()
    except Exception as exc:
        log.warning("could not list the trials under %s: %s", sweep_root, exc)
        return []


def _orphan_rows(tracking: dict[str, str] | None, sweep_root: str | None, known_ids: set[str]) -> list[dict[str, Any]]:
    """Finished trials the restored Tuner does not know (see BudgetLimiter): from their own
    ``trial_result.json``, else from MLflow."""
    rows: dict[str, dict[str, Any]] = {}
    for r in _logged_trials(tracking):
        if r["status"] == "ok" and str(r["trial_id"]) not in known_ids:
            rows[str(r["trial_id"])] = {**r, "final_result": True}
    for r in _stored_rows(sweep_root):
        if str(r["trial_id"]) not in known_ids:
            rows[str(r["trial_id"])] = {**r, "status": "ok", "final_result": True}
    return list(rows.values())


def _tune_file_loggers() -> list[Any]:
    """Tune's per-trial result.json and progress.csv (its result grid reads them), without its
    TensorBoard logger: see :func:`_quiet_tune`."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


#: Environment set while Tune runs the sweep (``_quiet_tune``): Tune's legacy output engine at
#: ``verbose=0`` prints nothing (the new engine prints its configuration box and a results
#: path whatever the verbosity; the sweep prints its own lines), and Tune's automatic loggers are
#: off (the CSV and JSON ones are passed explicitly; no TensorBoard event file per trial, and no
#: TensorBoard hint into a temporary Ray folder: MLflow holds the curves). Tune's own log lines
#: (a failed trial's traceback, "Trials did not complete") are off too: the sweep prints each
#: failure as one line, and the summary.
_TUNE_QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Set :data:`_TUNE_QUIET_ENV` during ``fit`` (read by Tune when it starts), restored after."""
    old = {key: os.environ.get(key) for key in _TUNE_QUIET_ENV}
    os.environ.update(_TUNE_QUIET_ENV)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _result_trial_id(result: Any) -> str:
    """The Tune trial id of a ``Result``: from its metrics, else from its folder's name
    (``ray_trainable_<id>_<n>_<settings>_<date>``: a trial that never reported)."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return str(reported)
    name = str(result.path or "").rstrip("/").rsplit("/", 1)[-1]
    match = re.search(r"_([0-9a-f]{8})_\d+_", name)
    return match.group(1) if match else name


def _end_unfinished_runs(tracking: dict[str, Any], known: set[str] | None = None) -> None:
    """End KILLED the child runs still RUNNING once Tune is done (trials stopped early by the
    scheduler, or whose worker or driver died); on resume, retire those of attempts Tune never
    knew (``known``: the resumed Tuner's trial ids); a store outage only warns."""
    from search.tracking import end_unfinished_trial_runs

    try:
        end_unfinished_trial_runs(tracking["uri"], tracking["parent_run_id"],
                                  "the trial ended without a result: stopped early by the scheduler, interrupted, "
                                  "or its worker or driver died", known=known)
    except Exception as exc:
        log.warning("could not end the trials' unfinished MLflow runs: %s", exc)


def _make_abort_stopper_class() -> type:
    from ray.tune import Stopper

    class AbortStopper(Stopper):
        """Stops every trial once a configuration error was seen in one (``abort.json`` exists)."""

        def __init__(self, abort_file: str) -> None:
            self.abort_file = abort_file

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            request = read_abort(self.abort_file)
            return request is not None and request.get("via") != "interrupt"

    return AbortStopper


# Abort requests of this driver, by abort file: the file may be on the disk that is full.
_ABORTS: dict[str, dict[str, Any]] = {}


def request_abort(abort_file: str, request: dict[str, Any]) -> None:
    """Ask the running sweep to stop every trial (read by the AbortStopper and after Tune ends):
    kept in memory first, then in ``abort.json`` when the disk takes it."""
    _ABORTS.setdefault(str(abort_file), request)
    try:
        atomic_write_text(abort_file, json.dumps(_ABORTS[str(abort_file)]))
    except (StorageError, OSError) as exc:  # the disk is what failed; memory holds the request
        log.info("could not write %s (%s); the sweep stops anyway", abort_file, exc)


def _stopped_by_storage(run: dict[str, Any]) -> bool:
    """Whether an MLflow trial row ended on a :class:`~search.storage.StorageError` (no result)."""
    return run.get("status") == "failed" and "StorageError" in str(run.get("error") or "")


def _drop_truncated_tune_state(storage: SweepStorage, experiment_path: str) -> bool:
    """Remove Tune's experiment-state files a full disk truncated (Tune writes them in place);
    returns whether a whole one is left. Without one a resume starts a new Tuner, which adopts
    the finished trials from their files and MLflow. Remote roots are left as they are (True)."""
    if not storage.is_local:
        return True
    whole = False
    for path in Path(experiment_path).glob("experiment_state-*.json"):
        try:
            json.loads(path.read_text())
            whole = True
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                path.unlink()
                log.info("removed %s: truncated by a full disk", path)
    return whole


def _interrupt_tune() -> bool:
    """Stop Tune's loop as Ctrl-C does (SIGUSR1 to Tune's own handler, which ``tune.run``
    installs on the main thread); False, sending nothing, where that handler is not installed
    (SIGUSR1's default action would end the process)."""
    import signal

    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    if not callable(handler) or getattr(handler, "__name__", "") != "signal_interrupt_tune_run":
        return False
    os.kill(os.getpid(), signal.SIGUSR1)
    return True


def read_abort(abort_file: str) -> dict[str, Any] | None:
    """The abort request of this sweep (this driver's, or ``abort.json``), or None."""
    if str(abort_file) in _ABORTS:
        return _ABORTS[str(abort_file)]
    if not os.path.exists(abort_file):
        return None
    try:
        request = json.loads(Path(abort_file).read_text())
    except (OSError, json.JSONDecodeError):
        request = {}
    return request if isinstance(request, dict) else {}


def trial_storage_error(trial: Any) -> StorageError | None:
    """The :class:`~search.storage.StorageError` a Tune trial failed with, or None."""
    for getter in ("get_pickled_error", "get_error"):
        try:
            error = getattr(trial, getter)()
        except Exception:
            error = None
        for _ in range(8):  # RayTaskError -> .cause; TuneError -> __cause__
            if error is None or isinstance(error, StorageError):
                break
            error = getattr(error, "cause", None) or getattr(error, "__cause__", None)
        if isinstance(error, StorageError):
            return error
    line = trial_error_line(trial)
    if "StorageError: " in line:  # only the text came back
        path, _, reason = line.split("StorageError: ", 1)[1].partition(": ")
        return StorageError(path, reason or "the storage refused a write")
    return None


def _write_state(path: Path, state: dict[str, Any], tracker: Any = None) -> None:
    """``sweep.json``, atomically; with ``tracker``, also its copy in the parent run
    (:data:`~search.tracking.SWEEP_STATE_ARTIFACT`): a store outage costs that copy only (a warning)."""
    text = json.dumps(state, indent=1, default=str)
    atomic_write_text(path, text)
    if tracker is not None:
        from search.tracking import SWEEP_STATE_ARTIFACT

        try:
            tracker.client.log_text(tracker.run_id, text, SWEEP_STATE_ARTIFACT)
        except Exception as exc:
            print(f"warning: could not copy {path.name} to the MLflow parent run ({_last_line(str(exc))})",
                  file=sys.stderr, flush=True)


def _state_from_mlflow(cfg: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The state of the sweep in ``output_dir`` as its MLflow parent run holds it
    (:data:`STATE_ARTIFACT`), written back to ``sweep.json``; {} when there is no such copy."""
    from search.tracking import saved_sweep_state

    found = saved_sweep_state(cfg, output_dir)
    if found is None:
        return {}
    run_id, state = found
    _write_state(output_dir / STATE_FILE, state)
    print(f"note: {output_dir / STATE_FILE} was missing; restored from MLflow parent run {run_id}", flush=True)
    return state


#: What every ``sweep.json`` holds (written by :func:`_run_locked` before any trial starts).
STATE_KEYS = ("name", "sweep_root", "finished")


def _read_state(path: Path, key: str = "search.resume_dir") -> dict[str, Any]:
    """The sweep's ``sweep.json`` ({} when there is none).

    Raises:
        ConfigError: naming ``key`` and the file, when it is unreadable, not JSON, not a JSON
            object or lacks one of :data:`STATE_KEYS`.
    """
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"{key}: {path} is not readable JSON ({_last_line(str(exc))}); it is not a sweep's "
                          "state (restore it, or start a new sweep)") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {path} holds a JSON {type(state).__name__}, not a sweep's state (restore it, "
                          "or start a new sweep)")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ConfigError(f"{key}: {path} lacks {missing}; it is not a sweep's state (restore it, or start a "
                          "new sweep)")
    return state


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
        cfg, space, objectives = pre.cfg, pre.space, pre.objectives
        state = _read_state(output_dir / STATE_FILE, "search.resume_dir" if resuming else "search.resume")
        if resuming and not state and output_dir.is_dir():
            state = _state_from_mlflow(cfg, output_dir)
        if resuming and not state:
            raise ConfigError(f"search.resume_dir: {output_dir} holds no sweep (no {STATE_FILE}); pass the output "
                              "directory of the sweep to continue")
        if resuming and state.get("finished"):
            raise ConfigError(f"search.resume_dir: the sweep in {output_dir} finished ({state.get('n_trials')} "
                              "trials); nothing to resume")
        if state and not resuming:
            raise ConfigError(f"search.resume: {output_dir} already holds a sweep; pass search.resume=true "
                              "to continue it, or choose another output directory")
        state = _record_identity(cfg, output_dir, state, resuming)
        return _run_locked(cfg, pre, space, objectives, output_dir, state, resuming, builder,
                           built=checked is not None)
    finally:
        if builder is not None:
            builder.stop()
        if lock is not None:
            lock.release()


def _record_identity(cfg: dict[str, Any], output_dir: Path, state: dict[str, Any],
                     resuming: bool) -> dict[str, Any]:
    """``state`` with this run's identity (:mod:`search.identity`); a resume whose config differs
    from the recorded one is refused, unless ``search.resume_accept`` names every change (then
    the changes are recorded). A sweep recorded before identities were is adopted with a note.

    Raises:
        ConfigError: ``search.resume``, naming every key that differs.
    """
    from search.identity import accepted_keys, check_resume_identity, sweep_identity

    accept = accepted_keys(cfg["search"])
    identity = sweep_identity(cfg, output_dir)
    state = dict(state)
    if resuming and isinstance(state.get("identity"), dict):
        accepted = check_resume_identity(state, identity, accept, output_dir)
        if accepted:
            stamp = datetime.now().isoformat(timespec="seconds")
            state["accepted_changes"] = [*state.get("accepted_changes", []), *({**a, "at": stamp} for a in accepted)]
            print("note: resuming with accepted changes: " + ", ".join(
                f"{a['key']} ({a['old']} -> {a['new']})" for a in accepted), flush=True)
    elif resuming:
        print(f"note: {output_dir / STATE_FILE} predates recorded identities; this config is recorded as the "
              "sweep's now (not compared)", flush=True)
    state["identity"] = identity
    return state


def _run_locked(cfg: dict[str, Any], pre: PreflightResult, space: Any, objectives: list[tuple[str, str]],
                output_dir: Path, state: dict[str, Any], resuming: bool, builder: BuildProcess | None = None,
                built: bool = False) -> SweepResult:
    """Ray and the rest of the pre-flight, the parent run and the Optuna store; then the tuner.
    Holds the sweep's lock."""
    search = cfg["search"]
    if resuming:
        print(f"resuming the sweep in {output_dir}", flush=True)
    abort_file = output_dir / ABORT_FILE
    abort_file.unlink(missing_ok=True)
    _ABORTS.pop(str(abort_file), None)  # an earlier sweep of this process in the same directory

    cluster = dict(cfg.get("cluster") or {})
    import ray

    own_ray = not ray.is_initialized()
    try:
        _start_ray_and_check(cfg, pre, output_dir, cluster, builder, built)
    except BaseException:
        if own_ray and ray.is_initialized():  # a refusal leaves nothing running
            ray.shutdown()
        raise
    for note in pre.notes:
        print(f"note: {note}", flush=True)

    tracker = None
    tracking: dict[str, str] | None = None
    optuna_url = pre.optuna_storage
    tracking_cfg = dict(cfg.get("tracking") or {})
    if pre.tracking_uri is not None:
        from search.tracking import SweepTracker

        # Only now, with every check passed, is the store written to (created, migrated).
        tracker = SweepTracker(pre.tracking_uri, tracking_cfg.get("experiment", "prunesearch"),
                               tracking_cfg.get("artifact_location"))
    name = state.get("name") or _claim_name(cfg, objectives, optuna_url, tracker)
    storage_root = state.get("sweep_root") or (
        f"{str(search['storage']).rstrip('/')}/{name}" if search.get("storage") else str(output_dir))
    storage = SweepStorage(storage_root)
    if tracker is not None:
        parent = tracker.start_parent(
            name, params=cfg,
            tags={"prunesearch.data": cfg["data"]["name"], "prunesearch.model": cfg["model"]["name"],
                  "prunesearch.methods": ",".join(space.method_names),
                  "prunesearch.objectives": json.dumps(objectives),
                  "prunesearch.output_dir": str(output_dir), "prunesearch.storage": storage.root,
                  "prunesearch.optuna_storage": optuna_url or "", "prunesearch.optuna_study": name},
            resume_run_id=state.get("parent_run_id"))
        tracking = {"uri": pre.tracking_uri, "experiment": tracking_cfg.get("experiment", "prunesearch"),
                    "experiment_id": tracker.experiment_id, "parent_run_id": parent,
                    # What a trial logs while it runs (search.mlflow_trial).
                    **{k: tracking_cfg[k] for k in ("epoch_metrics", "log_model", "system_metrics_s")
                       if k in tracking_cfg}}
    state = {"name": name, "sweep_root": storage.root, "storage_path": storage.path("ray"),
             "parent_run_id": tracking and tracking["parent_run_id"],
             "experiment_id": tracking and tracking["experiment_id"], "optuna_storage": optuna_url,
             "optuna_study": name, "finished": False,
             "started": state.get("started", datetime.now().isoformat(timespec="seconds")),
             **{k: state[k] for k in ("identity", "accepted_changes") if k in state},
             **({"storage_error": state["storage_error"]} if state.get("storage_error") else {})}
    _write_state(output_dir / STATE_FILE, state, tracker)
    try:
        return _tune(cfg, space, objectives, output_dir, state, resuming, storage, tracker, tracking, str(abort_file))
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


def _claim_name(cfg: dict[str, Any], objectives: list[tuple[str, str]], optuna_url: str | None,
                tracker: Any) -> str:
    """A new sweep's name, claimed as its Optuna study (:func:`search.identity.claim_study_name`):
    ``sweep_name`` or ``<method or all>-<data>-<timestamp>``, suffixed ``-2``, ``-3``, ... when a
    study or an MLflow parent run of the experiment already has it (a chosen name that is
    suffixed is printed)."""
    from search.identity import claim_study_name
    from search.sampling import open_optuna_storage

    method_label = cfg["method"]["name"] if cfg.get("method") else "all"
    wanted = cfg.get("sweep_name") or f"{method_label}-{cfg['data']['name']}-{datetime.now():%Y%m%d-%H%M%S}"
    if not optuna_url:
        return str(wanted)
    taken = tracker.sweep_name_taken if tracker is not None else (lambda n: False)
    directions = ["minimize" if mode == "min" else "maximize" for _, mode in objectives]
    name = claim_study_name(open_optuna_storage(optuna_url), str(wanted), directions, taken)
    if name != wanted and cfg.get("sweep_name"):
        print(f"note: sweep_name {wanted!r} is taken in this store; this sweep is {name!r}", flush=True)
    return name


def _start_ray_and_check(cfg: dict[str, Any], pre: PreflightResult, output_dir: Path, cluster: dict[str, Any],
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

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stores") as pool:
        stores = pool.submit(open_sweep_stores, pre, output_dir) if not built else None
        try:
            init_ray(cluster, Path.cwd())
        finally:
            if stores is not None:
                stores.result()  # its ConfigError first: the store is what the user must fix
    if cluster.get("kind") == "ray":
        check_cluster_resources(cfg["trial"], ray.cluster_resources(), f"the Ray cluster at {cluster.get('address')}")
    if not built:
        apply_build(pre, builder.result() if builder is not None else build_check(pre.cfg))


def _end_parent(tracker: Any, status: str, reason: str) -> None:
    try:
        tracker.finish(status, reason=reason)
    except Exception as exc:  # the store may be what failed
        print(f"warning: could not mark the MLflow parent run {status} ({exc})", file=sys.stderr, flush=True)


def _tune(cfg: dict[str, Any], space: Any, objectives: list[tuple[str, str]], output_dir: Path,
          state: dict[str, Any], resuming: bool, storage: SweepStorage, tracker: Any,
          tracking: dict[str, str] | None, abort_file: str) -> SweepResult:
    """Run (or restore) the Tuner, then collect, print and export the front."""
    import pandas as pd
    from ray import tune

    from search import pareto

    from search.budget import Budget, BudgetLedger
    from search.budget_searcher import BudgetSearcher
    from search.mo_asha import build_scheduler
    from search.study_searcher import StudySearcher
    from search.schedulers import scheduler_kind

    search = cfg["search"]
    name = state["name"]
    if cfg["trial"].get("gpus") == "auto":
        cfg = {**cfg, "trial": {**cfg["trial"], "gpus": _auto_gpu_fraction(cfg)}}
    ctx = TrialContext(data=dict(cfg["data"]), model=dict(cfg["model"]), trial=dict(cfg["trial"]),
                       space=space, objectives=objectives, tracking=tracking,
                       report_every_epoch=scheduler_kind(search) != "none",
                       module=dict(cfg.get("module") or {}) or None, sweep_root=storage.root,
                       resumed=resuming, driver=_driver_identity())
    resources = {"cpu": float(cfg["trial"].get("cpus", 1)), "gpu": float(cfg["trial"].get("gpus", 0) or 0)}
    budget = Budget.from_config(search, cfg["trial"])
    trainable = tune.with_resources(tune.with_parameters(ray_trainable, ctx=ctx), resources)
    n_trials = int(search["n_trials"])
    experiment_path = storage.path("ray")
    start = time.perf_counter()
    print(f"sweep {name}: {n_trials} trials over {', '.join(space.method_names)} on "
          f"{cfg['data']['name']}/{cfg['model']['name']}, {search['sampler']} sampler, "
          f"concurrency {search.get('concurrency', 1)}" + (" (resumed)" if resuming else ""), flush=True)
    print(f"files: {storage.root} (trials/<trial id>/, ray/)", flush=True)
    if tracking:
        print(f"tracking: {tracking['uri']} (experiment {tracking['experiment']}, parent run "
              f"{tracking['parent_run_id']})", flush=True)

    callback = None
    storage_stopped = resuming and (bool(state.get("storage_error"))
                                    or any(_stopped_by_storage(r) for r in _logged_trials(tracking)))
    # Tune's state truncated by the full disk: a new Tuner, which adopts the finished trials.
    lost_state = storage_stopped and not _drop_truncated_tune_state(storage, experiment_path)
    if resuming and not lost_state and tune.Tuner.can_restore(experiment_path):
        # After a storage error the trial the full disk stopped is "errored" in Tune's state:
        # run the errored trials again (a trial that failed on its own fails again, once).
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=storage_stopped)
    else:
        dense_ref = None
        # Saved by its recipe, never by pickling the sampler (search/sampling.py).
        searcher = StudySearcher(space, objectives, search, study_name=name,
                                 storage_url=state.get("optuna_storage") or None, sampler_factory=make_sampler)
        searcher = _make_budget_limiter_class()(searcher, int(search.get("concurrency", 1)), n_trials, tracking,
                                                storage.root)
        searcher = BudgetSearcher(searcher, BudgetLedger(budget, resources["cpu"], resources["gpu"]))
        scheduler = build_scheduler(search, objectives)
        callback = _make_callback_class()(objectives, n_trials, tracking, dense_ref, abort_file)
        progress = make_progress_callback(board_name(storage.root), n_trials)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name="ray", storage_path=storage.root, callbacks=[progress, callback, *_tune_file_loggers()],
                verbose=0, stop=_make_abort_stopper_class()(abort_file),
                failure_config=tune.FailureConfig(max_failures=int(cfg["trial"].get("max_retries", 0)))),
        )
    # Running trials' lines and the sweep bar (search/progress.py); Tune itself prints nothing.
    results: Any = None
    try:
        with live_progress(n_trials), _quiet_tune(), storage_errors(experiment_path):
            results = tuner.fit()
    except Exception:
        # On a full disk Tune's own files (a trial's error.pkl) may be empty, and reading them
        # back fails: the storage error that stopped the sweep is the reason to give.
        request = read_abort(abort_file)
        if request is None or request.get("kind") != "storage":
            raise
    if tracking:  # no trial runs now: a run still RUNNING belongs to a trial that ended without a result
        _end_unfinished_runs(tracking, known={_result_trial_id(r) for r in results}
                             if resuming and results is not None else None)

    abort = read_abort(abort_file)
    if abort is not None and abort.get("kind") == "storage":
        _drop_truncated_tune_state(storage, experiment_path)
        # Keep the sweep resumable: the resume reruns the trial the disk stopped (Tune marked it errored).
        state.update({"finished": False, "storage_error": f"{abort.get('path')}: {abort.get('reason')}"})
        with contextlib.suppress(StorageError):
            _write_state(output_dir / STATE_FILE, state, tracker)
        raise StorageError(str(abort.get("path")), str(abort.get("reason")))
    if abort is not None:
        raise ConfigError(abort.get("reason", "a trial hit a configuration error"))
    rows = []
    configs: dict[str, dict[str, Any]] = {}  # trial id -> sampled params (for seed reruns)
    ledger = BudgetLedger(budget, resources["cpu"], resources["gpu"])  # from the results: also right on resume
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, (dict, list))}
        row = {**metrics, "trial_id": _result_trial_id(result)}
        configs[str(row["trial_id"])] = dict(result.config or {})
        ledger.record(str(row["trial_id"]), metrics)
        row.setdefault("method", (result.config or {}).get("method"))
        if result.error is not None:
            row["status"], row["error"] = "failed", exception_line(result.error)
        else:
            row["status"] = "ok" if metrics.get("final_result") else "early_stopped"
        rows.append(row)
    rows = [r for r in rows if r["status"] == "failed" or "final_result" in r]
    orphans = _orphan_rows(tracking, storage.root, {str(r["trial_id"]) for r in rows}) if resuming else []
    rows += orphans
    # Trials that ended (finished, stopped early or failed, orphans included); fewer than asked
    # for means Ctrl-C stopped the sweep (a trial Tune stopped mid-run has no final result),
    # unless the budget was spent.
    interrupted = len(rows) < n_trials and not ledger.exhausted
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
                  f"  {r['trial_id']}: {storage.trial_location(str(r['trial_id']))}/trial_result.json "
                  f"({r['mlflow_unlogged'][:120]})" for r in unlogged), flush=True)
    front_dir = output_dir / str((cfg.get("export") or {}).get("front_dir", "front"))
    exported = _export_front(front, rows, front_dir, tracking) if len(front) else []
    print(f"\n{len(rows)} trials in {time.perf_counter() - start:.0f}s; hypervolume {hv:.5g}; "
          f"front masks in {front_dir}", flush=True)
    if ledger.exhausted:
        print(f"budget spent: {ledger.describe()}; no trial started after that ({len(rows)} trials ran, "
              f"search.n_trials={n_trials})", flush=True)
    if interrupted:
        # Ctrl-C: Tune saved its state and returned early; keep the sweep resumable.
        print(f"\ninterrupted after {len(ended)} of {n_trials} trials; continue with:\n"
              f"  python -m search <same overrides> search.resume=true search.resume_dir={output_dir}",
              flush=True)
        state.update({"finished": False, "n_trials": len(rows)})
        _write_state(output_dir / STATE_FILE, state, tracker)
        raise SweepInterrupted(f"{len(ended)} of {n_trials} trials ended")
    front_seeds = None
    if int(search.get("seeds", 1)) > 1 and len(front):
        from search.seeds import rerun_front

        front_seeds = rerun_front(front, configs, ctx, seeds=int(search["seeds"]), objectives=objectives,
                                  output_dir=output_dir, front_dir=front_dir, resources=resources,
                                  concurrency=int(search.get("concurrency", 1)), tracking=tracking)
    state.pop("storage_error", None)
    state.update({"finished": True, "n_trials": len(rows), "exported": [str(p) for p in exported],
                  "cost": ledger.totals(), "budget_spent": ledger.exhausted})
    _write_state(output_dir / STATE_FILE, state, tracker)
    if not ok_rows:
        reasons = sorted({_last_line(r.get("error")) for r in failed})
        raise SweepFailed(f"no trial finished: {len(failed)} of {len(rows)} failed ({'; '.join(reasons)[:400]})")
    if tracker is not None:
        try:
            tracker.client.log_artifacts(tracker.run_id, str(front_dir), artifact_path="front_export")
            tracker.client.log_metric(tracker.run_id, "final_hypervolume", float(hv))
            tracker.finish("FINISHED")
            from search.tracking import ui_url

            print(f"MLflow: {shell_command(['mlflow', 'ui', '--backend-store-uri', tracking['uri']])}  (parent run "
                  f"{tracking['parent_run_id']}), then {ui_url(tracking['uri'], tracking['experiment_id'])}",
                  flush=True)
            print("export one point: " + export_command(tracking["parent_run_id"], "knee", "knee_point",
                                                         tracking["uri"]), flush=True)
        except Exception as exc:
            print(f"warning: could not log the final front to MLflow ({exc}); it is in {front_dir}",
                  file=sys.stderr, flush=True)
    if state.get("optuna_storage"):
        print(f"Optuna study {name!r}: " + shell_command(["optuna-dashboard", state["optuna_storage"]]), flush=True)
    return SweepResult(rows=rows, front=front, parent_run_id=tracking and tracking["parent_run_id"],
                       output_dir=output_dir, hypervolume=float(hv), cost=ledger.totals(),
                       budget_spent=ledger.exhausted, front_seeds=front_seeds)
