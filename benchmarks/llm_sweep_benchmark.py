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

With ``--method llm_structured`` the sweep is pinned to structured pruning (``+method=llm_structured``,
its space: FFN, head and depth fractions, importance, allocation) and its objectives are
validation perplexity against ``flops_deployed`` (physical FLOPs per sequence of the smaller
model); :func:`table_front_deployed` renders that front (issue 27)::

    .venv/bin/python benchmarks/llm_sweep_benchmark.py --method llm_structured --trials 24 \\
        --rows benchmarks/results/llm_structured_sweep_<date>.json.gz

``--rows PATH.json.gz`` writes every finished trial's row (the columns below, unrounded) with the
command, commit, machine and date; :func:`table_front` (and :func:`table_front_bytes`) render
RESULTS.md's front table from them (``benchmarks/results_md.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import run_meta, settings_of, write_rows  # noqa: E402

#: The columns kept per trial (the rows file and the printed tables).
COLUMNS = ["method", "param.pattern", "param.sparsity", "param.distribution", "param.allocation", "param.owl_lambda", "val_ppl",
           "test_ppl", "dense_val_ppl", "block_sparsity", "flops_effective", "flops_dense", "sparse_bytes",
           "dense_bytes", "prune_s", "param.ffn_sparsity", "param.head_sparsity", "param.depth_sparsity",
           "param.importance", "param.bias_compensation", "flops_deployed", "params_deployed"]
#: How the table names each method.
LABELS = {"llm_magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def _plain(value: Any) -> Any:
    """A JSON-ready scalar (numpy scalars to Python ones)."""
    return value.item() if isinstance(value, np.generic) else value


def front_rows(rows: list[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """The trials on the front of (val_ppl min, ``axis`` min), by ``axis`` ascending."""
    from search.pareto import non_dominated_mask

    done = [r for r in rows if r.get("val_ppl") is not None and r.get(axis) is not None]
    if not done:
        return []
    mask = non_dominated_mask(np.array([[r["val_ppl"], r[axis]] for r in done], dtype=float), ["min", "min"])
    return sorted((r for r, keep in zip(done, mask) if keep), key=lambda r: r[axis])


def _front_table(doc: dict[str, Any], axis: str) -> str:
    lines = ["| method | pattern | sparsity | distribution | val ppl | test ppl | effective FLOPs | sparse bytes |",
             "|---|---|---|---|---|---|---|---|"]
    # The dense model's FLOPs: a structured trial's own flops_dense is its smaller model's.
    dense = max((r["flops_dense"] for r in doc["rows"] if r.get("flops_dense")), default=None)
    for r in front_rows(doc["rows"], axis):
        sparsity = r.get("param.sparsity")
        sparsity = r.get("block_sparsity") if sparsity is None or sparsity != sparsity else sparsity  # NaN: N:M
        pattern = r.get("param.pattern") or ("structured" if r["method"] == "llm_structured" else "-")
        dist = r.get("param.distribution") or r.get("param.allocation") or "uniform"
        dist = f"OWL (lambda {r['param.owl_lambda']:.3f})" if dist == "owl" else dist
        flops = f"{r['flops_effective'] / 1e6:.1f}M" + (f" ({r['flops_effective'] / dense:.0%})".replace("%", " %")
                                                         if dense else "")
        test = "-" if r.get("test_ppl") is None else f"{r['test_ppl']:.2f}"
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {pattern} | "
                     f"{'-' if sparsity is None else f'{sparsity:.3f}'} | {dist} | {r['val_ppl']:.2f} | {test} | "
                     f"{flops} | {r['sparse_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def table_front(doc: dict[str, Any]) -> str:
    """RESULTS.md's table: the front of validation perplexity against effective FLOPs."""
    return _front_table(doc, "flops_effective")


def table_front_bytes(doc: dict[str, Any]) -> str:
    """The front of validation perplexity against sparse bytes (same columns)."""
    return _front_table(doc, "sparse_bytes")


def table_front_deployed(doc: dict[str, Any]) -> str:
    """A structured sweep's front: validation perplexity against ``flops_deployed`` (physical FLOPs
    per sequence of the exported, smaller model), with the settings that reached each point."""
    rows = doc["rows"]
    # No share of dense: a structured trial's own flops_dense is its smaller model's.
    lines = ["| FFN removed | heads removed | blocks removed | importance | allocation | val ppl | test ppl "
             "| deployed FLOPs | deployed params |", "|---|---|---|---|---|---|---|---|---|"]
    for r in front_rows(rows, "flops_deployed"):
        imp = r.get("param.importance") or "-"
        imp += " + bias comp." if r.get("param.bias_compensation") is True else ""
        alloc = r.get("param.allocation") or "uniform"
        alloc = f"OWL (lambda {r['param.owl_lambda']:.3f})" if alloc == "owl" else alloc
        test = "-" if r.get("test_ppl") is None else f"{r['test_ppl']:.2f}"
        frac = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-"
                for k in ("param.ffn_sparsity", "param.head_sparsity", "param.depth_sparsity")]
        params = f"{r['params_deployed'] / 1e6:.3f}M" if r.get("params_deployed") is not None else "-"
        lines.append(f"| {' | '.join(frac)} | {imp} | {alloc} | {r['val_ppl']:.2f} | {test} | "
                     f"{r['flops_deployed'] / 1e6:.1f}M | {params} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="/tmp/prunesearch-llm-bench/model-seed0")
    parser.add_argument("--text", default=None, help="the LM text (default: the fortunes corpus, written here)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit-eval", type=int, default=256)
    parser.add_argument("--method", default=None, choices=["llm_structured"],
                        help="pin the sweep to this method (objectives val_ppl and flops_deployed); "
                             "default: unpinned, val_ppl and flops_effective")
    parser.add_argument("--work", default="/tmp/prunesearch-llm-sweep")
    parser.add_argument("--rows", type=Path, default=None,
                        help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                             "RESULTS.md's table is generated from (benchmarks/results_md.py)")
    args = parser.parse_args()
    from prunelib.data.corpora import write_fortunes_corpus
    from search.config import load_config
    from search.tuner import run_sweep

    work = Path(args.work)
    text = Path(args.text) if args.text else write_fortunes_corpus(work / "corpus")["txt"]
    axis = "flops_deployed" if args.method else "flops_effective"
    overrides = [*([f"+method={args.method}"] if args.method else []), "model=hf", f"model.path={args.model_dir}",
                 "data=text", f"data.path={text}",
                 f"data.max_length={args.max_length}", f"data.limit_eval={args.limit_eval}",
                 f"search.n_trials={args.trials}", f"search.concurrency={args.concurrency}",
                 f"search.objectives=[{{metric: val_ppl, mode: min}}, {{metric: {axis}, mode: min}}]",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "trial.evaluate_test=true"]
    print("python -m search " + " ".join(overrides), flush=True)
    start = time.perf_counter()
    result = run_sweep(load_config(overrides), work / f"out-{int(time.time())}")
    print(f"\nsweep wall time {time.perf_counter() - start:.0f}s", flush=True)
    rows = [r for r in result.rows if r.get("status") == "ok"]
    table = pd.DataFrame(rows)
    table = table[[c for c in COLUMNS if c in table.columns]].sort_values("val_ppl")
    pd.set_option("display.width", 250)
    print("\nall trials:\n" + table.to_string(index=False), flush=True)
    doc = {"meta": run_meta("llm_sweep_benchmark.py", settings=settings_of(args, ("rows",)),
                            seconds=time.perf_counter() - start,
                            search_command="python -m search " + " ".join(overrides)),
           "rows": [{c: _plain(r[c]) for c in COLUMNS if c in r} for r in rows]}
    if args.method:
        print(f"\nfront of val_ppl against flops_deployed:\n{table_front_deployed(doc)}", flush=True)
    else:
        print(f"\nfront of val_ppl against flops_effective:\n{table_front(doc)}", flush=True)
        print(f"\nfront of val_ppl against sparse_bytes:\n{table_front_bytes(doc)}", flush=True)
    if args.rows:
        print(f"raw rows written to {write_rows(args.rows, doc)}")


if __name__ == "__main__":
    main()
