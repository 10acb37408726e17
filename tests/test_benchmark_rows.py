"""Every benchmark renderer renders its RESULTS.md table from rows (issue 26).

No training: each renderer gets a tiny synthetic rows document shaped like what its script's
``--rows`` writes, and must give the table RESULTS.md shows (its header, and figures computed
from the rows), so a renderer cannot silently break before the real reruns. The shared
provenance helper (benchmarks/rows.py) is checked to write what results_md.load_rows accepts.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import results_md  # noqa: E402
import rows  # noqa: E402

META = {"command": "python benchmarks/x.py", "commit": "abc1234", "machine": "m", "date": "2026-12-07"}


def header(table: str) -> str:
    """The first Markdown table header line of ``table``."""
    return next(line for line in table.split("\n") if line.startswith("| ") or line.startswith("| |"))


def table_lines(table: str) -> list[str]:
    return [line for line in table.split("\n") if line.startswith("|") and not line.startswith("|---")]


def metrics(**kw: float) -> dict:
    base = {"sparsity": 0.0, "test_acc": 0.9, "val_acc": 0.91, "flops_effective": 1000.0, "flops_dense": 1000.0,
            "flops_physical": 1000.0, "params_effective": 100, "epochs": 4, "extra_forward_passes": 0,
            "wall_s": 10.0, "cpu_s": 8.0}
    return {**base, **kw}


def foundation_doc() -> dict:
    return {"meta": META, "rows": [{"method": "dense", "target": 0.0, **metrics()},
                                   {"method": "magnitude", "target": 0.5,
                                    **metrics(sparsity=0.5, flops_effective=600.0, wall_s=12.0, cpu_s=10.0)}]}


def sampler_doc() -> dict:
    settings = {"checkpoints": [16, 48]}
    return {"meta": {**META, "settings": settings},
            "rows": [{"sampler": s, "seed": seed, "hv": {"16": 0.8 + 0.01 * seed, "48": v}}
                     for s, v in (("mo_tpe", 0.84), ("random", 0.80)) for seed in (0, 1)]}


def paoding_doc() -> dict:
    dense = {"model": "lenet5", "method": "dense", "ratio": 0.0, "params": 1000, "flops": 2000, "bytes": 4000,
             "acc": 0.8, "fgsm": 0.4, "onnx_ms": 10.0, "torch_ms": 20.0}
    cut = {**dense, "method": "paoding (paper)", "ratio": 0.25, "params": 500, "flops": 1000, "bytes": 2000,
           "acc": 0.4, "fgsm": 0.2, "onnx_ms": 5.0, "torch_ms": 10.0}
    return {"meta": META, "rows": [dense, cut]}


def gap_doc() -> dict:
    run = {**metrics(), "label": "dense", "target": 0.0, "group_dev": None}
    gap = {**metrics(sparsity=0.8, flops_effective=200.0), "label": "gap 3x1x3 (uniform) @ 80%", "target": 0.8,
           "group_dev": 0.0}
    sweeps = [{"variant": v, "seed": s, "hv": hv} for v, hv in (("distribution", 0.6), ("global only", 0.7))
              for s in (0, 1)]
    return {"meta": META, "rows": [run, gap], "sweeps": sweeps}


def ken_doc() -> dict:
    quality = [{"variant": "fine-tuned (full)", "reverted": 0.0, "val": 0.9, "test": 0.88, "file_ratio": None,
                "select_s": None},
               {"variant": "KEN keep 50%/row", "reverted": 0.5, "val": 0.85, "test": 0.84, "file_ratio": 0.53,
                "select_s": 3.5}]
    speed = [{"k": 64, "kept": 0.0671, "rows": 113980, "seconds": {"native": 2.2, "torch": 9.2},
              "width_seconds": {"native": {"768": 1.7, "3072": 0.5}, "torch": {"768": 7.0, "3072": 2.2}},
              "backends_identical": True, "rows_differing": 0, "fastest": "native", "loop_s": 507.0,
              "loop_ms_per_row": {"768": 4.2, "3072": 7.7}, "sample_equal": 60, "sample_rows": 60,
              "load_average": 1.7}]
    return {"meta": META, "quality": quality, "speed": speed}


def llm_doc(distributions: tuple[str, ...] = ("uniform",), patterns: tuple[str, ...] = ("unstructured", "2:4")) -> dict:
    out = []
    for seed in (0, 1):
        out.append({"seed": seed, "method": "dense", "pattern": "-", "test_ppl": 87.0 + seed})
        for i, method in enumerate(("llm_magnitude", "wanda", "sparsegpt")):
            for pattern in patterns:
                for dist in distributions:
                    if dist == "uniform" or pattern == "unstructured":
                        out.append({"seed": seed, "method": method, "pattern": pattern, "distribution": dist,
                                    "test_ppl": 95.0 - 2 * i + seed + (10 if dist == "owl" else 0)})
    settings = {"patterns": list(patterns), "distributions": list(distributions), "sparsity": 0.5, "owl_lambda": 0.08}
    return {"meta": {**META, "settings": settings}, "rows": out}


def ken_text_doc() -> dict:
    out = [{"seed": s, "rule": "finetuned", "keep_fraction": 1.0, "reverted_fraction": 0.0, "test_acc": 0.51 + s / 100}
           for s in (0, 1)]
    out += [{"seed": s, "rule": rule, "keep_fraction": 0.25, "reverted_fraction": 0.739, "test_acc": 0.4 + s / 100}
            for s in (0, 1) for rule in ("ken", "random", "delta")]
    return {"meta": META, "rows": out}


def llm_sweep_doc() -> dict:
    trial = {"method": "sparsegpt", "param.pattern": "unstructured", "param.sparsity": 0.79,
             "param.distribution": "uniform", "val_ppl": 107.8, "test_ppl": 110.3, "flops_effective": 85.9e6,
             "flops_dense": 175.3e6, "sparse_bytes": 1.01e6, "block_sparsity": 0.79}
    worse = {**trial, "method": "llm_magnitude", "val_ppl": 139.2}  # same FLOPs, worse perplexity: off the front
    nm = {**trial, "param.pattern": "4:8", "param.sparsity": None, "block_sparsity": 0.5, "val_ppl": 86.1,
          "flops_effective": 118.7e6, "sparse_bytes": 1.55e6}
    return {"meta": META, "rows": [trial, worse, nm]}


def front_doc() -> dict:
    return {"meta": META,
            "hypervolume": {"points": 300, "objectives": 3, "new_s": 6e-5, "former_s": 0.631, "normalised_s": 8e-5},
            "sort": [{"points": 2000, "objectives": k, "new_s": 1.4e-4, "former_s": 0.186} for k in (2, 3)],
            "driver": [{"tracking": t, "trials": 20, "on_loop_s": [0.0002] * 20, "background_s": [0.006] * 20,
                        "uploads": 4 if t else 0} for t in (False, True)]}


def trace_doc() -> dict:
    return {"meta": META, "rows": [{"model": "lenet5", "shape": [1, 28, 28], "call": "surgery", "fresh_s": 0.02,
                                    "reused_s": 0.005}]}


#: (script, renderer, doc, RESULTS.md's header, a line the rows must produce)
CASES = [
    ("foundation_baselines", "results_table", foundation_doc,
     "| method | target sparsity | achieved sparsity | test acc | val acc | FLOPs eff / sample | FLOPs vs dense "
     "| params eff | epochs | extra fwd passes | wall s | wall vs dense | CPU s | CPU vs dense |",
     "| magnitude | 50% | 50.00% | 90.00% | 91.00% | 600 | 0.600 | 100 | 4 | 0 | 12.0 | 1.20x | 10.0 | 1.25x |"),
    ("sampler_hypervolume", "results_table", sampler_doc,
     "| sampler | HV after 16 trials | HV after 48 trials |", "| mo_tpe / random | 1.000 | 1.050 |"),
    ("paoding_benchmark", "results_table", paoding_doc,
     "| model | method | channels removed | params cut | phys FLOPs cut | size cut | test acc | acc retained "
     "| FGSM acc | FGSM retained | ONNX speed-up | torch speed-up |",
     "| lenet5 | paoding (paper) | 25% | 50.0% | 50.0% | 50.0% | 40.00% | 0.500 | 20.00% | 0.500 | 2.00x | 2.00x |"),
    ("gap_benchmark", "table_runs", gap_doc,
     "| run | target sparsity | achieved sparsity | max group deviation | test acc | val acc | FLOPs eff vs dense "
     "| epochs | wall s | CPU s |",
     "| gap 3x1x3 (uniform) @ 80% | 80% | 80.00% | 0.000 pt | 90.00% | 91.00% | 0.200 | 4 | 10.0 | 8.0 |"),
    ("gap_benchmark", "table_sweeps", gap_doc, "| search space | HV per seed (0, 1) | mean |",
     "| magnitude: sparsity only (global ranking) | 0.7000, 0.7000 | 0.7000 |"),
    ("ken_benchmark", "table_quality", ken_doc,
     "| variant | reverted | val acc | test acc | delta file / full | select s |",
     "| KEN keep 50%/row | 50.0% | 85.00% | 84.00% | 0.530 | 3.50 |"),
    ("ken_benchmark", "table_speed", ken_doc,
     "| k per row | kept | vectorised (measured) | per-row loop (extrapolated) | speed-up | load average at start |",
     "| 64 | 6.7% | 2.2 s (768-wide 1.7 s, 3072-wide 0.5 s) | 507 s (4.2 / 7.7 ms per row) | 230x | 1.7 |"),
    ("ken_benchmark", "table_backends", ken_doc,
     "| k per row | kept | new (C extension) | torch path (same run) | target | positions |",
     "| 64 | 6.71% | **2.2 s** (768-wide 1.7 s, 3072-wide 0.5 s) | 9.2 s (4.2x) | <= 8 s: met | new = torch path "
     "on all 113,980 rows; = per-row reference on 60 of 60 sampled rows |"),
    ("llm_pruning_benchmark", "table_perplexity", llm_doc,
     "| test perplexity (mean ± std, 2 seeds) | 50 % unstructured | 2:4 |", "| dense | 87.50 ± 0.71 | |"),
    ("llm_pruning_benchmark", "table_paired", llm_doc,
     "| paired difference (ppl), seeds 0 / 1 | unstructured | 2:4 |",
     "| SparseGPT - magnitude | -4.00 / -4.00 | -4.00 / -4.00 |"),
    ("llm_pruning_benchmark", "table_owl", lambda: llm_doc(("uniform", "owl"), ("unstructured",)),
     "| test perplexity (mean ± std, 2 seeds) | 50 % uniform | 50 % OWL (M = 5, lambda = 0.08) |",
     "| Wanda | 93.50 ± 0.71 | 103.50 ± 0.71 |"),
    ("ken_text_benchmark", "results_table", ken_text_doc,
     "| kept per row | reverted (of all params) | KEN test acc % | random | largest delta |",
     "| 0.25 | 0.739 | 40.50 ± 0.71 | 40.50 ± 0.71 | 40.50 ± 0.71 |"),
    ("llm_sweep_benchmark", "table_front", llm_sweep_doc,
     "| method | pattern | sparsity | distribution | val ppl | test ppl | effective FLOPs | sparse bytes |",
     "| SparseGPT | 4:8 | 0.500 | uniform | 86.10 | 110.30 | 118.7M (68 %) | 1.55 MB |"),
    ("front_speed", "table_front", front_doc, "| what | new | former | target |",
     "| hypervolume, 300 points x 3 objectives, all mutually non-dominated | **0.06 ms** (moocore) "
     "| 631 ms (recursive slicing) | <= 10 ms: met |"),
    ("front_speed", "table_driver", front_doc,
     "| | on Tune's loop per `on_trial_complete`, trials 11-20 | median over all 20 "
     "| background work per trial at the end | plot uploads |",
     "| MLflow sqlite tracking | 0.20 ms | 0.20 ms | 6.0 ms | 4 for 20 trials |"),
    ("trace_reuse", "results_table", trace_doc,
     "| model | call | fresh trace each call s | one trace reused s | ratio |",
     "| lenet5 (1, 28, 28) | surgery | 0.020 | 0.005 | 4.0x |"),
]


@pytest.mark.parametrize("script,function,make_doc,head,line", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_renderer_renders_its_table_from_rows(script, function, make_doc, head, line):
    table = results_md.renderer(script, function)(make_doc())
    assert header(table) == head
    assert line in table_lines(table), table
    widths = {line.count("|") for line in table_lines(table)}
    assert len(widths) == 1, f"rows of unequal width:\n{table}"


def test_the_front_table_leaves_dominated_trials_out():
    table = results_md.renderer("llm_sweep_benchmark", "table_front")(llm_sweep_doc())
    assert "magnitude" not in table and table.count("SparseGPT") == 2


def test_rows_written_by_the_shared_helper_load_with_their_provenance(tmp_path):
    meta = rows.run_meta("foundation_baselines.py", ["--epochs", "1"], {"epochs": 1}, seconds=1.5)
    assert meta["command"] == "python benchmarks/foundation_baselines.py --epochs 1"
    assert meta["commit"] and meta["settings"] == {"epochs": 1} and meta["seconds"] == 1.5
    path = rows.write_rows(tmp_path / "results" / "x.json.gz", {"meta": meta, "rows": foundation_doc()["rows"]})
    doc = results_md.load_rows(path)
    assert doc["meta"]["machine"] == meta["machine"]
    assert importlib.import_module("foundation_baselines").results_table(doc) == \
        importlib.import_module("foundation_baselines").results_table(foundation_doc())


def test_every_script_with_a_renderer_takes_rows():
    for script in sorted({c[0] for c in CASES}):
        assert "--rows" in (BENCHMARKS / f"{script}.py").read_text(), script


def test_a_structured_trial_is_measured_against_the_dense_model():
    doc = llm_sweep_doc()
    doc["rows"].append({"method": "llm_structured", "param.allocation": "uniform", "block_sparsity": 0.35,
                        "val_ppl": 80.0, "test_ppl": 81.0, "flops_effective": 110.0e6, "flops_dense": 110.0e6,
                        "sparse_bytes": 1.5e6})  # its flops_dense is its own, smaller model's
    table = results_md.renderer("llm_sweep_benchmark", "table_front")(doc)
    assert "| llm_structured | structured | 0.350 | uniform | 80.00 | 81.00 | 110.0M (63 %) | 1.50 MB |" in table


def test_seed_methods_paper_against_extended_pairs_each_paper_row_with_its_twin():
    """table_paper_vs_extended: a paper row is paired by seed with the extended row of the same
    method in the table of the same name without 'paper'; rows of other methods are ignored."""
    import seed_methods

    def row(table, method, seed, test, flops=50, params=40, fwd=0):
        return {"table": table, "method": method, "seed": seed, "test": test, "flops": flops, "flops_dense": 100,
                "params": params, "params_dense": 100, "extra_fwd": fwd}

    rows = [row("paoding paper @ 25%", "PAODING (paper) (data-free)", s, 0.80 + 0.01 * s, fwd=2) for s in (0, 1)]
    rows += [row("paoding @ 25%", "PAODING (extended: the default) (data-free)", s, 0.78, flops=60) for s in (0, 1, 2)]
    rows += [row("paoding @ 25%", "channel L1 (data-free)", s, 0.5) for s in (0, 1)]
    table = seed_methods.table_paper_vs_extended({"rows": rows}).split("\n")
    assert len(table) == 3  # header, rule, the one pair
    assert table[2] == ("| PAODING (data-free) | paoding @ 25% | 2 | 80.50 ± 0.71 % | 78.00 ± 0.00 % | +2.50 ± 0.71 "
                        "| 0.500 / 0.600 | 0.400 / 0.400 | 2 / 0 |")
