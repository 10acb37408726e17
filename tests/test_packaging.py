"""From a pip install: the wheel carries the configs and a console script, every imported package is
a declared dependency, and a user's model, data module and LightningModule run from their own directory."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

# Optional extras: imported lazily, only when their feature is used.
EXTRAS = {"transformers": "hf", "tokenizers": "hf", "torchvision": "vision"}


def _imports(root: Path) -> set[str]:
    names = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_a_declared_dependency():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    extras = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for deps in project["optional-dependencies"].values()
              for d in deps}
    dists = packages_distributions()
    ours = {"prunelib", "search", "dashboards"}
    missing = {}
    for name in sorted(set().union(*(_imports(REPO / p) for p in ours)) - ours - set(sys.stdlib_module_names)):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if name in EXTRAS:
            assert owners & extras, f"{name} is imported but not in an extra"
            continue
        if not owners & declared:
            missing[name] = sorted(owners)
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


def test_method_configs_on_the_search_path_join_an_unpinned_sweep(tmp_path):
    from search.config import load_config
    from search.preflight import preflight

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "narrow_magnitude.yaml").write_text(textwrap.dedent("""\
        name: narrow_magnitude
        _target_: prunelib.methods.MagnitudePruning
        settings: {sparsity: 0.5}
        space:
          sparsity: {type: float, low: 0.4, high: 0.6}
        """))
    cfg = load_config(["search.n_trials=4"], searchpath=[str(tmp_path)])
    assert "narrow_magnitude" in cfg["method_pool"] and "magnitude" in cfg["method_pool"]
    result = preflight({**cfg, "search": {**cfg["search"], "methods": ["magnitude", "narrow_magnitude"]}},
                       build=False, open_stores=False)
    assert result.space.method_names == ["magnitude", "narrow_magnitude"]


def _readme_example() -> tuple[str, list[str]]:
    """The README's "Your own model and data" example: mycode.py and the command, as written."""
    import shlex

    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# mycode.py\n.*?)```", text, re.S).group(1)
    command = re.search(r"```bash\n(prunesearch \+method=magnitude search.n_trials=4.*?)```", text, re.S).group(1)
    return code, shlex.split(command.replace("\\\n", " "))


@pytest.mark.slow
def test_wheel_installs_and_runs_the_readme_example_from_an_empty_directory(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("prunesearch-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The heavy dependencies (torch, ray...) come from this environment's site-packages (a path
    # entry: its own .pth files, such as this checkout's editable install, are not processed);
    # prunesearch itself only from the wheel.
    (Path(site) / "_heavy_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: this environment's own (editable) prunesearch is visible through the .pth.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--ignore-installed", "-q", str(wheel)], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    user = tmp_path / "user"
    user.mkdir()
    code, command = _readme_example()
    (user / "mycode.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TUNE_GLOBAL_CHECKPOINT_S="1")
    where = subprocess.run([str(python), "-c", "import search, prunelib, search.space as s; "
                            "print(search.__file__, prunelib.__file__, s.CONF_DIR)"],
                           cwd=user, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(site) for p in where), where  # the installed wheel and its configs, not the checkout
    assert command[0] == "prunesearch"
    proc = subprocess.run(command, cwd=user, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Pareto front" in proc.stdout
    results = [json.loads(p.read_text()) for p in user.glob("outputs/*/*/trials/*/trial_result.json")]
    assert len(results) == 4 and all(0 < r["val_hit_rate"] <= 1 and r["flops_effective"] < r["flops_dense"]
                                     for r in results)
    assert (user / "mlflow.db").is_file() and (user / "optuna.db").is_file()
    # Issue 29: the best point taken home from the installed command reproduces its metric in a
    # fresh process that imports the loader, the user's own code and Lightning, nothing of search.
    export = subprocess.run(["prunesearch-export", "select=best:val_hit_rate", "out=point"], cwd=user, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert "the model's own code must be importable: mycode.Net" in export.stdout
    check = subprocess.run([str(python), "-c", (
        "import json, sys, lightning as L\n"
        "from prunelib.artifact import load_pruned\n"
        "import mycode\n"
        "model = load_pruned('point')\n"
        "trainer = L.Trainer(accelerator='cpu', logger=False, enable_progress_bar=False, enable_model_summary=False)\n"
        "logged = trainer.validate(mycode.Classifier(model), datamodule=mycode.Digits(), verbose=False)[0]\n"
        "assert 'search' not in sys.modules and 'ray' not in sys.modules\n"
        "print(json.dumps({'val_hit_rate': logged['val_hit_rate']}))")], cwd=user, env=env, capture_output=True,
        text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    reported = json.loads((user / "point" / "trial.json").read_text())["val_hit_rate"]
    assert reported == max(r["val_hit_rate"] for r in results)
    assert abs(json.loads(check.stdout.strip().splitlines()[-1])["val_hit_rate"] - reported) <= 1e-6
    # Method configs on Hydra's search path join an unpinned sweep of the installed command.
    (user / "more_conf" / "method").mkdir(parents=True)
    (user / "more_conf" / "method" / "half_magnitude.yaml").write_text(
        "name: half_magnitude\n_target_: prunelib.methods.MagnitudePruning\nsettings: {sparsity: 0.5}\n")
    pool = subprocess.run(["prunesearch", "--config-dir", "more_conf", "search.methods=[half_magnitude,nope]"],
                          cwd=user, env=env, capture_output=True, text=True, timeout=300)
    assert pool.returncode == 2 and "search.methods: ['nope'] not found; available: [" in pool.stderr, pool.stderr
    assert "'half_magnitude'" in pool.stderr and "'magnitude'" in pool.stderr
