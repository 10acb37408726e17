"""Does the default sampler beat random search? Hypervolume after N trials, same budget, 3 seeds.

Each sweep is a real ``run_sweep`` (Ray Tune + Optuna + MLflow) over every registered method
on Fashion-MNIST; the hypervolume (validation accuracy up, effective FLOPs down; reference
point: accuracy 0 and the dense model's FLOPs) is read from the parent run's
``hypervolume_normalised`` metric at step N (N finished trials, in completion order): the
fraction of the reference box (accuracy 0..1 x dense..0 FLOPs) the front dominates, so 1.0
would be a perfect model at zero FLOPs.

    python benchmarks/sampler_hypervolume.py --trials 48 --checkpoints 16 48 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sweep_overrides(data: str, model: str, limit_train: int, epochs: int, finetune_epochs: int,
                    concurrency: int, tracking_uri: str, name: str) -> list[str]:
    """The overrides every benchmark sweep shares: data, model, trial length, tracking."""
    return [f"search.concurrency={concurrency}", f"data={data}", f"model={model}",
            f"data.limit_train={limit_train}", f"trial.epochs={epochs}",
            f"trial.finetune_epochs={finetune_epochs}", f"tracking.uri={tracking_uri}", f"sweep_name={name}"]


def mean_sd(values: list[float], fmt: str = ".4f") -> str:
    """``'mean ± sd'`` (sample sd; 0 for one value)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=["mo_tpe", "random"])
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--limit-train", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--method", default=None, help="pin one method (default: the method is searched)")
    args = ap.parse_args()

    import ray
    from mlflow import MlflowClient

    from search.tuner import run_sweep
    from tests.conftest import compose

    ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[str, int], dict[int, float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for sampler in args.samplers:
            for seed in args.seeds:
                t0 = time.perf_counter()
                overrides = [f"search={sampler}", f"search.seed={seed}", f"search.n_trials={args.trials}",
                             *sweep_overrides(args.data, args.model, args.limit_train, args.epochs,
                                              args.finetune_epochs, args.concurrency, uri, f"hv-{sampler}-{seed}")]
                if args.method:
                    overrides.insert(0, f"+method={args.method}")
                sweep = run_sweep(compose(overrides), Path(tmp) / f"{sampler}-{seed}")
                history = MlflowClient(tracking_uri=uri).get_metric_history(sweep.parent_run_id,
                                                                            "hypervolume_normalised")
                by_step = {m.step: m.value for m in history}
                results[(sampler, seed)] = {n: by_step.get(n, float("nan")) for n in args.checkpoints}
                methods = sorted({r.get("method") for r in sweep.rows})
                print(f"== {sampler} seed {seed}: " + ", ".join(
                    f"HV@{n} {v:.4f}" for n, v in results[(sampler, seed)].items())
                      + f"  ({time.perf_counter() - t0:.0f}s; methods tried {methods})", flush=True)
    ray.shutdown()

    print(f"\n{args.data}/{args.model}, limit_train={args.limit_train}, {args.epochs}+{args.finetune_epochs} epochs, "
          f"concurrency {args.concurrency}, seeds {args.seeds}; normalised hypervolume (mean ± sd)")
    print("| sampler | " + " | ".join(f"HV after {n} trials" for n in args.checkpoints) + " |")
    print("|---|" + "---|" * len(args.checkpoints))
    means: dict[str, list[float]] = {}
    for sampler in args.samplers:
        cells = []
        for n in args.checkpoints:
            vals = [results[(sampler, s)][n] for s in args.seeds]
            means.setdefault(sampler, []).append(statistics.fmean(vals))
            cells.append(mean_sd(vals))
        print(f"| {sampler} | " + " | ".join(cells) + " |")
    if len(args.samplers) == 2:
        a, b = args.samplers
        print(f"| {a} / {b} | " + " | ".join(f"{x / y:.3f}" for x, y in zip(means[a], means[b])) + " |")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    main()
