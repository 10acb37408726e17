"""Polarization consensus sub-network: group-channel gates, STE, polarizer, budget, gate removal.

Every run is a real :func:`run_pruning` on digits (512 training samples, 8 steps per epoch).
Spies subclass the method to look at the gated network during training (the budget and the
floors are held at every step) and right around the removal of the gates (the outputs must not
change). Gate removal is checked on the model itself: no gate module, hook, parameter or buffer
may stay behind.
"""

from __future__ import annotations

import copy
import inspect
import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from prunelib.callbacks import PruningCallback
from prunelib.data import build_datamodule
from prunelib.flops import deployable
from prunelib.masks import sparsity_report
from prunelib.methods import METHODS, register_method
from prunelib.methods.base import Phase
from prunelib.methods.polarization import GATES_ATTR, GateModule, PolarizationGates
from prunelib.models import BasicBlock, build_model
from prunelib.surgery import complete_channel_masks
from prunelib.training import ClassifierModule, TrainConfig, evaluate, run_pruning

if "polarization" not in METHODS:
    register_method(PolarizationGates)

BATCH = 64
LIMIT = 512  # 8 optimizer steps per epoch
EPOCHS = 8


@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=LIMIT, batch_size=BATCH)


class Spy(PolarizationGates):
    """Records the hard state at every step, the state before export and the outputs around
    the gate removal."""

    probe: Tensor | None = None

    def on_train_batch_end(self, model: nn.Module, batch, step: int) -> None:
        super().on_train_batch_end(model, batch, step)
        if self._gates is not None:
            gates = self._gates
            self.__dict__.setdefault("trace", []).append({
                "step": self._step, "budget": self.budget_at(self._step), "hard": self.hard_sparsity(),
                "open": [int(gates.state[f:f + g.size].sum()) for g, f in self._gated],
                "state": gates.state.detach().clone()})

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train" and self._gates is not None:
            self.seen = {"stats01": self.polarization_stats(margin=0.1), "density": self.expected_density(),
                         "hard_sparsity": self.hard_sparsity(), "state": self._gates.state.detach().clone()}
        super().on_phase_end(model, phase, index)

    def remove_gates(self, model: nn.Module) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            self.before = model(self.probe)
            super().remove_gates(model)
            self.after = model(self.probe)
        model.train(was)


def train(dm, model_name: str, sparsity: float, epochs: int = EPOCHS, finetune: int = 2,
          width: float = 1.0, seed: int = 0, model: nn.Module | None = None, **settings):
    torch.manual_seed(seed)
    model = model if model is not None else build_model(model_name, dm.input_shape, dm.num_classes, width=width)
    method = Spy(sparsity=sparsity, **settings)
    method.probe = dm.sample_batch("val", generator=torch.Generator().manual_seed(1))[0]
    result = run_pruning(model, dm, method, TrainConfig(epochs=epochs, finetune_epochs=finetune,
                                                        accelerator="cpu"), seed=seed)
    return model, method, result


@pytest.fixture(scope="module")
def runs(dm):
    return {name: train(dm, name, 0.5) for name in ("lenet5", "mlp")}


def assert_no_gates_left(model: nn.Module) -> None:
    assert not hasattr(model, GATES_ATTR)
    for name, m in model.named_modules():
        assert not isinstance(m, GateModule), name
        assert GATES_ATTR not in name
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in names if GATES_ATTR in n or "theta" in n]


# ------------------------------------------------------------------------------------------
# Training on digits: polarization, the budget held in training, gate removal
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_gates_polarize_and_the_target_is_held_during_training(runs, name):
    model, method, result = runs[name]
    stats = method.seen["stats01"]
    assert stats["gates"] == method.cost.extra_params > 0
    # Within 0.1 of their state at the end of training. A few units are held against their
    # logit's side by design (a group's floor, a cheap unit filling the budget's last gap), so
    # the bar is 0.85 (the gates without a budget projection reached 0.9 by themselves).
    assert stats["polarized"] >= 0.85, stats
    # After the ramp the hard gates sit on the budget at every step, to channel granularity.
    ramp_end = method._warmup_steps + method._ramp_steps
    late = [t for t in method.trace if t["step"] >= ramp_end]
    assert late and all(t["budget"] == 0.5 for t in late)
    assert all(abs(t["hard"] - 0.5) <= 0.01 for t in late), [round(t["hard"], 4) for t in late]
    # During the ramp the hard gates follow the ramping budget.
    ramp = [t for t in method.trace if method._warmup_steps < t["step"] < ramp_end]
    assert ramp and all(abs(t["hard"] - t["budget"]) <= 0.02 for t in ramp)
    assert all(t["hard"] == 0.0 for t in method.trace if t["step"] < method._warmup_steps)
    # What training ended with is what is exported: no gate reopened or closed afterwards.
    assert torch.equal(method.seen["state"], method.trace[-1]["state"])
    assert method.report["sparsity_gates"] == pytest.approx(method.seen["hard_sparsity"])
    assert abs(result.sparsity - 0.5) <= 0.01
    assert abs(sparsity_report(model)["global"]["sparsity"] - 0.5) <= 0.01  # zeros in the weights
    assert result.val_acc >= 0.75, result.val_acc  # magnitude pruning gets about 0.90 here


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_the_per_layer_floor_is_held_at_every_step(runs, name):
    _, method, _ = runs[name]
    floors = method._floor.tolist()
    assert all(f >= 1 for f in floors)
    for t in method.trace:
        assert all(o >= f for o, f in zip(t["open"], floors)), (t["step"], t["open"], floors)
    _, strict, _ = train(build_datamodule("digits", limit_train=LIMIT, batch_size=BATCH), name, 0.8,
                         epochs=4, finetune=0, min_open_fraction=0.5)
    for t in strict.trace:
        assert all(o >= math.ceil(0.5 * g.size) for o, (g, _) in zip(t["open"], strict._gated))


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_exported_model_has_no_gates_and_the_same_outputs(runs, name):
    model, method, result = runs[name]
    assert torch.allclose(method.before, method.after, atol=1e-5)
    assert method.before.abs().max() > 0 and torch.isfinite(method.before).all()
    assert_no_gates_left(model)
    fresh = build_model(name, (1, 8, 8), 10)
    assert set(model.state_dict()) == set(fresh.state_dict())
    # Closed channels stay closed through the fine-tune: the final masks are the exported ones.
    assert result.history[0]["sparsity"] == pytest.approx(result.sparsity)
    # The final gate states are still available for logging.
    states = method.gate_states()
    assert states and all(((v >= 0) & (v <= 1)).all() for v in states.values())


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_achieved_sparsity_is_within_one_point(dm, name, target):
    model, method, result = train(dm, name, target, finetune=1)
    assert abs(result.sparsity - target) <= 0.01, (result.sparsity, method.report)
    assert abs(method.seen["hard_sparsity"] - target) <= 0.01, method.seen
    assert_no_gates_left(model)
    assert torch.allclose(method.before, method.after, atol=1e-5)
    assert result.val_acc >= 0.6, result.val_acc


def test_the_cost_pressure_reaches_the_loss_and_ranks_expensive_units_down(dm):
    # mlp: a unit of the second hidden layer owns 300 + 10 weights, one of the first 64 + 100.
    def closed_share(method) -> tuple[float, float]:
        (g1, f1), (g2, f2) = sorted(method._gated, key=lambda gf: gf[0].root)  # net.1, net.3
        state = method.seen["state"]
        return (1 - float(state[f1:f1 + g1.size].mean()), 1 - float(state[f2:f2 + g2.size].mean()))

    # Identity STE: the pressure on a logit is its unit's cost share exactly (the sigmoid STE
    # scales it by the unit's distance from the boundary as well).
    _, free, _ = train(dm, "mlp", 0.5, finetune=0, lambda_s=0.0, ste="identity")
    _, pressed, _ = train(dm, "mlp", 0.5, finetune=0, lambda_s=100.0, ste="identity")
    assert abs(free.seen["hard_sparsity"] - 0.5) <= 0.01 and abs(pressed.seen["hard_sparsity"] - 0.5) <= 0.01
    free_first, free_second = closed_share(free)
    pressed_first, pressed_second = closed_share(pressed)
    assert pressed_second > free_second and pressed_first < free_first, (closed_share(free), closed_share(pressed))


# ------------------------------------------------------------------------------------------
# Straight-through estimator, the ordinary optimizer
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ste", ["sigmoid", "identity"])
def test_gate_values_are_binary_with_a_straight_through_gradient(ste):
    gates = GateModule([], 4, gate_init=0.0, gate_scale=2.0, temperature=0.7, ste=ste, logit_clip=6.0)
    with torch.no_grad():
        gates.theta.copy_(torch.tensor([-1.0, -0.15, 0.1, 0.75]))  # logits -2, -0.3, 0.2, 1.5
    gates.state.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
    gates.threshold = 0.0
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = gates.values()
    assert torch.equal(g.detach(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    (g * w).sum().backward()
    z = torch.tensor([-2.0, -0.3, 0.2, 1.5])
    s = torch.sigmoid(z / 0.7)
    expect = (w * s * (1 - s) / 0.7 if ste == "sigmoid" else w) * 2.0  # d logit / d theta = scale
    assert torch.allclose(gates.theta.grad, expect)
    assert (gates.theta.grad != 0).all()  # closed gates get a gradient too


def test_gated_forward_is_exactly_binary_and_the_runs_optimizer_steps_the_gates(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes, width=0.1)
    method = PolarizationGates(sparsity=0.5, warmup_fraction=0.0)
    method.setup(model, dm)
    gates = getattr(model, GATES_ATTR)
    assert isinstance(gates, GateModule) and method.cost.extra_params == 30 + 10
    assert any(p is gates.theta for p in model.parameters())  # a model parameter: the optimizer's
    method.steps_per_epoch = 8
    method.on_phase_start(model, Phase("train", 1), 0)
    with torch.no_grad():
        gates.theta.copy_(torch.linspace(-1.0, 1.0, gates.theta.numel()))
    method.on_train_batch_end(model, None, 1)  # the projection sets the hard state
    raw = {}
    hidden = model.net[1]
    hidden.register_forward_hook(lambda m, i, o: raw.update(pre=i[0]))
    model.net[2].register_forward_hook(lambda m, i, o: raw.update(gated=i[0]))
    x, y = dm.sample_batch("train")
    loss = nn.functional.cross_entropy(model(x), y) + method.regularization(model)
    dense = nn.functional.linear(raw["pre"], hidden.weight, hidden.bias)
    group, first = next(gf for gf in method._gated if gf[0].root == "net.1")
    g = gates.state[first:first + group.size]
    assert 0 < int(g.sum()) < group.size
    assert torch.equal(raw["gated"], dense * g)  # exactly 0 or exactly the unit's output
    loss.backward()
    assert gates.theta.grad is not None and (gates.theta.grad[:30] != 0).all()
    before = gates.theta.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    assert not torch.equal(before, gates.theta.detach())


# ------------------------------------------------------------------------------------------
# Coupled groups: residual blocks, depthwise + concat
# ------------------------------------------------------------------------------------------
def test_resnet_gates_follow_the_coupled_groups_and_a_closed_block_passes_the_shortcut(dm):
    small = build_datamodule("digits", limit_train=128, batch_size=64)
    torch.manual_seed(0)
    model = build_model("resnet20", small.input_shape, small.num_classes, width=0.25)
    method = Spy(sparsity=0.4)
    method.probe = small.sample_batch("val")[0]
    result = run_pruning(model, small, method, TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"))
    blocks = [n for n, m in model.named_modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    states = method.gate_states()
    assert all(states[b].numel() == 1 for b in blocks)
    # One gate set per coupled group: a block's inner channels, and one per residual stream
    # (the stem, every conv2 and the projections of a stage share it): 9 + 3 groups.
    channel_groups = [name for name in states if name not in blocks]
    assert len(channel_groups) == 9 + 3
    assert math.isfinite(result.val_loss) and abs(result.sparsity - 0.4) <= 0.01
    assert torch.allclose(method.before, method.after, atol=1e-5)
    assert_no_gates_left(model)

    # Close one block by hand: its branch contributes zero, the shortcut carries the signal.
    torch.manual_seed(0)
    model = build_model("resnet20", small.input_shape, small.num_classes, width=0.25)
    method = Spy(sparsity=0.1, warmup_fraction=0.0)
    method.setup(model, small)
    method.on_phase_start(model, Phase("train", 1), 0)
    gates = getattr(model, GATES_ATTR)
    unit = dict(method._blocks)["layer1.1"]
    state = gates.state.clone()
    state[unit] = 0.0
    method._set_state(state)
    block = model.layer1[1]
    seen = {}
    handle = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    model.eval()
    x = small.sample_batch("val")[0]
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(seen["y"], torch.relu(seen["x"]))  # identity shortcut only
    assert seen["x"].abs().sum() > 0
    handle.remove()
    # Exported: the block's convolutions are masked entirely, reported, outputs unchanged.
    method.probe = x
    masks = method.export_masks(model)
    assert "layer1.1" in method.report["closed_blocks"]
    for conv in ("layer1.1.conv1.weight", "layer1.1.conv2.weight"):
        assert not masks.expanded(conv, dict(model.named_parameters())[conv]).any()
    method.remove_gates(model)
    assert torch.allclose(method.before, method.after, atol=1e-5)
    assert_no_gates_left(model)


def test_a_depthwise_and_concat_model_comes_out_physically_smaller(dm):
    from tests.topologies import ResidualDepthwiseConcat

    torch.manual_seed(0)
    model = ResidualDepthwiseConcat(num_classes=dm.num_classes)
    model, method, result = train(dm, "custom", 0.5, epochs=4, finetune=1, model=model)
    assert {g.root for g, _ in method._gated} == {"stem", "c"}  # the stream (with a, b1, dw) and c
    assert abs(result.sparsity - 0.5) <= 0.02
    assert torch.allclose(method.before, method.after, atol=1e-5)
    art = deployable(model, result.masks, tuple(dm.input_shape), round_to=None)
    assert art.kind == "surgered"
    small = art.model
    assert small.stem.out_channels < 16 and small.dw.out_channels < 8 and small.c.out_channels < 24
    assert small.dw.groups == small.dw.out_channels == small.b1.out_channels
    assert art.params < 0.75 * art.cost.params_dense and art.flops < art.cost.flops_dense
    x = dm.sample_batch("val")[0]
    ref = copy.deepcopy(model)
    complete_channel_masks(ref, result.masks, tuple(dm.input_shape)).apply(ref)
    torch.testing.assert_close(small.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
    assert evaluate(small, dm.val_dataloader())["acc"] == pytest.approx(result.val_acc, abs=1e-6)


def test_flops_weighting_holds_a_flops_budget(dm):
    from prunelib.flops import model_cost

    model, method, result = train(dm, "lenet5", 0.5, epochs=4, finetune=0, cost_weighting="flops")
    cost = model_cost(model, tuple(dm.input_shape), result.masks, round_to=None)
    # Removed Conv/Linear FLOPs of the surgered model: the budget, to channel granularity.
    assert abs(1 - cost.flops_physical / cost.flops_dense - 0.5) <= 0.03, cost


# ------------------------------------------------------------------------------------------
# The standalone Lightning callback (gates created after the optimizer)
# ------------------------------------------------------------------------------------------
def test_standalone_callback_trains_the_gates_and_removes_them(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = PolarizationGates(sparsity=0.5)
    module = ClassifierModule(model, TrainConfig(accelerator="cpu"))
    seen = {}

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            if method._gates is not None:
                seen["in_optimizer"] = any(p is method._gates.theta for g in opt.param_groups for p in g["params"])
                seen["theta"] = method._gates.theta.detach().clone()

    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[PruningCallback(method), Watch()])
    trainer.fit(module, datamodule=dm)
    assert seen["in_optimizer"]  # the callback handed the gates to the run's optimizer
    assert float(seen["theta"].std()) > 0  # and it moved them
    assert method.masks is not None and abs(method.masks.sparsity(model) - 0.5) <= 0.01
    assert_no_gates_left(model)
    assert evaluate(model, dm.val_dataloader())["acc"] > 0.5


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def test_polarization_yaml_matches_the_constructor_and_loads_into_the_search_space():
    from search.preflight import check_method
    from search.space import SearchSpace, load_method_configs
    from tests.conftest import sampled_settings

    cfg = load_method_configs()["polarization"]
    accepted = inspect.signature(PolarizationGates.__init__).parameters
    for key, value in cfg["settings"].items():
        assert key in accepted, key
        default = accepted[key].default
        assert (list(value) == list(default)) if isinstance(value, list) else value == default, key
    assert set(accepted) - {"self"} == set(cfg["settings"])  # every setting documented
    for key in ("sparsity", "lambda_s", "lambda_p", "warmup_fraction", "min_open_fraction"):
        assert key in cfg["space"] and key in accepted
    check_method("polarization", cfg, pinned=True, search_settings=True, n_trials=1)
    space = SearchSpace({"polarization": cfg}, pinned=True)
    dists = space.distributions("polarization")
    assert dists["polarization.lambda_s"].log and dists["polarization.lambda_p"].log
    assert dists["polarization.sparsity"].low == 0.3 and dists["polarization.sparsity"].high == 0.9
    for settings in sampled_settings(space, "polarization"):
        PolarizationGates(**settings)
    assert PolarizationGates(sparsity=0.7).config()["sparsity"] == 0.7
    with pytest.raises(ValueError, match="polarization"):
        PolarizationGates(polarization="l1")
    with pytest.raises(ValueError, match="min_open_fraction"):
        PolarizationGates(min_open_fraction=1.5)
