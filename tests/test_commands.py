"""Printed commands are shell-quoted: pasting one runs exactly the export, nothing else."""

from __future__ import annotations

import shlex
import subprocess

from search.commands import export_command


def test_metacharacters_in_ids_are_quoted(tmp_path) -> None:
    evil_trial = "t1$(touch pwned)"
    line = export_command("abc;touch pwned2", f"trial:{evil_trial}", f"masks-{evil_trial}.safetensors",
                          "sqlite:///x y.db")
    words = shlex.split(line)
    assert words[:3] == ["python", "-m", "search.export"]
    assert "run_id=abc;touch pwned2" in words and f"select=trial:{evil_trial}" in words
    assert "tracking.uri=sqlite:///x y.db" in words
    # The shell sees one echo of the words, and creates no file.
    out = subprocess.run(["sh", "-c", "printf '%s\\n' " + line.split(" ", 3)[3]], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == words[3:]
    assert list(tmp_path.iterdir()) == []


def test_plain_ids_stay_readable() -> None:
    assert export_command("0123abcd", "knee", "masks.safetensors") == \
        "python -m search.export run_id=0123abcd select=knee out=masks.safetensors"
