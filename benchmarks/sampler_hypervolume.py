"""Does the default sampler beat random search? Hypervolume after N trials, same budget, 3 seeds.

Each sweep is a real ``run_sweep`` (Ray Tune + Optuna + MLflow) over every registered method
on Fashion-MNIST; the hypervolume (validation accuracy up, effective FLOPs down; reference
point: accuracy 0 and the dense model's FLOPs) is read from the parent run's
``hypervolume_normalised`` metric at step N (N finished trials, in completion order): the
fraction of the reference box (accuracy 0..1 x dense..0 FLOPs) the front dominates, so 1.0
would be a perfect model at zero FLOPs.

    python benchmarks/sampler_hypervolume.py --trials 48 --checkpoints 16 48 --seeds 0 1 2
    python benchmarks/sampler_hypervolume.py --rows benchmarks/results/sampler_hypervolume_DATE.json.gz

``--rows`` writes one row per sweep (sampler, seed, the normalised hypervolume at each
checkpoint, unrounded) with the command, commit, machine and date; :func:`results_table`
renders RESULTS.md's table from them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from rows import run_meta, settings_of, write_rows  # noqa: E402


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


def results_table(doc: dict[str, Any]) -> str:
    """RESULTS.md's table: normalised hypervolume after each checkpoint, mean ± sd over seeds, per sampler."""
    st = doc["meta"]["settings"]
    samplers = list(dict.fromkeys(r["sampler"] for r in doc["rows"]))
    checkpoints = st["checkpoints"]
    lines = ["| sampler | " + " | ".join(f"HV after {n} trials" for n in checkpoints) + " |",
             "|---|" + "---|" * len(checkpoints)]
    means: dict[str, list[float]] = {}
    for sampler in samplers:
        sweeps = [r for r in doc["rows"] if r["sampler"] == sampler]
        cells = []
        for n in checkpoints:
            values = [float(r["hv"][str(n)]) for r in sweeps]
            means.setdefault(sampler, []).append(statistics.fmean(values))
            cells.append(mean_sd(values))
        lines.append(f"| {SAMPLER_LABELS.get(sampler, sampler)} | " + " | ".join(cells) + " |")
    if len(samplers) == 2:
        a, b = samplers
        lines.append(f"| {a} / {b} | " + " | ".join(f"{x / y:.3f}" for x, y in zip(means[a], means[b])) + " |")
    return "\n".join(lines)


#: How RESULTS.md names a sampler in the table.
SAMPLER_LABELS = {"mo_tpe": "mo_tpe (default: multivariate TPE, 4 random start-up trials, constant liar)"}


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
    ap.add_argument("--rows", type=Path, default=None,
                    help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                         "RESULTS.md's table is generated from (benchmarks/results_md.py)")
    args = ap.parse_args()

    import ray
    from mlflow import MlflowClient

    from search.tuner import run_sweep
    from tests.conftest import compose

    ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[str, int], dict[int, float]] = {}
    rows: list[dict[str, Any]] = []
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
                methods = sorted({str(r.get("method")) for r in sweep.rows})
                # JSON keys are strings: the checkpoint N is written as "N".
                rows.append({"sampler": sampler, "seed": seed, "hv": {str(n): v for n, v in results[(sampler, seed)].items()},
                             "trials": len(sweep.rows), "methods": methods, "wall_s": time.perf_counter() - t0})
                print(f"== {sampler} seed {seed}: " + ", ".join(
                    f"HV@{n} {v:.4f}" for n, v in results[(sampler, seed)].items())
                      + f"  ({time.perf_counter() - t0:.0f}s; methods tried {methods})", flush=True)
    ray.shutdown()

    doc = {"meta": run_meta("sampler_hypervolume.py", settings=settings_of(args),
                            seconds=time.perf_counter() - start), "rows": rows}
    print(f"\n{args.data}/{args.model}, limit_train={args.limit_train}, {args.epochs}+{args.finetune_epochs} epochs, "
          f"concurrency {args.concurrency}, seeds {args.seeds}; normalised hypervolume (mean ± sd)")
    print(results_table(doc))
    if args.rows:
        print(f"raw rows written to {write_rows(args.rows, doc)}")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    main()
