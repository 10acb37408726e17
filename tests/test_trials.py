"""The trial protocol (issue 25): one registry of trial kinds read by the pre-flight and the worker,
capabilities declared on the method class, metric names declared once, no import circle in
`search`, and a method added from outside the package with a metric of its own as an objective."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, compose

# ------------------------------------------------------------------------------------------------
# The import graph of `search`
# ------------------------------------------------------------------------------------------------
#: Import edges allowed to close a circle (none: every circle was broken). Every entry must still be
#: an edge of the graph (a stale one fails below), so the list can only shrink.
KNOWN_CIRCLE_EDGES: set[tuple[str, str]] = set()


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "search").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the `search` modules it imports, anywhere in its code (functions included; not
    the imports under ``if TYPE_CHECKING:``, which never run)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        # `if TYPE_CHECKING:` imports never run: a circle through one is the documented idiom.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from search import pareto` imports the submodule; `from search.x import f` the module x.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_import_graph_finds_a_circle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_search_imports_itself_in_a_circle():
    graph = import_graph()
    assert "search.trials.kinds" in graph and "search.trials.training" in graph["search.trials.ken"]
    stale = sorted(edge for edge in KNOWN_CIRCLE_EDGES if edge[1] not in graph.get(edge[0], set()))
    assert not stale, f"{stale} no longer imported: remove them from KNOWN_CIRCLE_EDGES"
    for source, target in KNOWN_CIRCLE_EDGES:
        graph[source].discard(target)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_trial_kinds_and_metric_names_import_no_training_stack():
    """The driver reads the registry (pre-flight) and hands Tune the trainable: neither may load
    Lightning, torchmetrics or transformers (issue 23)."""
    code = ("import sys, json\n"
            "import search.trials, search.trials.kinds, search.trials.metrics, search.trials.context\n"
            "import search.trials.trainable, search.trials.text_config, search.preflight, search.trial_context\n"
            "import search.llm_trial, search.pareto\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'lightning', 'pytorch_lightning', 'torchmetrics', 'transformers'})))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------------------------------
# Capabilities and kinds
# ------------------------------------------------------------------------------------------------
def test_capabilities_are_typed_class_attributes_read_directly():
    from prunelib.llm.methods import Wanda
    from prunelib.methods import KEN, PruningMethod

    assert (PruningMethod.needs_pair, PruningMethod.model_kinds, PruningMethod.reported_metrics) == (False, (), ())
    assert KEN.needs_pair and Wanda.model_kinds == ("hf",)
    pattern = re.compile(r"""getattr\([^)]*["'](needs_pair|model_kinds|reported_metrics)["']""")
    readers = [f"{path.relative_to(REPO)}:{i}" for folder in ("search", "prunelib", "dashboards")
               for path in (REPO / folder).rglob("*.py")
               for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert readers == [], f"capabilities read with getattr: {readers}"


@pytest.mark.parametrize("method, overrides, kind", [
    ("magnitude", [], "train"),
    ("bingo", [], "train"),
    ("ken", [], "ken_pair"),
    ("wanda", ["model=hf", "data=text"], "text"),
    ("ken", ["model=hf", "data=text"], "text_ken_pair"),
    ("magnitude", ["model=hf", "data=text"], None),
])
def test_the_pre_flight_and_the_worker_read_one_registry(method, overrides, kind):
    from prunelib.methods import METHODS
    from search.trials.kinds import TRIAL_KINDS, kind_for, reported_metrics

    cfg = compose(overrides)
    chosen = kind_for(METHODS[method], cfg["data"], cfg["model"])
    assert (chosen.name if chosen else None) == kind
    if chosen is None:
        return
    # What the pre-flight checks objectives against is what this kind declares ...
    assert reported_metrics(cfg, method) == chosen.reports(cfg, None) | set(METHODS[method].reported_metrics)
    # ... and the worker runs the function the same kind names.
    assert callable(chosen.runner()) and chosen in TRIAL_KINDS


def test_a_training_trial_reports_what_its_kind_declares(tmp_path):
    from search.config import build_search_space
    from search.trial import TrialContext, run_trial
    from search.trials.kinds import reported_metrics

    cfg = compose(["+method=magnitude", "trial.epochs=1", "trial.finetune_epochs=0", "trial.fgsm_epsilon=0.05",
                   "data.limit_train=200"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("latency_ms", "min")])
    row = run_trial({"method": "magnitude"}, ctx, trial_id="declared", trial_dir=tmp_path / "t")
    declared = reported_metrics(cfg, "magnitude")
    assert declared - set(row) == set(), f"declared but not reported: {sorted(declared - set(row))}"


def test_trainconfig_keys_given_as_trial_keys_reach_the_training(tmp_path, monkeypatch):
    """trial.val_every_n_epochs / trial.accelerator (TrainConfig fields the trial otherwise sets
    itself) are passed to the training, not accepted and dropped."""
    import search.trials.training as training
    from search.config import build_search_space
    from search.trial import TrialContext, run_trial

    seen = []

    def capture(model, datamodule, method, config, **kwargs):
        seen.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(training, "run_pruning", capture)
    cfg = compose(["+method=magnitude", "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=200",
                   "+trial.val_every_n_epochs=1", "+trial.accelerator=cpu"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max")])
    with pytest.raises(Exception):
        run_trial({"method": "magnitude"}, ctx, trial_id="options", trial_dir=tmp_path / "t")
    assert seen and seen[0].val_every_n_epochs == 1 and seen[0].accelerator == "cpu"


# ------------------------------------------------------------------------------------------------
# Adding a method touches only its module, its YAML and its test
# ------------------------------------------------------------------------------------------------
MY_METHOD = '''
"""A user's method, outside the package: magnitude pruning that reports the norm of what it keeps."""
import math

from torch import nn

from prunelib.methods import MagnitudePruning


class KeptNormMagnitude(MagnitudePruning):
    reported_metrics = ("kept_weight_norm",)

    def finalize(self, model):
        masks = super().finalize(model)
        self.kept_norm = math.sqrt(sum(float((m.weight.detach() ** 2).sum()) for m in model.modules()
                                       if isinstance(m, (nn.Linear, nn.Conv2d))))
        return masks

    def method_metrics(self):
        return {"kept_weight_norm": self.kept_norm}
'''

MY_METHOD_YAML = """\
name: kept_norm
_target_: my_method.KeptNormMagnitude
settings: {sparsity: 0.5}
space:
  sparsity: {type: float, low: 0.3, high: 0.9}
"""


@pytest.mark.slow
def test_a_method_from_outside_the_package_runs_a_sweep_on_its_own_metric(tmp_path):
    (tmp_path / "my_method.py").write_text(textwrap.dedent(MY_METHOD))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "kept_norm.yaml").write_text(MY_METHOD_YAML)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "search", f"hydra.searchpath=[file://{tmp_path}/conf]", "+method=kept_norm",
         "search.n_trials=2", "search.objectives=[{metric: kept_weight_norm, mode: max}, "
         "{metric: flops_deployed, mode: min}]", "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=400",
         f"hydra.run.dir={out}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[2/2]" in proc.stdout
    rows = [json.loads(p.read_text()) for p in out.rglob("trial_result.json")]
    assert len(rows) == 2 and {r["method"] for r in rows} == {"kept_norm"}
    assert all(r["kept_weight_norm"] > 0 for r in rows)
    # The metric of its own is an objective of the sweep (recorded in its state) and on its front.
    states = list(out.rglob("sweep.json"))
    assert states and "kept_weight_norm" in states[0].read_text()
    fronts = list(out.rglob("front.csv"))
    assert fronts and "kept_weight_norm" in fronts[0].read_text().splitlines()[0]
