"""The method protocol: optional hooks that mirror a training run.

Methods differ in *when* they act, so the protocol is a set of hooks rather than one call.
A method scores and selects weights; a :mod:`~prunelib.schedules` object says when to cut;
the runner (:func:`prunelib.training.run_pruning`) owns the Lightning trainers and calls:

1. ``setup(model, datamodule)`` once (data-free methods accept ``datamodule=None``);
2. for each :class:`Phase` in ``plan(epochs, finetune_epochs)`` (the outer loop a method
   declares: fine-tuning after a one-shot cut, IMP rounds...):
   ``on_phase_start`` -> per step ``after_optimizer_step`` then ``on_train_batch_end``,
   per epoch ``on_train_epoch_end`` -> ``on_phase_end``;
3. ``finalize(model) -> MaskSet``.

Data-free methods implement only ``finalize`` (and ``plan`` returning no phases).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from prunelib.masks import MaskSet

__all__ = ["Phase", "PruningMethod", "train_then_finetune"]


@dataclass(frozen=True)
class Phase:
    """One training run inside a method's plan.

    Attributes:
        name: label used in progress output and history (``"train"``, ``"finetune"``, ``"round2"``).
            A phase named ``"finetune"`` recovers after a cut: the runner trains it at
            ``TrainConfig.finetune_lr`` instead of restarting at the peak learning rate.
        epochs: epochs to train in this phase.
        lr_start_epoch: where in the LR schedule this phase starts (weight rewinding to epoch k
            replays the schedule from k).
        lr_total_epochs: length of the LR schedule this phase follows (default: ``epochs``).
        prunes: whether the method's step hooks may change the masks during this phase.
    """

    name: str
    epochs: int
    lr_start_epoch: int = 0
    lr_total_epochs: int | None = None
    prunes: bool = True


def train_then_finetune(epochs: int, finetune_epochs: int, prunes: bool = True) -> list[Phase]:
    """The common plan: one training phase (kept at 0 epochs: its end is where a one-shot
    cut happens), then a fine-tune phase with the masks fixed when ``finetune_epochs > 0``."""
    phases = [Phase("train", epochs, prunes=prunes)]
    if finetune_epochs > 0:
        phases.append(Phase("finetune", finetune_epochs, prunes=False))
    return phases


@dataclass
class MethodCost:
    """Extra work a method adds on top of plain training.

    Attributes:
        extra_forward_passes: forward passes over one batch beyond training (probes,
            scoring batches, candidate evaluations).
        extra_backward_passes: backward passes beyond training (SNIP's scoring batch).
        extra_params: parameters the method adds during training (gates), removed at the end.
    """

    extra_forward_passes: int = 0
    extra_backward_passes: int = 0
    extra_params: int = 0


class PruningMethod:
    """Base class of every pruning method; every hook is optional.

    Subclasses set ``name`` (the registry key, also the ``conf/method/NAME.yaml`` file) and
    ``needs_data``. The current masks live in ``self.masks``; ``after_optimizer_step``
    re-applies them so pruned weights stay exactly zero through training.
    """

    name: ClassVar[str] = "base"
    needs_data: ClassVar[bool] = True

    def __init__(self) -> None:
        self.masks: MaskSet | None = None
        self.cost = MethodCost()
        self.steps_per_epoch: int = 1

    # -- description -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The method's settings as a JSON-friendly dict (stored with exported masks)."""
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), list, tuple))}

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """The training phases this method needs, given the trial's epoch budget."""
        return [Phase("train", epochs)]

    # -- hooks -----------------------------------------------------------------------
    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Called once before any training; data-free methods get ``datamodule=None``."""
        if self.needs_data and datamodule is None:
            raise ValueError(f"method {self.name!r} needs training data; pass a datamodule")

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        """Called before each phase's trainer starts (rewinding happens here)."""

    def on_train_batch_end(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int) -> None:
        """Called after each optimizer step (``step`` counts steps within the phase, from 1)."""

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called at the end of each training epoch of a phase (``epoch`` from 0)."""

    def regularization(self, model: nn.Module) -> Tensor | None:
        """An extra loss term added to the training loss at every step (None = nothing).

        Methods that train gates or scores (polarization) return their regulariser here; the
        runner and :class:`~prunelib.callbacks.PruningCallback` add it to the module's loss.
        """
        return None

    def distillation_loss(self, model: nn.Module, inputs: Tensor, logits: Tensor) -> Tensor | None:
        """An extra loss term that needs the training batch: ``inputs`` and the model's
        ``logits`` on them (None = nothing). Knowledge distillation (RL-Pruner) compares the
        logits with a teacher's on the same inputs; the runner adds the term to the loss.
        """
        return None

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Keep pruned weights at zero after the optimizer moved them."""
        if self.masks is not None:
            self.masks.enforce(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        """Called after each phase (one-shot cuts at the end of training happen here)."""

    def projected_masks(self, model: nn.Module) -> MaskSet | None:
        """The masks this method is heading for, judged from the model as it is now, without
        changing the model or the method (None = dense).

        Early stopping compares trials by the FLOPs they will end at, not by those of a model
        still dense or half-way up a sparsity ramp. Default: the current masks (right for
        methods whose masks are set at ``setup``, and all a method can say before a cut it
        cannot preview); methods with a sparsity target cut to it now, by magnitude.
        """
        return self.masks

    def write_artifacts(self, directory: str | os.PathLike) -> list[Path]:
        """Write what the method learned besides masks (pictures, logs) into ``directory``;
        returns the files written. Nothing by default (RL-Pruner writes its distribution)."""
        return []

    def finalize(self, model: nn.Module) -> MaskSet:
        """The final masks (applied to ``model``); the method's result."""
        if self.masks is None:
            raise RuntimeError(f"method {self.name!r} produced no masks; was it run?")
        self.masks.apply(model)
        return self.masks
