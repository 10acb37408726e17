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

Writes ``--out`` (JSON of every number) and prints a Markdown table; the seed-0 model is kept in
``--model-dir`` for ``llm_sweep_benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prunelib.data.corpora import write_fortunes_corpus
from prunelib.data.text import build_text_datamodule
from prunelib.llm import evaluate_text
from prunelib.methods import build_method
from prunelib.models.hf import (build_small_model, load_hf_model, load_tokenizer, save_hf_model, train_text_model,
                                train_tokenizer)

METHODS = ("llm_magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4", "4:8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=128)
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    corpus = write_fortunes_corpus(work / "corpus")
    docs = corpus["txt"].read_text().split("\n\n")
    print(f"corpus: {len(docs)} fortunes, {corpus['txt'].stat().st_size / 1e6:.1f} MB", flush=True)
    tok = None if args.reuse else train_tokenizer(docs, "bpe", args.vocab)
    results: list[dict] = []
    for seed in args.seeds:
        model_dir = Path(args.model_dir) if seed == 0 else work / f"model-seed{seed}"
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
            model = build_small_model("llama", "causal_lm", tok, layers=args.layers, hidden=args.hidden,
                                      heads=args.heads, intermediate=args.intermediate,
                                      max_positions=args.seq_len, seed=seed)
            params = sum(p.numel() for p in model.parameters())
            print(f"seed {seed}: training a {params / 1e6:.2f}M-parameter Llama-style LM for {args.epochs} epochs",
                  flush=True)
            train = train_text_model(model, dm, epochs=args.epochs, lr=3e-3, seed=seed, log_every=200)
            save_hf_model(model, tok, model_dir)
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
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))

    def cell(method: str, column: str) -> str:
        values = [r["test_ppl"] for r in results if r["method"] == method and
                  (column == "-" and r["pattern"] == "-" or f"{r['pattern']} {r.get('distribution')}" == column)]
        if not values:
            return ""
        if len(values) > 1:
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        return f"{values[0]:.2f}"

    columns = [f"{p} {d}" for p in args.patterns for d in args.distributions if d == "uniform" or p == "unstructured"]
    print("\n| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    print(f"| dense | {cell('dense', '-')} |" + " |" * (len(columns) - 1))
    for method in METHODS:
        print(f"| {method} | " + " | ".join(cell(method, c) for c in columns) + " |")


if __name__ == "__main__":
    main()
