"""prunelib must import with PyTorch and Lightning alone: no orchestrator stack."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("ray", "mlflow", "hydra", "optuna")


def test_prunelib_does_not_import_the_search_stack():
    code = (
        "import sys, json\n"
        "import prunelib, prunelib.data, prunelib.models, prunelib.training\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"prunelib imported {loaded}"
