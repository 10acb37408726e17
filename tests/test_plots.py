"""The sweep's figures: the dense reference, a colour per method, accuracy against sparsity and
per-layer sparsity of trials side by side (search.plots)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from search import plots
from search.pareto import pareto_front

OBJ = [("val_acc", "max"), ("flops_effective", "min")]
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(tmp_path, with_layers: bool = True) -> pd.DataFrame:
    points = [("magnitude", 0.90, 80e3, 0.2), ("magnitude", 0.70, 60e3, 0.4), ("magnitude", 0.60, 90e3, 0.3),
              ("snip", 0.85, 50e3, 0.5), ("snip", 0.40, 20e3, 0.8)]
    rows = []
    for i, (method, acc, flops, sparsity) in enumerate(points):
        trial_dir = tmp_path / f"t{i}"
        trial_dir.mkdir()
        if with_layers:
            (trial_dir / plots.LAYER_SPARSITY_FILE).write_text(json.dumps({"net.0.weight": sparsity,
                                                                           "net.2.weight": 1 - sparsity}))
        row = {"trial_id": f"t{i}", "method": method, "val_acc": acc, "flops_effective": flops, "flops_dense": 1e5,
               "sparsity": sparsity, "status": "ok", "masks_path": str(trial_dir / "masks.safetensors")}
        if method == "snip":
            row["param.scope"] = "layer"  # a conditional setting only snip trials have
        rows.append(row)
    rows.append({"trial_id": "failed", "method": "snip", "status": "failed"})
    return pd.DataFrame(rows)


def test_dense_reference_from_parent_metrics():
    assert plots.DenseReference.from_metrics({}) is None
    assert plots.DenseReference.from_metrics({"dense_val_acc": float("nan")}) is None
    dense = plots.DenseReference.from_metrics({"dense_val_acc": 0.95, "dense_flops": 1e5, "dense_params": 4e3,
                                               "hypervolume": 3.0})
    assert dense == plots.DenseReference(val_acc=0.95, flops=1e5, params=4e3)
    assert dense.point("flops_effective", "val_acc") == (1e5, 0.95)
    assert dense.point("params_physical", "val_acc") == (4e3, 0.95)
    assert dense.point("sparsity", "val_acc") == (0.0, 0.95)
    assert dense.point("flops_effective", "val_fgsm_acc") is None  # not measured: no point
    assert plots.DenseReference(flops=1e5).point("flops_effective", "val_acc") is None


def test_front_figure_colours_methods_and_marks_the_dense_model(tmp_path):
    df = _rows(tmp_path)
    dense = plots.DenseReference(val_acc=0.95, flops=1e5, params=4e3)
    fig = plots.front_figure(df, pareto_front(df, OBJ), OBJ, "sweep", dense=dense)
    by_name = {t.name: t for t in fig.data}
    colours = plots.method_colours(["snip", "magnitude"])
    assert colours == {"magnitude": plots.METHOD_PALETTE[0], "snip": plots.METHOD_PALETTE[1]}
    assert by_name["magnitude"].marker.color == colours["magnitude"] and len(by_name["magnitude"].x) == 3
    assert by_name["snip"].marker.color == colours["snip"]
    assert list(by_name["dense model"].x) == [1e5] and list(by_name["dense model"].y) == [0.95]
    # Only the settings a trial has appear in its hover text.
    assert all("param.scope" not in text for text in by_name["magnitude"].text)
    assert all("param.scope: layer" in text for text in by_name["snip"].text)
    # Without the parent's dense metrics there is no dense point.
    plain = plots.front_figure(df.drop(columns=["flops_dense"]), None, OBJ, "sweep")
    assert "dense model" not in {t.name for t in plain.data} and not plain.layout.shapes


def test_layer_sparsity_figure_picks_any_two_trials(tmp_path):
    layers = plots.load_layer_sparsity(_rows(tmp_path))
    assert set(layers) == {"t0", "t1", "t2", "t3", "t4"}  # the failed trial has none
    assert layers["t3"] == {"net.0.weight": 0.5, "net.2.weight": 0.5}
    fig = plots.layer_sparsity_figure(layers, "layers", labels={"t0": "t0 magnitude"})
    assert [t.name for t in fig.data] == ["t0 magnitude", "t1"]
    assert list(fig.data[0].x) == ["net.0.weight", "net.2.weight"] and list(fig.data[1].y) == [0.4, 0.6]
    menu_a, menu_b = fig.layout.updatemenus
    assert len(menu_a.buttons) == len(menu_b.buttons) == 5
    pick = menu_b.buttons[4]  # trial B := t4
    assert pick.label == "trial B: t4" and menu_a.buttons[0].label == "trial A: t0 magnitude"
    assert list(pick.args[1]) == [1] and list(pick.args[0]["y"][0]) == [0.8, pytest.approx(0.2)]


def test_sweep_plots_written(tmp_path):
    df = _rows(tmp_path)
    dense = plots.DenseReference(val_acc=0.95, flops=1e5)
    out = tmp_path / "front"
    paths = plots.write_sweep_plots(df, pareto_front(df, OBJ), OBJ, out, "sweep", dense=dense)
    assert {p.name for p in paths} == {"front.png", "front.html", "accuracy_vs_sparsity.png",
                                       "layer_sparsity.html", "layer_sparsity.png"}
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    html = (out / "layer_sparsity.html").read_text()
    assert "trial A" in html and "trial B" in html and "<script src=\"https://cdn" not in html
    assert "dense model" in (out / "front.html").read_text()
    # No per-layer files and no sparsity column: the front plots only; 0 finished trials plot too.
    (tmp_path / "bare").mkdir()
    bare = _rows(tmp_path / "bare", with_layers=False)
    paths = plots.write_sweep_plots(bare.drop(columns=["sparsity"]), None, OBJ, tmp_path / "bare-front", "sweep")
    assert {p.name for p in paths} == {"front.png", "front.html"}
    empty = plots.plot_accuracy_sparsity_png(pd.DataFrame([{"status": "failed"}]), OBJ, tmp_path / "e.png", "x")
    assert empty.read_bytes()[:8] == PNG
