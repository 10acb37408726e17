"""The structured-pruning benchmark's smoke path (issue 27, Show): a tiny Llama trained for a
moment, one seed, every method and target, the latency of the exported models, and the table
functions RESULTS.md renders from its rows file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytest.importorskip("torch_pruning")


@pytest.mark.slow
def test_smoke_run_rows_and_tables(tmp_path: Path) -> None:
    import llm_structured_benchmark as bench
    import results_md

    rows_path = tmp_path / "rows.json.gz"
    bench.main(["--smoke", "--work", str(tmp_path / "work"), "--rows", str(rows_path)])
    doc = results_md.load_rows(rows_path)  # provenance checked as RESULTS.md's generator does
    rows = doc["rows"]
    dense = [r for r in rows if r["method"] == "dense"]
    assert len(dense) == 1 and dense[0]["test_ppl"] > 1.0
    by = {(r["method"], r["family"], r["distill"], r["target"]): r for r in rows if r["method"] != "dense"}
    for target in (0.25, 0.5):
        width = by[("llm_structured", "width", False, target)]
        depth = by[("llm_structured", "depth", False, target)]
        # every reported point is on its parameter target (within 1 % of the block parameters)
        assert abs(width["removed_fraction"] - target) <= bench.TOLERANCE
        assert depth["removed_fraction"] == pytest.approx(target)  # 4 blocks: whole blocks
        assert depth["layers_kept"] == round(4 * (1 - target))
        distilled = by[("llm_structured", "width", True, target)]
        assert distilled["block_params"] == width["block_params"]
        assert distilled["distill_s"] > 0 and distilled["kl_after"] == distilled["kl_after"]  # not NaN
        magnitude = by[("magnitude_width", "width", False, target)]
        assert magnitude["block_params"] == width["block_params"]  # the same widths, data-free
        tp_row = by[("torch_pruning", "width", False, target)]
        assert tp_row["matched"] and abs(tp_row["block_params"] - width["block_params"]) <= 0.01 * width[
            "block_params_dense"]
        for r in (width, depth, distilled, magnitude, tp_row):
            assert r["test_ppl"] > 1.0 and r["block_params"] < r["block_params_dense"]
    # one block is 25 % of a 4-block model: width+depth has no point there, and says so
    assert by[("llm_structured", "width_depth", False, 0.25)]["test_ppl"] is None
    mixed = by[("llm_structured", "width_depth", False, 0.5)]
    assert mixed["layers_kept"] == 3 and abs(mixed["removed_fraction"] - 0.5) <= bench.TOLERANCE
    # latency: dense and every non-distilled structured model, batch 1 and 16, loaded back exactly
    latency = doc["latency"]
    assert {r["batch"] for r in latency} == {1, 16}
    assert len([r for r in latency if r["method"] == "dense"]) == 2
    assert len(latency) == 2 * (1 + 5)
    assert all(r["median_ms"] > 0 and r["roundtrip_max_abs"] < 1e-4 for r in latency)
    ppl_table = bench.table_perplexity(doc)
    assert "| dense | " in ppl_table and "width + depth + distillation" in ppl_table
    assert f"{width['test_ppl']:.2f}" in ppl_table and "one block is more than the target" in ppl_table
    lat_table = bench.table_latency(doc)
    assert lat_table.count("\n| ") == 1 + 1 + 5  # header, dense, five pruned models
    assert "x1.00" in lat_table


def test_structured_sweep_front_table_from_rows() -> None:
    """llm_sweep_benchmark --method llm_structured: the front of val_ppl against flops_deployed."""
    import llm_sweep_benchmark as sweep

    rows = [{"method": "llm_structured", "param.ffn_sparsity": 0.3, "param.head_sparsity": 0.25,
             "param.depth_sparsity": 0.0, "param.importance": "fluctuation", "param.bias_compensation": True,
             "param.allocation": "uniform", "val_ppl": 90.0, "test_ppl": 91.0, "flops_deployed": 5e6,
             "params_deployed": 4e5},
            {"method": "llm_structured", "param.ffn_sparsity": 0.6, "param.head_sparsity": 0.5,
             "param.depth_sparsity": 0.25, "param.importance": "activation", "param.allocation": "owl",
             "param.owl_lambda": 0.1, "val_ppl": 120.0, "flops_deployed": 3e6, "params_deployed": 2e5},
            {"method": "llm_structured", "val_ppl": 130.0, "flops_deployed": 6e6}]  # dominated by the first
    table = sweep.table_front_deployed({"rows": rows})
    body = table.split("\n")[2:]
    assert len(body) == 2  # the dominated trial is not on the front
    assert body[0].startswith("| 0.600 | 0.500 | 0.250 | activation | OWL (lambda 0.100) | 120.00 | - | 3.0M")
    assert "fluctuation + bias comp." in body[1] and "0.400M" in body[1]
