"""Baseline pruning methods run end to end through ``run_pruning`` on digits.

Every test checks behaviour against an independent computation: mask counts against the
target, pruned weights against the weights seen at the cut, SNIP scores against a
connection-multiplier gradient, IMP rewinding against saved weights.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelib import (
    METHODS,
    SNIP,
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    MagnitudePruning,
    RandomPruning,
    TrainConfig,
    build_method,
    prunable_parameters,
    run_pruning,
)
from prunelib.data import build_datamodule
from prunelib.importance import snip_scores
from prunelib.models import build_model
from prunelib.schedules import Cubic

EPOCHS = 3
FINETUNE = 1
BATCH = 64
LIMIT = 384  # 6 optimizer steps per epoch


@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=LIMIT, batch_size=BATCH)


def mlp(dm, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", dm.input_shape, dm.num_classes)


def cfg(epochs: int = EPOCHS, finetune: int = FINETUNE) -> TrainConfig:
    # Fine-tune at the full rate: these few-step runs test plumbing, and a random cut needs it.
    return TrainConfig(epochs=epochs, finetune_epochs=finetune, finetune_lr=0.05, accelerator="cpu")


def pruned_fraction(model: nn.Module, masks) -> float:
    """Fraction of Conv/Linear weights the masks themselves remove (not counting natural zeros)."""
    params = prunable_parameters(model)
    total = sum(p.numel() for p in params.values())
    removed = sum(int((~masks.masks[n]).sum()) for n in masks.names())
    return removed / total


def assert_pruned_are_zero(model: nn.Module, masks) -> None:
    params = dict(model.named_parameters())
    assert len(masks) > 0
    for n in masks.names():
        w = params[n].detach()
        assert torch.count_nonzero(w[~masks.expanded(n, w)]) == 0, n


class EpochCounter(L.Callback):
    """Counts the training epochs Lightning actually ran, across every phase."""

    def __init__(self) -> None:
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1


# -- every baseline end to end --------------------------------------------------------------

CASES = {
    # id: (factory(sparsity), expected epochs with EPOCHS / FINETUNE)
    "magnitude-global": (lambda s: MagnitudePruning(s, distribution="global"), EPOCHS + FINETUNE),
    "magnitude-layer": (lambda s: MagnitudePruning(s, distribution="uniform"), EPOCHS + FINETUNE),
    "random-init": (lambda s: RandomPruning(s, at="init"), EPOCHS + FINETUNE),
    "random-trained": (lambda s: RandomPruning(s, at="trained"), EPOCHS + FINETUNE),
    "snip": (lambda s: SNIP(s), EPOCHS + FINETUNE),
    "gmp": (lambda s: GradualMagnitudePruning(s), EPOCHS + FINETUNE),
    # IMP, rounds=2: round1 (E) + round2 and final (E - k each); fine-tune epochs are unused.
    "imp-weights-k0": (lambda s: IterativeMagnitudePruning(s, rounds=2, rewind="weights"), 3 * EPOCHS),
    "imp-weights-k1": (lambda s: IterativeMagnitudePruning(s, rounds=2, rewind="weights", rewind_epoch=1),
                       EPOCHS + 2 * (EPOCHS - 1)),
    "imp-lr": (lambda s: IterativeMagnitudePruning(s, rounds=2, rewind="lr"), 3 * EPOCHS),
}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("case", list(CASES))
def test_baseline_end_to_end(dm, case, sparsity):
    factory, expected_epochs = CASES[case]
    method = factory(sparsity)
    model = mlp(dm)
    counter = EpochCounter()
    result = run_pruning(model, dm, method, cfg(), callbacks=[counter])

    assert abs(pruned_fraction(model, result.masks) - sparsity) <= 1e-3
    assert abs(result.sparsity - sparsity) <= 1e-3
    assert_pruned_are_zero(result.model, result.masks)
    assert result.epochs == expected_epochs
    assert counter.epochs == expected_epochs
    assert sum(h["epochs"] for h in result.history) == expected_epochs
    if case == "magnitude-layer":
        for name, frac in result.masks.layer_sparsity(model).items():
            n = prunable_parameters(model)[name].numel()
            assert abs(frac - sparsity) <= 1.0 / n + 1e-9, name
    if sparsity == 0.5:
        assert result.val_acc > 0.5, (case, result.val_acc)  # chance is 0.1


# -- magnitude --------------------------------------------------------------------------------

class SpyMagnitude(MagnitudePruning):
    """Records the weights right before the cut and the masks right after it."""

    def on_phase_end(self, model, phase, index):
        if phase.name == "train":
            self.before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
        super().on_phase_end(model, phase, index)
        if phase.name == "train":
            self.cut_masks = self.masks.clone()


@pytest.mark.parametrize("distribution", ["global", "uniform"])
def test_magnitude_cuts_smallest_weights_at_cut_time(dm, distribution):
    method = SpyMagnitude(0.8, distribution=distribution)
    model = mlp(dm)
    result = run_pruning(model, dm, method, cfg())
    before, masks = method.before, method.cut_masks
    # The mask is fixed through the fine-tune: the final masks are the ones of the cut.
    for n in masks.names():
        assert torch.equal(masks.masks[n], result.masks.masks[n])
    groups = [list(before)] if distribution == "global" else [[n] for n in before]
    for names in groups:
        pruned = torch.cat([before[n][~masks.masks[n]].abs() for n in names])
        kept = torch.cat([before[n][masks.masks[n]].abs() for n in names])
        assert pruned.numel() > 0 and kept.numel() > 0
        assert pruned.max() <= kept.min()
    # The weights trained further after the cut (the fine-tune ran on the masked model).
    after = prunable_parameters(model)
    assert any(not torch.equal(after[n][masks.masks[n]], before[n][masks.masks[n]]) for n in before)


def test_magnitude_data_free_finalize():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10))
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    masks = MagnitudePruning(0.7).finalize(model)  # no setup, no data module
    assert abs(pruned_fraction(model, masks) - 0.7) <= 1e-3
    assert_pruned_are_zero(model, masks)
    pruned = torch.cat([before[n][~masks.masks[n]].abs() for n in before])
    kept = torch.cat([before[n][masks.masks[n]].abs() for n in before])
    assert pruned.max() <= kept.min()
    # Survivors are untouched.
    for n, p in prunable_parameters(model).items():
        assert torch.equal(p.detach()[masks.masks[n]], before[n][masks.masks[n]])


def test_magnitude_zero_epochs_cuts_before_finetune(dm):
    method = MagnitudePruning(0.5)
    model = mlp(dm)
    seen = []

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(method.masks is not None)

    result = run_pruning(model, dm, method, cfg(epochs=0, finetune=2), callbacks=[AtStart()])
    assert seen == [True]
    assert result.history[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


# -- SNIP -------------------------------------------------------------------------------------

def tiny_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))


def multiplier_sensitivity(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """|dL(c * w)/dc| at c = 1: SNIP's definition, computed without touching ``.grad``."""
    names = list(prunable_parameters(model))
    params = {n: p.detach() for n, p in model.named_parameters()}
    cs = {n: torch.ones_like(params[n], requires_grad=True) for n in names}
    merged = {n: params[n] * cs[n] if n in cs else params[n] for n in params}
    loss = F.cross_entropy(torch.func.functional_call(model, merged, (x,)), y)
    grads = torch.autograd.grad(loss, [cs[n] for n in names])
    return {n: g.abs() for n, g in zip(names, grads)}


def test_snip_scores_match_hand_computation(dm):
    model = tiny_net()
    x, y = dm.sample_batch("train", generator=torch.Generator().manual_seed(0))
    expected = multiplier_sensitivity(model, x, y)
    scores = snip_scores(model, [(x, y)])
    assert set(scores) == set(expected)
    for n in expected:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # no gradient left for step 1

    # SNIP itself draws that same batch (its generator is seeded with 0) and keeps the global top-k.
    method = SNIP(0.6)
    method.setup(model, dm)
    flat = torch.cat([expected[n].flatten() for n in expected])
    keep = flat.numel() - round(0.6 * flat.numel())
    threshold = torch.sort(flat, descending=True).values[keep - 1]
    for n in expected:
        kept_scores = expected[n][method.masks.masks[n]]
        pruned_scores = expected[n][~method.masks.masks[n]]
        assert kept_scores.numel() == 0 or kept_scores.min() >= threshold
        assert pruned_scores.numel() == 0 or pruned_scores.max() <= threshold
    assert sum(int(m.sum()) for m in method.masks.masks.values()) == keep
    assert method.cost.extra_forward_passes == 1 and method.cost.extra_backward_passes == 1


def test_snip_without_data_raises(dm):
    with pytest.raises(ValueError, match="needs training data"):
        SNIP(0.5).setup(tiny_net())
    with pytest.raises(ValueError, match="needs training data"):
        run_pruning(tiny_net(), None, SNIP(0.5), cfg())
    with pytest.raises(RuntimeError, match="no masks"):
        SNIP(0.5).finalize(tiny_net())


def test_snip_prunes_before_first_step(dm):
    model = mlp(dm)
    method = SNIP(0.8)
    method.setup(model, dm)
    assert method.masks is not None
    assert abs(pruned_fraction(model, method.masks) - 0.8) <= 1e-3
    assert_pruned_are_zero(model, method.masks)

    # Through the runner: the weights used by the very first forward pass are already pruned.
    method = SNIP(0.8)
    model = mlp(dm)
    first: dict[str, torch.Tensor] = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not first:
                assert method.masks is not None
                first.update({n: p.detach().clone() for n, p in prunable_parameters(model).items()})
                first["_masks"] = method.masks.clone()

    result = run_pruning(model, dm, method, cfg(epochs=1, finetune=0), callbacks=[FirstStep()])
    masks0 = first.pop("_masks")
    for n, w in first.items():
        assert torch.count_nonzero(w[~masks0.masks[n]]) == 0
        assert torch.equal(masks0.masks[n], result.masks.masks[n])  # fixed mask


# -- GMP --------------------------------------------------------------------------------------

class MaskRecorder(L.Callback):
    """After each optimizer step: the masks, and whether any masked weight is non-zero."""

    def __init__(self, method) -> None:
        self.method = method
        self.steps: list[tuple[int, float]] = []
        self.masks = []
        self.leaks = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.method.masks
        net = pl_module.model
        if masks is None:
            self.steps.append((trainer.global_step, 0.0))
            self.masks.append(None)
            return
        self.steps.append((trainer.global_step, pruned_fraction(net, masks)))
        self.masks.append(masks.clone())
        params = dict(net.named_parameters())
        for n in masks.names():
            self.leaks += int(torch.count_nonzero(params[n].detach()[~masks.masks[n]]))


def test_gmp_ramp_is_monotone_and_masks_only_shrink(dm):
    method = GradualMagnitudePruning(0.8, n_updates=5)
    rec = MaskRecorder(method)
    model = mlp(dm)
    result = run_pruning(model, dm, method, cfg(epochs=4, finetune=1), callbacks=[rec])
    steps_per_epoch = math.ceil(LIMIT / BATCH)
    train_steps = 4 * steps_per_epoch
    assert len(rec.steps) == 5 * steps_per_epoch
    values = [s for _, s in rec.steps]
    assert values == sorted(values)
    assert len(set(values)) >= 5  # gradual: 5 updates, not one cut
    assert values[-1] == pytest.approx(0.8, abs=1e-3)
    # The ramp follows the cubic schedule fitted to the training phase.
    ramp = Cubic.fit_to(0.8, train_steps, 0.0, 0.75, 5)
    for step, s in rec.steps[:train_steps]:
        last_update = min(step - step % ramp.frequency, ramp.end_step)
        assert s == pytest.approx(ramp.sparsity_at(last_update), abs=1e-3), step
    assert ramp.end_step < train_steps  # masks fixed after the ramp ends
    # Masked weights never come back: each mask is a subset of the previous one, weights stay zero.
    prev = None
    for m in rec.masks:
        if m is None:
            continue
        if prev is not None:
            for n in m.names():
                assert not bool((m.masks[n] & ~prev.masks[n]).any()), n
        prev = m
    assert rec.leaks == 0
    assert_pruned_are_zero(result.model, result.masks)


# -- IMP --------------------------------------------------------------------------------------

class PhaseRecorder(L.Callback):
    """Weights and masks at the start and end of each phase, and after each epoch of phase 0."""

    def __init__(self, method) -> None:
        self.method = method
        self.start: list[dict] = []
        self.end: list[dict] = []
        self.masks: list = []
        self.epoch_end: list[dict] = []

    @staticmethod
    def _weights(pl_module):
        return {n: p.detach().clone() for n, p in prunable_parameters(pl_module.model).items()}

    def on_fit_start(self, trainer, pl_module):
        self.start.append(self._weights(pl_module))
        self.masks.append(None if self.method.masks is None else self.method.masks.clone())

    def on_fit_end(self, trainer, pl_module):
        self.end.append(self._weights(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if len(self.start) == 1:
            self.epoch_end.append(self._weights(pl_module))


def run_imp(dm, rounds=2, sparsity=0.8, epochs=EPOCHS, **kw):
    method = IterativeMagnitudePruning(sparsity, rounds=rounds, **kw)
    model = mlp(dm)
    init = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    rec = PhaseRecorder(method)
    result = run_pruning(model, dm, method, cfg(epochs=epochs, finetune=0), callbacks=[rec])
    return method, init, rec, result


def masked(weights: dict, masks) -> dict:
    return {n: w * masks.masks[n].to(w.dtype) for n, w in weights.items()}


def test_imp_weight_rewinding_to_init(dm):
    method, init, rec, result = run_imp(dm, rounds=2, rewind="weights", rewind_epoch=0)
    assert rec.masks[0] is None and len(rec.start) == 3
    for phase in (1, 2):  # round2 and final start from the initial weights on the survivors
        expected = masked(init, rec.masks[phase])
        for n in init:
            assert torch.equal(rec.start[phase][n], expected[n]), (phase, n)
    # ...and not from the trained ones.
    n = next(iter(init))
    assert not torch.equal(rec.start[1][n], masked(rec.end[0], rec.masks[1])[n])


def test_imp_weight_rewinding_to_epoch_one(dm):
    method, init, rec, result = run_imp(dm, rounds=2, rewind="weights", rewind_epoch=1)
    assert len(rec.epoch_end) == EPOCHS
    expected = masked(rec.epoch_end[0], rec.masks[1])  # weights after round 1's first epoch
    for n in init:
        assert torch.equal(rec.start[1][n], expected[n]), n
    assert [h["epochs"] for h in result.history] == [EPOCHS, EPOCHS - 1, EPOCHS - 1]


def test_imp_rewind_point_matches_plan_when_clamped(dm):
    method, init, rec, result = run_imp(dm, rounds=1, rewind="weights", rewind_epoch=EPOCHS)
    plan = method.plan(EPOCHS, 0)
    k = plan[1].lr_start_epoch
    assert k == EPOCHS - 1
    expected = masked(rec.epoch_end[k - 1], rec.masks[1])  # the plan replays from epoch k
    for n in init:
        assert torch.equal(rec.start[1][n], expected[n]), n


def test_imp_lr_rewinding_keeps_trained_weights(dm):
    method, init, rec, result = run_imp(dm, rounds=2, rewind="lr")
    for phase in (1, 2):
        expected = masked(rec.end[phase - 1], rec.masks[phase])
        for n in init:
            assert torch.equal(rec.start[phase][n], expected[n]), (phase, n)
    n = next(iter(init))
    assert not torch.equal(rec.start[1][n], masked(init, rec.masks[1])[n])
    assert all(p.lr_start_epoch == 0 and p.epochs == EPOCHS for p in method.plan(EPOCHS, 0))


@pytest.mark.parametrize("rounds", [2, 3])
def test_imp_rounds_nest_and_follow_the_geometric_schedule(dm, rounds):
    sparsity = 0.9
    method, init, rec, result = run_imp(dm, rounds=rounds, sparsity=sparsity, epochs=1)
    assert len(result.history) == rounds + 1
    for r in range(1, rounds + 1):
        expected = 1.0 - (1.0 - sparsity) ** (r / rounds)
        assert result.history[r - 1]["sparsity"] == pytest.approx(expected, abs=1e-3), r
        # The masks in force during round r+1 were cut at the end of round r.
        assert pruned_fraction(result.model, rec.masks[r]) == pytest.approx(expected, abs=1e-3)
    assert result.history[-1]["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    for r in range(2, rounds + 1):
        later, earlier = rec.masks[r], rec.masks[r - 1]
        for n in later.names():
            assert not bool((later.masks[n] & ~earlier.masks[n]).any()), (r, n)
    for n in result.masks.names():
        assert torch.equal(result.masks.masks[n], rec.masks[rounds].masks[n])


# -- registry ---------------------------------------------------------------------------------

def test_build_method_registry_and_errors():
    assert {"magnitude", "random", "snip", "gmp", "imp"} <= set(METHODS)
    m = build_method("imp", sparsity=0.7, rounds=4, rewind="lr")
    assert isinstance(m, IterativeMagnitudePruning)
    assert (m.sparsity, m.rounds, m.rewind) == (0.7, 4, "lr")
    assert isinstance(build_method("gmp", sparsity=0.5), GradualMagnitudePruning)
    with pytest.raises(ValueError) as exc:
        build_method("no_such_method")
    assert "no_such_method" in str(exc.value)
    for name in ("magnitude", "random", "snip", "gmp", "imp"):
        assert name in str(exc.value)
    with pytest.raises(TypeError, match="bogus_setting"):
        build_method("magnitude", sparsity=0.5, bogus_setting=3)
    for bad in (1.5, 1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            build_method("magnitude", sparsity=bad)
    with pytest.raises(ValueError, match="sparsity"):
        build_method("gmp", sparsity=1.5)


# -- determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: MagnitudePruning(0.8), lambda: GradualMagnitudePruning(0.8)],
                         ids=["magnitude", "gmp"])
def test_same_seed_gives_identical_masks_and_weights(dm, make):
    runs = []
    for _ in range(2):
        model = mlp(dm, seed=5)
        result = run_pruning(model, dm, make(), cfg(epochs=2, finetune=1), seed=7)
        runs.append((result.masks, {n: p.detach().clone() for n, p in model.state_dict().items()}))
    (m1, w1), (m2, w2) = runs
    assert m1.names() == m2.names()
    for n in m1.names():
        assert torch.equal(m1.masks[n], m2.masks[n]), n
    assert w1.keys() == w2.keys()
    for n in w1:
        assert torch.equal(w1[n], w2[n]), n


class _LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_finetune_phase_uses_the_finetune_learning_rate(dm):
    rec = _LrRecorder()
    run_pruning(mlp(dm), dm, MagnitudePruning(0.5), TrainConfig(epochs=2, finetune_epochs=1, lr=0.1,
                accelerator="cpu"), callbacks=[rec])
    train_lrs, finetune_lr = rec.lrs[:2], rec.lrs[2]
    assert train_lrs[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert finetune_lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # lr / 10, mid-epoch cosine
