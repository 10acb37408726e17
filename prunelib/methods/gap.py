"""GaP: scheduled grow-and-prune (Ma et al., ICLR 2022, arXiv 2106.09857), the cyclic variant.

The prunable layers are split into ``num_partitions`` contiguous groups of similar size. The
network starts from its random initialisation with every group but the first magnitude-pruned
to the target (no dense pre-training). Then, for ``rounds`` rounds, each group in turn is
*grown*: its mask is lifted (its pruned weights restart from zero), the network trains for
``epochs_per_step`` epochs with the other groups' masks fixed, and the grown group is
magnitude-pruned back to its target. A final fine-tune trains with every mask fixed.

Following the authors' Transformer code (``boone891214/GaP``), each step is its own training
run, so the optimizer state (momentum of the entries that were masked) is reset at every step;
by default the learning rate follows one cosine over all steps (``lr_schedule="continuous"``),
``"restart"`` replays it within each step as separate runs would. See
``reference/algorithms.md`` section 6 for the open details and the decisions taken here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunelib.importance import magnitude_scores, scored_names
from prunelib.masks import MaskSet, prunable_parameters
from prunelib.methods.base import Phase, PruningMethod, set_field
from prunelib.methods.baselines import ScoredSettings
from prunelib.schedules import GrowPruneCycles
from prunelib.selection import largest_remainder, select_masks

__all__ = ["GrowAndPrune", "balanced_partitions"]

log = logging.getLogger("prunelib")

_LR_SCHEDULES = ("continuous", "restart")
_STEP_PREFIX = "step"


def balanced_partitions(sizes: list[int], num_partitions: int) -> list[list[int]]:
    """Split layers (in order) into ``num_partitions`` contiguous non-empty groups.

    Minimises the largest group's weight count (the linear-partition problem, by dynamic
    programming), so no step grows far more weights than another.

    Args:
        sizes: weight count of each layer, in depth order.
        num_partitions: groups wanted; at most ``len(sizes)``.

    Returns:
        The layer indices of each group, in order.
    """
    n = len(sizes)
    if not 1 <= num_partitions <= n:
        raise ValueError(f"cannot split {n} layers into {num_partitions} non-empty groups")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[j][i]: smallest possible largest group when the first i layers form j groups.
    best = [[inf] * (n + 1) for _ in range(num_partitions + 1)]
    cut = [[0] * (n + 1) for _ in range(num_partitions + 1)]
    best[0][0] = 0
    for j in range(1, num_partitions + 1):
        for i in range(j, n + 1):
            for m in range(j - 1, i):
                value = max(best[j - 1][m], prefix[i] - prefix[m])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, m
    groups: list[list[int]] = []
    i = n
    for j in range(num_partitions, 0, -1):
        m = cut[j][i]
        groups.append(list(range(m, i)))
        i = m
    return groups[::-1]


@dataclass(frozen=True)
class GaPSettings(ScoredSettings):
    """GaP's settings (see :class:`GrowAndPrune` for each one)."""

    distribution: str = "uniform"
    num_partitions: int = 3
    epochs_per_step: int | None = 1
    rounds: int = 1
    lr_schedule: str = "continuous"
    partitions: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_schedule not in _LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(_LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.partitions is not None:
            if not self.partitions or any(not group for group in self.partitions):
                raise ValueError("partitions must be a non-empty list of non-empty prefix lists")
            set_field(self, "partitions", tuple(tuple(group) for group in self.partitions))
            set_field(self, "num_partitions", len(self.partitions))
        if int(self.num_partitions) < 1 or int(self.rounds) < 1:
            raise ValueError(f"num_partitions and rounds must be >= 1, got {self.num_partitions}, {self.rounds}")
        if self.epochs_per_step is not None and int(self.epochs_per_step) < 1:
            raise ValueError(f"epochs_per_step must be >= 1 (or None), got {self.epochs_per_step}")
        set_field(self, "num_partitions", int(self.num_partitions))
        set_field(self, "rounds", int(self.rounds))
        if self.epochs_per_step is not None:
            set_field(self, "epochs_per_step", int(self.epochs_per_step))


class GrowAndPrune(PruningMethod):
    """Cyclic GaP: grow one group of layers dense at a time, train, prune it back.

    Plan: ``num_partitions * rounds`` training phases named ``step1``, ``step2``, ... of
    ``epochs_per_step`` epochs each (step ``k`` grows group ``(k - 1) % num_partitions``),
    then a ``finetune`` phase of the trial's fine-tune epochs with every mask fixed. Total
    training: ``num_partitions * rounds * epochs_per_step + finetune_epochs`` epochs.

    Every group ends at its target: with ``distribution="global"`` that is ``sparsity`` of
    the group's weights (ranked by magnitude across the group's layers, the paper's
    "non-uniform"); otherwise the group's layers get the counts the
    :class:`~prunelib.distributions.LayerDistribution` allocates over the whole model, so the
    group's target is the sum of its layers' shares (``sparsity`` for ``uniform``). Counts are
    exact integers; the global sparsity is ``round(sparsity * weights) / weights``.

    Args:
        sparsity: global target, fraction of all Conv/Linear weights (default 0.8, the repo's).
        num_partitions: kappa, the number of layer groups (default 3, the repo's). Groups are
            contiguous in registration order and balanced by weight count unless
            ``partitions`` is given. Must not exceed the number of scored layers.
        epochs_per_step: T, epochs of each grow-and-prune step (the repo defaults to 5);
            None = spread the trial's ``epochs`` over the steps,
            ``max(1, epochs // (num_partitions * rounds))``.
        rounds: R, passes over all groups (default 1).
        distribution: per-layer sparsity distribution: ``uniform`` (default, the paper's
            uniform), ``global`` (the paper's non-uniform), ``protect_ends``, ``depth_increasing``.
        end_protection / depth_slope: the distribution's shape parameters (fractions).
        max_layer_sparsity: no layer is pruned beyond this fraction (default 0.99).
        lr_schedule: ``"continuous"`` (default: one cosine over all steps, like a single
            training run of the same length) or ``"restart"`` (each step replays the cosine).
        partitions: explicit groups as lists of parameter-name prefixes (e.g.
            ``[["features"], ["classifier"]]``); overrides ``num_partitions``. Every scored
            layer must match exactly one group.
        min_density: fraction of each layer always kept.
        exclude: parameter-name prefixes never pruned nor grown (still in the denominator;
            the reference advises keeping the first conv and the classifier out, or alone).
    """

    name = "gap"
    needs_data = True

    Settings = GaPSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_distribution = self.settings.layer_distribution()
        self.schedule: GrowPruneCycles | None = None
        #: Parameter names of each group (set by ``setup``).
        self.groups: list[list[str]] = []
        #: Target pruned-weight count of each group (set by ``setup``).
        self.group_zeros: list[int] = []
        #: The group grown at each step so far (0-based indices), for logs and tests.
        self.grown_history: list[int] = []
        self._group_masks: dict[int, MaskSet] = {}
        self._layer_zeros: dict[str, int] | None = None
        self._step = 0
        self._grown: int | None = None
        self._total = 0

    # -- plan ---------------------------------------------------------------------------------
    def _make_schedule(self, epochs: int) -> GrowPruneCycles:
        steps = self.num_partitions * self.rounds
        per_step = self.epochs_per_step or max(1, int(epochs) // steps)
        return GrowPruneCycles(self.sparsity, self.num_partitions, self.rounds, per_step)

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        self.schedule = self._make_schedule(epochs)
        per_step, total = self.schedule.epochs_per_step, self.schedule.growth_epochs
        phases = []
        for k in range(1, self.schedule.total_steps + 1):
            if self.lr_schedule == "continuous":
                phases.append(Phase(f"{_STEP_PREFIX}{k}", per_step, lr_start_epoch=(k - 1) * per_step,
                                    lr_total_epochs=total))
            else:
                phases.append(Phase(f"{_STEP_PREFIX}{k}", per_step))
        if finetune_epochs > 0:
            phases.append(Phase("finetune", finetune_epochs, prunes=False, recovers=True))
        return phases

    # -- setup: groups, targets, initial masks --------------------------------------------------
    def _partition(self, names: list[str], sizes: dict[str, int]) -> list[list[str]]:
        if self.partitions is not None:
            groups: list[list[str]] = [[] for _ in self.partitions]
            for n in names:
                hits = [i for i, prefixes in enumerate(self.partitions) if n.startswith(tuple(prefixes))]
                if len(hits) != 1:
                    raise ValueError(f"gap: layer {n!r} matches {len(hits)} of the partitions "
                                     f"{self.partitions}; each layer needs exactly one")
                groups[hits[0]].append(n)
            empty = [self.partitions[i] for i, g in enumerate(groups) if not g]
            if empty:
                raise ValueError(f"gap: partitions {empty} match no prunable layer")
            return groups
        if self.num_partitions > len(names):
            raise ValueError(f"gap: num_partitions={self.num_partitions} but the model has only "
                             f"{len(names)} prunable layers; lower num_partitions")
        index_groups = balanced_partitions([sizes[n] for n in names], self.num_partitions)
        return [[names[i] for i in group] for group in index_groups]

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        super().setup(model, datamodule)
        if self.schedule is None:  # driven without the runner's plan: one epoch per step
            self.schedule = self._make_schedule(self.num_partitions * self.rounds)
        params = prunable_parameters(model)
        names = scored_names(model, self.exclude)
        if not names:
            raise ValueError("gap: no prunable layer left after `exclude`")
        sizes = {n: params[n].numel() for n in names}
        self._total = sum(p.numel() for p in params.values())
        zeros = round(self.sparsity * self._total)
        self.groups = self._partition(names, sizes)
        dist = self.layer_distribution
        if dist.ranked:
            # A global ranking inside each group; groups get proportional, exact quotas so every
            # group (and hence the whole model) returns to the same sparsity.
            caps = dist.layer_caps(sizes, max(self.min_density, 1.0 - dist.max_layer_sparsity))
            group_sizes = [sum(sizes[n] for n in g) for g in self.groups]
            scored = sum(group_sizes)
            quotas = {str(i): zeros * size / scored for i, size in enumerate(group_sizes)}
            group_caps = {str(i): sum(caps[n] for n in g) for i, g in enumerate(self.groups)}
            counts = largest_remainder(quotas, zeros, group_caps)
            self.group_zeros = [counts[str(i)] for i in range(len(self.groups))]
            self._layer_zeros = None
        else:
            self._layer_zeros = dist.allocate(sizes, zeros, self.min_density)
            self.group_zeros = [sum(self._layer_zeros[n] for n in g) for g in self.groups]
        self._group_masks = {}
        self._step = 0
        self.grown_history = []
        # Every group but the first starts pruned from the random initialisation; the first is
        # the one grown in step 1, so it starts dense (the repo's step_0).
        for g in range(1, len(self.groups)):
            self._group_masks[g] = self._prune_group(model, g)
        self.masks = self._union(skip=None)
        self.masks.apply(model)
        log.info("gap: %d groups %s, %d steps of %d epochs, target zeros per group %s",
                 len(self.groups), [len(g) for g in self.groups], self.schedule.total_steps,
                 self.schedule.epochs_per_step, self.group_zeros)

    def _prune_group(self, model: nn.Module, group: int) -> MaskSet:
        """Magnitude-prune group ``group`` to its target count (its weights' current |w|)."""
        names = self.groups[group]
        scores = magnitude_scores(model, names)
        if self._layer_zeros is not None:
            params = prunable_parameters(model)
            per_layer = {n: self._layer_zeros[n] / params[n].numel() for n in names}
            return select_masks(model, scores, per_layer, min_density=self.min_density)
        floor = max(self.min_density, 1.0 - self.layer_distribution.max_layer_sparsity)
        # select_masks counts a float target over all Conv/Linear weights: this one is the
        # group's exact quota (unscored layers are left as they are).
        return select_masks(model, scores, self.group_zeros[group] / self._total, scope="global",
                            min_density=floor)

    def _union(self, skip: int | None) -> MaskSet:
        """The masks of every pruned group except ``skip`` (the grown one)."""
        out = MaskSet()
        for g, masks in sorted(self._group_masks.items()):
            if g == skip:
                continue
            for n in masks.names():
                out.set(n, masks.masks[n], masks.granularity[n])
        out.metadata.update({"method": self.name, "config": self.config(),
                             "groups": [list(g) for g in self.groups]})
        return out

    # -- steps ----------------------------------------------------------------------------------
    @staticmethod
    def _is_step(phase: Phase) -> bool:
        return phase.name.startswith(_STEP_PREFIX)

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if not self._is_step(phase):
            self.masks = self._union(skip=None)  # fine-tune: every mask fixed
            self.masks.apply(model)
            return
        assert self.schedule is not None
        self._step += 1
        grown = self.schedule.grown_partition(self._step)
        self._grown = grown
        self.grown_history.append(grown)
        # GROW: lifting the group's mask lets its pruned weights (now exactly 0) train again.
        self.masks = self._union(skip=grown)
        self.masks.apply(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if not self._is_step(phase) or self._grown is None:
            return
        # PRUNE: the grown group back to its target by magnitude; the others are untouched.
        self._group_masks[self._grown] = self._prune_group(model, self._grown)
        self._grown = None
        self.masks = self._union(skip=None)
        self.masks.apply(model)

    def finalize(self, model: nn.Module) -> MaskSet:
        # A plan cut short (fewer steps than groups) leaves groups that were never pruned.
        for g in range(len(self.groups)):
            if g not in self._group_masks:
                self._group_masks[g] = self._prune_group(model, g)
        if self.groups:
            self.masks = self._union(skip=None)
        return super().finalize(model)

    def projected_masks(self, model: nn.Module) -> MaskSet | None:
        """Every group at its target: pruned groups keep their masks, the grown one and any
        not pruned yet are cut now by magnitude (not applied)."""
        if not self.groups:
            return self.masks
        out = MaskSet()
        for g in range(len(self.groups)):
            masks = self._group_masks.get(g) if g != self._grown else None
            masks = masks if masks is not None else self._prune_group(model, g)
            for n in masks.names():
                out.set(n, masks.masks[n], masks.granularity[n])
        return out

    def group_sparsity(self) -> list[float]:
        """Fraction of each group's weights its own mask removes (0 for a group not yet pruned)."""
        out = []
        for g, names in enumerate(self.groups):
            masks = self._group_masks.get(g)
            size = removed = 0
            for n in names:
                size += masks.masks[n].numel() if masks is not None else 0
                removed += int((~masks.masks[n]).sum()) if masks is not None else 0
            out.append(removed / size if size else 0.0)
        return out
