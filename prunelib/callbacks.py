"""A Lightning callback that drives any :class:`~prunelib.methods.base.PruningMethod`.

The user's LightningModule stays untouched: the callback finds the network at
``pl_module.model`` (or uses the module itself) and forwards Lightning's hooks to the
method. Masks are enforced after every optimizer step, so pruned weights stay zero.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import nn

from prunelib.methods.base import Phase, PruningMethod

__all__ = ["PruningCallback"]


def _network(pl_module: L.LightningModule) -> nn.Module:
    return getattr(pl_module, "model", pl_module)


def _add_to_optimizers(trainer: L.Trainer, params: list[nn.Parameter]) -> None:
    """Give the run's first optimizer the method's own parameters (gates made after the
    optimizer, in standalone use), in its first param group (so its learning-rate schedule,
    one entry per group, covers them), unless it already has them."""
    if not params or not trainer.optimizers:
        return
    optimizer = trainer.optimizers[0]
    have = {id(p) for group in optimizer.param_groups for p in group["params"]}
    optimizer.param_groups[0]["params"].extend(p for p in params if id(p) not in have)


class PruningCallback(L.Callback):
    """Forwards training hooks to a pruning method for one phase of its plan.

    Args:
        method: the method to drive.
        phase: the phase being trained (its index in the plan too); with the default, a
            single phase named ``"train"`` that may prune.
        setup_method: call ``method.setup`` when fitting starts (done by the runner itself
            when it drives several phases, so the method is set up once).
    """

    def __init__(self, method: PruningMethod, phase: Phase | None = None, phase_index: int = 0,
                 setup_method: bool = True) -> None:
        self.method = method
        self.phase = phase or Phase("train", 0)
        self.phase_index = phase_index
        self.setup_method = setup_method

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = _network(pl_module)
        if self.phase.epochs == 0:  # standalone use: the phase is the whole fit
            self.phase = Phase(self.phase.name, int(trainer.max_epochs or 1), prunes=self.phase.prunes)
        if self.setup_method:
            self.method.setup(model, trainer.datamodule)
        _add_to_optimizers(trainer, self.method.trainable_parameters())
        # estimated_stepping_batches makes Lightning set up the train loader (it is still
        # unset in on_fit_start) and accounts for gradient accumulation.
        total_steps = trainer.estimated_stepping_batches
        epochs = max(1, int(trainer.max_epochs or 1))
        self.method.steps_per_epoch = (max(1, math.ceil(total_steps / epochs))
                                       if math.isfinite(total_steps) else 1)
        if self.setup_method:
            self.method.on_phase_start(model, self.phase, self.phase_index)
            extra = getattr(pl_module, "extra_losses", None)
            if isinstance(extra, list):  # modules built on ClassifierModule take the regulariser
                extra.append(lambda: self.method.regularization(model))
            batch_terms = getattr(pl_module, "batch_losses", None)
            if isinstance(batch_terms, list):  # and the batch-dependent term (distillation)
                batch_terms.append(lambda inputs, logits: self.method.distillation_loss(model, inputs, logits))
        self.method.after_optimizer_step(model)  # masks set before training hold from step 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        model = _network(pl_module)
        # In automatic optimisation this hook runs after optimizer.step().
        self.method.after_optimizer_step(model)
        if self.phase.prunes:
            self.method.on_train_batch_end(model, batch, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.method.on_train_epoch_end(_network(pl_module), trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.setup_method:
            self.method.on_phase_end(_network(pl_module), self.phase, self.phase_index)
