"""GaP (grow-and-prune): its schedule, its partitions, and full runs on digits.

The runs check what the method promises against the weights themselves: every group ends at
its target, exactly one group is dense during each step while the others' masks hold, grown
weights restart from zero and do regrow.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch

from prunelib import TrainConfig, build_method, prunable_parameters, run_pruning
from prunelib.data import build_datamodule
from prunelib.distributions import LayerDistribution
from prunelib.methods.gap import GrowAndPrune, balanced_partitions
from prunelib.models import build_model
from prunelib.schedules import GrowPruneCycles


# -- schedule and partitions ----------------------------------------------------------------

def test_cycles_grow_each_partition_in_turn():
    s = GrowPruneCycles(0.8, num_partitions=3, rounds=2, epochs_per_step=2)
    assert s.total_steps == 6 and s.growth_epochs == 12
    assert [s.grown_partition(k) for k in range(1, 7)] == [0, 1, 2, 0, 1, 2]
    assert [s.target_at(k) for k in range(0, 8)] == [None] + [0.8] * 6 + [None]
    with pytest.raises(ValueError):
        s.grown_partition(7)
    for bad in ({"num_partitions": 0}, {"rounds": 0}, {"epochs_per_step": 0}):
        with pytest.raises(ValueError):
            GrowPruneCycles(0.8, **bad)
    with pytest.raises(ValueError):
        GrowPruneCycles(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partitions_are_contiguous_and_minimise_the_largest_group(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(v) for v in torch.randint(1, 1000, (7,), generator=gen)]
    for k in range(1, 8):
        groups = balanced_partitions(sizes, k)
        assert [i for g in groups for i in g] == list(range(7)) and all(groups)
        largest = max(sum(sizes[i] for i in g) for g in groups)
        # Brute force over every way to cut 7 layers into k contiguous groups.
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, 7)))
                   for cuts in itertools.combinations(range(1, 7), k - 1))
        assert largest == best
    with pytest.raises(ValueError):
        balanced_partitions(sizes, 8)


def test_plan_lists_one_phase_per_step_then_the_finetune():
    gap = GrowAndPrune(0.8, num_partitions=3, rounds=2, epochs_per_step=2)
    phases = gap.plan(epochs=10, finetune_epochs=3)
    assert [p.name for p in phases] == [f"step{k}" for k in range(1, 7)] + ["finetune"]
    assert [p.epochs for p in phases] == [2] * 6 + [3]
    # One cosine over the 12 growth epochs: each step starts where the previous one ended.
    assert [p.lr_start_epoch for p in phases[:-1]] == [0, 2, 4, 6, 8, 10]
    assert {p.lr_total_epochs for p in phases[:-1]} == {12}
    assert not phases[-1].prunes
    restart = GrowAndPrune(0.8, num_partitions=3, lr_schedule="restart").plan(3, 0)
    assert [(p.lr_start_epoch, p.lr_total_epochs) for p in restart] == [(0, None)] * 3
    # epochs_per_step=None spreads the trial's epochs over the steps.
    fitted = GrowAndPrune(0.8, num_partitions=2, rounds=2, epochs_per_step=None).plan(9, 1)
    assert [p.epochs for p in fitted] == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"sparsity": 1.0}, "sparsity"), ({"distribution": "erk"}, "distribution"),
    ({"lr_schedule": "step"}, "lr_schedule"), ({"rounds": 0}, "rounds"),
    ({"epochs_per_step": 0}, "epochs_per_step"), ({"partitions": [[]]}, "partitions"),
])
def test_bad_settings_name_the_setting(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        GrowAndPrune(**kwargs)


# -- runs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=256, batch_size=64)


def model_of(dm, name: str = "mlp") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, dm.input_shape, dm.num_classes)


def cfg(finetune: int = 1) -> TrainConfig:
    return TrainConfig(epochs=3, finetune_epochs=finetune, accelerator="cpu")


def removed(masks, names) -> int:
    return sum(int((~masks.masks[n]).sum()) for n in names)


@pytest.mark.parametrize("distribution", ["uniform", "global", "depth_increasing"])
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_gap_ends_at_the_target_in_every_group(dm, distribution, sparsity):
    model = model_of(dm)
    gap = GrowAndPrune(sparsity, num_partitions=2, rounds=2, epochs_per_step=1, distribution=distribution)
    result = run_pruning(model, dm, gap, cfg())
    params = prunable_parameters(model)
    sizes = {n: p.numel() for n, p in params.items()}
    total = sum(sizes.values())
    assert len(gap.groups) == 2 and sorted(n for g in gap.groups for n in g) == sorted(sizes)
    if distribution == "depth_increasing":
        layer_zeros = LayerDistribution(distribution).allocate(sizes, round(sparsity * total))
    for group in gap.groups:
        group_size = sum(sizes[n] for n in group)
        achieved = removed(result.masks, group) / group_size
        if distribution == "depth_increasing":  # the group's target: its layers' shares
            target = sum(layer_zeros[n] for n in group) / group_size
        else:
            target = sparsity
        assert abs(achieved - target) <= 1e-3, (group, achieved, target)
        # The weights themselves are zero where the masks say so.
        for n in group:
            assert torch.count_nonzero(params[n].detach()[~result.masks.masks[n]]) == 0
    assert abs(result.sparsity - sparsity) <= 1e-3
    assert removed(result.masks, sizes) == round(sparsity * total)
    assert gap.grown_history == [0, 1, 0, 1]
    assert result.epochs == 2 * 2 * 1 + 1


class StepRecorder(L.Callback):
    """Checks, after every optimizer step, that only the grown group is free of masks."""

    def __init__(self, gap: GrowAndPrune) -> None:
        self.gap = gap
        self.checked_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gap = self.gap
        if gap._grown is None:  # the fine-tune: everything masked
            assert sorted(gap.masks.names()) == sorted(n for g in gap.groups for n in g)
            return
        grown = set(gap.groups[gap._grown])
        others = {n for g in gap.groups for n in g} - grown
        assert set(gap.masks.names()) == others
        params = dict(pl_module.model.named_parameters())
        for n in others:
            assert torch.count_nonzero(params[n].detach()[~gap.masks.masks[n]]) == 0, n
        self.checked_steps += 1


class SpyGaP(GrowAndPrune):
    """Records the masks and weights at the start and end of every step."""

    def setup(self, model, datamodule=None):
        self.records = []
        super().setup(model, datamodule)

    def on_phase_start(self, model, phase, index):
        super().on_phase_start(model, phase, index)
        if phase.name.startswith("step"):
            self.records.append({"grown": self._grown, "start_masks": self.masks.clone(),
                                 "start_weights": {n: p.detach().clone() for n, p in prunable_parameters(model).items()},
                                 "groups_before": {g: m.clone() for g, m in self._group_masks.items()}})

    def on_phase_end(self, model, phase, index):
        if phase.name.startswith("step"):
            rec = self.records[-1]
            rec["end_masks"] = self.masks.clone()
            rec["end_weights"] = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
        super().on_phase_end(model, phase, index)
        if phase.name.startswith("step"):
            self.records[-1]["groups_after"] = {g: m.clone() for g, m in self._group_masks.items()}


def test_each_step_grows_exactly_one_group_and_leaves_the_others_masks(dm):
    model = model_of(dm)
    gap = SpyGaP(0.85, num_partitions=3, rounds=2, epochs_per_step=1)
    recorder = StepRecorder(gap)
    run_pruning(model, dm, gap, cfg(), callbacks=[recorder])
    assert gap.grown_history == [0, 1, 2, 0, 1, 2]
    assert len(gap.records) == 6 and recorder.checked_steps > 0
    for k, rec in enumerate(gap.records):
        grown = rec["grown"]
        grown_names = gap.groups[grown]
        # During the step the masks are those of the other groups, unchanged from start to end.
        assert set(rec["start_masks"].names()).isdisjoint(grown_names)
        assert rec["start_masks"].names() == rec["end_masks"].names()
        for n in rec["start_masks"].names():
            assert torch.equal(rec["start_masks"].masks[n], rec["end_masks"].masks[n]), (k, n)
        # The prune at the step's end changes the grown group's masks only.
        for g, masks in rec["groups_before"].items():
            if g != grown:
                for n in masks.names():
                    assert torch.equal(masks.masks[n], rec["groups_after"][g].masks[n]), (k, g, n)
        assert grown in rec["groups_after"]
        if grown in rec["groups_before"]:
            # Grown weights start at exactly zero where they were pruned, and they regrow.
            before = rec["groups_before"][grown]
            regrown = 0
            for n in grown_names:
                pruned = ~before.masks[n]
                assert torch.count_nonzero(rec["start_weights"][n][pruned]) == 0, (k, n)
                regrown += int(torch.count_nonzero(rec["end_weights"][n][pruned]))
            assert regrown > 0, k
    # The first step grows the first group from its (dense) initialisation.
    assert 0 not in gap.records[0]["groups_before"]
    assert set(gap.records[0]["groups_before"]) == {1, 2}


def test_explicit_partitions_by_prefix_on_lenet(dm):
    model = model_of(dm, "lenet5")
    gap = build_method("gap", sparsity=0.8, partitions=[["features"], ["classifier"]],
                       epochs_per_step=1, distribution="global")
    result = run_pruning(model, dm, gap, cfg(finetune=0))
    assert gap.groups == [["features.0.weight", "features.3.weight"],
                          ["classifier.0.weight", "classifier.2.weight", "classifier.4.weight"]]
    sizes = {n: p.numel() for n, p in prunable_parameters(model).items()}
    for group in gap.groups:
        assert abs(removed(result.masks, group) / sum(sizes[n] for n in group) - 0.8) <= 1e-3
    assert result.epochs == 2


def test_too_many_partitions_is_explained(dm):
    gap = GrowAndPrune(0.8, num_partitions=4)  # the mlp has 3 prunable layers
    with pytest.raises(ValueError, match="num_partitions=4"):
        run_pruning(model_of(dm), dm, gap, cfg())
