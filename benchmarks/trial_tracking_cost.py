"""What MLflow tracking adds to one trial, in-process (no Ray): ``search.trial.run_trial`` on
digits/mlp (one-shot magnitude to 80 %, 10+3 epochs), four trials without tracking and four with
a SQLite MLflow store (per-epoch curves, final results, the trial's weights and MLflow model),
twice, alternating. Prints seconds per trial (the mean of trials 2-4 of each round).

    python benchmarks/trial_tracking_cost.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search.config import build_search_space  # noqa: E402
from search.tracking import SweepTracker  # noqa: E402
from search.trials.context import TrialContext  # noqa: E402
from search.trials.run import run_trial  # noqa: E402  # noqa: E402
from tests.conftest import compose  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)  # a sweep trial gets one CPU
    tmp = tempfile.mkdtemp(prefix="prunesearch-trial-cost-")
    cfg = compose(["+method=magnitude", "search.search_settings=false", "method.settings.sparsity=0.8"])
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracker = SweepTracker(uri, "trial-cost")
    tracking = {"uri": uri, "experiment": "trial-cost", "experiment_id": tracker.experiment_id,
                "parent_run_id": tracker.start_parent("cost", params={}, tags={})}
    space = build_search_space(cfg)
    for round_ in range(2):
        for tracked in (False, True):
            ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=space,
                               objectives=[("val_acc", "max"), ("flops_deployed", "min")],
                               tracking=tracking if tracked else None)
            times = []
            for i in range(4):
                t0 = time.perf_counter()
                run_trial({"method": "magnitude"}, ctx, trial_id=f"r{round_}{int(tracked)}{i}",
                          trial_dir=f"{tmp}/r{round_}{int(tracked)}{i}")
                times.append(time.perf_counter() - t0)
            print(f"round {round_ + 1}, {'tracking' if tracked else 'no tracking'}: "
                  f"{statistics.mean(times[1:]):.3f} s/trial ({', '.join(f'{t:.3f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
