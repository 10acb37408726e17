"""conf `space:` -> Optuna: one translation, conditionals, and errors that name the key."""

import optuna
import pytest

from search.space import ConfigError, SearchSpace, load_method_configs, parse_space, settings_from_params


def test_every_method_config_parses_and_names_match_files():
    configs = load_method_configs()
    assert {"magnitude", "random", "snip", "gmp", "imp"} <= set(configs)
    space = SearchSpace(configs, pinned=False)
    for name in space.method_names:
        dists = space.distributions(name)
        assert dists and all(k.startswith(f"{name}.") for k in dists)


def test_types_translate_to_optuna_distributions():
    dims = parse_space("x", {
        "sparsity": {"type": "float", "low": 0.1, "high": 0.9},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "rounds": {"type": "int", "low": 1, "high": 4},
        "distribution": {"type": "categorical", "choices": ["global", "uniform"]},
    })
    d = {dim.key: dim.distribution() for dim in dims}
    assert isinstance(d["sparsity"], optuna.distributions.FloatDistribution) and not d["sparsity"].log
    assert d["lr"].log and d["lr"].low == 1e-4
    assert isinstance(d["rounds"], optuna.distributions.IntDistribution) and d["rounds"].high == 4
    assert d["distribution"].choices == ("global", "uniform")


def test_conditional_entries_are_sampled_only_when_their_condition_holds():
    configs = {"imp": load_method_configs()["imp"]}
    space = SearchSpace(configs, pinned=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen = {"weights": 0, "lr": 0}
    for _ in range(30):
        trial = study.ask()
        assert space(trial) == {"method": "imp"}
        rewind = trial.params["imp.rewind"]
        seen[rewind] += 1
        assert ("imp.rewind_epoch" in trial.params) == (rewind == "weights")
        study.tell(trial, [0.5, 1.0])
    assert seen["weights"] and seen["lr"]


def test_unpinned_space_searches_the_method_first():
    configs = load_method_configs()
    space = SearchSpace(configs, pinned=False)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(1))
    methods = set()
    for _ in range(40):
        trial = study.ask()
        assert space(trial) is None
        methods.add(trial.params["method"])
        method, settings, _ = settings_from_params(space, trial.params)
        assert method == trial.params["method"]
        assert set(configs[method]["settings"]) <= set(settings)  # fixed settings come along
        study.tell(trial, [0.5, 1.0])
    assert len(methods) >= 3


def test_sampled_values_override_fixed_settings_and_trial_keys_split_off():
    space = SearchSpace({"gmp": {"name": "gmp", "settings": {"sparsity": 0.5, "distribution": "uniform"},
                                 "space": {"sparsity": {"type": "float", "low": 0.6, "high": 0.7},
                                           "trial.finetune_epochs": {"type": "int", "low": 0, "high": 2}}}},
                        pinned=True)
    method, settings, overrides = settings_from_params(
        space, {"method": "gmp", "gmp.sparsity": 0.65, "gmp.trial.finetune_epochs": 2})
    assert (method, settings, overrides) == ("gmp", {"sparsity": 0.65, "distribution": "uniform"}, {"finetune_epochs": 2})


@pytest.mark.parametrize("space, fragment", [
    ({"sparsity": {"type": "float", "low": 0.5, "high": 1.5}}, "space.sparsity.high: 1.5"),
    ({"sparsity": {"type": "float", "low": -0.1, "high": 0.5}}, "space.sparsity.low: -0.1"),
    ({"k": {"type": "gaussian"}}, "space.k.type"),
    ({"k": {"type": "int", "low": 5, "high": 1}}, "space.k: low (5) is greater than high (1)"),
    ({"k": {"type": "float", "low": 0, "high": 1, "log": True}}, "space.k.low: a log scale"),
    ({"k": {"type": "categorical", "choices": []}}, "space.k.choices"),
    ({"k": {"type": "int", "low": 0, "high": 2, "when": {"later": 1}}}, "space.k.when"),
    ({"k": {"type": "int", "low": 0, "high": 2, "typo": 1}}, "space.k: unknown field"),
])
def test_bad_space_entries_name_the_key(space, fragment):
    with pytest.raises(ConfigError) as err:
        parse_space("m", space)
    assert fragment in str(err.value)


def test_a_pinned_method_can_bring_its_own_objectives():
    from search.config import validate_config
    from search.tuner import objectives_of
    from tests.conftest import compose

    assert objectives_of(compose(["+method=ken"])) == [("val_acc", "max"), ("reverted_fraction", "max")]
    assert objectives_of(compose(["+method=magnitude"])) == [("val_acc", "max"), ("flops_deployed", "min")]
    bad = compose(["+method=ken", "method.objectives.1.metric=nonsense"])
    with pytest.raises(ConfigError, match=r"method.objectives\[1\].metric: 'nonsense'"):
        validate_config(bad)
