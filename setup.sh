#!/usr/bin/env bash
# Fresh machine -> working prunesearch: a virtual environment in .venv, then the main job
# (a pruning sweep on the embedded digits data). `./setup.sh --install-only` skips the sweep.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: the CPU wheel of this version is what the machines carry; an open
# range here would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,hf]"
if [ "${1:-}" != "--install-only" ]; then
  .venv/bin/python -m search +method=magnitude
fi
