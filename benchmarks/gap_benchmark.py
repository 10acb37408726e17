"""GaP (grow-and-prune) against GMP at the same total epochs; optionally, distribution sweeps.

Part 1 trains ``lenet5`` on a Fashion-MNIST subset through :func:`prunelib.run_pruning` (the
path ``search`` trials use). Every pruned run trains ``--epochs`` E epochs and then fine-tunes
``--finetune-epochs`` F with the masks fixed, so all runs cost E + F epochs:

- ``gmp``: layer-wise gradual magnitude pruning (cubic ramp over the first 75 % of E);
- ``gap KxRxT``: cyclic GaP with K partitions, R rounds, T epochs per step (K * R * T = E),
  from the random initialisation (no dense pre-training), ``--gap-distributions`` each;
- ``dense``: E + F epochs unpruned, for reference.

It reports test and validation accuracy (the test split is only reported), the achieved global
sparsity and, for GaP, the largest deviation of any layer group from its target.

Part 2 (``--sweep-trials N``, off by default) runs two real sweeps (Ray Tune + Optuna
MO-TPE + MLflow) of one-shot magnitude pruning with N trials each, one searching the
sparsity and the per-layer distribution (with its shape parameter), one the sparsity only
(global ranking), and compares the hypervolume of (validation accuracy up, effective FLOPs
down), normalised by the box (accuracy 1, dense FLOPs).

    python benchmarks/gap_benchmark.py                           # part 1, ~5-10 min on 2 cores
    python benchmarks/gap_benchmark.py --sweep-trials 16 --sweep-seeds 0 1
    python benchmarks/gap_benchmark.py --epochs 3 --gap-configs 3x1x1 --data-limit 2000   # smoke
    python benchmarks/gap_benchmark.py --sweep-trials 12 --sweep-seeds 0 1 --rows benchmarks/results/gap_DATE.json.gz

``--rows`` writes the raw rows (part 1: ``rows``, one per run; part 2: ``sweeps``, one per sweep,
with its hypervolume unrounded) with the command, commit, machine and date;
:func:`table_runs` and :func:`table_sweeps` render RESULTS.md's two tables from them.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from prunelib import TrainConfig, __version__, build_method, prunable_parameters, run_pruning  # noqa: E402
from prunelib.data import build_datamodule  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from rows import run_meta, settings_of, write_rows  # noqa: E402


def parse_gap_config(text: str) -> tuple[int, int, int]:
    """``"3x1x3"`` -> (partitions, rounds, epochs per step)."""
    try:
        k, r, t = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"GaP config must look like KxRxT, got {text!r}") from exc
    if min(k, r, t) < 1:
        raise argparse.ArgumentTypeError(f"GaP config values must be >= 1, got {text!r}")
    return k, r, t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=9, help="training epochs E of every run before the fine-tune")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs F (masks fixed)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--gap-configs", type=parse_gap_config, nargs="+", default=["3x1x3", "3x3x1"],
                   help="GaP partitions x rounds x epochs per step; the product must equal --epochs")
    p.add_argument("--gap-distributions", nargs="+", default=["uniform", "global"],
                   help="per-layer distributions run for each GaP config")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--data-limit", type=int, default=12000, help="first N training images (None: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine usable)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    p.add_argument("--sweep-trials", type=int, default=0, help="part 2: trials per sweep (0 = skip)")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sweep-data-limit", type=int, default=5000)
    p.add_argument("--sweep-epochs", type=int, default=3)
    p.add_argument("--sweep-finetune-epochs", type=int, default=1)
    p.add_argument("--rows", type=Path, default=None,
                   help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                        "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = p.parse_args(argv)
    args.gap_configs = [parse_gap_config(c) if isinstance(c, str) else c for c in args.gap_configs]
    for k, r, t in args.gap_configs:
        if k * r * t != args.epochs:
            p.error(f"GaP {k}x{r}x{t} trains {k * r * t} epochs, not --epochs {args.epochs}")
    for s in args.sparsities:
        if not 0.0 < s < 1.0:
            p.error(f"sparsities must be in (0, 1), got {s}")
    return args


def group_deviation(method: Any, model: torch.nn.Module, masks: Any) -> float:
    """Largest |group sparsity - group target| (fraction) over GaP's layer groups.

    The target of a group is ``sparsity`` for the uniform and global distributions and its
    layers' allocated share for the shaped ones; recomputed here from the final masks.
    """
    sizes = {n: p.numel() for n, p in prunable_parameters(model).items()}
    worst = 0.0
    for group, zeros in zip(method.groups, method.group_zeros):
        size = sum(sizes[n] for n in group)
        removed = sum(int((~masks.masks[n]).sum()) for n in group)
        target = method.sparsity if method.distribution in ("uniform", "global") else zeros / size
        worst = max(worst, abs(removed / size - target))
    return worst


def run_one(args: argparse.Namespace, dm: Any, label: str, method: str, settings: dict[str, Any],
            epochs: int, finetune: int) -> dict[str, Any]:
    torch.manual_seed(args.seed)  # the same initialisation for every run
    model = build_model(args.model, dm.input_shape, dm.num_classes, width=args.width)
    pruner = build_method(method, **settings)
    config = TrainConfig(epochs=epochs, finetune_epochs=finetune, lr=args.lr)
    cpu0 = time.process_time()
    result = run_pruning(model, dm, pruner, config, evaluate_test=True, seed=args.seed)
    row = {"label": label, **result.metrics(), "cpu_s": time.process_time() - cpu0,
           "group_dev": group_deviation(pruner, model, result.masks) if method == "gap" else None,
           "target": settings.get("sparsity", 0.0)}
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Part 1's table: one line per run."""
    head = ("| run | target sparsity | achieved sparsity | max group deviation | test acc | val acc "
            "| FLOPs eff vs dense | epochs | wall s | CPU s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        dev = "" if r["group_dev"] is None else f"{100 * r['group_dev']:.3f} pt"
        lines.append(f"| {r['label']} | {r['target']:.0%} | {r['sparsity']:.2%} | {dev} | {r['test_acc']:.2%} "
                     f"| {r['val_acc']:.2%} | {r['flops_effective'] / r['flops_dense']:.3f} | {int(r['epochs'])} "
                     f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    return "\n".join(lines)


def table_runs(doc: dict[str, Any]) -> str:
    """RESULTS.md's part-1 table from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return markdown_table(doc["rows"])


#: How the part-2 table names each searched space.
SPACE_LABELS = {"distribution": "magnitude: sparsity + distribution",
                "global only": "magnitude: sparsity only (global ranking)"}


def table_sweeps(doc: dict[str, Any]) -> str:
    """RESULTS.md's part-2 table: normalised hypervolume per seed and its mean, per searched space."""
    sweeps = doc.get("sweeps") or []
    if not sweeps:
        return "(part 2 not run: --sweep-trials 0)"
    seeds = list(dict.fromkeys(r["seed"] for r in sweeps))
    means = {}
    lines = [f"| search space | HV per seed ({', '.join(str(s) for s in seeds)}) | mean |", "|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in sweeps):
        values = [r["hv"] for r in sweeps if r["variant"] == variant]
        means[variant] = statistics.fmean(values)
        lines.append(f"| {SPACE_LABELS.get(variant, variant)} | {', '.join(f'{v:.4f}' for v in values)} "
                     f"| {means[variant]:.4f} |")
    if "distribution" in means and "global only" in means:
        lines.append(f"\nRatio distribution / sparsity-only: {means['distribution'] / means['global only']:.3f}.")
    return "\n".join(lines)


def part_one(args: argparse.Namespace) -> list[dict[str, Any]]:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    plog = logging.getLogger("prunelib")
    plog.addHandler(handler)
    plog.setLevel(logging.INFO)
    plog.propagate = False

    t_start = time.perf_counter()
    dm = build_datamodule(args.dataset, batch_size=args.batch_size, seed=args.seed, limit_train=args.data_limit)
    print(f"data: {dm!r}  (loaded in {time.perf_counter() - t_start:.1f}s)", flush=True)
    runs: list[tuple[str, str, dict[str, Any], int, int]] = []
    if not args.no_dense:
        runs.append(("dense", "magnitude", {"sparsity": 0.0}, args.epochs + args.finetune_epochs, 0))
    for s in args.sparsities:
        runs.append((f"gmp (layer) @ {s:.0%}", "gmp", {"sparsity": s, "distribution": "uniform"},
                     args.epochs, args.finetune_epochs))
        for k, r, t in args.gap_configs:
            for dist in args.gap_distributions:
                runs.append((f"gap {k}x{r}x{t} ({dist}) @ {s:.0%}", "gap",
                             {"sparsity": s, "num_partitions": k, "rounds": r, "epochs_per_step": t,
                              "distribution": dist}, args.epochs, args.finetune_epochs))
    total_epochs = sum(e + f for *_, e, f in runs)
    print(f"plan: {len(runs)} runs, {total_epochs} epochs in all", flush=True)
    rows = []
    done = 0
    for i, (label, method, settings, epochs, finetune) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {label} ...", flush=True)
        row = run_one(args, dm, label, method, settings, epochs, finetune)
        rows.append(row)
        done += epochs + finetune
        elapsed = time.perf_counter() - t_start
        left = elapsed / done * (total_epochs - done) / 60
        print(f"[{i}/{len(runs)}] {label}: sparsity {row['sparsity']:.2%}  test {row['test_acc']:.2%}  "
              f"val {row['val_acc']:.2%}  {row['wall_s']:.1f}s  (elapsed {elapsed / 60:.1f} min, "
              f"~{left:.1f} min left)", flush=True)
    print("\n" + markdown_table(rows) + f"\n\npart 1: {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    return rows


def part_two(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    from search.pareto import hypervolume
    from search.tuner import run_sweep
    from tests.conftest import compose

    shaped = ("distribution", "end_protection", "depth_slope")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sweeps: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for seed in args.sweep_seeds:
            for variant in SPACE_LABELS:
                t0 = time.perf_counter()
                cfg = compose(["+method=magnitude", "search.sampler=mo_tpe", f"search.seed={seed}",
                               f"search.n_trials={args.sweep_trials}", "search.concurrency=2",
                               f"data={args.dataset}", f"model={args.model}",
                               f"data.limit_train={args.sweep_data_limit}", f"trial.epochs={args.sweep_epochs}",
                               f"trial.finetune_epochs={args.sweep_finetune_epochs}", f"tracking.uri={uri}",
                               f"sweep_name=dist-{variant.replace(' ', '-')}-{seed}"])
                if variant == "global only":
                    # The same space minus the distribution: sparsity alone, one global ranking.
                    cfg["method"]["space"] = {k: v for k, v in cfg["method"]["space"].items() if k not in shaped}
                    cfg["method"]["settings"]["distribution"] = "global"
                sweep = run_sweep(cfg, Path(tmp) / f"{variant}-{seed}")
                done = [r for r in sweep.rows if "val_acc" in r and "flops_effective" in r]
                dense = max(float(r["flops_dense"]) for r in done)
                hv = hypervolume([[float(r["val_acc"]), float(r["flops_effective"])] for r in done],
                                 ["max", "min"], [0.0, dense]) / dense
                kinds = sorted({str(r.get("param.distribution")) for r in done})
                sweeps.append({"variant": variant, "seed": seed, "hv": hv, "trials": len(done),
                               "distributions": kinds, "wall_s": time.perf_counter() - t0})
                print(f"== {variant} seed {seed}: HV {hv:.4f} over {len(done)} trials "
                      f"({time.perf_counter() - t0:.0f}s; distributions tried {kinds})", flush=True)
    ray.shutdown()
    print(f"\n{args.dataset}/{args.model}, limit_train={args.sweep_data_limit}, "
          f"{args.sweep_epochs}+{args.sweep_finetune_epochs} epochs, {args.sweep_trials} trials per sweep, "
          f"seeds {args.sweep_seeds}; normalised hypervolume (val acc x effective FLOPs)\n\n"
          f"{table_sweeps({'sweeps': sweeps})}\npart 2: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return sweeps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in (
        sys.argv if argv is None else ["benchmarks/gap_benchmark.py", *argv]))
    print(f"command: {command}")
    print(f"prunelib {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip(), flush=True)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"rows": part_one(args), "sweeps": part_two(args) if args.sweep_trials > 0 else []}
    if args.rows:
        doc["meta"] = run_meta("gap_benchmark.py", argv, settings_of(args),
                               machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                                       f"{torch.get_num_threads()} torch thread(s)",
                               seconds=time.perf_counter() - t0)
        print(f"raw rows written to {write_rows(args.rows, doc)}")
    print(f"total wall time: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    raise SystemExit(main())
