"""Front bookkeeping speed: hypervolume, non-dominated sort, and the driver's work per trial.

Three measurements, each against a target (issue 19) and, where there is one, against the
former algorithm (kept as a reference in tests/pareto_reference.py):

1. Hypervolume of a 300-point, 3-objective front whose points are all mutually non-dominated
   (on the positive part of the unit sphere): ``search.pareto.hypervolume`` (moocore) against
   the former recursive slicing algorithm; same value; target <= 10 ms.
2. Non-dominated sort (``search.pareto.non_dominated_mask``) of 2,000 random points in 2 and
   3 objectives against the former O(n^2) loop; same mask.
3. The driver's work per finished trial with 200 finished trials: ``FrontCallback`` (the Ray
   Tune callback of search/tuner.py) is fed synthetic ended trials (random accuracy and FLOPs,
   no training, no Ray cluster); reported: the time ``on_trial_complete`` blocks Tune's event
   loop, and the background work per trial (front, hypervolume, the console line, MLflow
   metrics to a sqlite store, and the plots when the front changed), with the number of plot
   uploads.

    python benchmarks/front_speed.py
    python benchmarks/front_speed.py --trials 200 --repeats 50
    python benchmarks/front_speed.py --rows benchmarks/results/front_speed_DATE.json.gz

``--rows`` writes every timing (seconds, unrounded; the driver part's per-trial times in full)
with the command, commit, machine and date; :func:`table_front` and :func:`table_driver`
render RESULTS.md's two tables from them (``benchmarks/results_md.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from search import pareto  # noqa: E402
from tests.pareto_reference import reference_hypervolume, reference_non_dominated  # noqa: E402
from rows import run_meta, settings_of, write_rows  # noqa: E402

#: Issue 19's target for the hypervolume of 300 points in 3-D, seconds.
HV_TARGET_S = 0.010


def say(text: str) -> None:
    print(text, flush=True)


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def hypervolume_part(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    pts = np.abs(rng.normal(size=(args.hv_points, 3)))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    assert reference_non_dominated(pts).all(), "the test front must be mutually non-dominated"
    new_s, new_hv = best_of(lambda: pareto.hypervolume(pts, ["max"] * 3, [0.0, 0.0, 0.0]), args.repeats)
    old_s, old_hv = best_of(lambda: reference_hypervolume(pts), max(1, args.repeats // 25))
    say(f"1. hypervolume, {args.hv_points} points x 3 objectives, all non-dominated: new {1e3 * new_s:.2f} ms, "
        f"former {1e3 * old_s:.0f} ms ({old_s / new_s:.0f}x); values {new_hv:.12f} / {old_hv:.12f} "
        f"(relative difference {abs(new_hv - old_hv) / old_hv:.1e}); target <= 10 ms: "
        f"{'met' if new_s <= HV_TARGET_S else 'NOT met'}")
    norm_s, _ = best_of(lambda: pareto.normalised_hypervolume(
        pts, ["max"] * 3, pareto.ReferenceBox((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))), args.repeats)
    say(f"   normalised by the box [0, 1]^3: {1e3 * norm_s:.2f} ms")
    return {"points": args.hv_points, "objectives": 3, "new_s": new_s, "former_s": old_s, "new_hv": float(new_hv),
            "former_hv": float(old_hv), "normalised_s": norm_s}


def sort_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed + 1)
    out = []
    for k in (2, 3):
        pts = rng.uniform(size=(args.sort_points, k))
        new_s, new_mask = best_of(lambda: pareto.non_dominated_mask(pts, ["max"] * k), args.repeats)
        old_s, old_mask = best_of(lambda: reference_non_dominated(pts), 1)
        say(f"2. non-dominated sort, {args.sort_points} points x {k} objectives: new {1e3 * new_s:.2f} ms, "
            f"former {1e3 * old_s:.0f} ms ({old_s / new_s:.0f}x); same mask: {bool((new_mask == old_mask).all())} "
            f"({int(new_mask.sum())} on the front)")
        out.append({"points": args.sort_points, "objectives": k, "new_s": new_s, "former_s": old_s,
                    "same_mask": bool((new_mask == old_mask).all()), "on_front": int(new_mask.sum())})
    return out


class SyntheticTrial:
    """The attributes of a Ray Tune Trial that FrontCallback reads."""

    def __init__(self, i: int, acc: float, flops: float) -> None:
        self.trial_id = f"trial_{i:05d}"
        self.status = "RUNNING"
        self.config = {"method": "magnitude"}
        self.error_file = None
        self.last_result = {"val_acc": acc, "flops_effective": flops, "flops_dense": 1e6, "final_result": True,
                            "wall_s": 1.0, "param.sparsity": 1.0 - flops / 1e6, "epochs": 3, "test_acc": acc}


def driver_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    from search.tracking import SweepTracker
    from search.tune_callbacks import make_front_callback_class as _make_callback_class

    objectives = [("val_acc", "max"), ("flops_effective", "min")]
    rng = np.random.default_rng(args.seed + 2)
    flops = rng.uniform(0.05, 1.0, args.trials) * 1e6
    acc = 0.98 - 0.4 * (1 - flops / 1e6) ** 2 - rng.uniform(0.0, 0.2, args.trials)  # cheaper: less accurate
    uploads = []
    original = MlflowClient.log_artifacts

    def counting(self, run_id, local_dir, artifact_path=None):
        if artifact_path == "front":
            uploads.append(time.perf_counter())
        return original(self, run_id, local_dir, artifact_path=artifact_path)

    MlflowClient.log_artifacts = counting
    out = []
    for with_tracking in (False, True):
        with tempfile.TemporaryDirectory(prefix="front_speed_") as tmp:
            tracking = None
            if with_tracking:
                uri = f"sqlite:///{tmp}/mlflow.db"
                tracker = SweepTracker(uri, "front-speed")
                parent = tracker.start_parent("front-speed", {}, {})
                tracking = {"uri": uri, "experiment": "front-speed", "parent_run_id": parent}
            callback = _make_callback_class()(objectives, args.trials, tracking, None)
            background: list[float] = []
            report = callback._report

            def timed_report(*a, _report=report, **kw):
                t = time.perf_counter()
                _report(*a, **kw)
                background.append(time.perf_counter() - t)

            callback._report = timed_report
            trials = [SyntheticTrial(i, float(acc[i]), float(flops[i])) for i in range(args.trials)]
            on_loop: list[float] = []
            uploads.clear()
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                for trial in trials:
                    t = time.perf_counter()
                    callback.on_trial_complete(0, trials, trial)
                    on_loop.append(time.perf_counter() - t)
                    trial.status = "TERMINATED"
                    if with_tracking:
                        time.sleep(args.trial_gap)  # trials end apart; the background thread keeps up
                t = time.perf_counter()
                callback.on_experiment_end(trials)
                end_s = time.perf_counter() - t
            total = time.perf_counter() - start
            last = on_loop[-10:]
            label = "with MLflow (sqlite) tracking" if with_tracking else "without tracking"
            say(f"3. FrontCallback, {args.trials} synthetic trials, {label}: on Tune's loop "
                f"{1e3 * statistics.mean(last):.2f} ms per on_trial_complete at trials "
                f"{args.trials - 9}-{args.trials} (median {1e3 * statistics.median(on_loop):.2f} ms, max "
                f"{1e3 * max(on_loop):.0f} ms at trial {int(np.argmax(on_loop)) + 1}); background "
                f"{1e3 * statistics.mean(background[-10:]):.1f} ms per trial at the end "
                f"(median over all {1e3 * statistics.median(background):.1f} ms); plots uploaded "
                f"{len(uploads)} times for {args.trials} trials; on_experiment_end {end_s:.2f}s; "
                f"{total:.1f}s in all")
            out.append({"tracking": with_tracking, "trials": args.trials, "on_loop_s": on_loop,
                        "background_s": background, "uploads": len(uploads), "experiment_end_s": end_s,
                        "total_s": total})
    MlflowClient.log_artifacts = original
    return out


def table_front(doc: dict[str, Any]) -> str:
    """RESULTS.md's front-bookkeeping table: hypervolume and non-dominated sort, new against former."""
    hv = doc["hypervolume"]
    lines = ["| what | new | former | target |", "|---|---|---|---|",
             f"| hypervolume, {hv['points']} points x {hv['objectives']} objectives, all mutually non-dominated | "
             f"**{1e3 * hv['new_s']:.2f} ms** (moocore) | {1e3 * hv['former_s']:.0f} ms (recursive slicing) | "
             f"<= {1e3 * HV_TARGET_S:.0f} ms: {'met' if hv['new_s'] <= HV_TARGET_S else 'NOT met'} |",
             f"| same, normalised by the box [0, 1]^{hv['objectives']} | {1e3 * hv['normalised_s']:.2f} ms | - | |"]
    for i, r in enumerate(doc["sort"]):
        lines.append(f"| non-dominated sort, {r['points']:,} random points, {r['objectives']} objectives | "
                     f"{1e3 * r['new_s']:.2f} ms | {1e3 * r['former_s']:.0f} ms" + (" (O(n^2) loop)" if i == 0 else "")
                     + " | |")
    return "\n".join(lines)


def table_driver(doc: dict[str, Any]) -> str:
    """RESULTS.md's table of the driver's work per finished trial, without and with MLflow tracking."""
    n = doc["driver"][0]["trials"]
    lines = [f"| | on Tune's loop per `on_trial_complete`, trials {n - 9}-{n} | median over all {n} "
             "| background work per trial at the end | plot uploads |", "|---|---|---|---|---|"]
    for r in doc["driver"]:
        label = "MLflow sqlite tracking" if r["tracking"] else "without tracking"
        lines.append(f"| {label} | {1e3 * statistics.mean(r['on_loop_s'][-10:]):.2f} ms | "
                     f"{1e3 * statistics.median(r['on_loop_s']):.2f} ms | "
                     f"{1e3 * statistics.mean(r['background_s'][-10:]):.1f} ms | {r['uploads']} for {r['trials']} trials |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hv-points", type=int, default=300)
    ap.add_argument("--sort-points", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--trial-gap", type=float, default=0.0,
                    help="seconds between synthetic trial ends with tracking (0: as fast as possible)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=Path, default=None,
                    help="also write the raw timings (.json.gz with command, commit, machine, date) here: what "
                         "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    say(f"front bookkeeping speed; load average {load:.1f}, {os.cpu_count()} CPUs")
    doc = {"hypervolume": hypervolume_part(args), "sort": sort_part(args), "driver": driver_part(args)}
    doc["meta"] = run_meta("front_speed.py", settings=settings_of(args), load_average=load)
    say(f"\n{table_front(doc)}\n\n{table_driver(doc)}")
    if args.rows:
        say(f"raw rows written to {write_rows(args.rows, doc)}")


if __name__ == "__main__":
    main()
