"""search.settings: every group typed and checked once, one default per setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from search.settings import (ClusterSettings, SearchSettings, SweepSettings, TrackingSettings, TrialSettings,
                             register_schemas)
from search.space import ConfigError, conf_dir
from tests.conftest import compose


def test_a_composed_config_parses_into_typed_groups():
    settings = SweepSettings.from_dict(compose(["+method=magnitude", "search.scheduler=mo_asha"]))
    assert isinstance(settings.search, SearchSettings) and settings.search.n_trials == 10
    assert settings.search.scheduler_kind == "mo_asha" and settings.search.rungs.grace_period == 2
    assert isinstance(settings.trial, TrialSettings) and settings.trial.finetune_epochs == 3
    assert settings.objectives == (("val_acc", "max"), ("flops_deployed", "min"))
    assert settings.budget is None and settings.cluster.kind == "local" and settings.tracking.kind == "sqlite"


@pytest.mark.parametrize("override, message", [
    ("trial.epochs=0", "trial.epochs: 0 must be >= 1"),
    ("search.seed=abc", "search.seed: 'abc' is not an integer"),
    ("search.n_trials=0", "search.n_trials: 0 must be an integer between 1 and 100000"),
    ("search.asha.grace_period=0", "search.asha.grace_period: 0 must be >= 1"),
    ("search.scheduler=hyperband", "search.scheduler: 'hyperband' is not one of"),
    ("search.budget.amount=10 search.budget.unit=gpu_seconds", "search.budget.unit: gpu_seconds, but trial.gpus is 0"),
    ("+trial.nope=1", "trial.nope: unknown key; trial takes"),
    ("+search.asha.nope=1", "search.asha.nope: unknown key; search.asha takes"),
    ("+tracking.nope=1", "tracking.nope: unknown key; tracking takes"),
    ("+cluster.nope=1", "cluster.nope: unknown key; cluster takes"),
    ("+module.nope=1", "module.nope: unknown key; module takes ['_target_']"),
    ("search.resume_accept=['']", "search.resume_accept: expected a list of dotted keys, got ['']"),
])
def test_a_bad_value_is_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError) as err:
        SweepSettings.from_dict(compose(["+method=magnitude", *override.split()]))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_each_group_is_checked_once(monkeypatch):
    import search.budget
    import search.rungs

    calls = {"scheduler_kind": 0, "rung_settings": 0, "budget": 0}
    for name in ("scheduler_kind", "rung_settings"):
        real = getattr(search.rungs, name)

        def counted(raw, real=real, name=name):  # noqa: ANN001, ANN202
            calls[name] += 1
            return real(raw)
        monkeypatch.setattr(search.rungs, name, counted)
    real_budget = search.budget.Budget.from_config.__func__

    def counted_budget(cls, raw, trial=None):  # noqa: ANN001, ANN202
        calls["budget"] += 1
        return real_budget(cls, raw, trial)
    monkeypatch.setattr(search.budget.Budget, "from_config", classmethod(counted_budget))
    from search.preflight import preflight

    preflight(compose(["+method=magnitude"]), build=False, open_stores=False)
    assert calls == {"scheduler_kind": 1, "rung_settings": 1, "budget": 1}


def test_a_user_module_keeps_its_own_keys():
    settings = SweepSettings.from_dict(compose(["+method=magnitude", "module._target_=my_pkg.Module",
                                                "+module.hidden=64"]))
    assert settings.module.target == "my_pkg.Module" and settings.module.options == {"hidden": 64}


def test_train_config_fields_are_trial_keys_kept_typed():
    settings = TrialSettings.from_dict({"epochs": 2, "val_every_n_epochs": 1})
    assert settings.train_options == {"val_every_n_epochs": 1}
    with pytest.raises(ConfigError, match="trial.val_every_n_epochs: 'x' is not an integer"):
        TrialSettings.from_dict({"epochs": 2, "val_every_n_epochs": "x"})


def _defaults(schema: type) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.init and "check" in f.metadata:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = value.to_dict() if dataclasses.is_dataclass(value) else value
    return out


@pytest.mark.parametrize("path, key, schema", [
    ("config.yaml", "trial", TrialSettings),
    ("search/mo_tpe.yaml", None, SearchSettings),
    ("tracking/mlflow_sqlite.yaml", None, TrackingSettings),
    ("cluster/local.yaml", None, ClusterSettings),
])
def test_the_yaml_holds_values_only_and_they_are_the_defaults(path, key, schema):
    """One default per setting: the YAML's values are the dataclass's, and the YAML holds no
    schema (types, ranges, choices) of its own."""
    raw = yaml.safe_load((Path(conf_dir()) / path).read_text())
    section = raw[key] if key else {k: v for k, v in raw.items() if k != "defaults"}
    assert all(not isinstance(v, dict) or set(v) <= {"enabled", "grace_period", "reduction_factor", "tie_break",
                                                     "amount", "unit"} for v in section.values())
    defaults = _defaults(schema)
    for name, value in section.items():
        assert name in defaults, f"{path}: {name} is no field of {schema.__name__}"
        if isinstance(value, dict):
            assert {k: v for k, v in defaults[name].items() if k in value} == value, (path, name)
        else:
            assert defaults[name] == value, (path, name, defaults[name], value)


def test_schemas_register_in_hydras_config_store():
    from hydra.core.config_store import ConfigStore

    register_schemas()
    repo = ConfigStore.instance().repo
    assert "base_search.yaml" in repo["search"] and "base_tracking.yaml" in repo["tracking"]
    node = repo["search"]["base_search.yaml"].node
    assert node["n_trials"] == 10 and node["asha"]["grace_period"] == 2


def _count_parses(monkeypatch) -> list[int]:  # noqa: ANN001
    """Count SweepSettings.from_dict calls in this process (a Ray worker's own are not counted)."""
    calls = [0]
    real = SweepSettings.from_dict.__func__

    def counted(cls, cfg):  # noqa: ANN001, ANN202
        calls[0] += 1
        return real(cls, cfg)
    monkeypatch.setattr(SweepSettings, "from_dict", classmethod(counted))
    return calls


def test_the_preflight_parses_once_and_its_settings_are_the_final_config(monkeypatch, tmp_path):
    """The pre-flight's edits (absolute paths, the method pool, measure_latency for a latency
    budget) reach the typed settings without a second parse: they equal a parse of its dict."""
    from search.preflight import preflight

    calls = _count_parses(monkeypatch)
    cfg = compose(["search.storage=rel/store", f"search.resume_dir={tmp_path}",
                   "search.constraints=['latency_ms <= 20']"])
    pre = preflight(cfg, build=False, open_stores=False)
    assert calls == [1]
    settings = pre.settings
    assert settings.search.storage == str(Path("rel/store").absolute()) == pre.cfg["search"]["storage"]
    assert settings.method_pool and set(settings.method_pool) == set(pre.cfg["method_pool"])
    assert settings.trial.measure_latency is True and pre.cfg["trial"]["measure_latency"] is True
    assert settings == SweepSettings.from_dict(pre.cfg)


@pytest.mark.slow
def test_a_sweep_parses_its_config_once(monkeypatch, tmp_path):
    """run_sweep parses the config once in the driver (the pre-flight's parse, handed on to the
    tuner, the identity, the stores and the report)."""
    import ray

    from search.tuner import run_sweep

    calls = _count_parses(monkeypatch)
    cfg = compose(["+method=magnitude", "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=200",
                   "search.concurrency=1", "search.n_trials=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   "tracking.log_model=false", "tracking.system_metrics_s=0"])
    try:
        result = run_sweep(cfg, tmp_path / "out")
    finally:
        ray.shutdown()
    assert len(result.rows) == 1 and result.rows[0]["status"] == "ok"
    assert calls == [1]
