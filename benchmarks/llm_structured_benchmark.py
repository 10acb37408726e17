"""Structured pruning of the small causal LMs trained here (issue 27, Show): test perplexity at
25 % and 50 % of the decoder blocks' parameters removed, CPU latency of the exported models, and
optionally the front of a structured text sweep.

(a) **Perplexity.** The Llama-style LMs of ``llm_pruning_benchmark.py`` (one per seed, saved under
``WORK/model-seed{N}``; trained here with its function when missing) are pruned by
``llm_structured`` (:func:`prunelib.llm.structured.prune_structured`) in three families:
*width* (attention heads and FFN channels of every block), *depth* (whole blocks, ShortGPT block
influence) and *width+depth* (about half of the removed parameters from blocks, the rest from
width), each without and with logit distillation from the dense model (``--distill-steps`` AdamW
steps on the calibration windows; its wall time is in the row's seconds). Baselines at the same
widths: uniform magnitude width pruning (``importance=magnitude``: L2 norms of the weights that
read and write each channel/head, the same heads and FFN channels removed in every block, no
calibration) and Torch-Pruning 1.6's LLM width pruning (``MetaPruner`` with
``GroupMagnitudeImportance(p=2)`` as in its ``examples/LLMs/prune_llm.py``) at the width row's
parameter count within 1 %: **FFN channels only**, per block, because over the whole Hugging Face
Llama its dependency graph never finishes building (Torch-Pruning issue #527; see
:func:`torch_pruning_ffn`), so its head pruning (``num_heads``/``prune_num_heads``) is not reached.

*Parameters removed* = the fraction of the **decoder blocks'** parameters removed (the tied
embedding/LM head and the final norm are never pruned, by any method); every method of a seed
sees the same calibration windows (``--calib-samples`` random training windows, drawn once per
seed). Each family's fractions come from a small search over the method's settings on the
parameter count itself (data-free dry runs of ``prune_structured``): depth = ``round(target * L)``
blocks; width = for every achievable head level (whole KV groups) a bisection of the FFN
fraction, keeping the level whose FFN fraction is nearest the head fraction (Minitron-style
balanced width) among those within 1 % of the target; width+depth = ``max(1, round(target * L /
2))`` blocks (fewer than the target alone removes), then the width search on the rest. The
parameters actually reached are in every row and table cell. On a 4-block model one block is
25 % of the block parameters, so width+depth at 25 % has no point (the table says so).

(b) **Latency.** The seed-``--latency-seed`` models (without distillation: the same shapes) are
exported with :func:`prunelib.llm.structured_export.save_structured`, loaded back with
``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code=True`` for the remote-code format)
as a user would, and timed on the CPU at batch 1 and 16 (``--latency-seq`` tokens, random ids,
``use_cache=False``): warm-up calls first, then the median of ``--latency-repeats`` forwards, as
a ratio to the dense model exported and timed the same way in the same run. The row also holds
the largest logit difference between the loaded and the in-memory model.

(c) **Sweep** (``--sweep N``): a real ``model=hf`` sweep of ``method=llm_structured`` on the
seed-0 model (``llm_sweep_benchmark.py`` with ``--method llm_structured``): objectives val_ppl
(min) and ``flops_deployed`` (physical FLOPs per sequence of the smaller model, min).

Full run (reuses the models ``llm_pruning_benchmark.py`` saved; trains the missing ones, about
5 min each on 2 cores)::

    .venv/bin/python benchmarks/llm_structured_benchmark.py --threads 2 \\
        --rows benchmarks/results/llm_structured_<date>.json.gz
    .venv/bin/python benchmarks/llm_sweep_benchmark.py --method llm_structured --trials 24 \\
        --rows benchmarks/results/llm_structured_sweep_<date>.json.gz            # part (c)

Smoke run (a tiny model trained for a moment, 1 seed; 90 s on the shared 2-core machine)::

    .venv/bin/python benchmarks/llm_structured_benchmark.py --smoke

:func:`table_perplexity`, :func:`table_latency` render RESULTS.md's tables from the rows
(``benchmarks/results_md.py``); the sweep's front table is ``llm_sweep_benchmark.table_front_deployed``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunelib.data.corpora import write_fortunes_corpus
from prunelib.data.text import build_text_datamodule
from prunelib.llm import evaluate_text
from prunelib.llm.blocks import find_blocks
from prunelib.llm.structured import StructuredResult, StructuredSettings, prune_structured
from prunelib.models.hf import load_hf_model, load_tokenizer, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_pruning_benchmark import add_model_args, seed_model_dir, train_seed_model  # noqa: E402
from rows import run_meta, settings_of, write_rows  # noqa: E402

TARGETS = (0.25, 0.5)
FAMILIES = ("width", "depth", "width_depth")
#: How the tables name each row (method, family, distilled).
LABELS = {("llm_structured", "width", False): "width-only (heads + FFN)",
          ("llm_structured", "width", True): "width-only + distillation",
          ("llm_structured", "depth", False): "depth-only (blocks)",
          ("llm_structured", "depth", True): "depth-only + distillation",
          ("llm_structured", "width_depth", False): "width + depth",
          ("llm_structured", "width_depth", True): "width + depth + distillation",
          ("magnitude_width", "width", False): "uniform magnitude width (L2, no calibration)",
          ("torch_pruning", "width", False): "Torch-Pruning 1.6 MetaPruner (FFN only, L2 group norm)"}
#: A parameter count within this fraction of the target counts as "on target".
TOLERANCE = 0.01


# ----------------------------------------------------------------------------------------------
# Parameter accounting and the search over the method's fractions
# ----------------------------------------------------------------------------------------------
def block_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks (what the targets are fractions of)."""
    _, blocks = find_blocks(model)
    return sum(p.numel() for p in blocks.parameters())


def dry_run_block_params(model: nn.Module, settings: StructuredSettings, probe: list[dict[str, torch.Tensor]]) -> int:
    """Block parameters after pruning a copy of ``model`` with ``settings``' fractions.

    The count depends only on the fractions (uniform allocation), not on which channels go, so
    the copy is pruned data-free by magnitude (one probe batch where depth needs block influence).
    """
    dry = dataclasses.replace(settings, importance="magnitude", bias_compensation=False, distill_steps=0)
    clone = copy.deepcopy(model)
    prune_structured(clone, probe if dry.needs_data else None, dry)
    return block_params(clone)


def bisect_nearest(params_at: Callable[[float], int], goal_params: float, start_params: int,
                   iterations: int) -> tuple[float, int]:
    """The fraction in [0, 0.95] whose block parameter count ``params_at(fraction)`` is nearest
    ``goal_params`` (bisection: the count falls as the fraction grows); returns (fraction,
    params reached). ``start_params``: the count at fraction 0."""
    lo, hi = 0.0, 0.95
    best = (0.0, start_params)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        params = params_at(mid)
        if abs(params - goal_params) < abs(best[1] - goal_params):
            best = (mid, params)
        if params > goal_params:
            lo = mid
        else:
            hi = mid
    return best


def _bisect_ffn(model: nn.Module, base: StructuredSettings, target_params: float, dense_params: int,
                probe: list[dict[str, torch.Tensor]], iterations: int = 14) -> tuple[float, int]:
    """The FFN fraction (others fixed in ``base``) whose block parameter count is nearest
    ``target_params``; returns (fraction, params reached)."""
    return bisect_nearest(
        lambda fraction: dry_run_block_params(model, dataclasses.replace(base, ffn_sparsity=fraction), probe),
        target_params, dry_run_block_params(model, base, probe), iterations)


def search_width(model: nn.Module, target: float, depth_sparsity: float, probe: list[dict[str, torch.Tensor]],
                 importance: str) -> dict[str, Any] | None:
    """Head and FFN fractions (after ``depth_sparsity`` of the blocks) that remove ``target`` of
    the dense block parameters; None when no head level gets within :data:`TOLERANCE`.

    Every achievable head level (whole KV groups: ``j / kv_heads``) gets a bisection of the FFN
    fraction; among the levels on target, the one whose FFN fraction is nearest its head fraction
    (the most balanced width) is kept.
    """
    dense = block_params(model)
    goal = (1.0 - target) * dense
    kv = int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
    candidates = []
    for j in range(kv):
        head = j / kv
        base = StructuredSettings(head_sparsity=head, depth_sparsity=depth_sparsity, importance=importance)
        if dry_run_block_params(model, base, probe) < goal * (1 - TOLERANCE):
            break  # this many heads alone already remove too much
        ffn, params = _bisect_ffn(model, base, goal, dense, probe)
        if abs(params - goal) <= TOLERANCE * dense:
            candidates.append({"head_sparsity": head, "ffn_sparsity": ffn, "depth_sparsity": depth_sparsity,
                               "block_params": params})
    return min(candidates, key=lambda c: abs(c["ffn_sparsity"] - c["head_sparsity"])) if candidates else None


def search_family(model: nn.Module, family: str, target: float, probe: list[dict[str, torch.Tensor]],
                  importance: str) -> dict[str, Any] | None:
    """The fractions of one family at one target (see the module docstring); None = no point."""
    layers = len(find_blocks(model)[1])
    if family == "width":
        return search_width(model, target, 0.0, probe, importance)
    if family == "depth":
        k = int(round(target * layers))
        depth = k / layers
        s = StructuredSettings(depth_sparsity=depth, importance=importance)
        return {"head_sparsity": 0.0, "ffn_sparsity": 0.0, "depth_sparsity": depth,
                "block_params": dry_run_block_params(model, s, probe)} if 0 < k < layers else None
    k = max(1, int(round(target * layers / 2)))
    if k / layers >= target - 1e-9:
        return None  # the blocks alone reach the target: no width left to remove
    return search_width(model, target, k / layers, probe, importance)


# ----------------------------------------------------------------------------------------------
# Torch-Pruning's LLM width pruning
# ----------------------------------------------------------------------------------------------
def torch_pruning_ffn(model: nn.Module, ffn_ratio: float, tokens: int = 8) -> None:
    """Torch-Pruning 1.6's ``MetaPruner`` on every block's FFN (``LlamaMLP``): ``ffn_ratio`` of the
    gate/up output channels (with the down projection's inputs), ``GroupMagnitudeImportance(p=2,
    group_reduction="mean")`` as in its ``examples/LLMs/prune_llm.py``, no calibration.

    Why per block and FFN only: over the whole Hugging Face Llama (transformers 5.x) the
    dependency graph's group search does not finish (over 5 CPU minutes on a 4-block, 50k-parameter
    model, in ``_fix_dependency_graph_non_recursive``; Torch-Pruning issue #527), so the heads
    cannot be pruned through it; a block's MLP traces in milliseconds.
    """
    import torch_pruning as tp

    hidden = model.config.hidden_size
    for name, mlp in model.named_modules():
        if not name.endswith("mlp"):
            continue
        example = torch.randn(1, tokens, hidden)
        pruner = tp.pruner.MetaPruner(mlp, example_inputs=example,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                      global_pruning=False, pruning_ratio=ffn_ratio, ignored_layers=[mlp.down_proj])
        for group in pruner.step(interactive=True):
            group.prune()
    first_mlp = next(m for n, m in model.named_modules() if n.endswith("mlp"))
    model.config.intermediate_size = first_mlp.gate_proj.out_features


def _search_tp_ffn(model: nn.Module, goal_params: int) -> tuple[float, int]:
    """The FFN ratio at which :func:`torch_pruning_ffn` is nearest ``goal_params`` block
    parameters (a bisection over dry runs on copies)."""
    def params_at(ratio: float) -> int:
        clone = copy.deepcopy(model)
        torch_pruning_ffn(clone, ratio)
        return block_params(clone)

    return bisect_nearest(params_at, goal_params, block_params(model), iterations=12)


# ----------------------------------------------------------------------------------------------
# Latency of the exported model
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def median_latency_ms(model: nn.Module, input_ids: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time of one forward pass (milliseconds) after ``warmup`` passes."""
    mask = torch.ones_like(input_ids)
    for _ in range(warmup):
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def export_and_load(model: nn.Module, tok: Any, out_dir: Path) -> tuple[nn.Module, str]:
    """Export with prunelib's ``save_structured``, load back with transformers' Auto class."""
    import transformers

    from prunelib.llm.structured_export import save_structured

    export = save_structured(model, out_dir, tok)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir,
                                                               trust_remote_code=export.format == "remote_code")
    return loaded.eval(), export.format


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _row_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    keys = {(r["method"], r["family"], r["distill"]) for r in rows if r["method"] != "dense"}
    return [k for k in LABELS if k in keys]


def table_perplexity(doc: dict[str, Any]) -> str:
    """Test perplexity (mean ± std over seeds, x mean ratio to dense) at each target, with the
    block parameters removed (mean over seeds) and the pruning wall time (distillation included)."""
    rows, st = doc["rows"], doc["meta"]["settings"]
    dense = {r["seed"]: r["test_ppl"] for r in rows if r["method"] == "dense"}
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    head = " | ".join(f"{_pct(t)} removed: test ppl (x dense) | removed | s" for t in targets)
    lines = [f"Parameters removed = fraction of the decoder blocks' parameters (tied embedding/LM head and final "
             f"norm kept by every method); {len(dense)} seed(s) ({', '.join(str(s) for s in sorted(dense))}); the same "
             f"{st['calib_samples']} calibration windows of {st['seq_len']} tokens for every method of a seed; "
             f"distillation: {st['distill_steps']} AdamW steps (lr {st['distill_lr']:g}) on those windows, its time "
             f"in s; importance of llm_structured: {st['importance']}.", "",
             f"| method | {head} |", "|---|" + "---|---|---|" * len(targets),
             f"| dense | {_mean_std(list(dense.values()))} | 0 % | - |" + " | | |" * (len(targets) - 1)]
    for key in _row_keys(rows):
        cells = []
        for t in targets:
            sel = sorted((r for r in rows if (r["method"], r["family"], r["distill"]) == key and r["target"] == t),
                         key=lambda r: r["seed"])
            done = [r for r in sel if r.get("test_ppl") is not None]
            if not done:
                why = sel[0].get("note", "not run") if sel else "not run"
                cells.append(f"- ({why}) | | ")
                continue
            ratio = statistics.mean(r["test_ppl"] / dense[r["seed"]] for r in done)
            removed = statistics.mean(r["removed_fraction"] for r in done)
            secs = statistics.mean(r["prune_s"] for r in done)
            cells.append(f"{_mean_std([r['test_ppl'] for r in done])} (x{ratio:.3f}) | {_pct(removed)} | {secs:.1f}")
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_latency(doc: dict[str, Any]) -> str:
    """CPU latency of the exported, reloaded models as ratios to dense (median of repeats)."""
    rows, st = doc["latency"], doc["meta"]["settings"]
    batches = sorted({r["batch"] for r in rows})
    dense = {r["batch"]: r["median_ms"] for r in rows if r["method"] == "dense"}
    lines = [f"CPU, {st['threads']} thread(s), {st['latency_seq']} tokens, use_cache=False; median of "
             f"{st['latency_repeats']} forwards after 3 warm-up; seed {st['latency_seed']}; each model exported by "
             f"save_structured and loaded with AutoModelForCausalLM.from_pretrained.", "",
             "| model | removed | format | " + " | ".join(f"batch {b}: ms (x dense)" for b in batches) + " |",
             "|---|---|---|" + "---|" * len(batches),
             "| dense | 0 % | stock | " + " | ".join(f"{dense[b]:.2f} (x1.00)" for b in batches) + " |"]
    configs = sorted({(r["family"], r["target"]) for r in rows if r["method"] != "dense"},
                     key=lambda c: (c[1], FAMILIES.index(c[0])))
    for family, target in configs:
        sel = {r["batch"]: r for r in rows
               if r["family"] == family and r["target"] == target and r["method"] != "dense"}
        first = next(iter(sel.values()))
        cells = [f"{sel[b]['median_ms']:.2f} (x{sel[b]['median_ms'] / dense[b]:.2f})" if b in sel else "-"
                 for b in batches]
        lines.append(f"| {LABELS[('llm_structured', family, False)]} | {_pct(first['removed_fraction'])} "
                     f"| {first['format']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _prune_row(seed: int, target: float, method: str, family: str, distill: bool, dense_blocks: int,
               model: nn.Module, seconds: float, dm: Any, result: StructuredResult | None = None,
               fractions: dict[str, Any] | None = None) -> dict[str, Any]:
    blocks = block_params(model)
    test = evaluate_text(model, dm, "test")
    row = {"seed": seed, "target": target, "method": method, "family": family, "distill": distill,
           "test_ppl": test["ppl"], "block_params": blocks, "block_params_dense": dense_blocks,
           "removed_fraction": 1.0 - blocks / dense_blocks, "params": sum(p.numel() for p in model.parameters()),
           "prune_s": seconds, **(fractions or {})}
    if result is not None:
        row.update(layers_kept=len(result.ffn_kept), heads_kept=result.heads_kept, kv_heads_kept=result.kv_heads_kept,
                   ffn_kept=result.ffn_kept, removed_blocks=result.removed_blocks)
        if result.distill is not None:
            row.update(distill_s=result.distill.seconds, kl_before=result.distill.kl_before,
                       kl_after=result.distill.kl_after)
    return row


def run_seed(seed: int, args: argparse.Namespace, corpus_txt: Path, docs: list[str],
             shared_tok: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every pruning row of one seed; returns (rows, this seed's dense model, tokenizer and pruned models)."""
    model_dir = seed_model_dir(seed, args.work)
    if (model_dir / "config.json").is_file():
        tok = load_tokenizer(model_dir)  # the tokenizer the model was trained with
        dm = build_text_datamodule(corpus_txt, tok, max_length=args.seq_len, batch_size=16, seed=seed,
                                   limit_eval=args.limit_eval)
        dense_model, train = load_hf_model(model_dir), {"seconds": 0.0}
        print(f"seed {seed}: reusing the model in {model_dir}", flush=True)
    else:
        if "tok" not in shared_tok:
            shared_tok["tok"] = train_tokenizer(docs, "bpe", args.vocab)
        tok = shared_tok["tok"]
        dm = build_text_datamodule(corpus_txt, tok, max_length=args.seq_len, batch_size=16, seed=seed,
                                   limit_eval=args.limit_eval)
        dense_model, train = train_seed_model(seed, tok, dm, model_dir, layers=args.layers, hidden=args.hidden,
                                              heads=args.heads, intermediate=args.intermediate,
                                              seq_len=args.seq_len, epochs=args.epochs)
    dense_model.eval()
    dense_blocks = block_params(dense_model)
    dense_ppl = evaluate_text(dense_model, dm, "test")["ppl"]
    rows: list[dict[str, Any]] = [{"seed": seed, "method": "dense", "family": "-", "distill": False, "target": 0.0,
                                   "test_ppl": dense_ppl, "block_params": dense_blocks,
                                   "block_params_dense": dense_blocks, "removed_fraction": 0.0,
                                   "params": sum(p.numel() for p in dense_model.parameters()),
                                   "layers": dense_model.config.num_hidden_layers, "train_s": train["seconds"]}]
    print(f"seed {seed}: dense test ppl {dense_ppl:.2f}, {dense_blocks} block parameters", flush=True)
    # One draw of calibration windows per seed: every method of this seed sees exactly these.
    calib = dm.calibration_batches(args.calib_samples, seed=seed, batch_size=args.calib_batch_size)
    pruned_models: dict[tuple[str, float], nn.Module] = {}
    for target in args.targets:
        plans = {f: search_family(dense_model, f, target, calib[:1], args.importance) for f in FAMILIES}
        for family, plan in plans.items():
            for distill in (False, True):
                if plan is None:
                    note = "one block is more than the target" if family == "width_depth" else "no point on target"
                    rows.append({"seed": seed, "target": target, "method": "llm_structured", "family": family,
                                 "distill": distill, "test_ppl": None, "note": note})
                    continue
                settings = StructuredSettings(head_sparsity=plan["head_sparsity"], ffn_sparsity=plan["ffn_sparsity"],
                                              depth_sparsity=plan["depth_sparsity"], importance=args.importance,
                                              distill_steps=args.distill_steps if distill else 0,
                                              distill_lr=args.distill_lr)
                model = copy.deepcopy(dense_model)
                t0 = time.perf_counter()
                result = prune_structured(model, calib, settings)
                seconds = time.perf_counter() - t0
                model.eval()
                row = _prune_row(seed, target, "llm_structured", family, distill, dense_blocks, model, seconds, dm,
                                 result, {k: plan[k] for k in ("head_sparsity", "ffn_sparsity", "depth_sparsity")})
                rows.append(row)
                if not distill:
                    pruned_models[(family, target)] = model
                print(f"seed {seed}: {target:.0%} {family:<11} distill={distill!s:<5} test ppl {row['test_ppl']:8.2f} "
                      f"(removed {row['removed_fraction']:.4f}, {seconds:.1f}s)", flush=True)
        width = plans["width"]
        if width is None:
            continue
        fractions = {k: width[k] for k in ("head_sparsity", "ffn_sparsity", "depth_sparsity")}
        # Uniform magnitude width pruning: the width row's fractions, data-free.
        model = copy.deepcopy(dense_model)
        t0 = time.perf_counter()
        result = prune_structured(model, None, StructuredSettings(head_sparsity=width["head_sparsity"],
                                                                  ffn_sparsity=width["ffn_sparsity"],
                                                                  importance="magnitude"))
        rows.append(_prune_row(seed, target, "magnitude_width", "width", False, dense_blocks, model.eval(),
                               time.perf_counter() - t0, dm, result, fractions))
        # Torch-Pruning, FFN only, at the width row's parameter count.
        tp_ratio, _ = _search_tp_ffn(dense_model, width["block_params"])
        model = copy.deepcopy(dense_model)
        t0 = time.perf_counter()
        torch_pruning_ffn(model, tp_ratio)
        row = _prune_row(seed, target, "torch_pruning", "width", False, dense_blocks, model.eval(),
                         time.perf_counter() - t0, dm, None,
                         {"head_sparsity": 0.0, "ffn_sparsity": tp_ratio, "depth_sparsity": 0.0})
        row["matched"] = abs(row["block_params"] - width["block_params"]) <= TOLERANCE * dense_blocks
        rows.append(row)
        for r in rows[-2:]:
            print(f"seed {seed}: {target:.0%} {r['method']:<15} test ppl {r['test_ppl']:8.2f} "
                  f"(removed {r['removed_fraction']:.4f})", flush=True)
    return rows, {"dense": dense_model, "tok": tok, "pruned": pruned_models}


def measure_latency(models: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Export, reload and time the dense and every pruned model of one seed (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    inputs = {b: torch.randint(0, vocab, (b, args.latency_seq), generator=g) for b in args.latency_batches}
    dense_blocks = block_params(models["dense"])
    rows = []
    entries = [("dense", "-", 0.0, models["dense"])] + [("llm_structured", f, t, m)
                                                        for (f, t), m in models["pruned"].items()]
    with tempfile.TemporaryDirectory(prefix="llm-structured-export-") as tmp:
        for i, (method, family, target, model) in enumerate(entries):
            loaded, fmt = export_and_load(model, models["tok"], Path(tmp) / f"m{i}")
            with torch.inference_mode():
                ids = inputs[args.latency_batches[0]]
                diff = float((loaded(input_ids=ids, use_cache=False).logits
                              - model(input_ids=ids, use_cache=False).logits).abs().max())
            for batch in args.latency_batches:
                ms = median_latency_ms(loaded, inputs[batch], args.latency_repeats)
                rows.append({"seed": args.latency_seed, "method": method, "family": family, "target": target,
                             "batch": batch, "seq_len": args.latency_seq, "median_ms": ms, "format": fmt,
                             "removed_fraction": 1.0 - block_params(loaded) / dense_blocks,
                             "roundtrip_max_abs": diff})
                print(f"latency: {method} {family} {target:.0%} batch {batch}: {ms:.2f} ms ({fmt}, "
                      f"round trip {diff:.1e})", flush=True)
    return rows


SMOKE = {"seeds": [0], "layers": 4, "hidden": 32, "heads": 4, "intermediate": 64, "vocab": 400, "seq_len": 32,
         "epochs": 0.02, "calib_samples": 8, "calib_batch_size": 4, "distill_steps": 4, "limit_eval": 32,
         "latency_repeats": 3, "latency_seq": 32, "work": "/tmp/prunesearch-llm-structured-smoke"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--smoke`` replaces the sizes by :data:`SMOKE`'s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS),
                        help="fractions of the decoder blocks' parameters removed")
    parser.add_argument("--importance", default="activation", choices=["activation", "fluctuation"],
                        help="llm_structured's channel/head importance")
    parser.add_argument("--distill-steps", type=int, default=32)
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=8)
    parser.add_argument("--limit-eval", type=int, default=None, help="test windows evaluated (None: all)")
    parser.add_argument("--latency-seed", type=int, default=None, help="seed whose models are timed (first seed)")
    parser.add_argument("--latency-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--latency-seq", type=int, default=128)
    parser.add_argument("--latency-repeats", type=int, default=20)
    add_model_args(parser)  # the benchmark LM's shape: used only when a seed's model is missing
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None,
                        help="where the models are (WORK/model-seed{N}) and the corpus is written (default: "
                             "/tmp/prunesearch-llm-bench, llm_pruning_benchmark.py's; --smoke: its own)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 1 seed, in its own --work (< 1 min)")
    parser.add_argument("--rows", type=Path, default=None,
                        help="write the raw rows (.json.gz with command, commit, machine, date) here: what "
                             "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if key != "work" or args.work is None:
                setattr(args, key, value)
    args.work = args.work or "/tmp/prunesearch-llm-bench"
    if args.latency_seed is None:
        args.latency_seed = args.seeds[0]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (a) and (b); print the tables; write ``--rows``. Returns the rows document."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    corpus = write_fortunes_corpus(Path(args.work) / "corpus")
    docs = corpus["txt"].read_text().split("\n\n")
    rows: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    shared_tok: dict[str, Any] = {}
    for seed in args.seeds:
        seed_rows, models = run_seed(seed, args, corpus["txt"], docs, shared_tok)
        rows += seed_rows
        if seed == args.latency_seed:
            latency = measure_latency(models, args)
        del models
    doc = {"meta": run_meta("llm_structured_benchmark.py", argv, settings=settings_of(args),
                            seconds=time.perf_counter() - start), "rows": rows, "latency": latency}
    print("\n" + table_perplexity(doc) + "\n\n" + table_latency(doc), flush=True)
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    if args.rows:
        print(f"raw rows written to {write_rows(args.rows, doc)}")
    return doc


if __name__ == "__main__":
    main()
