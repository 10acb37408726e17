"""Per-layer sparsity distributions: exact global targets, bounds, shapes, and their use.

Allocations are checked against an independent bisection on the water level, mask counts
against the allocation, and a sampled config with a distribution runs one real trial.
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from prunelib import TrainConfig, build_method, prunable_parameters, run_pruning
from prunelib.data import build_datamodule
from prunelib.distributions import DISTRIBUTIONS, LayerDistribution, select_distributed
from prunelib.importance import magnitude_scores
from prunelib.models import build_model
from prunelib.selection import select_masks
from search.config import build_search_space
from search.space import SearchSpace, load_method_configs, settings_from_params
from search.trial import TrialContext, run_trial
from tests.conftest import compose

# Odd sizes, a tiny first layer and a tiny last one, so rounding and clipping both bite.
SIZES = {"stem": 27, "a": 1153, "b": 4099, "c": 2311, "head": 97}
SHAPED = ("uniform", "protect_ends", "depth_increasing")


def water_level_shares(weights: list[float], sizes: list[int], caps: list[int], zeros: float) -> list[float]:
    """Independent reference: bisection on c for sum(min(cap, c * w * n)) = zeros."""
    assert zeros <= sum(caps)
    lo, hi = 0.0, 1.0
    while sum(min(cap, hi * w * n) for w, n, cap in zip(weights, sizes, caps)) < zeros:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(cap, mid * w * n) for w, n, cap in zip(weights, sizes, caps)) < zeros:
            lo = mid
        else:
            hi = mid
    return [min(cap, hi * w * n) for w, n, cap in zip(weights, sizes, caps)]


def counts_of(masks, names) -> dict[str, int]:
    return {n: int((~masks.masks[n]).sum()) for n in names}


@pytest.mark.parametrize("kind", SHAPED + ("global",))
@pytest.mark.parametrize("target", [0.1, 0.5, 0.8, 0.9, 0.95, 0.985])
def test_allocation_averages_to_the_target_exactly_within_bounds(kind, target):
    dist = LayerDistribution(kind, end_protection=0.7, depth_slope=0.8, max_layer_sparsity=0.99)
    total = sum(SIZES.values())
    zeros = round(target * total)
    counts = dist.allocate(SIZES, zeros)
    assert sum(counts.values()) == zeros  # exact integer total, whatever the per-layer rounding
    for n, c in counts.items():
        assert 0 <= c <= math.floor(0.99 * SIZES[n]), n
    sparsities = dist.layer_sparsities(SIZES, target)
    mean = sum(sparsities[n] * SIZES[n] for n in SIZES) / total
    assert mean == pytest.approx(zeros / total, abs=1e-12)
    assert abs(mean - target) <= 0.5 / total


@pytest.mark.parametrize("kind", SHAPED)
@pytest.mark.parametrize("target", [0.3, 0.7, 0.9, 0.97])
def test_shares_match_an_independent_water_level(kind, target):
    dist = LayerDistribution(kind, end_protection=0.6, depth_slope=0.7, max_layer_sparsity=0.98)
    names = list(SIZES)
    zeros = target * sum(SIZES.values())
    caps = dist.layer_caps(SIZES)
    reference = water_level_shares(dist.shape_weights(len(names)), [SIZES[n] for n in names],
                                   [caps[n] for n in names], zeros)
    shares = dist.shares(SIZES, zeros)
    for n, ref in zip(names, reference):
        assert shares[n] == pytest.approx(ref, abs=1e-6), n
    # Integer counts stay within one weight of the real shares.
    counts = dist.allocate(SIZES, round(zeros))
    for n in names:
        assert abs(counts[n] - shares[n]) < 1.0 + 1e-9, n


def test_clipped_layers_pass_their_excess_on_and_the_target_still_holds():
    dist = LayerDistribution("depth_increasing", depth_slope=0.9, max_layer_sparsity=0.95)
    target = 0.9
    s = dist.layer_sparsities(SIZES, target)
    total = sum(SIZES.values())
    # The deepest layers would exceed 0.95 and sit exactly at the cap...
    assert s["head"] == math.floor(0.95 * SIZES["head"]) / SIZES["head"]
    assert s["c"] == math.floor(0.95 * SIZES["c"]) / SIZES["c"]
    # ...and the shallower ones carry the rest: the mean is still the target.
    assert sum(s[n] * SIZES[n] for n in SIZES) == round(target * total)
    assert s["stem"] < s["a"] < s["b"] <= 0.95


def test_protect_ends_keeps_first_and_last_denser_by_the_fraction():
    p = 0.6
    dist = LayerDistribution("protect_ends", end_protection=p)
    s = dist.layer_sparsities(SIZES, 0.5)
    middle = [s[n] for n in ("a", "b", "c")]
    assert max(middle) - min(middle) < 2e-3
    for end in ("stem", "head"):
        # (1 - p) times the middle's rate, up to one weight of rounding in the small layer.
        assert abs(s[end] - (1 - p) * middle[1]) <= 1.0 / SIZES[end] + 1e-3, end


def test_depth_increasing_is_linear_over_depth():
    slope = 0.5
    s = LayerDistribution("depth_increasing", depth_slope=slope).layer_sparsities(SIZES, 0.4)
    names = list(SIZES)
    values = [s[n] for n in names]
    for prev, nxt, n in zip(values, values[1:], names[1:]):
        assert nxt >= prev - 1.0 / SIZES[n], n
    assert values[-1] / values[0] == pytest.approx((1 + slope) / (1 - slope), rel=0.06)
    # Equal steps between consecutive layers (depth is the index, not the size).
    steps = [b - a for a, b in zip(values[1:-1], values[2:-1])]
    assert max(steps) - min(steps) < 2e-3


@pytest.mark.parametrize("kind, shape", [("protect_ends", {"end_protection": 0.0}),
                                         ("depth_increasing", {"depth_slope": 0.0})])
def test_a_flat_shape_is_uniform(kind, shape):
    flat = LayerDistribution(kind, **shape).allocate(SIZES, 6000)
    assert flat == LayerDistribution("uniform").allocate(SIZES, 6000)


def test_min_density_and_the_cap_bound_every_layer():
    dist = LayerDistribution("depth_increasing", depth_slope=0.9)
    s = dist.layer_sparsities(SIZES, 0.6, min_density=0.3)
    assert max(s.values()) <= 0.7 + 1e-12
    assert sum(s[n] * SIZES[n] for n in SIZES) == round(0.6 * sum(SIZES.values()))


def test_impossible_targets_and_bad_settings_are_explained():
    with pytest.raises(ValueError, match="max_layer_sparsity"):
        LayerDistribution("uniform", max_layer_sparsity=0.9).layer_sparsities(SIZES, 0.95)
    with pytest.raises(ValueError, match="distribution must be one of"):
        LayerDistribution("erk")
    with pytest.raises(ValueError, match="depth_slope"):
        LayerDistribution("depth_increasing", depth_slope=1.0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        build_method("magnitude", distribution="triangle")


# -- selection and methods ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=256, batch_size=64)


def lenet(dm) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lenet5", dm.input_shape, dm.num_classes)  # 5 layers: a real middle


@pytest.mark.parametrize("kind", SHAPED)
def test_select_distributed_masks_follow_the_allocation(dm, kind):
    net = lenet(dm)
    params = prunable_parameters(net)
    sizes = {n: p.numel() for n, p in params.items()}
    dist = LayerDistribution(kind, end_protection=0.5, depth_slope=0.6)
    masks = select_distributed(net, magnitude_scores(net), 0.85, dist)
    assert counts_of(masks, sizes) == dist.allocate(sizes, round(0.85 * sum(sizes.values())))
    # Within a layer the cut is still by magnitude.
    for n in sizes:
        w = params[n].detach().abs()
        if (~masks.masks[n]).any() and masks.masks[n].any():
            assert w[~masks.masks[n]].max() <= w[masks.masks[n]].min(), n


def test_global_distribution_is_the_global_ranking(dm):
    net = lenet(dm)
    scores = magnitude_scores(net)
    legacy = select_masks(net, scores, 0.7, scope="global")
    ranked = select_distributed(net, scores, 0.7, LayerDistribution("global", max_layer_sparsity=1.0))
    for n in legacy.names():
        assert torch.equal(legacy.masks[n], ranked.masks[n]), n


METHOD_CASES = {
    "magnitude": {},
    "random": {"at": "init"},
    "snip": {},
    "gmp": {},
    "imp": {"rounds": 2},
    "bingo": {"probe_every_n_steps": 2},
    "gap": {"num_partitions": 2, "epochs_per_step": 1},
}


@pytest.mark.parametrize("method", list(METHOD_CASES))
@pytest.mark.parametrize("kind", ["protect_ends", "depth_increasing"])
def test_methods_with_a_global_target_follow_the_distribution(dm, method, kind):
    net = lenet(dm)
    sizes = {n: p.numel() for n, p in prunable_parameters(net).items()}
    target = 0.8
    settings = {"sparsity": target, "distribution": kind, "end_protection": 0.5, "depth_slope": 0.5,
                **METHOD_CASES[method]}
    result = run_pruning(net, dm, build_method(method, **settings),
                         TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"))
    total = sum(sizes.values())
    removed = counts_of(result.masks, sizes)
    assert sum(removed.values()) == round(target * total)
    expected = LayerDistribution(kind, 0.5, 0.5).allocate(sizes, round(target * total))
    for n in sizes:
        # Iterative methods reach the final counts through earlier masks: one weight of slack.
        assert abs(removed[n] - expected[n]) <= 1, (n, removed[n], expected[n])


def test_global_and_uniform_are_the_retired_scopes_and_scope_is_refused(dm):
    # scope="global" was one ranking, scope="layer" the same sparsity per layer.
    for scope, kind in (("global", "global"), ("layer", "uniform")):
        a, b = lenet(dm), lenet(dm)
        old = select_masks(a, magnitude_scores(a), 0.75, scope=scope)
        new = build_method("magnitude", sparsity=0.75, distribution=kind, max_layer_sparsity=1.0).finalize(b)
        for n in old.names():
            assert torch.equal(old.masks[n], new.masks[n]), (scope, n)
    for method in ("magnitude", "random", "snip", "gmp", "imp", "bingo", "gap"):
        with pytest.raises(TypeError, match="scope"):
            build_method(method, scope="global")
    # The default layer cap keeps every layer alive under a global ranking.
    net = lenet(dm)
    masks = build_method("magnitude", sparsity=0.97).finalize(net)
    assert all(float(m.float().mean()) >= 0.01 - 1e-9 for m in masks.masks.values())


# -- search space ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "random", "snip", "gmp", "imp", "gap"])
def test_every_global_target_method_searches_a_distribution_with_conditional_shapes(method):
    space = SearchSpace({method: load_method_configs()[method]}, pinned=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        kind = trial.params[f"{method}.distribution"]
        seen.add(kind)
        assert (f"{method}.end_protection" in trial.params) == (kind == "protect_ends")
        assert (f"{method}.depth_slope" in trial.params) == (kind == "depth_increasing")
        study.tell(trial, [0.5, 1.0])
    assert seen == set(DISTRIBUTIONS)


def test_a_sampled_config_with_a_distribution_runs_one_trial(tmp_path):
    cfg = compose(["+method=magnitude", "data.limit_train=256", "trial.epochs=1", "trial.finetune_epochs=1"])
    space = build_search_space(cfg)
    params = {"magnitude.sparsity": 0.7, "magnitude.distribution": "depth_increasing",
              "magnitude.depth_slope": 0.2}
    fixed = optuna.trial.FixedTrial(params)
    assert space(fixed) == {"method": "magnitude"}
    sampled = {"method": "magnitude", **params}
    method, settings, _ = settings_from_params(space, sampled)
    assert settings["distribution"] == "depth_increasing" and settings["depth_slope"] == 0.2
    ctx = TrialContext(data=dict(cfg["data"]), model=dict(cfg["model"]), trial=dict(cfg["trial"]),
                       space=space, objectives=[("val_acc", "max"), ("flops_effective", "min")])
    row = run_trial(sampled, ctx, trial_id="dist", trial_dir=tmp_path)
    assert abs(row["sparsity"] - 0.7) < 1e-3
    assert row["param.distribution"] == "depth_increasing"
    import json

    layers = json.loads((tmp_path / "layer_sparsity.json").read_text())
    values = list(layers.values())  # the mlp's three layers, shallow to deep
    assert values[0] < values[1] < values[2]
