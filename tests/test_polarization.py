"""Polarization consensus sub-network: binary gates, STE, polarizer, target, gate removal.

Every run is a real :func:`run_pruning` on digits (512 training samples, 8 steps per epoch).
Spies subclass the method to look at the gated network right before the gates are converted
(polarization, the state the losses reached) and right around the removal of the gates (the
outputs must not change). Gate removal is checked on the model itself: no gate module, hook,
parameter or buffer may stay behind.
"""

from __future__ import annotations

import inspect
import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from prunelib.callbacks import PruningCallback
from prunelib.data import build_datamodule
from prunelib.masks import sparsity_report
from prunelib.methods import METHODS, register_method
from prunelib.methods.base import Phase
from prunelib.methods.polarization import GATES_ATTR, GateModule, PolarizationGates, _HardGate
from prunelib.models import BasicBlock, build_model
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
    """Records the gated state before export and the outputs around the gate removal."""

    probe: Tensor | None = None

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train" and self._gates is not None:
            self.seen = {"stats01": self.polarization_stats(margin=0.1),
                         "density": self.expected_density(),
                         "hard_sparsity": self.hard_sparsity()}
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
          width: float = 1.0, seed: int = 0, **settings):
    torch.manual_seed(seed)
    model = build_model(model_name, dm.input_shape, dm.num_classes, width=width)
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
    assert not [n for n in names if GATES_ATTR in n or "logits" in n]


# ------------------------------------------------------------------------------------------
# Training on digits: polarization, target, gate removal
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_gates_polarize_and_the_target_is_met(runs, name):
    model, method, result = runs[name]
    stats = method.seen["stats01"]
    assert stats["gates"] == method.cost.extra_params > 0
    assert stats["polarized"] >= 0.9, stats  # within 0.1 of 0 or 1 at the end of training
    # The gates themselves got close to the target (the enforcement only trims the rest).
    assert abs(method.seen["hard_sparsity"] - 0.5) < 0.1, method.seen
    assert abs(result.sparsity - 0.5) <= 0.01
    assert abs(sparsity_report(model)["global"]["sparsity"] - 0.5) <= 0.01  # zeros in the weights
    assert method.report["adjustments"] < 0.1 * stats["gates"]
    assert result.val_acc >= 0.75, result.val_acc  # magnitude pruning gets about 0.90 here


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
    assert abs(method.seen["hard_sparsity"] - target) < 0.15, method.seen
    assert_no_gates_left(model)
    assert torch.allclose(method.before, method.after, atol=1e-5)
    assert result.val_acc >= 0.6, result.val_acc


def test_the_regularizer_reaches_the_loss_and_moves_the_gates(dm):
    # Without the sparsity loss, nothing closes gates (the polarizer holds open gates open).
    _, free, _ = train(dm, "mlp", 0.6, finetune=0, lambda_s=0.0)
    assert free.seen["hard_sparsity"] < 0.05 and free.seen["density"] > 0.9, free.seen
    # With a strong sparsity loss the live fraction goes to the target during the run.
    _, held, _ = train(dm, "mlp", 0.6, finetune=0, lambda_s=100.0)
    assert abs(held.seen["density"] - 0.4) < 0.05, held.seen
    assert abs(held.seen["hard_sparsity"] - 0.6) < 0.1, held.seen


# ------------------------------------------------------------------------------------------
# Straight-through estimator
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ste", ["sigmoid", "identity"])
def test_hard_gate_is_binary_with_a_straight_through_gradient(ste):
    z = torch.tensor([-2.0, -0.3, 0.2, 1.5], requires_grad=True)
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    temperature = 0.7
    g = _HardGate.apply(z, temperature, ste)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    (g * w).sum().backward()
    s = torch.sigmoid(z.detach() / temperature)
    expect = w * s * (1 - s) / temperature if ste == "sigmoid" else w
    assert torch.allclose(z.grad, expect)
    assert (z.grad != 0).all()  # closed gates get a gradient too


def test_gated_forward_is_exactly_binary_and_logits_get_gradients(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes, width=0.1)
    method = PolarizationGates(sparsity=0.5, warmup_fraction=0.0)
    method.setup(model, dm)
    gates = getattr(model, GATES_ATTR)
    assert isinstance(gates, GateModule) and method.cost.extra_params == 30 + 10
    assert not any(GATES_ATTR in n for n, _ in model.named_parameters())  # own optimizer
    with torch.no_grad():
        gates.logits.copy_(torch.linspace(-1.0, 1.0, gates.logits.numel()))
    method.steps_per_epoch = 8
    method.on_phase_start(model, Phase("train", 1), 0)
    raw = {}
    hidden = model.net[1]
    hidden.register_forward_hook(lambda m, i, o: raw.update(pre=i[0]))
    model.net[2].register_forward_hook(lambda m, i, o: raw.update(gated=i[0]))
    x, y = dm.sample_batch("train")
    loss = nn.functional.cross_entropy(model(x), y) + method.regularization(model)
    dense = nn.functional.linear(raw["pre"], hidden.weight, hidden.bias)
    g = (gates.logits[:30] > 0).float()
    assert torch.equal(raw["gated"], dense * g)  # exactly 0 or exactly the unit's output
    loss.backward()
    assert gates.logits.grad is not None and (gates.logits.grad[:30] != 0).all()
    before = gates.logits.detach().clone()
    method.after_optimizer_step(model)  # the method's own Adam steps the logits
    assert not torch.equal(before, gates.logits.detach()) and gates.logits.grad is None


# ------------------------------------------------------------------------------------------
# Residual networks: block gates
# ------------------------------------------------------------------------------------------
def test_resnet_block_gates_train_and_a_closed_block_passes_the_shortcut(dm):
    small = build_datamodule("digits", limit_train=128, batch_size=64)
    torch.manual_seed(0)
    model = build_model("resnet20", small.input_shape, small.num_classes, width=0.25)
    method = Spy(sparsity=0.4)
    method.probe = small.sample_batch("val")[0]
    result = run_pruning(model, small, method, TrainConfig(epochs=2, finetune_epochs=1,
                                                           accelerator="cpu"))
    blocks = [n for n, m in model.named_modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    assert sorted(method.gate_states()) == sorted(
        blocks + ["conv1"] + [f"{b}.conv{i}" for b in blocks for i in (1, 2)]
        + ["layer2.0.shortcut.0", "layer3.0.shortcut.0"])
    assert all(method.gate_states()[b].numel() == 1 for b in blocks)
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
    group = next(g for g in gates.groups if g.kind == "block" and g.layer == "layer1.1")
    with torch.no_grad():
        gates.logits[group.offset] = -3.0
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
    assert abs(masks.sparsity(model) - 0.1) <= 0.01


# ------------------------------------------------------------------------------------------
# The standalone Lightning callback (gates created after the optimizer)
# ------------------------------------------------------------------------------------------
def test_standalone_callback_trains_the_gates_and_removes_them(dm):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = PolarizationGates(sparsity=0.5)
    module = ClassifierModule(model, TrainConfig(accelerator="cpu"))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[PruningCallback(method)])
    trainer.fit(module, datamodule=dm)
    assert method.masks is not None and abs(method.masks.sparsity(model) - 0.5) <= 0.01
    assert method.report["sparsity_gates"] > 0.3  # the gates moved by themselves
    assert_no_gates_left(model)
    assert evaluate(model, dm.val_dataloader())["acc"] > 0.5


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def test_polarization_yaml_matches_the_constructor_and_loads_into_the_search_space():
    from search.config import _check_method_settings
    from search.space import SearchSpace, load_method_configs
    from tests.conftest import sampled_settings

    cfg = load_method_configs()["polarization"]
    accepted = inspect.signature(PolarizationGates.__init__).parameters
    for key, value in cfg["settings"].items():
        assert key in accepted, key
        default = accepted[key].default
        assert (list(value) == list(default)) if isinstance(value, list) else value == default, key
    assert set(accepted) - {"self"} == set(cfg["settings"])  # every setting documented
    for key in ("sparsity", "lambda_s", "lambda_p", "warmup_fraction", "gate_init"):
        assert key in cfg["space"] and key in accepted
    _check_method_settings("polarization", cfg)
    space = SearchSpace({"polarization": cfg}, pinned=True)
    dists = space.distributions("polarization")
    assert dists["polarization.lambda_s"].log and dists["polarization.lambda_p"].log
    assert dists["polarization.sparsity"].low == 0.3 and dists["polarization.sparsity"].high == 0.9
    for settings in sampled_settings(space, "polarization"):
        PolarizationGates(**settings)
    with pytest.raises(ValueError, match="polarization"):
        PolarizationGates(polarization="l1")
