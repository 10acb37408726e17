"""Numbers are written one way for people: the console's format is the dashboard's."""

from __future__ import annotations

import math

import pytest

from search import tuner
from search.formatting import format_count, format_metric


@pytest.mark.parametrize("value, text", [
    (100400, "100.40k"), (100400.0, "100.40k"), (3_210_000, "3.21M"), (2.5e9, "2.50G"), (999, "999"),
    (0.25, "0.25"), (-12000, "-12.00k"), ("abc", "?"), (None, "?"), (math.inf, "inf"), (math.nan, "nan"),
])
def test_counts_carry_a_unit(value, text):
    assert format_count(value) == text


def test_the_console_uses_the_same_formatter():
    assert tuner._fmt_flops is format_count


@pytest.mark.parametrize("name, value, text", [
    ("flops_effective", 1.004e5, "100.40k"), ("params_physical", 25_000.0, "25.00k"),
    ("dense_flops", 1e6, "1.00M"), ("param.flops_budget", 5e4, "50.00k"),
    ("val_acc", 0.912345678, "0.9123"), ("sparsity", 0.5, "0.5000"), ("val_acc", 1.0, "1.0000"),
    ("epochs", 3.0, "3"), ("param.rounds", 4, "4"), ("hypervolume", 12345.678, "1.235e+04"),
    ("final_hypervolume", 0.5, "0.5"), ("method", "magnitude", "magnitude"), ("param.x", None, ""),
    ("val_acc", math.nan, "nan"), ("param.rewind", True, "True"),
])
def test_metrics_and_settings(name, value, text):
    assert format_metric(name, value) == text


def test_a_vector_setting_is_written_entry_by_entry_and_survives_mlflow_and_the_front_table(capsys):
    """A per-layer vector (``size:`` in a space) is a list in a trial's row: the console, the
    front table, the hover text and MLflow's string params all handle it."""
    import pandas as pd

    from search.front_report import print_front
    from search.plots import _fmt
    from search.tracking import _param_value, _parse_param
    from search.tune_callbacks import settings_text

    fr = [0.125, 0.5, 0.33333]
    assert format_metric("param.ffn_fractions", fr) == "[0.1250, 0.5000, 0.3333]"
    assert settings_text({"param.ffn_fractions": fr}) == "ffn_fractions=[0.125,0.500,0.333]"
    assert _fmt(fr) == "[0.125, 0.5, 0.33333]"
    assert _parse_param(_param_value(fr)) == fr and _parse_param(_param_value([1, 2])) == [1, 2]
    assert _parse_param("[a, b]") == "[a, b]" and _parse_param('["x"]') == '["x"]'
    front = pd.DataFrame([
        {"trial_id": "a", "method": "llm_structured", "val_ppl": 30.0, "flops_deployed": 1e6, "param.ffn_fractions": fr},
        {"trial_id": "b", "method": "llm_structured", "val_ppl": 40.0, "flops_deployed": 5e5,
         "param.ffn_fractions": [0.6, 0.6, 0.6]}])
    print_front(front, [("val_ppl", "min"), ("flops_deployed", "min")])
    out = capsys.readouterr().out
    assert "param.ffn_fractions" in out and "[0.1250, 0.5000, 0.3333]" in out and "[0.6000, 0.6000, 0.6000]" in out
