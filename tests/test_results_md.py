"""RESULTS.md is what its committed rows make it (issue 26): every generated table matches the
rows under benchmarks/results/, every rows file says which run wrote it, and every benchmark
script and rows file RESULTS.md names exists."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import results_md  # noqa: E402

TEXT = results_md.RESULTS_MD.read_text()


def test_results_md_matches_what_its_rows_generate():
    assert results_md.regenerate(TEXT) == TEXT, "RESULTS.md is stale: run python benchmarks/results_md.py"


def test_every_rows_file_names_its_run():
    files = sorted((BENCHMARKS / "results").glob("*.json.gz"))
    assert files
    for path in files:
        meta = results_md.load_rows(path)["meta"]
        assert all(meta[k] for k in results_md.PROVENANCE_KEYS), path


def test_every_script_and_rows_file_named_in_results_exists():
    named = set(re.findall(r"benchmarks/([\w./-]+\.(?:py|json\.gz|txt\.gz))", TEXT))
    named |= {f"{script}.py" for script, _, _ in results_md.generated_blocks(TEXT)}
    named |= {rows for _, _, rows in results_md.generated_blocks(TEXT)}
    missing = sorted(n for n in named if not (BENCHMARKS / n).is_file())
    assert not missing, f"RESULTS.md names files that do not exist: {missing}"


def test_a_stale_table_is_found_and_rewritten(tmp_path):
    rows = tmp_path / "results" / "toy.json.gz"
    rows.parent.mkdir()
    with gzip.open(rows, "wt") as handle:
        json.dump({"meta": {"command": "python x.py", "commit": "abc1234", "machine": "m", "date": "2026-12-07"},
                   "rows": [{"case": "one", "tried": 2, "refused": 1, "recovered": 1}]}, handle)
    stale = f"# R\n\n<!-- table: reliability_drill.results_table {rows} -->\n| old |\n<!-- end table -->\n"
    fresh = results_md.regenerate(stale)
    assert "| old |" not in fresh and "| one | 2 | 1 | 1 | 0 | 0 | 0 |" in fresh
    assert "commit `abc1234`" in fresh and results_md.regenerate(fresh) == fresh


def test_a_rows_file_without_provenance_is_refused(tmp_path):
    rows = tmp_path / "bare.json.gz"
    with gzip.open(rows, "wt") as handle:
        json.dump({"rows": []}, handle)
    with pytest.raises(results_md.ResultsError, match="does not say its command, commit, machine, date"):
        results_md.load_rows(rows)



def sections_with_hand_typed_tables(text: str) -> set[str]:
    """Headings of the sections holding a Markdown table outside a generated block."""
    section, generated, found = None, False, set()
    for line in text.split("\n"):
        if line.startswith("## "):
            section = line[3:]
        if line.strip().startswith("<!-- table:"):
            generated = True
        elif line.strip() == "<!-- end table -->":
            generated = False
        elif line.startswith("|---") and not generated:
            found.add(section)
    return found


def test_every_table_is_generated_from_rows():
    """Issue 26: no RESULTS table is typed by hand; each sits in a generated block."""
    assert sections_with_hand_typed_tables(TEXT) == set()


def test_a_hand_typed_table_is_found():
    text = "## A\n<!-- table: x.y results/z.json.gz -->\n| a |\n|---|\n<!-- end table -->\n## B\n| b |\n|---|\n"
    assert sections_with_hand_typed_tables(text) == {"B"}
