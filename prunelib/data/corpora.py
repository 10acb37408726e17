"""A small real text corpus made on the machine: the fortune cookies of Debian's ``fortunes`` package.

Debian's ``fortunes`` package (``apt-get install fortunes``; BSD licence, see
``/usr/share/doc/fortunes/copyright``) installs about 14,000 fortunes in ~40 category files
under ``/usr/share/games/fortunes`` (``computers``, ``people``, ``definitions``, ...; entries
separated by lines holding ``%``). Nothing here downloads anything: :func:`write_fortunes_corpus`
turns the installed files into

* ``fortunes.jsonl``: one ``{"text", "label"}`` record per fortune, the label being its
  category (a sequence-classification task, ``data=text``), and
* ``fortunes.txt``: the same fortunes as plain text, one paragraph each (language modelling).

The package is not shipped in the repository; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FORTUNES_ROOT", "CorpusNotFoundError", "fortune_categories", "read_fortunes", "write_fortunes_corpus"]

#: Where Debian's ``fortunes`` package installs its category files.
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
_SKIP = {"ascii-art"}  # drawings, not text
_BLANK_RUN = re.compile(r"\n\s*\n+")


class CorpusNotFoundError(FileNotFoundError):
    """The fortunes files are absent; the message says which package installs them."""


def _root(root: str | os.PathLike | None) -> Path:
    path = Path(root) if root is not None else FORTUNES_ROOT
    if not path.is_dir():
        raise CorpusNotFoundError(f"no fortunes under {path}: install Debian's package (apt-get install fortunes)")
    return path


def fortune_categories(root: str | os.PathLike | None = None) -> dict[str, int]:
    """Category name -> number of fortunes, for every category file under ``root``."""
    base = _root(root)
    out = {}
    for f in sorted(base.iterdir()):
        if f.is_file() and not f.is_symlink() and "." not in f.name and f.name not in _SKIP:
            out[f.name] = len(_entries(f))
    return out


def _entries(path: Path) -> list[str]:
    entries, current = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e.strip("\n") for e in entries if e.strip()]


def read_fortunes(categories: Sequence[str] | None = None, root: str | os.PathLike | None = None,
                  min_chars: int = 20, max_chars: int = 600) -> list[tuple[str, str]]:
    """``[(text, category), ...]`` of the installed fortunes, in file order.

    Args:
        categories: which category files (default: all but ``ascii-art``).
        min_chars / max_chars: keep fortunes of this length (characters); the long ones are
            stories and lists that a short-context model truncates anyway.

    Raises:
        CorpusNotFoundError: the package is not installed, or a category does not exist.
    """
    base = _root(root)
    names = list(categories) if categories is not None else list(fortune_categories(base))
    out = []
    for name in names:
        f = base / name
        if not f.is_file():
            raise CorpusNotFoundError(f"fortunes category {name!r} not found under {base} "
                                      f"(known: {sorted(fortune_categories(base))})")
        for entry in _entries(f):
            text = _BLANK_RUN.sub("\n", entry.replace("\t", "    ")).strip()
            if min_chars <= len(text) <= max_chars:
                out.append((text, name))
    return out


def write_fortunes_corpus(out_dir: str | os.PathLike, categories: Sequence[str] | None = None,
                          root: str | os.PathLike | None = None, min_chars: int = 20,
                          max_chars: int = 600) -> dict[str, Path]:
    """Write ``fortunes.jsonl`` (text, label) and ``fortunes.txt`` (plain) under ``out_dir``.

    Returns ``{"jsonl": path, "txt": path}``. Internal blank lines of a fortune are collapsed
    so that a blank line separates fortunes in the text file (one document each).
    """
    records = read_fortunes(categories, root, min_chars, max_chars)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, txt = out / "fortunes.jsonl", out / "fortunes.txt"
    with open(jsonl, "w", encoding="utf-8") as handle:
        for text, label in records:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    txt.write_text("\n\n".join(text for text, _ in records) + "\n", encoding="utf-8")
    return {"jsonl": jsonl, "txt": txt}
