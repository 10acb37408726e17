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


#: What a sweep's driver never trains with, so never imports (issue 23: ~8 s of its start).
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics", "transformers")

# Runs the sweep command with Tune's fit wrapped: the modules loaded when the trials are about to
# be submitted, and again when the command is done, go to a JSON file.
_WATCH_DRIVER = """
import atexit, json, runpy, sys
import ray.tune as tune
out, stack = sys.argv.pop(1), {stack!r}
seen = {{}}
def heavy():
    return sorted({{m.split('.')[0] for m in sys.modules}} & set(stack))
_fit = tune.Tuner.fit
def fit(self, *args, **kwargs):
    seen["at_fit"] = heavy()
    return _fit(self, *args, **kwargs)
tune.Tuner.fit = fit
@atexit.register
def dump():
    seen["at_exit"] = heavy()
    open(out, "w").write(json.dumps(seen))
sys.argv = ["search", *sys.argv[1:]]
runpy.run_module("search", run_name="__main__", alter_sys=True)
"""


def test_the_sweep_driver_never_imports_the_training_stack(tmp_path):
    """Trials train in Ray workers; the driver (pre-flight, Tune, Optuna, MLflow, the front) needs
    none of Lightning, torchmetrics or transformers, also for a user's own model."""
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, in_channels=1, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(in_channels * 64, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n")
    seen = tmp_path / "modules.json"
    code = _WATCH_DRIVER.format(stack=TRAINING_STACK)
    proc = subprocess.run([sys.executable, "-c", code, str(seen), "+method=magnitude", "search.n_trials=2",
                           "model=custom", "model._target_=mynet.Net", "trial.epochs=1", "trial.finetune_epochs=1",
                           f"hydra.run.dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[2/2]" in proc.stdout  # both trials ran (in workers, which do import Lightning)
    modules = json.loads(seen.read_text())
    assert modules == {"at_fit": [], "at_exit": []}, modules
