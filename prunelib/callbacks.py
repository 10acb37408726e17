"""A Lightning callback that drives any :class:`~prunelib.methods.base.PruningMethod`.

The user's LightningModule stays untouched: the callback finds the network at
``pl_module.model`` (or uses the module itself) and forwards Lightning's hooks to the
method. Masks are enforced after every optimizer step, so pruned weights stay zero.

Loss terms a method adds (a regulariser, knowledge distillation) reach a module that does not
collect them itself (no ``extra_losses`` list, as :class:`~prunelib.training.ClassifierModule`
has) by a second backward pass of the terms after the module's own, before the optimizer step:
gradients add up, so the module's loss is never rewritten.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
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
        add_loss_terms: add the method's loss terms by an extra backward pass (True), or leave
            them to the module (False); None = when the module has no ``extra_losses`` list.
    """

    def __init__(self, method: PruningMethod, phase: Phase | None = None, phase_index: int = 0,
                 setup_method: bool = True, add_loss_terms: bool | None = None) -> None:
        self.method = method
        self.phase = phase or Phase("train", 0)
        self.phase_index = phase_index
        self.setup_method = setup_method
        self.add_loss_terms = add_loss_terms
        self._inputs: torch.Tensor | None = None
        # Only methods that define a batch term (distillation) pay for the extra forward pass.
        self._has_batch_term = type(method).distillation_loss is not PruningMethod.distillation_loss

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
        if self.add_loss_terms is None:
            self.add_loss_terms = not isinstance(getattr(pl_module, "extra_losses", None), list)
        if self.setup_method:
            self.method.on_phase_start(model, self.phase, self.phase_index)
            if not self.add_loss_terms:  # modules built on ClassifierModule take the terms themselves
                pl_module.extra_losses.append(lambda: self.method.regularization(model))
                batch_terms = getattr(pl_module, "batch_losses", None)
                if isinstance(batch_terms, list):  # and the batch-dependent term (distillation)
                    batch_terms.append(lambda inputs, logits: self.method.distillation_loss(model, inputs, logits))
        self.method.after_optimizer_step(model)  # masks set before training hold from step 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.add_loss_terms and self._has_batch_term and isinstance(batch, (tuple, list)) and batch:
            self._inputs = batch[0] if isinstance(batch[0], torch.Tensor) else None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.add_loss_terms:
            return
        model = _network(pl_module)
        total = self.method.regularization(model)
        if self._inputs is not None:
            term = self.method.distillation_loss(model, self._inputs, model(self._inputs))
            if term is not None:
                total = term if total is None else total + term
        if total is None or not total.requires_grad:
            return
        # Scale as Lightning scaled the module's loss: gradient accumulation and AMP's scaler.
        total = total / max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        (scaler.scale(total) if scaler is not None else total).backward()

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
