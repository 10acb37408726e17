#!/usr/bin/env bash
# Fresh machine -> working prunesearch: a virtual environment in .venv with the tested versions
# (constraints.txt), then the main job (a pruning sweep on the embedded digits data).
# `./setup.sh --install-only` skips the sweep.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip too at its tested version (pinned in constraints.txt).
.venv/bin/python -m pip install --quiet -c constraints.txt --upgrade pip
# torch first, pinned: the CPU wheel of this version is what the machines carry; an open
# range here would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# Every other package at the version tested with this commit (constraints.txt, written by
# .ci/latest --freeze): the same set tomorrow as today. pyproject.toml keeps the ranges that a
# `pip install` of the wheel resolves.
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,hf]"
if [ "${1:-}" != "--install-only" ]; then
  .venv/bin/python -m search +method=magnitude
fi
