"""A real sweep over the LLM pruners: method x N:M pattern x sparsity x per-block distribution.

Runs ``python -m search``'s own code path (:func:`search.tuner.run_sweep`: Ray Tune trials,
multi-objective TPE, MLflow) on the small causal LM that ``llm_pruning_benchmark.py`` trained
(its seed-0 model directory) and the fortunes text, with the method *not* pinned: a ``model=hf``
sweep covers ``llm_magnitude``, ``wanda`` and ``sparsegpt`` and each one's space (pattern
unstructured / 2:4 / 4:8; for unstructured the sparsity 0.3-0.8 and uniform or OWL with its
lambda). Objectives: validation perplexity (min) and effective FLOPs per sequence (min). The
front is printed, and the front of perplexity against ``sparse_bytes`` of the same trials.

    flock /tmp/prunesearch-cpu.lock .venv/bin/python benchmarks/llm_sweep_benchmark.py \\
        --model-dir /tmp/prunesearch-llm-bench/model-seed0 --trials 24

The command line it runs is the same as::

    python -m search model=hf model.path=DIR data=text data.path=fortunes.txt \\
        "search.objectives=[{metric: val_ppl, mode: min}, {metric: flops_effective, mode: min}]"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="/tmp/prunesearch-llm-bench/model-seed0")
    parser.add_argument("--text", default=None, help="the LM text (default: the fortunes corpus, written here)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit-eval", type=int, default=256)
    parser.add_argument("--work", default="/tmp/prunesearch-llm-sweep")
    args = parser.parse_args()
    from prunelib.data.corpora import write_fortunes_corpus
    from search import pareto
    from search.config import load_config
    from search.tuner import run_sweep

    work = Path(args.work)
    text = Path(args.text) if args.text else write_fortunes_corpus(work / "corpus")["txt"]
    overrides = ["model=hf", f"model.path={args.model_dir}", "data=text", f"data.path={text}",
                 f"data.max_length={args.max_length}", f"data.limit_eval={args.limit_eval}",
                 f"search.n_trials={args.trials}", f"search.concurrency={args.concurrency}",
                 "search.objectives=[{metric: val_ppl, mode: min}, {metric: flops_effective, mode: min}]",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "trial.evaluate_test=true"]
    print("python -m search " + " ".join(overrides), flush=True)
    start = time.perf_counter()
    result = run_sweep(load_config(overrides), work / f"out-{int(time.time())}")
    print(f"\nsweep wall time {time.perf_counter() - start:.0f}s", flush=True)
    rows = [r for r in result.rows if r.get("status") == "ok"]
    cols = ["method", "param.pattern", "param.sparsity", "param.distribution", "param.owl_lambda", "val_ppl",
            "test_ppl", "dense_val_ppl", "block_sparsity", "flops_effective", "flops_dense", "sparse_bytes",
            "dense_bytes", "prune_s"]
    table = pd.DataFrame(rows)
    table = table[[c for c in cols if c in table.columns]].sort_values("val_ppl")
    pd.set_option("display.width", 250)
    print("\nall trials:\n" + table.to_string(index=False), flush=True)
    for axis in ("flops_effective", "sparse_bytes"):
        front = pareto.pareto_front(rows, [("val_ppl", "min"), (axis, "min")])
        shown = front[[c for c in cols if c in front.columns]]
        print(f"\nfront of val_ppl against {axis} ({len(front)} points):\n" + shown.to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
