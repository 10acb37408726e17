"""PruningCallback used standalone, in a user's own LightningModule and Trainer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelib import SNIP, GradualMagnitudePruning, MagnitudePruning, RandomPruning, prunable_parameters
from prunelib.callbacks import PruningCallback
from prunelib.data import build_datamodule
from prunelib.models import build_model

BATCH = 64
LIMIT = 256  # 4 optimizer steps per epoch
EPOCHS = 4

# Lightning's hints for tiny data (no validation_step, few batches) are noise here.
pytestmark = [pytest.mark.filterwarnings("ignore:.*val_dataloader.*"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:.*(num_workers|log_every_n_steps).*")]


@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=LIMIT, batch_size=BATCH)


class BareNet(L.LightningModule):
    """The module *is* the network: layers are its own attributes, no ``.model``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        # Momentum and weight decay move pruned weights unless the masks are re-applied.
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


class WrappedNet(BareNet):
    """A module holding its network at ``.model``, like prunelib's ClassifierModule."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.model = build_model("mlp", (1, 8, 8), 10, width=0.25)

    def forward(self, x):
        return self.model(x)


class Watcher(L.Callback):
    """Placed after PruningCallback: checks masked weights right after every optimizer step."""

    def __init__(self, method, network) -> None:
        self.method = method
        self.network = network
        self.sparsity: list[float] = []
        self.leaks = 0
        self.first_batch: dict | None = None
        self.masks_each_step = []

    def _check(self) -> None:
        masks = self.method.masks
        if masks is None:
            return
        params = dict(self.network.named_parameters())
        for n in masks.names():
            self.leaks += int(torch.count_nonzero(params[n].detach()[~masks.masks[n]]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch is None:  # the weights the very first forward pass uses
            masks = self.method.masks
            self.first_batch = {"masks": None if masks is None else masks.clone()}
            self._check()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.method.masks
        self.sparsity.append(0.0 if masks is None else masks.sparsity(self.network))
        self.masks_each_step.append(None if masks is None else masks.clone())
        self._check()


def fit(module, dm, method, network, epochs=EPOCHS, use_datamodule=True):
    watcher = Watcher(method, network)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[PruningCallback(method), watcher])
    if use_datamodule:
        trainer.fit(module, datamodule=dm)
    else:
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return watcher


def network_of(module):
    return module.model if hasattr(module, "model") else module


def assert_pruned_zero(network, masks):
    params = dict(network.named_parameters())
    for n in masks.names():
        assert torch.count_nonzero(params[n].detach()[~masks.masks[n]]) == 0, n


@pytest.mark.parametrize("module_cls", [BareNet, WrappedNet], ids=["no-model-attr", "model-attr"])
def test_gmp_drives_pruning_in_users_trainer(dm, module_cls):
    module = module_cls()
    network = network_of(module)
    method = GradualMagnitudePruning(0.75)
    watcher = fit(module, dm, method, network)

    # Masks name the network's own parameters (not "model.net.1.weight").
    assert set(method.masks.names()) == set(prunable_parameters(network))
    steps = EPOCHS * math.ceil(LIMIT / BATCH)
    assert len(watcher.sparsity) == steps
    assert watcher.leaks == 0  # pruned weights were zero after every optimizer step
    assert watcher.sparsity == sorted(watcher.sparsity)
    assert len(set(watcher.sparsity)) >= 3  # gradual, not one cut
    assert watcher.sparsity[-1] == pytest.approx(0.75, abs=1e-3)
    assert method.masks.sparsity(network) == pytest.approx(0.75, abs=1e-3)
    assert_pruned_zero(network, method.masks)
    prev = None
    for m in watcher.masks_each_step:  # once pruned, never back
        if m is not None and prev is not None:
            for n in m.names():
                assert not bool((m.masks[n] & ~prev.masks[n]).any())
        prev = m if m is not None else prev


def test_standalone_gmp_ramp_spans_the_training(dm):
    module = BareNet()
    method = GradualMagnitudePruning(0.75, end_fraction=0.75, n_updates=4)
    watcher = fit(module, dm, method, module)
    steps = EPOCHS * math.ceil(LIMIT / BATCH)
    assert method.steps_per_epoch == math.ceil(LIMIT / BATCH)
    # The target is first reached at 75 % of the steps, not in the first epoch.
    first_at_target = next(i for i, s in enumerate(watcher.sparsity, 1) if s >= 0.75 - 1e-3)
    assert first_at_target == int(0.75 * steps)


@pytest.mark.parametrize("make", [lambda: SNIP(0.8), lambda: RandomPruning(0.8, at="init")],
                         ids=["snip", "random-init"])
@pytest.mark.parametrize("module_cls", [BareNet, WrappedNet], ids=["no-model-attr", "model-attr"])
def test_masks_set_before_training_hold_from_step_zero(dm, make, module_cls):
    module = module_cls()
    network = network_of(module)
    method = make()
    watcher = fit(module, dm, method, network, epochs=2)
    first = watcher.first_batch["masks"]
    assert first is not None  # masks exist before the first forward pass
    assert watcher.leaks == 0  # ...zero at step 0 and after every step
    assert first.sparsity(network) == pytest.approx(0.8, abs=1e-3)
    for m in watcher.masks_each_step:  # a fixed mask
        for n in first.names():
            assert torch.equal(m.masks[n], first.masks[n])
    assert_pruned_zero(network, method.masks)
    # The survivors did train.
    assert any(int(torch.count_nonzero(p)) > 0 for p in prunable_parameters(network).values())


def test_snip_callback_without_datamodule_raises(dm):
    module = BareNet()
    with pytest.raises(ValueError, match="needs training data"):
        fit(module, dm, SNIP(0.5), module, epochs=1, use_datamodule=False)


def test_one_shot_magnitude_cuts_at_fit_end(dm):
    module = WrappedNet()
    method = MagnitudePruning(0.6)
    watcher = fit(module, dm, method, module.model, epochs=1)
    assert all(s == 0.0 for s in watcher.sparsity)  # dense while training
    assert method.masks.sparsity(module.model) == pytest.approx(0.6, abs=1e-3)
    assert_pruned_zero(module.model, method.masks)
