"""What a sweep says on the console and leaves on disk: its first lines, the front's table, the
summary lines (failed trials, trials MLflow missed), the front's masks and settings copied
under ``front/``, and the front's files in the MLflow parent run.

The front and its hypervolume are computed once (:func:`search.pareto.front_summary`) by
:mod:`search.tuner` and handed here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import export_command, shell_command
from search.formatting import _last_line, format_metric
from search.storage import StorageError, atomic_write, atomic_write_text, copy_out, storage_errors

if TYPE_CHECKING:
    import pandas as pd

    from search.tuner import SweepRun

__all__ = ["FEASIBLE", "export_front", "finish_tracking", "is_store_outage", "mark_feasible", "print_front",
           "print_problems", "print_start"]

#: The row column (and, as ``prunesearch.feasible``, the MLflow tag of a trial's run) that says
#: whether a trial met ``search.constraints``.
FEASIBLE = "feasible"

def export_front(front: pd.DataFrame, rows: list[dict[str, Any]], out_dir: Path,
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


def mark_feasible(ok_rows: list[dict[str, Any]], constraints: Any, tracker: Any = None) -> list[dict[str, Any]]:
    """Mark each finished row (in place) with :data:`FEASIBLE` (it met every ``search.constraints`` entry)
    and tag its MLflow run ``prunesearch.feasible``; returns the rows the front is taken over:
    the feasible ones when any trial met the constraints (said on the console), else every
    finished row (also said). Without constraints: ``ok_rows``, nothing marked."""
    if not constraints:
        return ok_rows
    for row in ok_rows:  # the same dicts as in rows
        row[FEASIBLE] = all(c.met(row) for c in constraints)
    feasible = [r for r in ok_rows if r.get(FEASIBLE)]
    listed = ", ".join(repr(c.text) for c in constraints)
    if feasible:
        print(f"constraints {listed}: {len(feasible)} of {len(ok_rows)} trial(s) met them; the front and front/ "
              "hold only those", flush=True)
    elif ok_rows:
        print(f"constraints {listed}: no trial met them; the front is over all {len(ok_rows)} finished trial(s) "
              f"(column {FEASIBLE} is false for each)", flush=True)
    if tracker is not None:
        try:
            for row in ok_rows:
                if row.get("mlflow_run_id"):
                    tracker.client.set_tag(row["mlflow_run_id"], "prunesearch.feasible", str(row[FEASIBLE]).lower())
            tracker.client.log_metric(tracker.run_id, "feasible_trials", float(len(feasible)))
        except Exception as exc:  # the rows and front/ still say it
            print(f"warning: could not tag the trials' MLflow runs with prunesearch.feasible ({exc})",
                  file=sys.stderr, flush=True)
    return feasible or ok_rows


def print_front(front: pd.DataFrame, objectives: list[tuple[str, str]]) -> None:
    """A table of the front, cheapest first."""
    if front.empty:
        print("front: no finished trial", flush=True)
        return
    cols = ["trial_id", "method"] + [m for m, _ in objectives] + [
        c for c in ("sparsity", "test_acc", "epochs", "wall_s", FEASIBLE) if c in front.columns]
    # Settings that differ across the front say what the points are; constant ones are noise.
    cols += [c for c in front.columns if c.startswith("param.") and c != "param.sparsity"
             and front[c].map(_hashable).nunique(dropna=False) > 1][:4]
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


def _hashable(value: Any) -> Any:
    # A vector setting (``size:`` in a space) is a list: compared as a tuple.
    return tuple(value) if isinstance(value, list) else value



def print_problems(rows: list[dict[str, Any]], unlogged_fronts: list[str], trial_location: Any) -> None:
    """The sweep's closing problem lines: the trials that failed (one line), and the trials and
    front updates MLflow missed (their results stay beside their masks: ``trial_location(id)``)."""
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} trial(s) failed: " + "; ".join(
            f"{r['trial_id']}: {_last_line(r.get('error'))}" for r in failed), flush=True)
    unlogged = [r for r in rows if r.get("mlflow_unlogged")]
    if unlogged or unlogged_fronts:
        errors = [str(r["mlflow_unlogged"]) for r in unlogged] + list(unlogged_fronts)
        # "Unreachable" only when the store did not answer; an error of the logging itself
        # (a value MLflow refuses, a plot that failed) is named as what it is.
        outage = all(is_store_outage(e) for e in errors)
        what = "MLflow was unreachable for" if outage else "MLflow logging failed for"
        first = next((e for e in errors if not is_store_outage(e)), "")
        cause = "" if outage else f" (first error: {_last_line(first)[:200]})"
        lines = [f"{what} {len(unlogged)} trial(s) and {len(unlogged_fronts)} front update(s){cause}"
                 + ("; those trials' results stay beside their masks:" if unlogged else
                    "; the front is on disk (front/) and in the sweep's result")]
        lines += [f"  {r['trial_id']}: {trial_location(str(r['trial_id']))}/trial_result.json "
                  f"({r['mlflow_unlogged'][:120]})" for r in unlogged]
        print("\n".join(lines), flush=True)


#: Words of the errors a tracking store that does not answer raises (requests, urllib3, MLflow's
#: REST client, SQLAlchemy on a vanished database file).
_OUTAGE_MARKERS = ("connection", "connect", "timed out", "timeout", "max retries", "unreachable",
                   "unable to open database", "temporarily unavailable", "name or service not known",
                   "api request to", "503", "502", "504")


def is_store_outage(error: str) -> bool:
    """Whether a logging error's text says the tracking store did not answer (an outage), as
    opposed to the logging itself failing on a value or a file."""
    text = str(error).lower()
    return any(marker in text for marker in _OUTAGE_MARKERS)


def print_start(run: SweepRun) -> None:
    """The sweep's first lines: what it searches, where its files and its tracking are."""
    settings, search = run.settings, run.settings.search
    print(f"sweep {run.state['name']}: {search.n_trials} trials over {', '.join(run.space.method_names)} on "
          f"{settings.data.name}/{settings.model.name}, {search.sampler} sampler, "
          f"concurrency {search.concurrency}" + (" (resumed)" if run.resuming else ""), flush=True)
    print(f"files: {run.storage.root} (trials/<trial id>/, ray/)", flush=True)
    if run.tracking:
        print(f"tracking: {run.tracking['uri']} (experiment {run.tracking['experiment']}, parent run "
              f"{run.tracking['parent_run_id']})", flush=True)


def finish_tracking(run: SweepRun, front_dir: Path, hv: float) -> None:
    """The front's files and final hypervolume in the parent run, which ends FINISHED; then how
    to open MLflow and export a point. A store outage only warns (the front is on disk)."""
    tracker, tracking = run.tracker, run.tracking
    if tracker is None:
        return
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
