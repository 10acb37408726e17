"""Scale check of structured pruning: a randomly initialised Llama-architecture model of ~1.1B
parameters (TinyLlama's shape: hidden 2048, FFN 5632, 22 blocks, 32 query heads over 4 KV heads,
vocabulary 32,000) pruned in width and depth and exported, on the CPU; and, for comparison, the
same model pruned by prunelib's unstructured SparseGPT (50 %).

Each method runs in its own process (``--method``), so peak resident memory (``ru_maxrss``) is
that method's alone. Prints one JSON line: wall seconds of building, pruning and exporting, peak
RSS (GiB), parameters before and after.

Usage (as measured for issue 27; both under the shared CPU lock)::

    flock /work/cpu.lock .venv/bin/python benchmarks/llm_structured_scale.py --method structured --out /tmp/scale
    flock /work/cpu.lock .venv/bin/python benchmarks/llm_structured_scale.py --method sparsegpt

Nothing is committed from a run (the exported checkpoint is ~2 GB).

Measured once (2-core, 24 GiB machine, torch 2.13 CPU, 2 threads, 8 x 256-token windows):
structured (FFN 50 %, heads 25 % = 1 of 4 KV groups, depth 25 % = 6 of 22 blocks; FLAP with
bias compensation) 1.100 B -> 0.521 B parameters, prune 59.7 s, export 5.2 s (remote_code
format: 24 heads do not divide hidden 2048), whole run 79 s wall, peak RSS 4.64 GiB;
SparseGPT 50 % unstructured: prune 368.5 s, whole run 384 s wall, peak RSS 6.57 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch


def build(layers: int, seed: int) -> torch.nn.Module:
    """The TinyLlama-shaped Llama, randomly initialised (float32, CPU)."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def calibration(samples: int, tokens: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token windows (the model is random too: this measures cost, not quality)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 32000, (1, tokens), generator=g),
             "attention_mask": torch.ones(1, tokens, dtype=torch.long)} for _ in range(samples)]


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["structured", "sparsegpt"], required=True)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--ffn", type=float, default=0.5, help="FFN channel fraction removed")
    parser.add_argument("--heads", type=float, default=0.25, help="head (KV group) fraction removed")
    parser.add_argument("--depth", type=float, default=0.25, help="block fraction removed")
    parser.add_argument("--out", default=None, help="export directory (structured; removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model = build(args.layers, 0)
    batches = calibration(args.samples, args.tokens, 1)
    row: dict[str, object] = {"method": args.method, "layers": args.layers, "samples": args.samples,
                              "tokens": args.tokens, "threads": torch.get_num_threads(),
                              "params_before": sum(p.numel() for p in model.parameters()),
                              "build_s": round(time.perf_counter() - t0, 1), "rss_after_build_gib": round(peak_rss_gib(), 2)}
    t1 = time.perf_counter()
    if args.method == "structured":
        from prunelib.llm.structured import StructuredSettings, prune_structured
        from prunelib.llm.structured_export import save_structured

        result = prune_structured(model, batches, StructuredSettings(ffn_sparsity=args.ffn, head_sparsity=args.heads,
                                                                     depth_sparsity=args.depth,
                                                                     importance="fluctuation", bias_compensation=True))
        row["prune_s"] = round(time.perf_counter() - t1, 1)
        row.update(params_after=result.params_after, removed_blocks=result.removed_blocks,
                   ffn_kept=result.ffn_kept[0], heads_kept=result.heads_kept[0], kv_heads_kept=result.kv_heads_kept[0])
        if args.out:
            t2 = time.perf_counter()
            export = save_structured(model, args.out)
            row["export_s"] = round(time.perf_counter() - t2, 1)
            row["export_format"] = export.format
            row["export_bytes"] = sum(f.stat().st_size for f in Path(args.out).iterdir())
            shutil.rmtree(args.out)
    else:
        from prunelib.llm import OneShotSettings, prune_model

        result = prune_model(model, batches, OneShotSettings(method="sparsegpt", sparsity=0.5))
        row["prune_s"] = round(time.perf_counter() - t1, 1)
        row["pruned_sparsity"] = round(result.pruned_sparsity, 4)
        row["params_after"] = row["params_before"]  # masks: the dense shapes stay
    row["peak_rss_gib"] = round(peak_rss_gib(), 2)
    row["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row))


def results_table(doc: dict) -> str:
    """RESULTS.md's table from the committed JSON lines of both methods' runs (``benchmarks/results_md.py``)."""
    lines = ["| method | parameters before | parameters after (deployed) | prune s | export s | whole run s | peak RSS GiB "
             "| export format |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        label = ("structured: FFN 50 %, 1 of 4 KV groups, 6 of 22 blocks (FLAP, bias compensation)"
                 if r["method"] == "structured" else f"SparseGPT, {r.get('pruned_sparsity', 0.5):.0%} unstructured (masks)")
        lines.append(f"| {label} | {r['params_before'] / 1e9:.3f} B | {r['params_after'] / 1e9:.3f} B | {r['prune_s']:.1f} "
                     f"| {r.get('export_s', '-')} | {r['total_s']:.1f} | {r['peak_rss_gib']:.2f} | {r.get('export_format', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
