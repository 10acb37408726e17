"""What runs inside Ray Tune's loop on the driver: the callback that prints one line per ended
trial and logs the front to MLflow, the searcher wrapper that keeps ``search.n_trials`` across a
hard-killed driver, the stopper that ends every trial on a configuration or storage error, and
the helpers that read Tune's trials and results back as rows.

The classes subclass Ray Tune's, so they are made by functions (``make_*_class``) that import
Ray when called: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.formatting import _last_line, exception_line
from search.formatting import format_count as _fmt_flops
from search.progress import note_front
from search.storage import StorageError, SweepStorage
from search.sweep_state import interrupt_tune, read_abort, request_abort

if TYPE_CHECKING:
    from search import pareto

__all__ = ["FrontReport", "end_unfinished_runs", "logged_trials", "make_abort_stopper_class", "make_budget_limiter_class",
           "make_front_callback_class", "orphan_rows", "quiet_tune", "result_trial_id", "result_values", "settings_text",
           "stopped_by_storage", "stored_rows", "trial_error_line", "trial_rows", "trial_storage_error",
           "tune_file_loggers"]

log = logging.getLogger("search")

def settings_text(row: dict[str, Any], limit: int = 3) -> str:
    items = [(k[len("param."):], v) for k, v in row.items() if k.startswith("param.")]
    # The settings that say most about a trial first; other searched settings fill the rest.
    first = ("sparsity", "target", "keep_fraction", "conv_ratio", "dense_ratio", "layers", "distribution",
             "rounds", "num_partitions", "rewind", "at")
    keep = sorted(items, key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first))[:limit]
    return " ".join(f"{k}={_short(v)}" for k, v in keep)


def _short(value: Any) -> str:
    """A setting as the progress line writes it: floats to 3 decimals, a vector entry by entry."""
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def result_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """The flat values of a trial's reported result that go into its row: nested mappings and
    lists left out (Ray's own ``config``, histories), except a list-valued setting
    ``param.KEY`` (a vector searched with ``size:``, or a list given in the settings)."""
    return {k: v for k, v in result.items()
            if not isinstance(v, (dict, list)) or (isinstance(v, list) and str(k).startswith("param."))}


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
        row = result_values(result)
        row.setdefault("method", (t.config or {}).get("method"))
        row["trial_id"] = t.trial_id
        if status == "ERROR":
            row["status"] = "failed"
            row["error"] = str(getattr(t, "error_file", "") or "error")
        else:
            row["status"] = "ok" if result.get("final_result") else "early_stopped"
        rows.append(row)
    return rows


class FrontReport:
    """What the sweep's front callback does, apart from Tune's hooks: one line per ended trial,
    the front logged to MLflow (:func:`make_front_callback_class` adds the hooks).

    On Tune's event loop it only snapshots the ended trials' results; the front, the
    hypervolume (raw and normalised by the reference box), the console line and the MLflow
    writes run on one background thread, in the order the trials ended. The front's plots
    are uploaded when the front changes (at most every ``tracking.front_plots_s``) and once more
    at the end (see search.tracking.SweepTracker.log_front).

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
        from search import pareto

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
                                    final=final, summary=summary,
                                    plot_interval_s=float(self.tracking.get("front_plots_s", 0.0)))
        except Exception as exc:  # a tracking outage (or a logging bug) must not stop the sweep
            self.unlogged.append(f"front after {len(rows)} trials: {type(exc).__name__}: {exc}")
            log.warning("could not log the front to MLflow: %s: %s", type(exc).__name__, exc)

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
            from search.rungs import PROJECTED_PREFIX

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
              f"{settings_text(row):<34} {status}{acc_key} {float(row.get(acc_key, float('nan'))):.4f}  "
              f"{flops_key} {_fmt_flops(row.get(flops_key))}{share}  "
              f"{float(seconds or 0.0):.1f}s  front {size}{hv_text}{flag}",
              flush=True)

    def flush(self) -> None:
        """Wait for pending lines and front logging (called at the end of the experiment)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _abort_on_storage_error(self, trial: Any) -> None:
        failure = trial_storage_error(trial)
        if self.abort_file and failure is not None:
            request = {"kind": "storage", "path": failure.path, "reason": failure.reason,
                       "trial_id": trial.trial_id}
            # Stop as Ctrl-C does (Tune saves the running trials as unfinished, the searcher
            # stays open): the sweep resumes where it stopped. The AbortStopper, which ends
            # the searcher, is the fallback where Tune's handler is not installed.
            request["via"] = "interrupt" if interrupt_tune() else "stopper"
            request_abort(self.abort_file, request)


def make_front_callback_class() -> type:
    """The Ray Tune callback of the sweep: :class:`FrontReport` with Tune's hooks (made on call,
    so importing this module imports no Ray)."""
    from ray.tune import Callback

    class FrontCallback(FrontReport, Callback):
        """Tune's hooks of :class:`FrontReport`: every ended trial is one line and a front update."""

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

    return FrontCallback


def make_budget_limiter_class() -> type:
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
            known = {r["trial_id"] for r in logged_trials(self.tracking)
                     if r["status"] != "running" and not stopped_by_storage(r)}
            known |= {str(r["trial_id"]) for r in stored_rows(self.sweep_root)}
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


def make_abort_stopper_class() -> type:
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


def logged_trials(tracking: dict[str, str] | None) -> list[dict[str, Any]]:
    """The sweep's trials already in MLflow ([] without tracking, or when the store is unreachable)."""
    if not tracking:
        return []
    from search.tracking import find_trial_runs

    try:
        return find_trial_runs(tracking["uri"], tracking["parent_run_id"])
    except Exception as exc:  # an unreachable store must not stop the sweep
        log.warning("could not read the trials already in MLflow: %s", exc)
        return []


def stored_rows(sweep_root: str | None) -> list[dict[str, Any]]:
    """Finished trials' rows under ``<sweep root>/trials/`` ([] when unreadable)."""
    if not sweep_root:
        return []
    try:
        return SweepStorage(sweep_root).finished_rows()
    except Exception as exc:
        log.warning("could not list the trials under %s: %s", sweep_root, exc)
        return []


def orphan_rows(tracking: dict[str, str] | None, sweep_root: str | None, known_ids: set[str]) -> list[dict[str, Any]]:
    """Finished trials the restored Tuner does not know (see BudgetLimiter): from their own
    ``trial_result.json``, else from MLflow."""
    rows: dict[str, dict[str, Any]] = {}
    for r in logged_trials(tracking):
        if r["status"] == "ok" and str(r["trial_id"]) not in known_ids:
            rows[str(r["trial_id"])] = {**r, "final_result": True}
    for r in stored_rows(sweep_root):
        if str(r["trial_id"]) not in known_ids:
            rows[str(r["trial_id"])] = {**r, "status": "ok", "final_result": True}
    return list(rows.values())


def stopped_by_storage(run: dict[str, Any]) -> bool:
    """Whether an MLflow trial row ended on a :class:`~search.storage.StorageError` (no result)."""
    return run.get("status") == "failed" and "StorageError" in str(run.get("error") or "")


def tune_file_loggers() -> list[Any]:
    """Tune's per-trial result.json and progress.csv (its result grid reads them), without its
    TensorBoard logger: see :func:`quiet_tune`."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


#: Environment set while Tune runs the sweep (``quiet_tune``): Tune's legacy output engine at
#: ``verbose=0`` prints nothing (the new engine prints its configuration box and a results
#: path whatever the verbosity; the sweep prints its own lines), and Tune's automatic loggers are
#: off (the CSV and JSON ones are passed explicitly; no TensorBoard event file per trial, and no
#: TensorBoard hint into a temporary Ray folder: MLflow holds the curves). Tune's own log lines
#: (a failed trial's traceback, "Trials did not complete") are off too: the sweep prints each
#: failure as one line, and the summary.
_TUNE_QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@contextlib.contextmanager
def quiet_tune() -> Iterator[None]:
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


def result_trial_id(result: Any) -> str:
    """The Tune trial id of a ``Result``: from its metrics, else from its folder's name
    (``ray_trainable_<id>_<n>_<settings>_<date>``: a trial that never reported)."""
    reported = (result.metrics or {}).get("trial_id")
    if reported:
        return str(reported)
    name = str(result.path or "").rstrip("/").rsplit("/", 1)[-1]
    match = re.search(r"_([0-9a-f]{8})_\d+_", name)
    return match.group(1) if match else name


def end_unfinished_runs(tracking: dict[str, Any], known: set[str] | None = None) -> None:
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

