"""Schedules and exact-count selection: every target is hit whatever the layer rounding."""

import pytest
import torch
from torch import nn

from prunelib.importance import magnitude_scores, random_scores
from prunelib.masks import sparsity_report
from prunelib.schedules import Cubic, IterativeRounds, OneShot
from prunelib.selection import largest_remainder, select_masks


def odd_net() -> nn.Module:
    torch.manual_seed(0)
    # Layer sizes chosen so that per-layer rounding cannot hit round targets by luck.
    return nn.Sequential(nn.Conv2d(3, 7, 3), nn.Conv2d(7, 5, 1), nn.Flatten(),
                         nn.Linear(5 * 9, 13), nn.Linear(13, 3))


def test_one_shot():
    s = OneShot(0.8, at_step=5)
    assert s.target_at(4) is None and s.target_at(5) == 0.8 and s.target_at(6) is None
    with pytest.raises(ValueError):
        OneShot(1.0)


def test_cubic_ramp_shape_and_end():
    s = Cubic(0.9, start_step=10, n_updates=4, frequency=5)
    targets = {t: s.target_at(t) for t in range(0, 40)}
    updates = {t: v for t, v in targets.items() if v is not None}
    assert sorted(updates) == [15, 20, 25, 30]
    assert updates[30] == pytest.approx(0.9)
    values = [updates[t] for t in sorted(updates)]
    assert values == sorted(values)
    # cubic: most of the pruning happens early
    assert updates[15] > 0.9 / 4
    assert s.sparsity_at(15) == pytest.approx(0.9 * (1 - (1 - 0.25) ** 3))


def test_cubic_fit_to_short_runs():
    s = Cubic.fit_to(0.8, total_steps=3, n_updates=10)
    assert s.end_step <= 3
    assert s.target_at(s.end_step) == pytest.approx(0.8)


def test_iterative_rounds():
    s = IterativeRounds(0.8, rounds=3)
    got = [s.target_at(r) for r in (1, 2, 3)]
    assert got[-1] == 0.8
    assert 1 - got[0] == pytest.approx(0.2 ** (1 / 3))
    assert s.target_at(4) is None
    assert s.per_round_fraction == pytest.approx(1 - 0.2 ** (1 / 3))


def test_largest_remainder_sums_exactly():
    counts = largest_remainder({"a": 2.5, "b": 2.5, "c": 1.0}, 6, {"a": 10, "b": 10, "c": 10})
    assert sum(counts.values()) == 6


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("target", [0.1, 0.5, 0.8, 0.9, 0.97])
def test_selection_hits_target_exactly(scope, target):
    net = odd_net()
    masks = select_masks(net, magnitude_scores(net), target, scope=scope)
    masks.apply(net)
    achieved = sparsity_report(net)["global"]["sparsity"]
    assert abs(achieved - target) < 1e-3  # within 0.1 percentage point


def test_layer_scope_gives_each_layer_the_target():
    net = odd_net()
    masks = select_masks(net, magnitude_scores(net), 0.5, scope="layer")
    for name, s in masks.layer_sparsity(net).items():
        assert s == pytest.approx(0.5, abs=1.0 / net.get_parameter(name).numel()), name


def test_global_scope_prunes_the_smallest_magnitudes():
    net = odd_net()
    scores = magnitude_scores(net)
    masks = select_masks(net, scores, 0.6)
    kept = torch.cat([scores[n][masks.masks[n]] for n in scores])
    pruned = torch.cat([scores[n][~masks.masks[n]] for n in scores])
    assert pruned.max() <= kept.min()


def test_min_density_prevents_layer_collapse():
    net = odd_net()
    scores = magnitude_scores(net)
    scores["3.weight"] = scores["3.weight"] * 1e-6  # a layer every global ranking would empty
    masks = select_masks(net, scores, 0.6, min_density=0.1)
    assert masks.kept_fraction("3.weight") >= 0.1
    masks.apply(net)
    assert abs(sparsity_report(net)["global"]["sparsity"] - 0.6) < 1e-3


def test_previous_masks_are_kept_pruned():
    net = odd_net()
    first = select_masks(net, random_scores(net, seed=1), 0.5)
    second = select_masks(net, magnitude_scores(net), 0.7, previous=first)
    for n in first.names():
        assert not torch.any(second.masks[n] & ~first.masks[n])


def test_impossible_target_is_explained():
    net = odd_net()
    with pytest.raises(ValueError, match="min_density"):
        select_masks(net, magnitude_scores(net), 0.95, min_density=0.5)


def test_layer_scope_with_an_unscored_layer_still_hits_the_global_target():
    net = odd_net()
    scores = {n: t for n, t in magnitude_scores(net).items() if n != "4.weight"}  # the classifier stays dense
    masks = select_masks(net, scores, 0.8, scope="layer")
    masks.apply(net)
    assert abs(sparsity_report(net)["global"]["sparsity"] - 0.8) < 1e-3
    layer = sparsity_report(net)["layers"]
    assert layer["4.weight"]["sparsity"] == 0.0
    scored = [layer[n]["sparsity"] for n in scores]
    assert max(scored) - min(scored) < 0.05  # the extra pruning is shared evenly
