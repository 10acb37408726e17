"""benchmarks/gpu_suite.py: its --smoke mode (CPU, tiny sizes) writes every part's table, so the
script is known to work before GPU time is spent on it; its budget skips work rather than overrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


def _table(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """(header cells, data rows, notes) of a suite table file."""
    lines = path.read_text().splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("| ")]
    notes = [line[2:] for line in lines if line.startswith("- ")]
    return rows[0], rows[1:], notes


@pytest.mark.slow
def test_smoke_run_writes_every_table_with_its_columns(tmp_path):
    suite = _load_suite()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"smoke run: {time.monotonic() - start:.1f} s")
    for part, (filename, _title, columns) in suite.TABLES.items():
        header, rows, notes = _table(tmp_path / filename)
        assert header == list(columns), f"{filename}: columns {header}"
        assert rows, f"{filename}: no rows; notes: {notes}"
        assert all(len(r) == len(columns) for r in rows), filename
        assert not [n for n in notes if n.startswith(("failed", "skipped"))], f"{filename}: {notes}"
    # The numbers a claim rests on are numbers, not dashes.
    _, rows, _ = _table(tmp_path / "a_throughput.md")
    assert all(float(r[7]) > 0 and float(r[10]) > 0 for r in rows)  # steady and trial ratios
    _, rows, notes = _table(tmp_path / "b_packing.md")
    assert [r[0] for r in rows] == ["1", "2"] and float(rows[0][4]) == 1.0
    assert any(n.startswith("trial.gpus=auto probe") for n in notes)
    _, rows, _ = _table(tmp_path / "c_first_step.md")
    assert [r[0] for r in rows] == ["1", "2"]
    _, rows, _ = _table(tmp_path / "d_surgery_speedup.md")
    assert {r[1] for r in rows} == {"tp_l1", "paoding", "rl_pruner", "polarization", "bingo"}
    assert {r[3] for r in rows} == {"8", "none"}
    _, rows, _ = _table(tmp_path / "e_ken_selection.md")
    assert all(r[8].split("/")[0] == r[8].split("/")[1] for r in rows)  # same masks as the CPU (it is the CPU)
    _, rows, _ = _table(tmp_path / "f_speed_settings.md")
    settings = {r[2]: r for r in rows}
    assert {"runner (none)", "channels_last", "cuda_graphs", "compile"} <= set(settings)
    assert "ignored" in settings["cuda_graphs"][9]  # no CUDA graphs on a CPU, said so
    report = json.loads((tmp_path / "suite.json").read_text())
    assert set(report["parts"]) == set(suite.PARTS) and report["environment"]["device"] == "cpu"
    assert report["absent_on_gpu_machine_but_loaded"] == []  # no Ray, Optuna, MLflow or Hydra needed


def test_budget_skips_work_that_would_overrun():
    suite = _load_suite()
    budget = suite.Budget(100.0)
    budget.open_part(5.0)
    assert budget.fits(4.0) and not budget.fits(6.0)
    budget.end = time.monotonic() + 1.0  # the run's deadline caps every part
    budget.open_part(50.0)
    assert not budget.fits(2.0)


def test_a_part_out_of_time_notes_the_skip_in_its_table(tmp_path):
    suite = _load_suite()
    s = suite.Suite(sizes=suite.SMOKE, device="cpu", root=None, out=tmp_path, budget=suite.Budget(0.0), smoke=True)
    table = suite.Table("e", tmp_path / "e.md")
    suite.part_e(s, table)
    header, rows, notes = _table(tmp_path / "e.md")
    assert header == list(suite.TABLES["e"][2]) and rows == []
    assert notes and all(n.startswith("skipped (time budget") for n in notes)


def test_cells_are_formatted_for_reading():
    fmt = _load_suite().fmt
    assert [fmt(54321.7), fmt(0.91234), fmt(12.345), fmt(None), fmt(123456), fmt("8")] == \
        ["54,322", "0.912", "12.3", "-", "123,456", "8"]


def test_a_failing_measurement_is_noted_and_the_part_goes_on(tmp_path):
    suite = _load_suite()
    table = suite.Table("e", tmp_path / "e.md")
    done = []
    for k in (1, 2):
        with suite.unit(table, f"k={k}"):
            if k == 1:
                raise ValueError("boom\nsecond line")
            done.append(k)
    assert done == [2]
    assert _table(tmp_path / "e.md")[2] == ["failed: k=1: ValueError: boom"]
