"""Tests for search.pareto (fronts, hypervolume, knee, selectors) and search.plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from search.pareto import (
    ReferenceBox,
    default_reference,
    front_summary,
    hypervolume,
    knee_point,
    non_dominated_mask,
    normalised_hypervolume,
    pareto_front,
    reference_box,
    select_point,
)
from search.plots import axis_label, plot_front_html, plot_front_png
from tests.pareto_reference import reference_hypervolume, reference_hypervolume_of, reference_non_dominated

OBJ = [("val_acc", "max"), ("flops_effective", "min")]


def _rows(points, **extra):
    return [
        {"val_acc": a, "flops_effective": f, "trial_id": f"t{i}", "method": "m" + str(i % 2), **extra}
        for i, (a, f) in enumerate(points)
    ]


# --- non_dominated_mask -------------------------------------------------------------------

def test_mask_max_min():
    v = np.array([[0.5, 10], [0.8, 30], [0.7, 50], [0.9, 60], [0.6, 10]])
    # (0.5, 10) is dominated by (0.6, 10); (0.7, 50) by (0.8, 30).
    assert non_dominated_mask(v, ["max", "min"]).tolist() == [False, True, False, True, True]


def test_mask_all_directions_flip():
    v = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
    assert non_dominated_mask(v, ["max", "max"]).tolist() == [False, True, False, False]
    assert non_dominated_mask(v, ["min", "min"]).tolist() == [True, False, False, False]
    assert non_dominated_mask(v, ["min", "max"]).tolist() == [False, False, True, False]


def test_mask_duplicates_kept():
    v = np.array([[0.9, 10.0], [0.9, 10.0], [0.8, 10.0]])
    assert non_dominated_mask(v, ["max", "min"]).tolist() == [True, True, False]


def test_mask_nan_inf_never_on_front_and_never_dominate():
    v = np.array([[np.nan, 1.0], [0.5, 5.0], [np.inf, 0.0], [0.4, -np.inf]])
    assert non_dominated_mask(v, ["max", "min"]).tolist() == [False, True, False, False]
    assert non_dominated_mask(np.empty((0, 2)), ["max", "min"]).tolist() == []


def test_mask_bad_direction():
    with pytest.raises(ValueError, match="'max' or 'min'"):
        non_dominated_mask(np.ones((2, 2)), ["max", "up"])


# --- pareto_front -------------------------------------------------------------------------

def test_front_sorted_by_flops_and_filters_failed_and_missing():
    rows = _rows([(0.9, 60), (0.5, 10), (0.8, 30), (0.7, 50)])
    rows[0]["status"] = "ok"
    rows.append({"val_acc": 0.99, "flops_effective": 1.0, "status": "error", "trial_id": "bad"})
    rows.append({"val_acc": float("nan"), "flops_effective": 1.0, "trial_id": "nan"})
    rows.append({"flops_effective": 1.0, "trial_id": "nometric"})
    front = pareto_front(rows, OBJ)
    assert front["trial_id"].tolist() == ["t1", "t2", "t0"]
    assert front.index.tolist() == [1, 2, 0]  # labels are positions in the input list


def test_front_accepts_mlflow_status_and_dataframe():
    df = pd.DataFrame(_rows([(0.9, 60), (0.5, 10)]))
    df["status"] = ["FINISHED", "FAILED"]
    assert pareto_front(df, OBJ)["trial_id"].tolist() == ["t0"]


def test_front_empty_and_typo():
    assert pareto_front([], OBJ).empty
    assert pareto_front([{"status": "error"}], OBJ).empty
    with pytest.raises(KeyError, match="val_accuracy"):
        pareto_front(_rows([(0.9, 60)]), [("val_accuracy", "max"), ("flops_effective", "min")])


# --- hypervolume --------------------------------------------------------------------------

def test_hypervolume_2d_by_hand():
    # Gains over reference (acc 0, flops 100): (0.5, 90), (0.8, 70), (0.9, 40).
    # Union of boxes = 0.9*40 + (0.8-0.0)*(70-40) + 0.5*(90-70) = 36 + 24 + 10 = 70.
    v = [[0.5, 10], [0.8, 30], [0.9, 60], [0.7, 50]]
    assert hypervolume(v, ["max", "min"], [0.0, 100.0]) == pytest.approx(70.0)


def test_hypervolume_points_not_beating_reference_add_nothing():
    ref = [0.0, 100.0]
    assert hypervolume([[0.5, 100.0]], ["max", "min"], ref) == 0.0  # equal FLOPs: not strictly better
    assert hypervolume([[0.0, 10.0]], ["max", "min"], ref) == 0.0
    assert hypervolume([[0.5, 120.0]], ["max", "min"], ref) == 0.0
    assert hypervolume([[np.nan, 10.0], [0.5, 50.0]], ["max", "min"], ref) == pytest.approx(25.0)
    assert hypervolume(np.empty((0, 2)), ["max", "min"], ref) == 0.0


def test_hypervolume_duplicates_and_mixed_directions():
    # min, max: gains over (10, 0): (10-2, 3) and (10-6, 5) -> 8*3 + 4*(5-3) = 32.
    v = [[2.0, 3.0], [6.0, 5.0], [6.0, 5.0]]
    assert hypervolume(v, ["min", "max"], [10.0, 0.0]) == pytest.approx(32.0)


def _mc_hypervolume(points, ref, n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    hi = points.max(axis=0)
    samples = rng.uniform(ref, hi, size=(n, points.shape[1]))
    dominated = np.zeros(n, dtype=bool)
    for p in points:
        dominated |= (samples <= p).all(axis=1)
    return dominated.mean() * np.prod(hi - ref)


def test_hypervolume_3d_exact_cases_and_vs_monte_carlo():
    # Two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,1] overlap in a unit cube: 2 + 2 - 1 = 3.
    assert hypervolume([[2, 1, 1], [1, 2, 1]], ["max"] * 3, [0, 0, 0]) == pytest.approx(3.0)
    # Three "axis" boxes of volume 2 overlap pairwise in unit cubes, triple overlap 1: 6 - 3 + 1.
    pts = [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
    assert hypervolume(pts, ["max"] * 3, [0, 0, 0]) == pytest.approx(4.0)

    rng = np.random.default_rng(1)
    pts = rng.uniform(0.1, 1.0, size=(25, 3))
    exact = hypervolume(pts, ["max", "max", "max"], [0.0, 0.0, 0.0])
    mc = _mc_hypervolume(pts, np.zeros(3))
    assert exact == pytest.approx(mc, rel=0.01)
    # The same set with the last objective flipped to "min" around a mirrored reference.
    flipped = pts.copy()
    flipped[:, 2] = 1.0 - pts[:, 2]
    assert hypervolume(flipped, ["max", "max", "min"], [0.0, 0.0, 1.0]) == pytest.approx(exact)


def _random_points(rng: np.random.Generator, n: int, k: int, kind: str) -> np.ndarray:
    if kind == "front":  # all mutually non-dominated: on the positive part of a sphere
        p = np.abs(rng.normal(size=(n, k)))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if kind == "grid":  # few distinct levels: many ties in single coordinates and duplicates
        return rng.integers(1, 5, size=(n, k)).astype(float) / 4
    return rng.uniform(0.0, 1.0, size=(n, k))


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("kind", ["uniform", "front", "grid"])
def test_hypervolume_and_mask_equal_the_exact_reference(k, kind):
    rng = np.random.default_rng(10 * k + len(kind))
    for n in (1, 2, 7, 40 if k == 4 else 80):
        pts = _random_points(rng, n, k, kind)
        assert non_dominated_mask(pts, ["max"] * k).tolist() == reference_non_dominated(pts).tolist()
        assert hypervolume(pts, ["max"] * k, [0.0] * k) == pytest.approx(
            reference_hypervolume(pts[reference_non_dominated(pts)]), rel=1e-12)
        # mixed directions around a reference some points do not beat
        dirs = ["max", "min"] * (k // 2) + ["max"] * (k % 2)
        vals = np.where(np.array(dirs) == "min", 1.0 - pts, pts)
        ref = [0.2 if d == "max" else 0.8 for d in dirs]
        assert hypervolume(vals, dirs, ref) == pytest.approx(reference_hypervolume_of(vals, dirs, ref), rel=1e-12,
                                                             abs=1e-15)


def test_hypervolume_degenerate_cases():
    ref = [0.0, 0.0, 0.0]
    one = [[0.5, 0.5, 0.5]]
    assert hypervolume(one, ["max"] * 3, ref) == pytest.approx(0.125)
    assert hypervolume(one * 5, ["max"] * 3, ref) == pytest.approx(0.125)  # duplicates
    assert hypervolume([[0.5, 0.0, 0.5]], ["max"] * 3, ref) == 0.0  # on the reference plane
    assert hypervolume([[0.5, 0.5, 0.5], [0.5, 0.5, np.nan], [np.inf, 1, 1]], ["max"] * 3, ref) == pytest.approx(0.125)
    # collinear / coplanar points: a staircase in one plane
    plane = [[1.0, 0.2 * i, 1.0 - 0.2 * i] for i in range(6)]
    assert hypervolume(plane, ["max"] * 3, ref) == pytest.approx(reference_hypervolume(
        np.array(plane)[reference_non_dominated(np.array(plane))]))
    assert hypervolume([[3.0], [1.0]], ["max"], [0.5]) == pytest.approx(2.5)  # one objective
    assert hypervolume([[0.9, 10.0]], ["max", "min"], [0.0, 10.0]) == 0.0
    assert non_dominated_mask(np.array([[1.0], [2.0], [2.0]]), ["max"]).tolist() == [False, True, True]


def test_normalised_hypervolume_is_a_fraction_of_the_declared_box():
    rows = [{"val_acc": 0.9, "flops_effective": 400, "flops_dense": 1000},
            {"val_acc": 0.8, "flops_effective": 100, "flops_dense": 1000},
            {"val_acc": 0.2, "flops_effective": 900, "flops_dense": 1000, "status": "failed"}]
    box = reference_box(OBJ, rows)
    assert box == ReferenceBox((0.0, 1000.0), (1.0, 0.0)) and box.volume() == 1000.0
    summary = front_summary(rows, OBJ)
    assert summary.hypervolume == pytest.approx(0.9 * 600 + 0.8 * 300)
    assert summary.hypervolume_normalised == pytest.approx(summary.hypervolume / 1000.0)
    assert summary.box.as_dict() == {"worst": [0.0, 1000.0], "best": [1.0, 0.0]}
    assert list(summary.front["flops_effective"]) == [100, 400]
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        dirs = ["max"] + ["min"] * (k - 1)
        worst, best = [0.0] + [10.0] * (k - 1), [1.0] + [0.0] * (k - 1)
        for _ in range(10):
            # points partly outside the box (better than the ideal, worse than the reference)
            vals = np.column_stack([rng.uniform(-0.2, 1.3, 30)] + [rng.uniform(-2, 12, 30) for _ in range(k - 1)])
            value = normalised_hypervolume(vals, dirs, ReferenceBox(tuple(worst), tuple(best)))
            assert 0.0 <= value <= 1.0
    assert normalised_hypervolume([[1.0, 0.0]], ["max", "min"], ReferenceBox((0.0, 10.0), (1.0, 0.0))) == 1.0
    assert normalised_hypervolume([[2.0, -5.0]], ["max", "min"], ReferenceBox((0.0, 10.0), (1.0, 0.0))) == 1.0
    assert normalised_hypervolume([[0.5, 5.0]], ["max", "min"], ReferenceBox((0.0, 10.0), (1.0, 0.0))) == 0.25
    assert normalised_hypervolume([[0.5, 5.0]], ["max", "min"], ReferenceBox((0.0, math.nan), (1.0, 0.0))) == 0.0
    empty = front_summary([], OBJ)
    assert empty.front.empty and empty.hypervolume == 0.0 and empty.hypervolume_normalised == 0.0
    # objectives outside [0, 1] / negative: the ideal corner comes from the data
    box = reference_box([("score", "max"), ("loss", "min")], [{"score": 3.0, "loss": -1.0}, {"score": 5.0, "loss": 2.0}])
    assert box.best == (5.0, -1.0)


def test_default_reference_dense_and_fallbacks():
    rows = _rows([(0.9, 60), (0.5, 10)], flops_dense=200.0)
    assert default_reference(OBJ, rows) == [0.0, 200.0]
    no_dense = _rows([(0.9, 60), (0.5, 10)])
    assert default_reference(OBJ, no_dense) == pytest.approx([0.0, 66.0])
    objs = [("score", "max"), ("latency_ms", "min")]
    ref = default_reference(objs, [{"score": -2.0, "latency_ms": 5.0}, {"score": 3.0, "latency_ms": 4.0}])
    assert ref == pytest.approx([-2.2, 5.5])
    empty = default_reference(OBJ, [])
    assert empty[0] == 0.0 and math.isnan(empty[1])


# --- knee and selectors -------------------------------------------------------------------

CONVEX = [(0.50, 10), (0.85, 20), (0.90, 40), (0.92, 80), (0.93, 160)]


def test_knee_on_convex_front_is_elbow():
    front = pareto_front(_rows(CONVEX), OBJ)
    assert front.loc[knee_point(front, OBJ), "trial_id"] == "t1"


def test_knee_small_fronts_give_best_accuracy():
    two = pareto_front(_rows([(0.5, 10), (0.9, 50)]), OBJ)
    assert two.loc[knee_point(two, OBJ), "trial_id"] == "t1"
    one = pareto_front(_rows([(0.7, 10)]), OBJ)
    assert one.loc[knee_point(one, OBJ), "trial_id"] == "t0"
    with pytest.raises(ValueError, match="empty"):
        knee_point(pareto_front([], OBJ), OBJ)


def test_selectors():
    rows = _rows(CONVEX + [(0.93, 200), (0.6, 100)])  # t5 ties t4 on accuracy but costs more
    assert select_point(rows, OBJ, "knee")["trial_id"] == "t1"
    best = select_point(rows, OBJ, "max_acc")
    assert best["trial_id"] == "t4" and best.name == 4
    assert select_point(rows, OBJ, "min_flops")["trial_id"] == "t0"
    assert select_point(rows, OBJ, "flops_le:45")["trial_id"] == "t2"
    assert select_point(rows, OBJ, " flops_le:4e1 ")["trial_id"] == "t2"
    assert select_point(rows, OBJ, "flops_le:20")["trial_id"] == "t1"


def test_selector_errors():
    rows = _rows(CONVEX)
    with pytest.raises(ValueError, match=r"smallest flops_effective available is 10"):
        select_point(rows, OBJ, "flops_le:5")
    with pytest.raises(ValueError, match="not a number"):
        select_point(rows, OBJ, "flops_le:lots")
    with pytest.raises(ValueError, match=r"knee \| max_acc \| min_flops \| flops_le"):
        select_point(rows, OBJ, "fastest")
    with pytest.raises(ValueError, match="no finished trial"):
        select_point([{"status": "error"}], OBJ, "knee")


# --- plots --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 12])
def test_plots_written_for_0_1_many(tmp_path, n):
    rng = np.random.default_rng(n)
    rows = [
        {"val_acc": float(rng.uniform(0.3, 1.0)), "flops_effective": float(rng.uniform(1e3, 1e5)),
         "flops_dense": 1e5, "method": ["magnitude", "bingo", "snip"][i % 3], "trial_id": f"t{i:03d}",
         "param.sparsity": round(float(rng.uniform(0.1, 0.95)), 3), "status": "ok"}
        for i in range(n)
    ]
    rows.append({"trial_id": "failed", "status": "error"})  # a failed trial must not break plotting
    df = pd.DataFrame(rows)
    front = pareto_front(df, OBJ)
    png = plot_front_png(df, front, OBJ, tmp_path / "f.png", "sweep", log_x=True)
    html_path = plot_front_html(df, front, OBJ, tmp_path / "f.html", "sweep")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = html_path.read_text()
    assert "<script src=\"https://cdn" not in text  # self-contained: no CDN
    assert "plotly.js" in text.lower() or "Plotly" in text
    if n:
        assert "t000" in text and "param.sparsity" in text and "magnitude" in text
        assert "FLOPs per sample (effective)" in text and "validation accuracy" in text
    else:
        assert "no finished trials yet" in text


def test_axis_labels():
    assert axis_label("flops_effective") == "FLOPs per sample (effective)"
    assert axis_label("params_physical") == "parameters (physical)"
    assert axis_label("val_acc") == "validation accuracy"
    assert axis_label("custom") == "custom"


def test_select_a_trial_by_id_on_or_off_the_front():
    rows = _rows([(0.5, 10), (0.8, 30), (0.7, 50)]) + [{"val_acc": 0.9, "flops_effective": 5.0,
                                                        "trial_id": "bad", "status": "failed"}]
    assert select_point(rows, OBJ, "trial:t2")["flops_effective"] == 50  # dominated, still exportable
    with pytest.raises(ValueError, match="no finished trial 'bad'"):
        select_point(rows, OBJ, "trial:bad")
    with pytest.raises(ValueError, match="no finished trial 'zz'"):
        select_point(rows, OBJ, "trial:zz")


def test_selectors_speak_the_sweeps_objectives():
    from search.pareto import Selector

    objs = [("val_f1", "max"), ("flops_deployed", "min")]
    rows = [{"trial_id": f"t{i}", "val_f1": f1, "flops_deployed": fl, "status": "ok"}
            for i, (f1, fl) in enumerate([(0.5, 1e6), (0.8, 3e6), (0.9, 8e6), (0.9, 9e6), (0.4, 2e6)])]
    assert select_point(rows, objs, "best:val_f1")["trial_id"] == "t2"  # t3 ties on f1 but costs more
    assert select_point(rows, objs, "min:flops_deployed")["trial_id"] == "t0"
    assert select_point(rows, objs, "max:flops_deployed")["trial_id"] == "t2"  # t3 is dominated: off the front
    assert select_point(rows, objs, "le:flops_deployed:2e6")["trial_id"] == "t0"
    assert select_point(rows, objs, "le:flops_deployed:5e6")["trial_id"] == "t1"
    assert select_point(rows, objs, "ge:val_f1:0.75")["trial_id"] == "t1"  # cheapest with f1 >= 0.75
    # The aliases say which metric they read, and pick what their canonical form picks.
    alias = Selector.parse("max_acc", objs)
    assert alias.canonical() == "best:val_f1"
    assert "reads val_f1" in alias.describe(objs) and "first max objective" in alias.describe(objs)
    assert Selector.parse("min_flops", objs).canonical() == "min:flops_deployed"
    assert Selector.parse("flops_le:2e6", objs).canonical() == "le:flops_deployed:2e+06"
    assert select_point(rows, objs, "max_acc")["trial_id"] == select_point(rows, objs, "best:val_f1")["trial_id"]
    with pytest.raises(ValueError, match=r"'val_acc' is not an objective of this sweep; its objectives are "
                                         r"\['val_f1', 'flops_deployed'\]"):
        select_point(rows, objs, "best:val_acc")
    with pytest.raises(ValueError, match="largest val_f1 available is 0.9"):
        select_point(rows, objs, "ge:val_f1:0.95")
    with pytest.raises(ValueError, match="needs a bound"):
        select_point(rows, objs, "le:flops_deployed")
