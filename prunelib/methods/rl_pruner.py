"""RL-Pruner: learn *where* to remove filters, recover with knowledge distillation.

After Wang & Kindratenko, "RL-Pruner" (arXiv 2411.06463; reference/algorithms.md section 5).
The learned object is a categorical distribution ``PD`` over the prunable channel groups (one
entry per coupled group of :func:`prunelib.surgery.channel_groups`: a Conv/Linear layer's output
channels plus everything DepGraph ties to them, so the paper's "cluster adjustment" of residual
layers is built in). Which channels go *within* a group is a fixed criterion (``l1`` default,
``taylor`` the paper's), recomputed on the current model at every step; channels removed before
stay removed.

Per pruning step (``prune_steps`` steps; step ``s`` brings the removed count to
``round(target * s / prune_steps)``, so the last step lands exactly on the target):

1. for each of ``rl_epochs`` sampling rounds, draw ``sample_num`` noisy distributions
   ``normalise(clamp(PD + N(0, I) * noise_var * U(0, 1), >= 1e-5))`` (one uniform scalar per
   sample, as in the reference code); each one allocates the step's removals over the groups
   (largest remainder, capped at what a group can still lose) and is scored on **validation**
   batches of the *current* model (the weights the last recovery left):
   ``Q = val_acc + flop_coef * flops_reduction + param_coef * params_reduction``
   (accuracy a fraction; reductions are fractions of the *dense* model's FLOPs per sample and
   parameters of the physically cut candidate, from :func:`prunelib.flops.pruned_cost`: what
   surgery and the FLOP counter give, depthwise layers included). With ``bn_recalibration`` a
   candidate's BatchNorm statistics are first re-estimated on a few training batches;
2. discounted look-ahead (``lookahead_depth`` > 1): from each candidate, ``sample_num`` children
   are drawn for the *next* step around the same ``PD`` and scored the same way, recursively;
   a candidate's value is ``Q + discount * max(child values)``. Our reading of the reference
   code's DFS: the tree is a one-step-greedy rollout estimate of the value of a state, never
   deeper than the steps that remain; depth 1 = no look-ahead;
3. when a round's best value beats the step's best so far, the distribution moves toward that
   best sample: ``PD' = PD + step_length * (PD* - PD)``, the ratio ``PD'/PD`` clipped to
   ``[1 - ppo_clip, 1 + ppo_clip]`` (the paper's PPO-style clip), floored at 1e-5 (never below
   zero) and renormalised (:func:`update_distribution`);
4. the step commits the best candidate seen (or, with probability ``greedy_epsilon``, a random
   one of the kept ``sample_num`` best), and records ``PD`` in :attr:`RLPruner.distribution_history`.
   If the committed candidate's validation accuracy is more than ``reset_drop`` (relative)
   below the accuracy the step started from, ``PD`` is reset to be proportional to the channels
   the groups have left and the step is sampled once more from there; the better search is
   committed. (The reference code resets and resamples. Comparing with the previous step's
   *unrecovered* accuracy, as an earlier port did, triggered the reset at every step and threw
   the learned distribution away each time.)

Phases: the dense model is first trained for the trial's epochs (a ``pretrain`` phase, a stand-in
for a pretrained checkpoint); then the steps run, and after every ``post_train_period`` steps a
``recover{s}`` phase of ``recover_epochs`` epochs trains the pruned model with knowledge
distillation (the authors post-train every ``post_train_period`` steps); the last step is
followed by the trial's ``finetune_epochs``, also distilled. The teacher is a frozen copy of the
unpruned model; :meth:`RLPruner.distillation_loss` adds ``kd_weight * T**2 *
KL(softmax(teacher / T) || softmax(student / T))`` to the runner's cross-entropy. The paper's
loss is ``(1 - stu_co) * KD + stu_co * CE``; here CE keeps weight 1, so the paper's function
default (soft 0.75, CE 0.25) is ``kd_weight = 3``. Epochs trained: ``epochs + recover_epochs *
recoveries + finetune_epochs``.

Differences from the reference code, all decisions of pitfalls 5.4: the reward reads a
validation split (the code reads the test loader); dependencies come from DepGraph rather than
tensor-equality tracing; FLOPs/params of candidates come from the library's FLOP counts rather
than a profiler run per candidate; the teacher is not swapped for a better student.

Cost: ``prune_steps * rl_epochs * sum_{d < depth} sample_num ** (d + 1)`` candidate evaluations
plus one evaluation of the starting point per step, each over ``ceil(eval_samples /
eval_batch_size)`` validation batches (and ``bn_recalibration`` training batches), counted in
``self.cost.extra_forward_passes`` (the KD teacher's forward passes during recovery too).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.flops import layer_flops, pruned_cost
from prunelib.importance import CHANNEL_CRITERIA, channel_scores, taylor_scores
from prunelib.masks import MaskSet
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field
from prunelib.methods.baselines import check_fraction
from prunelib.surgery import ChannelGroup, channel_groups, complete_channel_masks

__all__ = ["RLPruner", "RLPrunerSettings", "update_distribution", "noisy_distribution", "allocate_removals"]

log = logging.getLogger("prunelib")

PROBABILITY_FLOOR = 1e-5  # the reference code's RL_PROBABILITY_LOWER_BOUND
CRITERIA = CHANNEL_CRITERIA
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------------------------------------
# The distribution: noise, update, allocation (pure functions, unit-tested)
# ---------------------------------------------------------------------------------------------
def _normalise(values: Tensor, floor: float = PROBABILITY_FLOOR) -> Tensor:
    values = values.clamp_min(floor)
    return values / values.sum()


def noisy_distribution(distribution: Tensor, noise_var: float, generator: torch.Generator) -> Tensor:
    """One exploratory action: ``normalise(clamp(PD + N(0, I) * noise_var * U(0, 1), >= 1e-5))``.

    Args:
        distribution: the current distribution over groups (float64, sums to 1).
        noise_var: scale of the Gaussian noise (in probability units).
        generator: source of randomness (CPU).
    """
    scale = float(torch.rand((), generator=generator, dtype=torch.float64)) * noise_var
    noise = torch.randn(distribution.shape, generator=generator, dtype=torch.float64) * scale
    return _normalise(distribution + noise)


def update_distribution(current: Tensor, best: Tensor, step_length: float, ppo_clip: float | None,
                        floor: float = PROBABILITY_FLOOR) -> Tensor:
    """Move ``current`` toward the best sampled action ``best``; the result is >= ``floor``
    everywhere and sums to 1.

    ``PD' = PD + step_length * (best - PD)``, floored at ``floor``; with ``ppo_clip`` the ratio
    ``PD' / PD`` is clipped to ``[1 - ppo_clip, 1 + ppo_clip]`` (each entry moves by at most that
    fraction of itself per update), floored again and renormalised.

    Args:
        current, best: distributions over the same groups (1-D, non-negative).
        step_length: fraction of the way toward ``best`` (0..1; the paper's eta).
        ppo_clip: relative clip of each entry's change (None or 0 = no clip).
    """
    current = current.double()
    new = (current + float(step_length) * (best.double() - current)).clamp_min(floor)
    if ppo_clip:
        ratio = (new / current.clamp_min(floor)).clamp(1.0 - ppo_clip, 1.0 + ppo_clip)
        new = (ratio * current).clamp_min(floor)
    return new / new.sum()


def allocate_removals(distribution: Tensor, count: int, capacity: Sequence[int]) -> list[int]:
    """Split ``count`` channel removals over groups in proportion to ``distribution``.

    Largest-remainder rounding; a group never gets more than its ``capacity`` (channels it can
    still lose); what a full group cannot take goes to the others, in proportion again. The
    result sums to ``min(count, sum(capacity))``.
    """
    cap = torch.tensor([int(c) for c in capacity], dtype=torch.long)
    counts = torch.zeros_like(cap)
    remaining = min(int(count), int(cap.sum()))
    weights = distribution.double().clamp_min(0)
    while remaining > 0:
        active = counts < cap
        share = weights * active
        if float(share.sum()) <= 0:
            share = active.double()  # the distribution is zero where room is left: spread evenly
        raw = share / share.sum() * remaining
        alloc = raw.floor().long()
        short = remaining - int(alloc.sum())
        if short > 0:  # largest remainders first (ties: lowest index)
            order = torch.argsort(raw - alloc.double(), descending=True, stable=True)
            order = order[active[order]]
            alloc[order[:short]] += 1
        take = torch.minimum(alloc, cap - counts)
        counts += take
        remaining -= int(take.sum())
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    value: float          # Q plus the discounted look-ahead
    reward: float         # Q alone
    val_acc: float
    action: Tensor        # the noisy distribution that made it
    removed: list[int]    # channels removed per group after this candidate's step


@dataclass(frozen=True)
class RLPrunerSettings(MethodSettings):
    """RL-Pruner's settings (see :class:`RLPruner` for each one)."""

    sparsity: float = 0.5
    prune_steps: int = 3
    rl_epochs: int = 2
    sample_num: int = 4
    lookahead_depth: int = 1
    noise_var: float = 0.04
    step_length: float = 0.5
    ppo_clip: float = 0.2
    discount: float = 0.9
    flop_coef: float = 0.5
    param_coef: float = 0.0
    greedy_epsilon: float = 0.0
    reset_drop: float | None = 0.1
    criterion: str = "l1"
    calibration_batches: int = 4
    bn_recalibration: int = 0
    eval_samples: int | None = 512
    eval_batch_size: int = 256
    post_train_period: int = 1
    recover_epochs: int = 1
    kd_temperature: float = 2.0
    kd_weight: float = 1.0
    pretrain: bool = True
    min_channels: int = 1
    seed: int = 0
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        set_field(self, "sparsity", check_fraction("sparsity", self.sparsity))
        for key, low in (("prune_steps", 1), ("rl_epochs", 1), ("sample_num", 1), ("lookahead_depth", 1),
                         ("min_channels", 1), ("eval_batch_size", 1), ("calibration_batches", 1),
                         ("bn_recalibration", 0), ("post_train_period", 0), ("recover_epochs", 0)):
            if int(getattr(self, key)) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")
            set_field(self, key, int(getattr(self, key)))
        for key in ("step_length", "discount", "greedy_epsilon"):
            set_field(self, key, check_fraction(key, getattr(self, key), high_closed=True))
        set_field(self, "ppo_clip", check_fraction("ppo_clip", self.ppo_clip))
        if float(self.noise_var) < 0 or float(self.kd_weight) < 0 or float(self.kd_temperature) <= 0:
            raise ValueError("noise_var and kd_weight must be >= 0 and kd_temperature > 0")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if self.eval_samples is not None and int(self.eval_samples) < 1:
            raise ValueError(f"eval_samples must be >= 1 or None, got {self.eval_samples}")
        for key in ("noise_var", "flop_coef", "param_coef", "kd_temperature", "kd_weight"):
            set_field(self, key, float(getattr(self, key)))
        if self.reset_drop is not None:
            set_field(self, "reset_drop", float(self.reset_drop))
        if self.input_shape is not None:
            set_field(self, "input_shape", tuple(int(v) for v in self.input_shape))
        set_field(self, "seed", int(self.seed))


class RLPruner(PruningMethod):
    """RL-Pruner: a learned layer-wise channel-removal distribution, KD recovery between steps.

    See the module doc for the algorithm. Produces ``"channel"`` masks on the producers of each
    prunable channel group (completed with their biases and BatchNorms), which
    :func:`prunelib.surgery.surgery` removes physically.

    Args:
        sparsity: fraction (0..1) of all prunable channels (output channels / neurons of the
            prunable groups; the classifier is never pruned) removed in the end (the paper's
            ``--sparsity``: a fraction of filters, not of weights).
        prune_steps: steps to reach ``sparsity`` (each removes about ``sparsity / prune_steps``
            of the channels).
        rl_epochs: sampling rounds per step (each may update the distribution).
        sample_num: noisy distributions sampled per round (and per look-ahead node).
        lookahead_depth: depth of the sampling tree (1 = no look-ahead).
        noise_var: scale of the exploration noise on the distribution (probability units).
        step_length: fraction of the way the distribution moves toward the best sample (eta).
        ppo_clip: relative clip of each entry's change per update (0 = none).
        discount: discount of the look-ahead's best child value (gamma).
        flop_coef, param_coef: reward weights of the FLOPs and parameter reductions (fractions
            of the dense model's) next to validation accuracy (a fraction).
        greedy_epsilon: probability of committing a random one of the kept best candidates.
        reset_drop: a committed candidate whose validation accuracy is more than this fraction
            below the accuracy the step started from (the current, recovered model) resets the
            distribution to the channels left, and the step is sampled once more from there;
            the better of the two searches is committed (None = never).
        criterion: which channels go within a group (:data:`prunelib.importance.CHANNEL_CRITERIA`):
            ``l1`` (L1 per weight), ``l1_bn`` (times the following BatchNorm's
            ``|gamma| / sigma``), ``l2``, ``taylor`` (the paper's: ``|w * dL/dw|`` on
            ``calibration_batches`` training batches) or ``random``; recomputed on the current
            model at every step.
        calibration_batches: training batches of the Taylor gradient.
        bn_recalibration: training batches run through each candidate (train mode, no
            gradient) to re-estimate its BatchNorm statistics before it is scored (0 = none).
        eval_samples: validation samples scoring each candidate (None = the whole split).
        eval_batch_size: samples per evaluation forward pass.
        post_train_period: a KD recovery phase of ``recover_epochs`` after every this many
            steps (the authors' ``post_train_period``; 0 = no recovery between steps, only the
            final fine-tune).
        recover_epochs: epochs of each recovery phase.
        kd_temperature: distillation temperature T.
        kd_weight: weight of the KD term next to the cross-entropy (weight 1); 0 = plain fine-tune.
        pretrain: plan a ``"pretrain"`` phase of the trial's epochs before the search (False:
            the model given is already trained).
        min_channels: channels every group keeps.
        seed: seed of the exploration noise.
        input_shape: one sample's shape; taken from the data module in :meth:`setup`.
    """

    name = "rl_pruner"
    needs_data = True
    Settings = RLPrunerSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report: dict[str, Any] = {}
        self._datamodule: Any = None
        self._shape: tuple[int, ...] | None = self.settings.input_shape
        self._groups: list[ChannelGroup] = []      # the prunable groups (the distribution's support)
        self._all_groups: list[ChannelGroup] = []  # every group, for mask completion
        self._candidates_evaluated = 0
        self._ranking: list[Tensor] = []        # per group: channel indices, least important first
        self._distribution: Tensor | None = None
        self._distribution_history: list[list[float]] = []
        self._step_log: list[dict[str, Any]] = []
        self._teacher: nn.Module | None = None
        self._distilling = False
        self._val_batches: list[tuple[Tensor, Tensor]] = []
        self._train_batches: list[tuple[Tensor, Tensor]] = []
        self._state: dict[str, Tensor] = {}
        self._work: nn.Module | None = None
        self._dense: dict[str, Any] = {}
        self._removed: list[int] = []
        self._targets: list[int] = []
        self._steps_done = 0
        self._gen: torch.Generator | None = None

    # -------------------------------------------------------------------------- protocol
    def _recovery_after(self) -> list[int]:
        """The steps followed by a KD recovery phase (never the last: the fine-tune follows)."""
        period = self.post_train_period
        if period <= 0 or self.recover_epochs <= 0:
            return []
        return [s for s in range(1, self.prune_steps) if s % period == 0]

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        phases = [Phase("pretrain", epochs, prunes=False)] if self.pretrain and epochs > 0 else []
        for step in self._recovery_after():
            phases.append(Phase(f"recover{step}", self.recover_epochs, prunes=False, recovers=True))
        if finetune_epochs > 0:
            phases.append(Phase("finetune", finetune_epochs, prunes=False, recovers=True))
        return phases

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Keep the data module (the search reads its validation split; the training split only
        for the Taylor criterion and BatchNorm recalibration)."""
        super().setup(model, datamodule)
        self._datamodule = datamodule
        shape = getattr(datamodule, "input_shape", None)
        if shape:
            self._shape = tuple(int(s) for s in shape)
        if self._shape is None:
            raise ValueError("rl_pruner needs input_shape=(C, H, W) (or a data module that has one)")

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name.startswith("recover"):
            self.run_steps(model, until=int(phase.name[len("recover"):]))
        elif phase.name == "finetune":
            self.run_steps(model)  # every step left (or all: the model given is the trained one)
        else:
            return
        self._distilling = self.kd_weight > 0 and self._teacher is not None

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.recovers:
            self._distilling = False

    def distillation_loss(self, model: nn.Module, inputs: Tensor, logits: Tensor) -> Tensor | None:
        """``kd_weight * T**2 * KL(softmax(teacher(x) / T) || softmax(logits / T))`` during the
        recovery and fine-tune phases (batch mean); None otherwise."""
        if not self._distilling or self._teacher is None:
            return None
        teacher = self._teacher
        if next(teacher.parameters()).device != inputs.device:
            teacher.to(inputs.device)
        with torch.no_grad():
            target = teacher(inputs)
        self.cost.extra_forward_passes += 1
        t = self.kd_temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1),
                      reduction="batchmean", log_target=True)
        return self.kd_weight * t * t * kl

    def finalize(self, model: nn.Module) -> MaskSet:
        """Run the steps no phase ran, stop distilling, and return the channel masks."""
        self.run_steps(model)
        self._distilling = False
        self._teacher = None  # free the copy; the student is the result
        self._work = None
        return super().finalize(model)

    # -------------------------------------------------------------------------- artifacts
    @property
    def distribution_history(self) -> list[list[float]]:
        """The distribution over groups before the first step and after each step (fractions)."""
        return [list(d) for d in self._distribution_history]

    @property
    def group_names(self) -> list[str]:
        """The prunable groups, named by their root Conv/Linear module, in distribution order."""
        return [g.root for g in self._groups]

    def write_artifacts(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``rl_pruner_distribution.json`` (groups, sizes, the distribution per step, the
        per-step log) and ``rl_pruner_distribution.png`` (final distribution and its evolution)
        into ``directory``; returns the paths written (nothing before the search ran)."""
        if not self._distribution_history:
            return []
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"groups": self.group_names, "sizes": [g.size for g in self._groups],
                   "distribution_history": self.distribution_history, "steps": self._step_log,
                   "report": self.report, "config": self.config()}
        json_path = out / "rl_pruner_distribution.json"
        json_path.write_text(json.dumps(payload, indent=1, default=float))
        png_path = out / "rl_pruner_distribution.png"
        self._plot(png_path)
        return [json_path, png_path]

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt

        history = torch.tensor(self._distribution_history)
        names = self.group_names
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.bar(range(len(names)), history[-1].tolist(), color="tab:blue", label="final")
        left.plot(range(len(names)), history[0].tolist(), "k_", markersize=14, label="initial")
        left.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        left.set_ylabel("share of the removals")
        left.set_title("final distribution")
        left.legend(fontsize=7)
        for j, name in enumerate(names):
            right.plot(range(len(history)), history[:, j].tolist(), marker="o", label=name)
        right.set_xticks(range(len(history)))
        right.set_xlabel("pruning step (0 = initial)")
        right.set_ylabel("share of the removals")
        right.set_title("evolution")
        right.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # -------------------------------------------------------------------------- search
    def _start(self, model: nn.Module) -> None:
        """Groups, dense costs, teacher, validation cache and the initial distribution."""
        if self._shape is None:
            raise ValueError("rl_pruner: call setup(model, datamodule) first")
        shape = self._shape
        modules = dict(model.named_modules())
        self._all_groups = channel_groups(model, shape)
        order = {name: i for i, name in enumerate(modules)}  # distribution in network order
        self._groups = sorted((g for g in self._all_groups if g.prunable and g.producers
                               and all(isinstance(modules[p], _PRODUCERS) for p in g.producers)),
                              key=lambda g: order[g.root])
        total_flops, per_layer = layer_flops(model, shape)
        self._dense = {"layers": (total_flops, per_layer), "flops": total_flops,
                       "params": sum(p.numel() for p in model.parameters())}
        self._teacher = copy.deepcopy(model).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)
        self._work = copy.deepcopy(model).eval()
        self._read_data()
        sizes = torch.tensor([g.size for g in self._groups], dtype=torch.float64)
        total = int(sizes.sum())
        target = min(int(round(self.sparsity * total)), total - self.min_channels * len(self._groups))
        self._targets = [int(round(target * s / self.prune_steps)) for s in range(1, self.prune_steps + 1)]
        self._gen = torch.Generator().manual_seed(self.seed)
        self._distribution = sizes / sizes.sum() if total else sizes
        self._distribution_history = [self._distribution.tolist()]
        self._step_log = []
        self._removed = [0] * len(self._groups)
        self._ranking = []
        self._steps_done = 0

    def _read_data(self) -> None:
        """Cache up to ``eval_samples`` validation samples (the reward's data) and, when the
        criterion or the recalibration needs them, a few training batches."""
        dm = self._datamodule
        if dm is None or not hasattr(dm, "val_dataloader"):
            raise ValueError("rl_pruner scores candidates on validation data: pass a data module "
                             "with val_dataloader()")
        xs, ys, have = [], [], 0
        for x, y in dm.val_dataloader():
            xs.append(x)
            ys.append(y)
            have += int(y.numel())
            if self.eval_samples is not None and have >= self.eval_samples:
                break
        if not xs:
            raise ValueError("rl_pruner: the validation split is empty")
        x, y = torch.cat(xs), torch.cat(ys)
        if self.eval_samples is not None:
            x, y = x[: self.eval_samples], y[: self.eval_samples]
        self._val_batches = list(zip(x.split(self.eval_batch_size), y.split(self.eval_batch_size)))
        need = max(self.calibration_batches if self.criterion == "taylor" else 0, self.bn_recalibration)
        self._train_batches = []
        if need:
            for x, y in dm.train_dataloader():
                self._train_batches.append((x, y))
                if len(self._train_batches) >= need:
                    break

    def _rank(self, model: nn.Module) -> None:
        """Within-group order on the current model: removed channels first, then the rest by
        ``criterion`` (lowest first)."""
        weight_scores = None
        if self.criterion == "taylor":
            device = next(model.parameters()).device
            was = model.training
            model.eval()
            batches = [(x.to(device), y.to(device)) for x, y in self._train_batches[: self.calibration_batches]]
            weight_scores = taylor_scores(model, batches, [f"{p}.weight" for g in self._groups for p in g.producers])
            model.train(was)
            self.cost.extra_forward_passes += len(batches)
            self.cost.extra_backward_passes += len(batches)
        gen = torch.Generator().manual_seed(self.seed + 1 + self._steps_done)
        previous = self._ranking
        ranking = []
        for j, (group, count) in enumerate(zip(self._groups, self._removed)):
            scores = channel_scores(model, group, self.criterion, weight_scores, gen)
            if count:
                scores[previous[j][:count]] = -math.inf  # already removed: they stay first
            ranking.append(torch.argsort(scores, stable=True))
        self._ranking = ranking

    def channel_masks(self, model: nn.Module, removed: Sequence[int]) -> MaskSet:
        """Completed channel masks removing ``removed[j]`` least important channels of group ``j``."""
        modules = dict(model.named_modules())
        masks = MaskSet()
        for group, ranking, count in zip(self._groups, self._ranking, removed):
            if count <= 0:
                continue
            drop = ranking[:count]
            for name, index in group.producers.items():
                weight = modules[name].weight
                key = f"{name}.weight"
                keep = masks.masks[key].clone() if key in masks else torch.ones(
                    weight.shape[0], dtype=torch.bool, device=weight.device)
                picked = index[drop]
                keep[picked[picked >= 0].to(keep.device)] = False
                masks.set(key, keep, "channel")
        return complete_channel_masks(model, masks, tuple(self._shape or ()), self._all_groups)

    def cost_of(self, model: nn.Module, removed: Sequence[int]) -> tuple[int, int]:
        """``(flops, params)`` per sample of the model with those channels physically removed,
        from :func:`prunelib.flops.pruned_cost` (what surgery and the FLOP counter give)."""
        gone: dict[str, Tensor] = {}
        for group, ranking, count in zip(self._groups, self._ranking, removed):
            mask = torch.zeros(group.size, dtype=torch.bool)
            mask[ranking[:count]] = True
            gone[group.root] = mask
        return pruned_cost(model, tuple(self._shape or ()), self._all_groups, gone, self._dense["layers"])

    @torch.no_grad()
    def _recalibrate(self, work: nn.Module) -> None:
        """Re-estimate the candidate's BatchNorm statistics on a few training batches."""
        norms = [m for m in work.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
        if not norms or not self.bn_recalibration:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        work.train()
        for x, _ in self._train_batches[: self.bn_recalibration]:
            work(x.to(next(work.parameters()).device))
        work.eval()
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        self.cost.extra_forward_passes += min(len(self._train_batches), self.bn_recalibration)

    @torch.no_grad()
    def _evaluate(self, removed: Sequence[int]) -> tuple[float, float, float]:
        """``(reward Q, val_acc, flops_reduction)`` of the current model with ``removed`` channels."""
        work = self._work
        assert work is not None
        work.load_state_dict(self._state)
        masks = self.channel_masks(work, removed)
        masks.apply(work)
        if self.bn_recalibration:
            self._recalibrate(work)
            masks.apply(work)  # the removed channels' BatchNorm affines stay zero
        device = next(work.parameters()).device
        correct = total = 0
        for x, y in self._val_batches:
            correct += int((work(x.to(device)).argmax(1) == y.to(device)).sum())
            total += int(y.numel())
        self.cost.extra_forward_passes += len(self._val_batches)
        self._candidates_evaluated += 1
        acc = correct / total
        flops, params = self.cost_of(work, removed)
        flops_red = 1.0 - flops / max(1, self._dense["flops"])
        params_red = 1.0 - params / max(1, self._dense["params"])
        return acc + self.flop_coef * flops_red + self.param_coef * params_red, acc, flops_red

    def _sample(self, removed: list[int], step: int, depth: int, distribution: Tensor,
                targets: list[int], gen: torch.Generator) -> list[_Candidate]:
        """``sample_num`` candidates for ``step`` from state ``removed``, valued with look-ahead."""
        need = targets[step] - sum(removed)
        capacity = [g.size - self.min_channels - r for g, r in zip(self._groups, removed)]
        out = []
        for _ in range(self.sample_num):
            action = noisy_distribution(distribution, self.noise_var, gen)
            add = allocate_removals(action, need, capacity)
            child = [r + a for r, a in zip(removed, add)]
            reward, acc, _ = self._evaluate(child)
            value = reward
            if depth + 1 < self.lookahead_depth and step + 1 < len(targets):
                grandchildren = self._sample(child, step + 1, depth + 1, distribution, targets, gen)
                value += self.discount * max(c.value for c in grandchildren)
            out.append(_Candidate(value, reward, acc, action, child))
        return out

    def _search_step(self, step: int, distribution: Tensor) -> tuple[_Candidate, Tensor]:
        """``rl_epochs`` sampling rounds for ``step``: the committed candidate and the distribution."""
        assert self._gen is not None
        best_value = -math.inf
        kept: list[_Candidate] = []
        for _ in range(self.rl_epochs):
            candidates = self._sample(self._removed, step, 0, distribution, self._targets, self._gen)
            kept = sorted(kept + candidates, key=lambda c: c.value, reverse=True)[: self.sample_num]
            round_best = max(candidates, key=lambda c: c.value)
            if round_best.value > best_value:  # the policy moves only on improvement
                best_value = round_best.value
                distribution = update_distribution(distribution, round_best.action, self.step_length,
                                                   self.ppo_clip)
        if self.greedy_epsilon > 0 and float(torch.rand((), generator=self._gen)) < self.greedy_epsilon:
            chosen = kept[int(torch.randint(len(kept), (), generator=self._gen))]
        else:
            chosen = kept[0]
        return chosen, distribution

    @torch.no_grad()
    def run_steps(self, model: nn.Module, until: int | None = None) -> MaskSet | None:
        """Run the pruning steps up to ``until`` (default: all) on the current ``model`` and
        apply the committed channel masks to it; returns them (None if nothing was left)."""
        until = self.prune_steps if until is None else min(until, self.prune_steps)
        if self._steps_done >= until:
            return self.masks
        if self._work is None and self._steps_done == 0:
            self._start(model)
        if not self._groups:
            self._steps_done = self.prune_steps
            self._commit(model)
            return self.masks
        assert self._distribution is not None
        while self._steps_done < until:
            step = self._steps_done
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._rank(model)
            start_acc = self._evaluate(self._removed)[1]
            chosen, distribution = self._search_step(step, self._distribution)
            reset = (self.reset_drop is not None and start_acc > 0
                     and chosen.val_acc < (1.0 - self.reset_drop) * start_acc)
            if reset:  # resample the step from the channels left; commit the better search
                left = torch.tensor([g.size - r for g, r in zip(self._groups, self._removed)], dtype=torch.float64)
                retry, retry_distribution = self._search_step(step, _normalise(left))
                if retry.value > chosen.value:
                    chosen, distribution = retry, retry_distribution
            self._distribution = distribution
            self._removed = list(chosen.removed)
            self._steps_done += 1
            self._distribution_history.append(distribution.tolist())
            self._step_log.append({"step": step + 1, "removed": list(self._removed), "val_acc": chosen.val_acc,
                                   "start_val_acc": start_acc, "reward": chosen.reward, "value": chosen.value,
                                   "reset": bool(reset)})
            log.info("rl_pruner: step %d/%d removed %d channels, val_acc %.4f (from %.4f), Q %.4f%s",
                     step + 1, self.prune_steps, sum(self._removed), chosen.val_acc, start_acc, chosen.reward,
                     " (distribution reset, step resampled)" if reset else "")
            self._commit(model)
        return self.masks

    def _commit(self, model: nn.Module) -> None:
        masks = self.channel_masks(model, self._removed) if self._groups else MaskSet()
        masks.apply(model)
        flops, params = self.cost_of(model, self._removed) if self._groups else (
            self._dense.get("flops", 0), self._dense.get("params", 0))
        self.report = {"groups": self.group_names, "removed": list(self._removed),
                       "channels": sum(g.size for g in self._groups),
                       "target": self._targets[-1] if self._targets else 0,
                       "steps_done": self._steps_done, "flops": flops, "params": params,
                       "dense_flops": self._dense.get("flops", 0),
                       "candidates_evaluated": self._candidates_evaluated,
                       "validation_samples": sum(int(y.numel()) for _, y in self._val_batches)}
        masks.metadata.update({"method": self.name, "config": self.config(), "rl_pruner": self.report})
        self.masks = masks

    def prune(self, model: nn.Module) -> MaskSet:
        """Run every step left now (no recovery in between) and apply the chosen masks."""
        self.run_steps(model)
        assert self.masks is not None
        return self.masks
