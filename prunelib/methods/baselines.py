"""The baselines users compare against: one-shot magnitude, random, SNIP, GMP and IMP.

Each is a small :class:`~prunelib.methods.base.PruningMethod`; scores come from
:mod:`prunelib.importance`, exact-count masks from :func:`prunelib.selection.select_masks`,
timing from :mod:`prunelib.schedules`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelib.importance import magnitude_scores, random_scores, scored_names, snip_scores
from prunelib.masks import MaskSet
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field, train_then_finetune
from prunelib.schedules import Cubic, IterativeRounds
from prunelib.distributions import LayerDistribution, select_distributed

__all__ = ["MagnitudePruning", "RandomPruning", "SNIP", "GradualMagnitudePruning",
           "IterativeMagnitudePruning", "ScoredSettings", "RandomSettings", "SNIPSettings",
           "GMPSettings", "IMPSettings", "check_fraction"]


def check_fraction(name: str, value: float, low_open: bool = False, high_closed: bool = False) -> float:
    """``value`` as a float when it lies in ``[0, 1)`` (``(0, ..`` / ``.., 1]`` when asked);
    otherwise a ValueError naming ``name``."""
    v = float(value)
    ok = (v > 0.0 if low_open else v >= 0.0) and (v <= 1.0 if high_closed else v < 1.0)
    if not ok:
        lo, hi = ("(" if low_open else "["), ("]" if high_closed else ")")
        raise ValueError(f"{name} must be a fraction in {lo}0, 1{hi}, got {value}")
    return v


@dataclass(frozen=True)
class ScoredSettings(MethodSettings):
    """Settings shared by the methods that rank weights and cut to a global sparsity.

    Attributes:
        sparsity: global target, fraction of all Conv/Linear weights.
        distribution: how the target is shared among layers (:data:`~prunelib.distributions.DISTRIBUTIONS`):
            ``global`` (one ranking of all scored weights), ``uniform`` (the same sparsity per
            layer), ``protect_ends``, ``depth_increasing``.
        min_density: fraction of each scored layer always kept.
        exclude: parameter-name prefixes never pruned (still in the denominator).
        end_protection: ``protect_ends`` shape parameter (fraction).
        depth_slope: ``depth_increasing`` shape parameter (fraction).
        max_layer_sparsity: no layer is pruned beyond this fraction (``global``: every layer
            keeps at least ``1 - max_layer_sparsity``).
    """

    sparsity: float = 0.8
    distribution: str = "global"
    min_density: float = 0.0
    exclude: tuple[str, ...] = ()
    end_protection: float = 0.5
    depth_slope: float = 0.5
    max_layer_sparsity: float = 0.99

    def __post_init__(self) -> None:
        set_field(self, "sparsity", check_fraction("sparsity", self.sparsity))
        set_field(self, "min_density", check_fraction("min_density", self.min_density, high_closed=True))
        set_field(self, "exclude", tuple(self.exclude))
        self.layer_distribution()  # checks the distribution's name and shape parameters

    def layer_distribution(self) -> LayerDistribution:
        """The :class:`~prunelib.distributions.LayerDistribution` these settings describe."""
        return LayerDistribution(str(self.distribution), float(self.end_protection), float(self.depth_slope),
                                 float(self.max_layer_sparsity))


class _ScoredMethod(PruningMethod):
    """Shared behaviour: cut the lowest-scored weights to a sparsity under the distribution."""

    Settings = ScoredSettings

    def projected_masks(self, model: nn.Module) -> MaskSet | None:
        """The current masks once they reach ``sparsity``; before that, the target cut now by
        magnitude under the method's distribution (not applied). Per-layer densities, hence
        effective FLOPs, follow the distribution exactly except under one global ranking."""
        if self.masks is not None and self.masks.sparsity(model) >= self.sparsity - 1e-9:
            return self.masks
        names = getattr(self, "_scored", None) or scored_names(model, self.exclude)
        return select_distributed(model, magnitude_scores(model, names), self.sparsity,
                                  self.settings.layer_distribution(), min_density=self.min_density,
                                  previous=self.masks)

    def _cut(self, model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float,
             previous: MaskSet | None = None) -> MaskSet:
        masks = select_distributed(model, scores, sparsity, self.settings.layer_distribution(),
                                   min_density=self.min_density, previous=previous)
        masks.metadata.update({"method": self.name, "config": self.config()})
        masks.apply(model)
        self.masks = masks
        return masks


class MagnitudePruning(_ScoredMethod):
    """One-shot magnitude pruning (global or layer-wise), then a fine-tune with masks fixed.

    Plan: train ``epochs`` dense, cut the smallest ``|w|`` to ``sparsity``, fine-tune
    ``finetune_epochs``. Used data-free, ``finalize`` alone prunes a trained model.
    """

    name = "magnitude"
    needs_data = False

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return train_then_finetune(epochs, finetune_epochs, prunes=False)

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        self._scored = scored_names(model, self.exclude)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train":
            self._cut(model, magnitude_scores(model, self._scored), self.sparsity)

    def finalize(self, model: nn.Module) -> MaskSet:
        if self.masks is None:  # data-free use, or a plan with no training phase
            if not hasattr(self, "_scored"):
                self.setup(model)
            self._cut(model, magnitude_scores(model, self._scored), self.sparsity)
        return super().finalize(model)


@dataclass(frozen=True)
class RandomSettings(ScoredSettings):
    """:class:`ScoredSettings` plus when the random cut happens (``at``: ``init`` | ``trained``)
    and the seed of its scores."""

    distribution: str = "uniform"
    at: str = "init"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.at not in ("init", "trained"):
            raise ValueError(f"at must be 'init' or 'trained', got {self.at!r}")
        set_field(self, "seed", int(self.seed))


class RandomPruning(_ScoredMethod):
    """Random pruning to ``sparsity``: at initialisation (default) or after training.

    ``at="init"`` prunes before training and trains the sparse network; ``at="trained"``
    cuts after training and fine-tunes, like :class:`MagnitudePruning` with random scores.
    """

    name = "random"
    needs_data = False
    Settings = RandomSettings

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        if self.at == "init":
            return [Phase("train", epochs + finetune_epochs, prunes=False)]
        return MagnitudePruning.plan(self, epochs, finetune_epochs)

    def _cut_random(self, model: nn.Module) -> None:
        names = scored_names(model, self.exclude)
        self._cut(model, random_scores(model, names, self.seed), self.sparsity)

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        if self.at == "init":
            self._cut_random(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if self.at == "trained" and phase.name == "train":
            self._cut_random(model)

    def finalize(self, model: nn.Module) -> MaskSet:
        if self.masks is None:
            self._cut_random(model)
        return super().finalize(model)


@dataclass(frozen=True)
class SNIPSettings(ScoredSettings):
    """:class:`ScoredSettings` plus the number of scoring mini-batches (``batches``)."""

    batches: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.batches) < 1:
            raise ValueError(f"batches must be >= 1, got {self.batches}")
        set_field(self, "batches", int(self.batches))


class SNIP(_ScoredMethod):
    """SNIP (Lee et al. 2019): prune at initialisation by connection sensitivity.

    ``|w * dL/dw|`` on ``batches`` training mini-batches (1 in the paper; more is a common
    variant), global top-k, then the sparse network trains for the whole budget.
    """

    name = "snip"
    needs_data = True
    Settings = SNIPSettings

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return [Phase("train", epochs + finetune_epochs, prunes=False)]

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        super().setup(model, datamodule)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(self.batches):
            x, y = datamodule.sample_batch("train", generator=gen)
            batches.append((x.to(device), y.to(device)))
        was_training = model.training
        model.train()
        scores = snip_scores(model, batches, scored_names(model, self.exclude), loss_fn=self.task_loss)
        model.train(was_training)
        self.cost.extra_forward_passes += self.batches
        self.cost.extra_backward_passes += self.batches
        self._cut(model, scores, self.sparsity)


@dataclass(frozen=True)
class GMPSettings(ScoredSettings):
    """:class:`ScoredSettings` plus the cubic ramp: it spans ``start_fraction`` to
    ``end_fraction`` of the training steps with ``n_updates`` mask updates, from
    ``initial_sparsity``."""

    distribution: str = "uniform"
    start_fraction: float = 0.0
    end_fraction: float = 0.75
    n_updates: int = 10
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.start_fraction) < float(self.end_fraction) <= 1.0:
            raise ValueError("need 0 <= start_fraction < end_fraction <= 1, got "
                             f"{self.start_fraction}, {self.end_fraction}")
        set_field(self, "start_fraction", float(self.start_fraction))
        set_field(self, "end_fraction", float(self.end_fraction))
        set_field(self, "n_updates", int(self.n_updates))
        set_field(self, "initial_sparsity", check_fraction("initial_sparsity", self.initial_sparsity))


class GradualMagnitudePruning(_ScoredMethod):
    """Gradual magnitude pruning (Zhu & Gupta 2017) on the cubic schedule.

    The ramp spans ``start_fraction`` to ``end_fraction`` of the training phase's steps with
    ``n_updates`` mask updates; masks stay fixed afterwards and during any fine-tune.
    """

    name = "gmp"
    needs_data = True
    Settings = GMPSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule: Cubic | None = None

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return train_then_finetune(epochs, finetune_epochs)

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        self._scored = scored_names(model, self.exclude)

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.prunes:
            self.schedule = Cubic.fit_to(self.sparsity, phase.epochs * self.steps_per_epoch,
                                         self.start_fraction, self.end_fraction, self.n_updates,
                                         self.initial_sparsity)

    def on_train_batch_end(self, model: nn.Module, batch: Any, step: int) -> None:
        if self.schedule is None:
            return
        target = self.schedule.target_at(step)
        if target is not None:
            self._cut(model, magnitude_scores(model, self._scored), target, previous=self.masks)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.prunes and (self.masks is None or self.masks.sparsity(model) < self.sparsity - 1e-9):
            # A phase shorter than the ramp (tiny data) still ends at the target.
            self._cut(model, magnitude_scores(model, self._scored), self.sparsity, previous=self.masks)
        self.schedule = None


@dataclass(frozen=True)
class IMPSettings(ScoredSettings):
    """:class:`ScoredSettings` plus ``rounds`` of prune-and-retrain, the rewind mode
    (``weights`` | ``lr``) and the epoch rewound to (``rewind_epoch``)."""

    rounds: int = 3
    rewind: str = "weights"
    rewind_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rewind not in ("weights", "lr"):
            raise ValueError(f"rewind must be 'weights' or 'lr', got {self.rewind!r}")
        if int(self.rewind_epoch) < 0:
            raise ValueError(f"rewind_epoch must be >= 0, got {self.rewind_epoch}")
        if int(self.rounds) < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        set_field(self, "rounds", int(self.rounds))
        set_field(self, "rewind_epoch", int(self.rewind_epoch))


class IterativeMagnitudePruning(_ScoredMethod):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Renda et al. 2020).

    ``rounds`` prune-and-retrain rounds, each removing the same fraction of survivors, then a
    final training of the sparse network. ``rewind="weights"`` resets survivors to their values
    at ``rewind_epoch`` (0 = initialisation, the original lottery ticket) and replays the LR
    schedule from there; ``rewind="lr"`` keeps the trained weights and replays the whole LR
    schedule (learning-rate rewinding). Cost: ``rounds + 1`` trainings.
    """

    name = "imp"
    needs_data = True
    Settings = IMPSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = IterativeRounds(self.sparsity, self.rounds)
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._k = self.rewind_epoch if self.rewind == "weights" else 0

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        k = min(self.rewind_epoch, max(epochs - 1, 0)) if self.rewind == "weights" else 0
        self._k = k  # the rewind point actually used (clamped to the run's length)
        phases = [Phase("round1", epochs, prunes=False)]
        for r in range(2, self.rounds + 2):
            label = f"round{r}" if r <= self.rounds else "final"
            phases.append(Phase(label, epochs - k, lr_start_epoch=k, lr_total_epochs=epochs,
                                prunes=False))
        return phases

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        self._scored = scored_names(model, self.exclude)
        if self.rewind == "weights" and self._k == 0:
            self._rewind_state = copy.deepcopy(model.state_dict())

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        if (self._rewind_state is None and self.rewind == "weights"
                and epoch + 1 == self._k):
            self._rewind_state = copy.deepcopy(model.state_dict())

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        round_no = index + 1
        target = self.schedule.target_at(round_no)
        if target is None:
            return  # the final training of the sparse network
        self._cut(model, magnitude_scores(model, self._scored), target, previous=self.masks)

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if index == 0 or self.rewind == "lr":
            return
        if self._rewind_state is None:  # a run shorter than rewind_epoch: rewind to where it got
            return
        model.load_state_dict(self._rewind_state)
        assert self.masks is not None
        self.masks.apply(model)
