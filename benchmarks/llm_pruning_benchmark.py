"""One-shot LLM pruning on a small causal LM trained here: magnitude vs Wanda vs SparseGPT.

A Llama-style causal LM (RMSNorm, rotary attention, SwiGLU; sizes below) is trained from scratch
on the fortunes corpus (Debian's ``fortunes`` package, ``prunelib.data.corpora``) with a
byte-level BPE tokenizer trained here, once per seed. Each model is pruned at 50 % unstructured,
2:4 and 4:8 by ``llm_magnitude`` (per layer), ``wanda`` (per output row) and ``sparsegpt``
(128-column blocks, 1 % damping), block by block with sequential calibration on 128 random
training windows, exactly as ``python -m search`` trials do, and the test-split perplexity is
measured (non-overlapping windows of ``--seq-len`` tokens, like the papers' WikiText figures).

    flock /tmp/prunesearch-cpu.lock .venv/bin/python benchmarks/llm_pruning_benchmark.py
    .venv/bin/python benchmarks/llm_pruning_benchmark.py --seeds 0 --epochs 0.3   # smoke run

Writes ``--out`` (JSON of every number) and prints the Markdown tables; the seed-0 model is kept
in ``--model-dir`` for ``llm_sweep_benchmark.py``. ``--rows PATH.json.gz`` writes the same rows
with the command, commit, machine and date: :func:`table_perplexity`, :func:`table_paired` and
:func:`table_owl` render RESULTS.md's tables from them (``benchmarks/results_md.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunelib.data.corpora import write_fortunes_corpus
from prunelib.data.text import build_text_datamodule
from prunelib.llm import evaluate_text
from prunelib.methods import build_method
from prunelib.models.hf import (build_small_model, load_hf_model, load_tokenizer, save_hf_model, train_text_model,
                                train_tokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import run_meta, settings_of, write_rows  # noqa: E402

METHODS = ("llm_magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4", "4:8")
#: How the tables name each method.
LABELS = {"llm_magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def seed_model_dir(seed: int, work: str | Path, seed0_dir: str | Path | None = None) -> Path:
    """Where the benchmark LM of ``seed`` is saved: ``seed0_dir`` (``--model-dir``) for seed 0 when
    given, else ``WORK/model-seed{seed}`` (the default ``--model-dir`` is ``WORK/model-seed0``)."""
    return Path(seed0_dir) if seed == 0 and seed0_dir is not None else Path(work) / f"model-seed{seed}"


def train_seed_model(seed: int, tok: Any, dm: Any, model_dir: str | Path, *, layers: int, hidden: int, heads: int,
                     intermediate: int, seq_len: int, epochs: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the benchmark's Llama-style LM of ``seed`` on ``dm`` (AdamW 3e-3) and save it with
    ``tok`` in ``model_dir``. Returns the model and ``train_text_model``'s record (``seconds``...)."""
    model = build_small_model("llama", "causal_lm", tok, layers=layers, hidden=hidden, heads=heads,
                              intermediate=intermediate, max_positions=seq_len, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"seed {seed}: training a {params / 1e6:.2f}M-parameter Llama-style LM for {epochs} epochs", flush=True)
    train = train_text_model(model, dm, epochs=epochs, lr=3e-3, seed=seed, log_every=200)
    save_hf_model(model, tok, model_dir)
    return model, train


def _select(rows: list[dict[str, Any]], method: str, pattern: str, distribution: str = "uniform") -> list[dict]:
    """The rows of one method, pattern and distribution, in seed order."""
    return sorted((r for r in rows if r["method"] == method and r["pattern"] == pattern
                   and r.get("distribution", "uniform") == distribution), key=lambda r: r["seed"])


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _pattern_label(pattern: str, sparsity: float) -> str:
    return f"{sparsity:.0%} unstructured".replace("%", " %") if pattern == "unstructured" else pattern


def table_perplexity(doc: dict[str, Any]) -> str:
    """Test perplexity, mean ± std over seeds, per method and pattern (uniform), with the mean ratio to dense."""
    rows, st = doc["rows"], doc["meta"]["settings"]
    dense = {r["seed"]: r["test_ppl"] for r in rows if r["method"] == "dense"}
    patterns = [p for p in st["patterns"] if any(_select(rows, m, p) for m in METHODS)]
    lines = [f"| test perplexity (mean ± std, {len(dense)} seeds) | "
             + " | ".join(_pattern_label(p, st["sparsity"]) for p in patterns) + " |", "|---|" + "---|" * len(patterns),
             f"| dense | {_mean_std(list(dense.values()))} |" + " |" * (len(patterns) - 1)]
    for method in METHODS:
        cells = []
        for pattern in patterns:
            sel = _select(rows, method, pattern)
            ratio = statistics.mean(r["test_ppl"] / dense[r["seed"]] for r in sel) if sel else None
            cells.append(f"{_mean_std([r['test_ppl'] for r in sel])} (x{ratio:.3f})" if sel else "")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_paired(doc: dict[str, Any]) -> str:
    """Paired differences of test perplexity between methods, per seed and pattern (uniform)."""
    rows, st = doc["rows"], doc["meta"]["settings"]
    seeds = sorted({r["seed"] for r in rows if r["method"] == "dense"})
    patterns = [p for p in st["patterns"] if any(_select(rows, m, p) for m in METHODS)]
    lines = ["| paired difference (ppl), seeds " + " / ".join(str(s) for s in seeds) + " | "
             + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
    for a, b in (("wanda", "llm_magnitude"), ("sparsegpt", "llm_magnitude"), ("sparsegpt", "wanda")):
        cells = []
        for pattern in patterns:
            x = {r["seed"]: r["test_ppl"] for r in _select(rows, a, pattern)}
            y = {r["seed"]: r["test_ppl"] for r in _select(rows, b, pattern)}
            cells.append(" / ".join(f"{x[s] - y[s]:+.2f}" for s in seeds if s in x and s in y))
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_owl(doc: dict[str, Any]) -> str:
    """Test perplexity at the run's unstructured sparsity, uniform against OWL, per method (mean ± std)."""
    rows, st = doc["rows"], doc["meta"]["settings"]
    dense = [r["test_ppl"] for r in rows if r["method"] == "dense"]
    sp = f"{st['sparsity']:.0%}".replace("%", " %")
    names = {"uniform": f"{sp} uniform", "owl": f"{sp} OWL (M = 5, lambda = {st['owl_lambda']:g})"}
    dists = [d for d in st["distributions"] if d in names]
    lines = [f"| test perplexity (mean ± std, {len(dense)} seeds) | " + " | ".join(names[d] for d in dists) + " |",
             "|---|" + "---|" * len(dists), f"| dense | {_mean_std(dense)} |" + " |" * (len(dists) - 1)]
    for method in METHODS:
        cells = [_mean_std([r["test_ppl"] for r in sel]) if (sel := _select(rows, method, "unstructured", d)) else ""
                 for d in dists]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark LM's shape and training options (one place for every script that trains it)."""
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_model_args(parser)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--distributions", nargs="+", default=["uniform"], help="uniform and/or owl (unstructured only)")
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--reuse", action="store_true", help="load the models a previous run saved instead of training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/prunesearch-llm-bench")
    parser.add_argument("--model-dir", default="/tmp/prunesearch-llm-bench/model-seed0")
    parser.add_argument("--out", default="/tmp/prunesearch-llm-bench/results.json")
    parser.add_argument("--rows", type=Path, default=None,
                        help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                             "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    corpus = write_fortunes_corpus(work / "corpus")
    docs = corpus["txt"].read_text().split("\n\n")
    print(f"corpus: {len(docs)} fortunes, {corpus['txt'].stat().st_size / 1e6:.1f} MB", flush=True)
    tok = None if args.reuse else train_tokenizer(docs, "bpe", args.vocab)
    results: list[dict] = []
    for seed in args.seeds:
        model_dir = seed_model_dir(seed, work, args.model_dir)
        if args.reuse:
            tok = load_tokenizer(model_dir)  # the tokenizer the model was trained with
        dm = build_text_datamodule(corpus["txt"], tok, max_length=args.seq_len, batch_size=16, seed=seed)
        if seed == args.seeds[0]:
            print(f"data: {dm.sizes} sequences of {args.seq_len} tokens, {dm.tokens} tokens", flush=True)
        if args.reuse:
            model = load_hf_model(model_dir)
            train = {"seconds": 0.0}
            params = sum(p.numel() for p in model.parameters())
        else:
            model, train = train_seed_model(seed, tok, dm, model_dir, layers=args.layers, hidden=args.hidden,
                                            heads=args.heads, intermediate=args.intermediate, seq_len=args.seq_len,
                                            epochs=args.epochs)
            params = sum(p.numel() for p in model.parameters())
        dense = evaluate_text(model, dm, "test")
        print(f"seed {seed}: dense test ppl {dense['ppl']:.2f} ({train['seconds']:.0f}s training)", flush=True)
        results.append({"seed": seed, "method": "dense", "pattern": "-", "test_ppl": dense["ppl"],
                        "val_ppl": evaluate_text(model, dm, "val")["ppl"], "train_s": train["seconds"],
                        "params": params})
        configs = [(m, p, d) for m in METHODS for p in args.patterns for d in args.distributions
                   if d == "uniform" or p == "unstructured"]
        for method, pattern, dist in configs:
            pruned = load_hf_model(model_dir)
            pruner = build_method(method, sparsity=args.sparsity, pattern=pattern, distribution=dist,
                                  owl_lambda=args.owl_lambda, calib_samples=args.calib_samples, calib_seed=seed)
            t0 = time.perf_counter()
            pruner.setup(pruned, dm)
            pruner.finalize(pruned)
            seconds = time.perf_counter() - t0
            test = evaluate_text(pruned, dm, "test")
            val = evaluate_text(pruned, dm, "val")
            row = {"seed": seed, "method": method, "pattern": pattern, "distribution": dist, "test_ppl": test["ppl"],
                   "val_ppl": val["ppl"], "test_acc": test["acc"], "prune_s": seconds,
                   "block_sparsity": pruner.result.pruned_sparsity, "block_targets": pruner.result.block_sparsity}
            results.append(row)
            print(f"seed {seed}: {method:<13} {pattern:<12} {dist:<8} test ppl {test['ppl']:9.2f}  "
                  f"(sparsity {row['block_sparsity']:.3f}, {seconds:.1f}s)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": settings_of(args, ()), "rows": results}, indent=1))

    doc = {"meta": run_meta("llm_pruning_benchmark.py", settings=settings_of(args),
                            seconds=time.perf_counter() - start), "rows": results}
    print("\n" + table_perplexity(doc) + "\n\n" + table_paired(doc))
    if "owl" in args.distributions:
        print("\n" + table_owl(doc))
    if args.rows:
        print(f"raw rows written to {write_rows(args.rows, doc)}")


if __name__ == "__main__":
    main()
