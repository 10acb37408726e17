"""``search.seeds``: only the front's trials are rerun, and their spread is summarised."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

from search.seeds import rerun_plan, summarise_seeds


def _front():
    return pd.DataFrame([{"trial_id": "a", "method": "gmp", "val_acc": 0.90, "flops_effective": 100.0},
                         {"trial_id": "b", "method": "snip", "val_acc": 0.80, "flops_effective": 50.0}])


def test_plan_reruns_front_points_only_with_the_next_seeds():
    configs = {t: {"method": "gmp"} for t in ("a", "b", "c", "d", "e")}  # five trials, two on the front
    assert rerun_plan(_front(), configs, seeds=3, base_seed=4) == [("a", 5), ("a", 6), ("b", 5), ("b", 6)]
    assert rerun_plan(_front(), configs, seeds=1, base_seed=0) == []
    assert rerun_plan(_front(), {"b": {}}, seeds=2, base_seed=0) == [("b", 1)]  # no config (orphan): skipped


def test_summary_is_mean_and_sample_std_over_the_original_and_its_reruns():
    reruns = {("a", 1): {"status": "ok", "val_acc": 0.86, "flops_effective": 100.0},
              ("a", 2): {"status": "ok", "val_acc": 0.88, "flops_effective": 100.0},
              ("b", 1): {"status": "failed", "error": "boom"}}
    table = summarise_seeds(_front(), reruns, ["val_acc", "flops_effective"], base_seed=0).set_index("trial_id")
    assert table.loc["a", "seeds"] == 3 and table.loc["a", "seed_list"] == "0 1 2"
    assert table.loc["a", "val_acc_mean"] == pytest.approx(0.88)
    assert table.loc["a", "val_acc_std"] == pytest.approx(statistics.stdev([0.90, 0.86, 0.88]))
    assert table.loc["a", "flops_effective_std"] == 0.0
    assert table.loc["b", "seeds"] == 1 and math.isnan(table.loc["b", "val_acc_std"])  # the failed rerun is left out
