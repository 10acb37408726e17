"""Foundation baselines: a dense run, then one-shot magnitude, GMP and IMP at several sparsities.

Trains ``lenet5`` on Fashion-MNIST (by default) through :func:`prunelib.run_pruning`, the same
path that ``search`` trials use, and reports per run: target and achieved sparsity, test and
validation accuracy, effective FLOPs per sample (and the ratio to the dense model), effective
parameters, and the training cost (epochs trained, extra forward passes, wall seconds and wall
time as a ratio to the dense run, and the same for this process's CPU seconds, which other
processes sharing the machine barely move when run with ``--threads 1``).

Every method gets the same ``--epochs`` E per training run:

- ``dense``: ``magnitude`` at sparsity 0 with no fine-tune (E epochs, same code path);
- ``magnitude``: global one-shot magnitude cut after E epochs, then ``--finetune-epochs`` F;
- ``gmp``: layer-wise gradual magnitude pruning (cubic ramp, library defaults) over E, then F;
- ``imp``: 3 rounds, weight rewinding to initialisation: rounds + 1 = 4 trainings of E each.

Usage::

    python benchmarks/foundation_baselines.py                      # E=4, F=1, 50/80/90 %
    python benchmarks/foundation_baselines.py --epochs 1 --data-limit 5000 --sparsities 0.8
    python benchmarks/foundation_baselines.py --out /tmp/table.md  # also write the table
    python benchmarks/foundation_baselines.py --rows benchmarks/results/foundation_baselines_DATE.json.gz

``--rows`` writes the raw rows (every run's metrics, unrounded) with the command, commit,
machine and date; :func:`results_table` renders RESULTS.md's table from them.

The test split is only reported, never used for a decision.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunelib import TrainConfig, __version__, build_method, run_pruning
from prunelib.data import build_datamodule
from prunelib.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import run_meta, settings_of, write_rows  # noqa: E402

#: Method settings for this benchmark (the library's defaults otherwise).
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "magnitude": {"distribution": "global"},
    "gmp": {"distribution": "uniform"},
    "imp": {"rounds": 3, "rewind": "weights", "rewind_epoch": 0},
    "bingo": {},          # library defaults (uniform distribution, loss metric, reset to zero)
    "polarization": {},   # library defaults (channel gates, block gates where present)
}
DEFAULT_METHODS = ["magnitude", "gmp", "imp"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs of every training run (E)")
    p.add_argument("--finetune-epochs", type=int, default=1,
                   help="fine-tune epochs after the cut (magnitude, GMP)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9],
                   help="target sparsities (fractions of Conv/Linear weights)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHOD_KWARGS))
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    p.add_argument("--data-limit", type=int, default=None,
                   help="keep only the first N training samples (None = the whole training split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    p.add_argument("--rows", type=Path, default=None,
                   help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                        "RESULTS.md's table is generated from (benchmarks/results_md.py)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.finetune_epochs < 0:
        p.error("--finetune-epochs must be >= 0")
    for s in args.sparsities:
        if not 0.0 < s < 1.0:
            p.error(f"sparsities must be in (0, 1), got {s}")
    return args


def planned_epochs(method: str, epochs: int, finetune: int) -> int:
    """Epochs one run of ``method`` trains (for the up-front estimate)."""
    if method == "imp":
        return (METHOD_KWARGS["imp"]["rounds"] + 1) * epochs
    return epochs + finetune


def run_one(args: argparse.Namespace, dm: Any, method: str, sparsity: float, finetune: int) -> dict[str, float]:
    torch.manual_seed(args.seed)  # the same initialisation for every run
    model = build_model(args.model, dm.input_shape, dm.num_classes, width=args.width)
    kwargs = dict(METHOD_KWARGS.get(method, {}))
    pruner = build_method(method, sparsity=sparsity, **kwargs)
    config = TrainConfig(epochs=args.epochs, finetune_epochs=finetune, lr=args.lr)
    cpu0 = time.process_time()
    result = run_pruning(model, dm, pruner, config, evaluate_test=True, seed=args.seed)
    metrics = result.metrics()
    # CPU seconds of this process: unlike wall seconds, barely moved by other processes sharing
    # the CPU (with --threads 1; more threads spin-wait and inflate it under contention).
    metrics["cpu_s"] = time.process_time() - cpu0
    return metrics


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """RESULTS.md's table: one line per run, costs as ratios to the dense run (the ``dense`` row)."""
    dense = next(r for r in rows if r["method"] == "dense")
    head = ("| method | target sparsity | achieved sparsity | test acc | val acc | FLOPs eff / sample "
            "| FLOPs vs dense | params eff | epochs | extra fwd passes | wall s | wall vs dense | CPU s | CPU vs dense |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for m in rows:
        lines.append(
            f"| {m['method']} | {m['target']:.0%} | {m['sparsity']:.2%} | {m['test_acc']:.2%} | {m['val_acc']:.2%} "
            f"| {int(m['flops_effective']):,} | {m['flops_effective'] / dense['flops_dense']:.3f} "
            f"| {int(m['params_effective']):,} | {int(m['epochs'])} | {int(m['extra_forward_passes'])} "
            f"| {m['wall_s']:.1f} | {m['wall_s'] / dense['wall_s']:.2f}x "
            f"| {m['cpu_s']:.1f} | {m['cpu_s'] / dense['cpu_s']:.2f}x |")
    return "\n".join(lines)


def results_table(doc: dict[str, Any]) -> str:
    """RESULTS.md's table from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return markdown_table(doc["rows"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The runner logs one line per finished phase: progress inside the long IMP runs.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    plog = logging.getLogger("prunelib")
    plog.addHandler(handler)
    plog.setLevel(logging.INFO)
    plog.propagate = False

    t_start = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["benchmarks/foundation_baselines.py", *argv]))
    print(f"command: {command}")
    print(f"prunelib {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip(), flush=True)
    dm = build_datamodule(args.dataset, batch_size=args.batch_size, seed=args.seed, limit_train=args.data_limit)
    print(f"data: {dm!r}  (loaded in {time.perf_counter() - t_start:.1f}s)", flush=True)

    runs: list[tuple[str, float, int]] = [("dense", 0.0, 0)]
    for method in args.methods:
        for s in args.sparsities:
            runs.append((method, s, args.finetune_epochs))
    total_epochs = args.epochs + sum(planned_epochs(m, args.epochs, args.finetune_epochs) for m, _, _ in runs[1:])
    print(f"plan: {len(runs)} runs, {total_epochs} training epochs in all", flush=True)

    rows: list[dict[str, Any]] = []
    epochs_done = 0
    for i, (method, sparsity, finetune) in enumerate(runs, 1):
        label = f"{method} @ {sparsity:.0%}" if method != "dense" else "dense"
        print(f"[{i}/{len(runs)}] {label} ...", flush=True)
        m = run_one(args, dm, "magnitude" if method == "dense" else method, sparsity, finetune)
        rows.append({"method": method, "target": sparsity, **m})
        epochs_done += int(m["epochs"])
        elapsed = time.perf_counter() - t_start
        eta = ""
        if epochs_done < total_epochs:
            eta = f", ~{elapsed / epochs_done * (total_epochs - epochs_done) / 60:.1f} min left"
        print(f"[{i}/{len(runs)}] {label}: sparsity {m['sparsity']:.2%}  test {m['test_acc']:.2%}  "
              f"val {m['val_acc']:.2%}  epochs {int(m['epochs'])}  {m['wall_s']:.1f}s wall  {m['cpu_s']:.1f}s CPU  "
              f"(elapsed {elapsed / 60:.1f} min{eta})", flush=True)

    table = markdown_table(rows)
    total = time.perf_counter() - t_start
    print()
    print(table)
    print(f"\ntotal wall time: {total:.1f}s ({total / 60:.1f} min)", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(f"table written to {args.out}")
    if args.rows:
        meta = run_meta("foundation_baselines.py", argv, settings_of(args),
                        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} torch thread(s)", seconds=total)
        print(f"raw rows written to {write_rows(args.rows, {'meta': meta, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
