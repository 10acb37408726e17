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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search import pareto  # noqa: E402
from tests.pareto_reference import reference_hypervolume, reference_non_dominated  # noqa: E402


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


def hypervolume_part(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    pts = np.abs(rng.normal(size=(args.hv_points, 3)))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    assert reference_non_dominated(pts).all(), "the test front must be mutually non-dominated"
    new_s, new_hv = best_of(lambda: pareto.hypervolume(pts, ["max"] * 3, [0.0, 0.0, 0.0]), args.repeats)
    old_s, old_hv = best_of(lambda: reference_hypervolume(pts), max(1, args.repeats // 25))
    say(f"1. hypervolume, {args.hv_points} points x 3 objectives, all non-dominated: new {1e3 * new_s:.2f} ms, "
        f"former {1e3 * old_s:.0f} ms ({old_s / new_s:.0f}x); values {new_hv:.12f} / {old_hv:.12f} "
        f"(relative difference {abs(new_hv - old_hv) / old_hv:.1e}); target <= 10 ms: "
        f"{'met' if new_s <= 0.010 else 'NOT met'}")
    norm_s, _ = best_of(lambda: pareto.normalised_hypervolume(
        pts, ["max"] * 3, pareto.ReferenceBox((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))), args.repeats)
    say(f"   normalised by the box [0, 1]^3: {1e3 * norm_s:.2f} ms")


def sort_part(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed + 1)
    for k in (2, 3):
        pts = rng.uniform(size=(args.sort_points, k))
        new_s, new_mask = best_of(lambda: pareto.non_dominated_mask(pts, ["max"] * k), args.repeats)
        old_s, old_mask = best_of(lambda: reference_non_dominated(pts), 1)
        say(f"2. non-dominated sort, {args.sort_points} points x {k} objectives: new {1e3 * new_s:.2f} ms, "
            f"former {1e3 * old_s:.0f} ms ({old_s / new_s:.0f}x); same mask: {bool((new_mask == old_mask).all())} "
            f"({int(new_mask.sum())} on the front)")


class SyntheticTrial:
    """The attributes of a Ray Tune Trial that FrontCallback reads."""

    def __init__(self, i: int, acc: float, flops: float) -> None:
        self.trial_id = f"trial_{i:05d}"
        self.status = "RUNNING"
        self.config = {"method": "magnitude"}
        self.error_file = None
        self.last_result = {"val_acc": acc, "flops_effective": flops, "flops_dense": 1e6, "final_result": True,
                            "wall_s": 1.0, "param.sparsity": 1.0 - flops / 1e6, "epochs": 3, "test_acc": acc}


def driver_part(args: argparse.Namespace) -> None:
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
    MlflowClient.log_artifacts = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hv-points", type=int, default=300)
    ap.add_argument("--sort-points", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--trial-gap", type=float, default=0.0,
                    help="seconds between synthetic trial ends with tracking (0: as fast as possible)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    say(f"front bookkeeping speed; load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    hypervolume_part(args)
    sort_part(args)
    driver_part(args)


if __name__ == "__main__":
    main()
