"""A benchmark run's raw rows and its provenance, in one place for every script (issue 26).

Each benchmark behind a RESULTS.md table writes, with ``--rows PATH``, one gzipped JSON document::

    {"meta": {"command": ..., "commit": ..., "machine": ..., "date": ..., "settings": {...}}, "rows": [...]}

(some scripts hold their figures under other keys beside ``meta``), and renders its tables from
that document with the same functions ``benchmarks/results_md.py`` calls. :func:`run_meta` says
which run wrote the rows; :func:`write_rows` writes them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: The code whose uncommitted changes make a run's commit not the whole story.
CODE_PATHS = ("prunelib", "search")


def git_commit(repo: Path = REPO, code_paths: tuple[str, ...] = CODE_PATHS) -> str:
    """``git rev-parse --short HEAD``, with ``+uncommitted`` when tracked files under ``code_paths`` differ."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code_paths], cwd=repo,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted" if dirty else "")


def machine_description(extra: str = "") -> str:
    """Architecture, CPU count, Python (and torch, once imported) versions, plus ``extra``."""
    parts = [platform.machine(), f"{os.cpu_count()} cores", f"Python {platform.python_version()}"]
    if "torch" in sys.modules:  # only where the script uses torch: no import for the version alone
        parts.append(f"torch {sys.modules['torch'].__version__}")
    return ", ".join(parts + ([extra] if extra else []))


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that ran: ``python benchmarks/<script> ARGS`` (``argv``: the arguments; default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", shlex.join(args)]).strip()


def settings_of(args: argparse.Namespace, leave_out: tuple[str, ...] = ("out", "rows")) -> dict[str, Any]:
    """The parsed arguments as JSON-ready settings (paths as strings), output paths left out."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in leave_out}


def run_meta(script: str, argv: list[str] | None = None, settings: dict[str, Any] | None = None, *,
             machine: str | None = None, **extra: Any) -> dict[str, Any]:
    """Provenance of a run: ``command``, ``commit``, ``machine``, ``date`` (UTC day), ``settings``, and ``extra``.

    ``script``: the file name under ``benchmarks/``; ``machine``: a description to use instead of
    :func:`machine_description`'s.
    """
    meta = {"command": command_line(script, argv), "commit": git_commit(),
            "machine": machine or machine_description(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if settings is not None:
        meta["settings"] = settings
    return {**meta, **extra}


def write_rows(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (``{"meta": ..., "rows": ...}``) as JSON, gzipped when ``path`` ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        json.dump(doc, handle, indent=1, default=str)
    return path


def read_rows(path: str | Path) -> dict[str, Any]:
    """The document :func:`write_rows` wrote (gzipped or not)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)
