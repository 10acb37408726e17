"""What tracing a model once saves: a structured model cost (as a per-epoch report asks for it)
and a surgery, with the model's one trace reused against a fresh trace on every call (what
every call did before the trace was kept, and what a new model object still gets).

Prints seconds per call and the ratio, one run, for each model:

    python benchmarks/trace_reuse.py --models lenet5 vgg_small resnet20 --calls 5
    python benchmarks/trace_reuse.py --rows benchmarks/results/trace_reuse_DATE.json.gz

``--rows`` writes one row per model and call (median seconds, unrounded) with the command,
commit, machine and date; :func:`results_table` renders the table from them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunelib.flops import model_cost  # noqa: E402
from prunelib.masks import MaskSet  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.surgery import surgery  # noqa: E402
from rows import run_meta, settings_of, write_rows  # noqa: E402

SHAPES = {"mlp": (1, 8, 8), "lenet5": (1, 28, 28)}


def channel_masks(model: torch.nn.Module, fraction: float, seed: int) -> MaskSet:
    """Random channel masks on every Conv/Linear layer but the classifier."""
    masks = MaskSet.ones_like(model, granularity="channel")
    names = masks.names()
    gen = torch.Generator().manual_seed(seed)
    for n in names[:-1]:
        m = masks.masks[n]
        m[torch.randperm(m.numel(), generator=gen)[: int(fraction * m.numel())]] = False
    del masks.masks[names[-1]], masks.granularity[names[-1]]
    return masks


def seconds(fn, calls: int) -> float:
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row_line(r: dict[str, Any]) -> str:
    """One line of the table: a model's call, fresh trace against the reused one."""
    return (f"| {r['model']} {tuple(r['shape'])} | {r['call']} | {r['fresh_s']:.3f} | {r['reused_s']:.3f} | "
            f"{r['fresh_s'] / r['reused_s']:.1f}x |")


HEADER = "| model | call | fresh trace each call s | one trace reused s | ratio |\n|---|---|---|---|---|"


def results_table(doc: dict[str, Any]) -> str:
    """The table from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return HEADER + "\n" + "\n".join(row_line(r) for r in doc["rows"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg_small", "resnet20"])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=Path, default=None,
                    help="also write the raw rows (.json.gz with command, commit, machine, date) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        shape = SHAPES.get(name, (3, 32, 32))
        torch.manual_seed(0)
        model = build_model(name, shape, 10)
        masks = [channel_masks(model, 0.5, seed) for seed in range(args.calls)]
        model_cost(model, shape, masks[0], round_to=None)  # the one trace, taken before timing
        calls = {"model_cost": lambda m, i: model_cost(m, shape, masks[i], round_to=None),
                 "surgery": lambda m, i: surgery(m, masks[i], shape, round_to=None, verify=False)}
        for label, call in calls.items():
            fresh = seconds(lambda i: call(copy.deepcopy(model), i), args.calls)  # a new object: traced
            copy_only = seconds(lambda i: copy.deepcopy(model), args.calls)
            reused = seconds(lambda i: call(model, i), args.calls)
            fresh -= copy_only  # the benchmark's own deepcopy is no part of the old path
            rows.append({"model": name, "shape": list(shape), "call": label, "fresh_s": fresh, "reused_s": reused,
                         "deepcopy_s": copy_only})
            print(row_line(rows[-1]), flush=True)
    if args.rows:
        doc = {"meta": run_meta("trace_reuse.py", settings=settings_of(args)), "rows": rows}
        print(f"raw rows written to {write_rows(args.rows, doc)}")


if __name__ == "__main__":
    main()
