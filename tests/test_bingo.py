"""BINGO: probes during training, significance = damage, one-shot cut of the least significant.

The sign test plants a network whose important and useless weights are known by construction
(hidden units the next layer ignores are useless, whatever their weights), and checks that a
method with the damage sign flipped (the authors' draft ``baseline_loss - loss``) fails it.
Probe hygiene is checked by spies (which split, which mode, grad off) and by bit-comparing the
state dict; cost by an independent count of the probing schedule.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from prunelib.data import ArrayDataModule, build_datamodule
from prunelib.distributions import LayerDistribution
from prunelib.masks import prunable_parameters
from prunelib.methods import METHODS, register_method
from prunelib.methods.base import Phase
from prunelib.methods.bingo import BINGO, select_channels
from prunelib.models import build_model
from prunelib.training import TrainConfig, run_pruning

if "bingo" not in METHODS:
    register_method(BINGO)

BATCH = 64
LIMIT = 384  # 6 optimizer steps per epoch


@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=LIMIT, batch_size=BATCH)


def auc(pos: Tensor, neg: Tensor) -> float:
    """P(a positive scores above a negative), ties counting half."""
    pos, neg = pos.flatten()[:, None].double(), neg.flatten()[None, :].double()
    return float((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean())


# ------------------------------------------------------------------------------------------
# Planted importance
# ------------------------------------------------------------------------------------------
def planted(seed: int = 0, n: int = 512):
    """A 16-32-4 ReLU teacher: hidden units 16..31 feed nothing (W2 columns are zero).

    Labels are the teacher's own argmax, so the weights of rows 0..15 of W1 carry the label
    (every one has magnitude 1..2) and the weights of rows 16..31 are useless by construction.
    Returns the data module, the student at its random init, and the teacher's weights.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(32, 16, generator=g).sign() * (1 + torch.rand(32, 16, generator=g))
    w2 = torch.randn(4, 32, generator=g).sign() * (1 + torch.rand(4, 32, generator=g))
    w2[:, 16:] = 0

    def teacher(x: Tensor) -> Tensor:
        return torch.relu(x.flatten(1) @ w1.T) @ w2.T

    splits = []
    for _ in range(3):
        x = torch.randn(n, 1, 1, 16, generator=g)
        splits.append((x, teacher(x).argmax(1)))
    data = ArrayDataModule("planted", *splits, num_classes=4, batch_size=64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32, bias=False), nn.ReLU(),
                          nn.Linear(32, 4, bias=False))
    return data, model, w1, w2


def probe_planted(cls: type[BINGO] = BINGO, steps: int = 512, **settings):
    """Set BINGO up at the random init (theta0), load the 'trained' teacher, run probes."""
    data, model, w1, w2 = planted()
    kw = dict(probe_every_n_steps=1, warmup_fraction=0.0, probe_batch_size=512)
    kw.update(settings)
    method = cls(**kw)
    method.setup(model, data)
    with torch.no_grad():
        model[1].weight.copy_(w1)
        model[3].weight.copy_(w2)
    method.steps_per_epoch = 1
    method.on_phase_start(model, Phase("train", steps), 0)
    for step in range(1, steps + 1):
        method.on_train_batch_end(model, None, step)
    return method, model


def important_kept(method: BINGO, model: nn.Module) -> tuple[float, float]:
    """(AUC important-vs-useless of W1's significance, share of important W1 weights kept)."""
    sig = method.significance()["1.weight"]
    if sig.dim() == 1:  # neuron mode: one score per row
        sig = sig[:, None].expand(32, 16)
    area = auc(sig[:16], sig[16:])
    masks = method.cut(model)
    keep = masks.expanded("1.weight", model[1].weight)
    return area, float(keep[:16].float().mean())


def sign_check_passes(area: float, kept: float) -> bool:
    return area > 0.9 and kept > 0.9


class InvertedBINGO(BINGO):
    """The draft's sign error: score = base - probed loss (negative for important weights)."""

    def _damage(self, base: Tensor, probed: Tensor) -> Tensor:
        return -super()._damage(base, probed)


@pytest.mark.parametrize("reset_to", ["init", "zero"])
def test_planted_important_weights_score_higher_and_survive_the_cut(reset_to):
    # One weight per probe of W1 (k = 1) and the whole validation split per step: the
    # significance is each weight's own damage. Only W1 is scored, cut globally to 256 of 512.
    method, model = probe_planted(probe_frac=0.002, reset_to=reset_to, exclude=["3."],
                                  sparsity=256 / 640, distribution="global")
    sig = method.significance()["1.weight"]
    assert float(sig[16:].abs().max()) < 1e-6  # the next layer ignores these rows: no damage
    assert float(sig[:16].mean()) > 0.01
    area, kept = important_kept(method, model)
    assert area > 0.9 and kept > 0.9, (area, kept)
    assert sign_check_passes(area, kept)


def test_an_inverted_score_fails_the_same_check():
    method, model = probe_planted(InvertedBINGO, probe_frac=0.002, exclude=["3."],
                                  sparsity=256 / 640, distribution="global")
    area, kept = important_kept(method, model)
    assert area < 0.1 and kept < 0.1, (area, kept)
    assert not sign_check_passes(area, kept)


def test_group_probes_at_the_default_fraction_still_separate_the_groups():
    # probe_frac 0.01 resets 5 weights of W1 at once: noisier per weight, same direction.
    method, _ = probe_planted(steps=300, exclude=["3."])
    sig = method.significance()["1.weight"]
    assert float(sig[:16].mean()) > 5 * abs(float(sig[16:].mean()))
    assert auc(sig[:16], sig[16:]) > 0.65


def test_neuron_unit_keeps_the_planted_neurons():
    # Neuron mode: W1's rows are the units (the classifier W2 is never cut). Cutting 256 of
    # 640 weights = 16 rows must remove exactly the 16 ignored ones.
    method, model = probe_planted(steps=64, unit="neuron", sparsity=256 / 640)
    sig = method.significance()["1.weight"]
    assert sig.shape == (32,)
    assert auc(sig[:16], sig[16:]) > 0.99
    masks = method.cut(model)
    assert masks.granularity["1.weight"] == "channel"
    assert masks.masks["1.weight"].nonzero().flatten().tolist() == list(range(16))
    inverted, model2 = probe_planted(InvertedBINGO, steps=64, unit="neuron", sparsity=256 / 640)
    assert inverted.cut(model2).masks["1.weight"][:16].sum() == 0


# ------------------------------------------------------------------------------------------
# Probe hygiene
# ------------------------------------------------------------------------------------------
class SpyDataModule(ArrayDataModule):
    """Records every sample_batch split; touching the test split raises."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampled: list[str] = []

    def sample_batch(self, split="train", n=None, generator=None):
        self.sampled.append(split)
        return super().sample_batch(split, n, generator)

    def split(self, split):
        if split == "test":
            raise AssertionError("the test split was used for a decision")
        return super().split(split)

    def test_dataloader(self):
        raise AssertionError("the test split was used for a decision")


def test_probes_draw_from_validation_never_test(dm):
    spy = SpyDataModule("digits", dm.split("train"), dm.split("val"), dm.split("test"),
                        num_classes=dm.num_classes, batch_size=BATCH)
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = BINGO(sparsity=0.5)
    run_pruning(model, spy, method, TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"))
    assert method.probing_steps > 0
    assert spy.sampled == ["val"] * method.probing_steps


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(32, 10))


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_probes_leave_weights_bn_statistics_modes_and_rng_untouched(dm, unit):
    model = _bn_model()
    method = BINGO(unit=unit, probe_frac=0.05, probe_every_n_steps=1, warmup_fraction=0.0)
    method.setup(model, dm)
    with torch.no_grad():  # move away from theta0 so reset-to-init changes the output
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model[2].running_mean.normal_()
    model.train()
    model[4].eval()  # a deliberately frozen submodule must stay frozen
    seen: list[tuple[bool, bool]] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    method.steps_per_epoch = 1
    method.on_phase_start(model, Phase("train", 5), 0)
    for step in range(1, 6):
        method.on_train_batch_end(model, None, step)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert model.training and model[2].training and not model[4].training
    assert torch.equal(torch.get_rng_state(), rng)
    layers = 2 if unit == "weight" else 1  # neuron mode never probes the classifier
    assert method.cost.extra_forward_passes == 5 * (1 + layers) == len(seen)
    assert seen and all(mode == (False, False) for mode in seen)  # eval mode, no grad
    assert any(float(s.abs().max()) > 0 for s in method.significance().values())


def test_never_probed_units_get_their_layers_mean(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    # At init, reset-to-init changes nothing: zero resets give damages to average.
    method = BINGO(probe_frac=0.01, probe_every_n_steps=1, warmup_fraction=0.0, reset_to="zero")
    method.setup(model, dm)
    method.steps_per_epoch = 1
    method.on_phase_start(model, Phase("train", 3), 0)
    for step in range(1, 4):
        method.on_train_batch_end(model, None, step)
    counts, sig = method.probe_counts(), method.significance()
    for name, cnt in counts.items():
        s = sig[name].flatten()
        probed = cnt > 0
        assert 0 < int(probed.sum()) < cnt.numel()
        assert float(s[probed].std()) > 0 and float(s[probed].mean().abs()) > 1e-7
        assert torch.allclose(s[~probed], s[probed].mean().expand(int((~probed).sum())))
    assert 0 < method.coverage() < 0.05


# ------------------------------------------------------------------------------------------
# Cost accounting
# ------------------------------------------------------------------------------------------
def expected_passes(total_steps: int, every: int, layers_per_step: int, warmup: float,
                    n_layers: int) -> tuple[int, int]:
    """(probing steps, forward passes) counted independently of the implementation."""
    w = min(int(warmup * total_steps), total_steps - 1)
    probing = sum(1 for t in range(1, total_steps + 1) if t > w and (t - w - 1) % every == 0)
    per_step = n_layers if layers_per_step in (0,) or layers_per_step >= n_layers else layers_per_step
    return probing, probing * (1 + per_step)


@pytest.mark.parametrize("steps,every,lps,warmup", [(40, 4, 0, 0.1), (37, 3, 1, 0.25),
                                                    (20, 1, 2, 0.0), (9, 5, 0, 0.5)])
def test_extra_forward_passes_follow_the_schedule(dm, steps, every, lps, warmup):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = BINGO(probe_every_n_steps=every, layers_per_step=lps, warmup_fraction=warmup)
    method.setup(model, dm)
    method.steps_per_epoch = steps
    method.on_phase_start(model, Phase("train", 1), 0)
    probed_at = []
    for step in range(1, steps + 1):
        before = method.cost.extra_forward_passes
        method.on_train_batch_end(model, None, step)
        if method.cost.extra_forward_passes > before:
            probed_at.append(step)
    probing, passes = expected_passes(steps, every, lps, warmup, 3)
    w = min(int(warmup * steps), steps - 1)
    assert probed_at == list(range(w + 1, steps + 1, every))
    assert method.probing_steps == probing == len(probed_at)
    assert method.cost.extra_forward_passes == passes
    # Round-robin: every tensor probed equally often (to within one).
    per_layer = [int(c.sum()) // method._k[n] for n, c in method.probe_counts().items()]
    assert sum(per_layer) == passes - probing and max(per_layer) - min(per_layer) <= 1


def test_run_pruning_reports_the_probe_cost_and_fine_tune_does_not_probe(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = BINGO(sparsity=0.5)
    result = run_pruning(model, dm, method, TrainConfig(epochs=3, finetune_epochs=2, accelerator="cpu"))
    steps = 3 * math.ceil(LIMIT / BATCH)
    probing, passes = expected_passes(steps, 4, 0, 0.1, 3)
    assert (method.probing_steps, result.extra_forward_passes) == (probing, passes)
    assert result.masks.metadata["extra_forward_passes"] == passes


def test_a_cut_without_training_runs_a_post_hoc_search(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = BINGO(sparsity=0.5, probe_frac=0.1)
    result = run_pruning(model, dm, method, TrainConfig(epochs=0, finetune_epochs=0, accelerator="cpu"))
    assert method.coverage() == 1.0
    assert method.probing_steps == 10 and result.extra_forward_passes == 10 * 4
    assert abs(result.sparsity - 0.5) < 1e-3


# ------------------------------------------------------------------------------------------
# End to end on digits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp", "lenet5"])
@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_end_to_end_hits_the_target_and_neurons_are_whole(dm, model_name, unit):
    torch.manual_seed(0)
    model = build_model(model_name, dm.input_shape, dm.num_classes)
    method = BINGO(sparsity=0.8, unit=unit, probe_frac=0.05, distribution="global")
    result = run_pruning(model, dm, method, TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"))
    assert abs(result.sparsity - 0.8) <= 1e-3, result.sparsity
    params = dict(model.named_parameters())
    if unit == "weight":
        assert set(result.masks.granularity.values()) == {"weight"}
        return
    prunable = list(prunable_parameters(model))
    assert prunable[-1] not in result.masks  # the classifier keeps its classes
    for name in result.masks.names():
        assert result.masks.granularity[name] == "channel"
        keep = result.masks.masks[name]
        w = params[name].detach().flatten(1)
        assert torch.all(w[~keep] == 0) and torch.all(w[keep].abs().sum(1) > 0)
        bias = params.get(name[: -len("weight")] + "bias")
        if bias is not None:
            assert torch.all(bias.detach()[~keep] == 0)


@pytest.mark.parametrize("reset_to,unit", [("init", "weight"), ("zero", "weight"), ("init", "neuron"),
                                           ("zero", "neuron")])
def test_end_to_end_accuracy_above_chance_at_half_sparsity(dm, reset_to, unit):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = BINGO(sparsity=0.5, unit=unit, reset_to=reset_to)
    result = run_pruning(model, dm, method, TrainConfig(epochs=4, finetune_epochs=2, accelerator="cpu"))
    assert abs(result.sparsity - 0.5) <= 1e-3
    assert result.val_acc > 0.3, result.val_acc  # chance is 0.1


# ------------------------------------------------------------------------------------------
# Channel selection and settings
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["global", "uniform", "depth_increasing"])
def test_select_channels_meets_weight_budgets_lowest_first(distribution):
    g = torch.Generator().manual_seed(0)
    sizes = {"a": 25, "b": 150, "c": 64, "d": 120}
    outs = {"a": 6, "b": 16, "c": 120, "d": 84}
    scores = {n: torch.rand(outs[n], generator=g) for n in sizes}
    total = sum(sizes[n] * outs[n] for n in sizes)
    dist = LayerDistribution(distribution)
    for frac in (0.1, 0.33, 0.5, 0.8, 0.9):
        target = round(frac * total)
        budgets = None if dist.ranked else dist.allocate({n: sizes[n] * outs[n] for n in sizes}, target)
        keep = select_channels(scores, sizes, target, budgets=budgets)
        zeros = sum(int((~keep[n]).sum()) * sizes[n] for n in sizes)
        assert abs(zeros - target) <= 12, (frac, zeros, target)
        for n in sizes:
            assert keep[n].any()  # no layer collapses
            if (~keep[n]).any():  # within a layer, exactly the lowest-scored channels go
                assert float(scores[n][~keep[n]].max()) < float(scores[n][keep[n]].min())


def test_default_resets_to_zero_and_a_thin_probe_schedule_is_warned(dm):
    assert BINGO().reset_to == "zero"
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    thin = BINGO(sparsity=0.5)  # 1 % per probe, every 4th step of 6 x 2: ~0.03 probes per weight
    with pytest.warns(UserWarning, match="probe each weight about 0.0"):
        run_pruning(model, dm, thin, TrainConfig(epochs=2, finetune_epochs=0, accelerator="cpu"))
    assert 0 < thin.expected_probes_per_unit(12) < 0.5
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    dense = BINGO(sparsity=0.5, probe_frac=0.25, probe_every_n_steps=1, warmup_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # about 3 probes per weight: no warning
        dense.setup(model, dm)
        dense.steps_per_epoch = 12
        dense.on_phase_start(model, Phase("train", 1), 0)
    assert dense.expected_probes_per_unit(12) == pytest.approx(3.0, rel=0.05)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    damage = BINGO(sparsity=0.5, allocation="damage")  # per-layer damage is well measured
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        damage.setup(model, dm)
        damage.steps_per_epoch = 12
        damage.on_phase_start(model, Phase("train", 1), 0)


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_damage_allocation_sets_layer_sparsity_from_damage_and_cuts_by_magnitude(unit):
    # Planted: W1's useful rows hurt when reset, the classifier W2's zero columns (rows 16..31)
    # make half of W1 harmless; W2 itself is all useful.
    method, model = probe_planted(steps=64, unit=unit, allocation="damage", sparsity=0.3)
    damage = method.layer_damage()
    assert all(math.isfinite(d) for d in damage.values())
    weights = method.damage_weights()
    masks = method.cut(model)
    params = dict(model.named_parameters())
    sparsity = {n: 1 - float(masks.expanded(n, params[n]).float().mean()) for n in masks.names()}
    total = sum(p.numel() for p in prunable_parameters(model).values())
    cut = sum(int((~masks.expanded(n, params[n])).sum()) for n in masks.names()) / total
    assert abs(cut - 0.3) <= (16 / total if unit == "neuron" else 1e-3)
    if unit == "weight":
        # The layer with the larger damage per probe is pruned less, in the ratio of the damages.
        low, high = sorted(damage, key=damage.get)
        assert sparsity[low] > sparsity[high]
        assert sparsity[low] / sparsity[high] == pytest.approx(weights[low] / weights[high], rel=0.02)
        for n in masks.names():  # magnitude ranks inside each layer
            w = params[n].detach().abs()
            keep = masks.masks[n]
            assert w[~keep].max() <= w[keep].min()
    else:
        assert list(sparsity) == ["1.weight"]  # neurons: the classifier keeps its classes
        keep = masks.masks["1.weight"]
        l1 = params["1.weight"].detach().abs().mean(1)
        assert l1[~keep].max() <= l1[keep].min()  # L1 per weight of the row ranks the neurons


def test_bad_settings_name_the_key():
    for kw, key in [({"unit": "row"}, "unit"), ({"reset_to": "rand"}, "reset_to"),
                    ({"metric": "f1"}, "metric"), ({"aggregate": "half"}, "aggregate"),
                    ({"distribution": "net"}, "distribution"), ({"allocation": "net"}, "allocation"),
                    ({"probe_frac": 0.0}, "probe_frac"),
                    ({"probe_every_n_steps": 0}, "probe_every_n_steps"),
                    ({"warmup_fraction": 1.0}, "warmup_fraction"), ({"sparsity": 1.0}, "sparsity")]:
        with pytest.raises(ValueError, match=key):
            BINGO(**kw)


def test_bingo_yaml_loads_into_the_search_space_and_matches_the_constructor():
    from search.preflight import check_method
    from search.space import SearchSpace, load_method_configs
    from tests.conftest import sampled_settings

    cfg = load_method_configs()["bingo"]
    accepted = inspect.signature(BINGO.__init__).parameters
    for key, value in cfg["settings"].items():
        assert key in accepted, key
        assert value == accepted[key].default, (key, value)  # the YAML documents the defaults
    for key in cfg["space"]:
        assert key in accepted, key
    for key in ("sparsity", "probe_frac", "reset_to", "metric", "unit"):
        assert key in cfg["space"]
    check_method("bingo", cfg, pinned=True, search_settings=True, n_trials=1)
    space = SearchSpace({"bingo": cfg}, pinned=True)
    dists = space.distributions("bingo")
    assert dists["bingo.probe_frac"].log and dists["bingo.sparsity"].high == 0.97
    for settings in sampled_settings(space, "bingo"):
        BINGO(**settings)
