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


# ------------------------------------------------------------------------------------------------
# Vector entries (``size: N``): a per-layer vector searched entry by entry (issue 27 item 2)
# ------------------------------------------------------------------------------------------------
PER_LAYER = {"name": "llm_structured", "settings": {"ffn_sparsity": 0.5, "allocation": "uniform", "ffn_fractions": None},
             "space": {"allocation": {"type": "categorical", "choices": ["uniform", "per_layer"]},
                       "ffn_fractions": {"type": "float", "low": 0.1, "high": 0.6, "size": 4,
                                         "when": {"allocation": "per_layer"}},
                       "rounds": {"type": "int", "low": 1, "high": 3, "size": 2}}}


def test_a_sized_entry_parses_into_a_vector_of_named_optuna_parameters():
    dims = {d.key: d for d in parse_space("llm_structured", PER_LAYER["space"])}
    assert dims["ffn_fractions"].size == 4 and dims["allocation"].size is None
    assert dims["ffn_fractions"].when == {"allocation": "per_layer"}
    dists = SearchSpace({"llm_structured": PER_LAYER}, pinned=True).distributions("llm_structured")
    assert list(dists) == ["llm_structured.allocation", *[f"llm_structured.ffn_fractions.{i}" for i in range(4)],
                           "llm_structured.rounds.0", "llm_structured.rounds.1"]
    assert dists["llm_structured.ffn_fractions.3"] == optuna.distributions.FloatDistribution(0.1, 0.6)
    assert dists["llm_structured.rounds.1"] == optuna.distributions.IntDistribution(1, 3)
    # The probes a pre-flight builds the method with: each end of the vector at its length, and a
    # choice comes with the vector it switches on.
    probes = dict(SearchSpace({"llm_structured": PER_LAYER}, pinned=True).spaces["llm_structured"].probes())
    assert probes["method[llm_structured].space.ffn_fractions: value [0.6] x 4"]["ffn_fractions"] == [0.6] * 4
    assert probes["method[llm_structured].space.allocation: value 'per_layer'"]["ffn_fractions"] == [0.1] * 4
    assert probes["method[llm_structured].space.allocation: value 'uniform'"]["ffn_fractions"] is None


@pytest.mark.parametrize("entry, fragment", [
    ({"type": "float", "low": 0, "high": 1, "size": 0}, "space.v.size: 0 must be an integer >= 1"),
    ({"type": "float", "low": 0, "high": 1, "size": 2.5}, "space.v.size: 2.5 must be an integer >= 1"),
    ({"type": "int", "low": 0, "high": 1, "size": True}, "space.v.size: True must be an integer >= 1"),
    ({"type": "float", "low": 0, "high": 1, "size": "4"}, "space.v.size: '4' must be an integer >= 1"),
    ({"type": "categorical", "choices": ["a", "b"], "size": 3}, "space.v.size: only a float or int entry"),
])
def test_bad_vector_sizes_name_the_key(entry, fragment):
    with pytest.raises(ConfigError) as err:
        parse_space("m", {"v": entry})
    assert fragment in str(err.value) and str(err.value).startswith("method[m].space.v")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^method\[m\]\.space\.trial\.finetune_epochs\.size: trial settings"):
        parse_space("m", {"trial.finetune_epochs": {"type": "int", "low": 0, "high": 2, "size": 2}})


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(3), optuna.samplers.TPESampler(seed=3, n_startup_trials=4)])
def test_a_vector_is_suggested_entry_by_entry_and_reaches_the_settings_as_a_list(sampler):
    space = SearchSpace({"llm_structured": PER_LAYER}, pinned=True)
    study = optuna.create_study(directions=["minimize"], sampler=sampler)
    vectors = []
    for _ in range(12):
        trial = study.ask()
        assert space(trial) == {"method": "llm_structured"}
        params = {"method": "llm_structured", **trial.params}
        method, settings, overrides = settings_from_params(space, params)
        assert method == "llm_structured" and not overrides
        assert isinstance(settings["rounds"], list) and len(settings["rounds"]) == 2
        assert all(isinstance(r, int) and 1 <= r <= 3 for r in settings["rounds"])
        per_layer = trial.params["llm_structured.allocation"] == "per_layer"
        # `when:` gates the vector as a whole: all its entries or none of them.
        assert sum(k.startswith("llm_structured.ffn_fractions.") for k in trial.params) == (4 if per_layer else 0)
        if per_layer:
            fr = settings["ffn_fractions"]
            assert isinstance(fr, list) and len(fr) == 4 and all(0.1 <= f <= 0.6 for f in fr)
            assert fr == [trial.params[f"llm_structured.ffn_fractions.{i}"] for i in range(4)]
            vectors.append(fr)
            assert space.spaces["llm_structured"].active_settings(settings)["ffn_fractions"] == fr
        else:
            assert settings["ffn_fractions"] is None  # the fixed setting, and inactive
            assert "ffn_fractions" not in space.spaces["llm_structured"].active_settings(settings)
        study.tell(trial, sum(settings["ffn_fractions"] or [0.5]))
    assert len(vectors) >= 2 and len({tuple(v) for v in vectors}) == len(vectors)
    assert any(len(set(v)) > 1 for v in vectors)  # entries sampled independently, not one value repeated


def test_a_vector_given_whole_or_with_an_entry_missing():
    space = SearchSpace({"llm_structured": PER_LAYER}, pinned=True)
    _, settings, _ = settings_from_params(space, {"method": "llm_structured", "llm_structured.allocation": "per_layer",
                                                  "llm_structured.ffn_fractions": [0.2, 0.3, 0.4, 0.5]})
    assert settings["ffn_fractions"] == [0.2, 0.3, 0.4, 0.5]
    with pytest.raises(ConfigError, match=r"^method\[llm_structured\]\.space\.ffn_fractions: the trial's parameters "
                                          r"hold only some of its 4 entries"):
        settings_from_params(space, {"method": "llm_structured", "llm_structured.ffn_fractions.0": 0.2})
