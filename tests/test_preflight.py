"""Every bad input is refused before Ray starts, in one line naming the key: nothing tracked or started."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from search.preflight import TRIAL_KINDS, TrialKind, preflight, register_trial_kind, reported_metrics
from search.space import ConfigError
from search.tuner import run_sweep
from tests.conftest import REPO, compose, free_port

Mutate = Callable[[dict[str, Any], Path], None]


def _set(path: str, value: Any) -> Mutate:
    def mutate(cfg: dict[str, Any], tmp: Path) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value(tmp) if callable(value) else value
    return mutate


def _corrupt_db(tmp: Path) -> str:
    (tmp / "broken.db").write_bytes(b"this is not a database, just junk bytes " * 50)
    return f"sqlite:///{tmp}/broken.db"


def _foreign_db(tmp: Path) -> str:
    con = sqlite3.connect(tmp / "other.db")
    con.execute("CREATE TABLE studies (id INTEGER)")
    con.commit()
    con.close()
    return f"sqlite:///{tmp}/other.db"


def _empty_dir(tmp: Path) -> str:
    (tmp / "not_a_sweep").mkdir()
    return str(tmp / "not_a_sweep")


MAG = ["+method=magnitude"]
CUSTOM = ["model=custom"]
# (id, overrides, mutations, fragment the one-line message must hold)
CASES: list[tuple[str, list[str], list[Mutate], str]] = [
    ("space not a mapping", MAG, [_set("method.space", 5)], "method[magnitude].space: expected a mapping"),
    ("when not a mapping", MAG, [_set("method.space.end_protection.when", "protect_ends")],
     "method[magnitude].space.end_protection.when: expected a mapping"),
    ("choices a string", MAG, [_set("method.space.distribution.choices", "global")],
     "method[magnitude].space.distribution.choices: expected a list, got 'global'"),
    ("step 0", MAG + ["+method.space.sparsity.step=0"], [], "method[magnitude].space.sparsity.step: 0 must be > 0"),
    ("step negative", MAG + ["+method.space.sparsity.step=-0.1"], [], "space.sparsity.step: -0.1 must be > 0"),
    ("log with step", MAG + ["+method.space.sparsity.log=true", "+method.space.sparsity.step=0.1"], [],
     "method[magnitude].space.sparsity: log and step cannot be combined"),
    ("choice the method refuses", MAG + ["method.space.distribution.choices=[global,bogus]"], [],
     "method[magnitude].space.distribution: value 'bogus'"),
    ("nan setting", MAG + ["method.settings.sparsity=nan"], [], "sparsity: nan is not a"),
    ("inf number", ["trial.lr=inf"], [], "trial.lr: inf is not a finite number"),
    ("nan bound", MAG, [_set("method.space.sparsity.high", float("nan"))], "space.sparsity.high: nan is not a finite"),
    ("search.seed=abc", ["search.seed=abc"], [], "search.seed: 'abc' is not an integer"),
    ("trial.seed=abc", ["trial.seed=abc"], [], "trial.seed: 'abc' is not an integer"),
    ("precision=bogus", ["trial.precision=bogus"], [], "trial.precision: 'bogus' is not a Lightning precision"),
    ("asha grace 0", ["search.asha.grace_period=0"], [], "search.asha.grace_period: 0 must be >= 1"),
    ("asha factor 1", ["search.asha.reduction_factor=1"], [], "search.asha.reduction_factor: 1 must be > 1"),
    ("asha typo", ["+search.asha.grace=2"], [], "search.asha.grace: unknown key"),
    ("n_startup_trials=-3", ["search.n_startup_trials=-3"], [], "search.n_startup_trials: -3 must be >= 0"),
    ("objective not reported", MAG + ["search.objectives=[{metric: val_fgsm_acc, mode: max}]"], [],
     "search.objectives[0].metric: 'val_fgsm_acc' is not reported by magnitude trials with these settings; "
     "it is measured only with trial.fgsm_epsilon set"),
    ("objective of another method", MAG + ["search.objectives=[{metric: reverted_fraction, mode: max}]"], [],
     "'reverted_fraction' is not reported by magnitude trials"),
    ("objective on the test split", MAG + ["search.objectives=[{metric: test_acc, mode: max}, {metric: flops_deployed, mode: min}]"],
     [], "search.objectives[0].metric: 'test_acc' is measured on the test split, which a search must not select on"),
    ("text objective on the test split", MAG + ["search.objectives=[{metric: test_ppl, mode: min}]"], [],
     "search.objectives[0].metric: 'test_ppl' is measured on the test split"),
    ("unknown trial key", ["+trial.epoch=3"], [], "trial.epoch: unknown key"),
    ("unknown data key", ["+data.batchsize=3"], [], "data.batchsize: unknown key for data set 'digits'"),
    ("unknown model key", ["+model.depth=3"], [], "model.depth: unknown key for model 'mlp'"),
    ("custom without target", CUSTOM, [], "model._target_: required with model=custom"),
    ("target does not import", CUSTOM + ["model._target_=no_such_pkg_xyz.Net"], [],
     "model._target_ 'no_such_pkg_xyz.Net' could not be imported"),
    ("target not a module", CUSTOM + ["model._target_=tests.user_code.not_a_module"], [],
     "model._target_=tests.user_code.not_a_module: returned str, not a torch.nn.Module"),
    ("constructor raises", CUSTOM + ["model._target_=tests.user_code.RaisingNet"], [],
     "model._target_=tests.user_code.RaisingNet raised RuntimeError: my net cannot be built"),
    ("wrong output shape", CUSTOM + ["model._target_=tests.user_code.ThreeLogits"], [],
     "model._target_=tests.user_code.ThreeLogits: output (4, 3) for a batch of shape (4, 1, 8, 8); expected (4, 10)"),
    ("key the target refuses", CUSTOM + ["model._target_=tests.user_code.PlainNet", "+model.depth=3"], [],
     "model._target_=tests.user_code.PlainNet: does not accept ['depth']"),
    ("data target does not import", ["data=custom", "data._target_=no_such_pkg_xyz.data"], [],
     "data._target_ 'no_such_pkg_xyz.data' could not be imported"),
    ("data target returns junk", ["data=custom", "data._target_=tests.user_code.not_a_module",
                                  "+data.num_classes=3"], [], "data._target_=tests.user_code.not_a_module"),
    ("module never logs the objective", MAG + CUSTOM + ["model._target_=tests.user_code.PlainNet",
                                                  "module._target_=tests.user_code.F1Module"], [],
     "search.objectives[0].metric: 'val_acc' is not reported by magnitude trials with these settings; "
     "module._target_=tests.user_code.F1Module logged ['val_f1', 'val_loss']"),
    ("unreachable server", ["tracking=mlflow_server"], [_set("tracking.uri", lambda t: f"http://127.0.0.1:{free_port()}")],
     "tracking.uri: MLflow tracking server http://127.0.0.1:"),
    ("unsupported uri", [], [_set("tracking.uri", "ftp://example.org/store")],
     "tracking.uri: 'ftp://example.org/store': scheme 'ftp' is not supported"),
    ("corrupt sqlite", [], [_set("tracking.uri", _corrupt_db)], "is not a readable SQLite database"),
    ("sqlite of something else", [], [_set("tracking.uri", _foreign_db)], "is an SQLite database but not an MLflow store"),
    ("resume_dir without a sweep", ["search.resume=true"], [_set("search.resume_dir", _empty_dir)],
     "not_a_sweep holds no sweep (no sweep.json)"),
    ("empty space", MAG, [_set("method.space", {})], "method[magnitude].space: empty, so all 10 trials"),
    ("more CPUs than exist", ["trial.cpus=4096"], [], "trial.cpus: 4096 CPUs per trial, but this machine has"),
    ("a GPU that is not there", ["trial.gpus=64"], [], "trial.gpus: 64 GPUs per trial, but this machine has"),
    ("unwritable storage", [], [_set("search.storage", "/proc/prunesearch-storage")],
     "search.storage: '/proc/prunesearch-storage' cannot be written"),
    ("unknown method in pool", ["search.methods=[magnitude,nope]"], [], "search.methods: ['nope'] not found"),
    ("in-memory tracking store", [], [_set("tracking.uri", "sqlite:///:memory:")],
     "tracking.uri: 'sqlite:///:memory:': an in-memory store keeps nothing after the sweep; give a file"),
    ("file store URI", [], [_set("tracking.uri", lambda t: f"file://{t}/mlruns")],
     "MLflow 3 no longer accepts the file store as a tracking backend; use sqlite:////"),
    ("plain path as tracking store", [], [_set("tracking.uri", lambda t: str(t / "mlruns"))],
     "/mlruns/mlflow.db"),
    ("in-memory Optuna store", [], [_set("search.optuna_storage", "sqlite:///:memory:")],
     "search.optuna_storage: 'sqlite:///:memory:': an in-memory store keeps nothing after the sweep"),
    ("n_trials a float", [], [_set("search.n_trials", 3.5)], "search.n_trials: 3.5 must be an integer between 1 and"),
    ("n_trials a whole float", [], [_set("search.n_trials", 3.0)], "search.n_trials: 3.0 must be an integer"),
    ("n_trials too many", ["search.n_trials=100001"], [], "search.n_trials: 100001 must be an integer between 1 and 100000"),
    ("resume_accept not a list", ["search.resume_accept=model.name"], [], "search.resume_accept: expected a list"),
]


@pytest.mark.parametrize("overrides, mutations, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_anything_starts(tmp_path, overrides, mutations, fragment):
    import ray

    cfg = compose([*overrides, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    for mutate in mutations:
        mutate(cfg, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, out)
    message = str(err.value)
    assert fragment in message, message
    assert "\n" not in message  # one line
    assert not ray.is_initialized()  # nothing started
    assert not (tmp_path / "mlflow.db").exists()  # nothing tracked
    assert not (out / "ray").exists() and not (out / "trials").exists()


@pytest.mark.parametrize("overrides, fragment", [
    (["model=custom", "model._target_=no_such_pkg_xyz.Net"], "config error: model._target_ 'no_such_pkg_xyz.Net'"),
    (["+method=magnitude", "search.objectives=[{metric: val_fgsm_acc, mode: max}]"], "'val_fgsm_acc' is not reported"),
])
def test_cli_refusal_is_one_line_with_exit_2(tmp_path, overrides, fragment):
    proc = subprocess.run([sys.executable, "-m", "search", *overrides, f"hydra.run.dir={tmp_path}/run",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run" / "ray").exists()


def test_a_trial_kind_or_method_declares_the_metrics_it_reports():
    cfg = compose(["+method=magnitude", "search.objectives=[{metric: val_acc, mode: max}, {metric: tokens_per_s, mode: max}]"])
    with pytest.raises(ConfigError, match="'tokens_per_s' is not reported by magnitude trials"):
        preflight(cfg, build=False, open_stores=False)
    kinds = list(TRIAL_KINDS)
    try:
        register_trial_kind(TrialKind("throughput", lambda cls: cls.name == "magnitude",
                                      lambda c, logged: {"val_acc", "tokens_per_s"}))
        assert "tokens_per_s" in reported_metrics(cfg, "magnitude")
        preflight(cfg, build=False, open_stores=False)  # now accepted
    finally:
        TRIAL_KINDS[:] = kinds
    assert "val_fgsm_acc" in reported_metrics(compose(["+method=magnitude", "trial.fgsm_epsilon=0.1"]), "magnitude")


def test_a_good_config_passes_and_reads_the_data(tmp_path):
    result = preflight(compose(["+method=magnitude", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]), tmp_path)
    assert result.input_shape == (1, 8, 8) and result.num_classes == 10
    assert result.optuna_storage == f"sqlite:///{tmp_path}/optuna.db"  # beside the MLflow store
    assert not (tmp_path / "mlflow.db").exists()  # checked, not created
    import optuna

    optuna.storages.RDBStorage(result.optuna_storage)  # an existing Optuna store is accepted again
    preflight(compose(["+method=magnitude", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]), tmp_path, build=False)
