"""RL-Pruner: learn *where* to remove filters, then recover with knowledge distillation.

After Wang & Kindratenko, "RL-Pruner" (arXiv 2411.06463; reference/algorithms.md section 5).
The learned object is a categorical distribution ``PD`` over the prunable channel groups (one
entry per coupled group of :func:`prunelib.surgery.channel_groups`: a Conv/Linear layer's output
channels plus everything DepGraph ties to them, so the paper's "cluster adjustment" of residual
layers is built in). Which channels go *within* a group is a fixed criterion (``l1`` default).

Per pruning step (``prune_steps`` steps; step ``s`` brings the removed count to
``round(target * s / prune_steps)``, so the last step lands exactly on the target):

1. for each of ``rl_epochs`` sampling rounds, draw ``sample_num`` noisy distributions
   ``normalise(clamp(PD + N(0, I) * noise_var * U(0, 1), >= 1e-5))`` (one uniform scalar per
   sample, as in the reference code); each one allocates the step's removals over the groups
   (largest remainder, capped at what a group can still lose) and is scored on **validation**
   batches: ``Q = val_acc + flop_coef * flops_reduction + param_coef * params_reduction``
   (accuracy a fraction; reductions are fractions of the *dense* model's FLOPs per sample and
   parameters, computed analytically from the kept channels: exactly what surgery would give
   for Conv/Linear FLOPs, see :meth:`RLPruner.estimated_cost`);
2. discounted look-ahead (``lookahead_depth`` > 1): from each candidate, ``sample_num`` children
   are drawn for the *next* step around the same ``PD`` and scored the same way, recursively;
   a candidate's value is ``Q + discount * max(child values)``. Our reading of the reference
   code's DFS: the tree is a one-step-greedy rollout estimate of the value of a state, never
   deeper than the steps that remain (looking past the target removes channels the run will
   never remove); depth 1 = no look-ahead;
3. when a round's best value beats the step's best so far, the distribution moves toward that
   best sample: ``PD' = PD + step_length * (PD* - PD)``, the ratio ``PD'/PD`` clipped to
   ``[1 - ppo_clip, 1 + ppo_clip]`` (the paper's PPO-style clip), floored at 1e-5 (never below
   zero) and renormalised (:func:`update_distribution`);
4. the step commits the best candidate seen (or, with probability ``greedy_epsilon``, a random
   one of the kept ``sample_num`` best), and records ``PD`` in :attr:`RLPruner.distribution_history`.
   If the committed candidate's validation accuracy fell by more than ``reset_drop``
   (relative) from the previous step, ``PD`` is reset to be proportional to the channels the
   groups have left (the reference code's reset).

The search runs once, after the dense model was trained for the trial's epochs (a ``pretrain``
phase, like PAODING's stand-in for a pretrained checkpoint); weights do not change during it,
only the masks. Recovery is a KD fine-tune phase of the trial's ``finetune_epochs``: a frozen
copy of the unpruned model is the teacher, and :meth:`RLPruner.distillation_loss` adds
``kd_weight * T**2 * KL(softmax(teacher / T) || softmax(student / T))`` to the runner's
cross-entropy. The paper's loss is ``(1 - stu_co) * KD + stu_co * CE``; here CE keeps weight 1,
so the paper's function default (soft 0.75, CE 0.25) is ``kd_weight = 3``.

Differences from the reference code, all decisions of pitfalls 5.4: the reward reads a
validation split (the code reads the test loader); dependencies come from DepGraph rather than
tensor-equality tracing; FLOPs/params of candidates are computed analytically rather than
profiled; the within-layer criterion is ``l1`` (raw, the paper's ``l1`` strategy), ``l1_bn``
(L1 times the following BatchNorm's ``|gamma| / sigma``), ``l2`` or ``random`` (the paper's
Taylor criterion needs gradients on a calibration set and is not implemented); KD happens once,
after the search (the code post-trains every ``post_train_period`` steps during the search,
which here would need the runner inside the method); the teacher is not swapped for a better
student.

Cost: ``prune_steps * rl_epochs * sum_{d < depth} sample_num ** (d + 1)`` candidate evaluations,
each over ``ceil(eval_samples / eval_batch_size)`` validation batches, counted in
``self.cost.extra_forward_passes`` (the KD teacher's forward passes during fine-tuning too).
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

from prunelib.masks import MaskSet
from prunelib.methods.base import Phase, PruningMethod
from prunelib.surgery import ChannelGroup, channel_groups, complete_channel_masks

__all__ = ["RLPruner", "update_distribution", "noisy_distribution", "allocate_removals"]

log = logging.getLogger("prunelib")

PROBABILITY_FLOOR = 1e-5  # the reference code's RL_PROBABILITY_LOWER_BOUND
CRITERIA = ("l1", "l1_bn", "l2", "random")
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


class RLPruner(PruningMethod):
    """RL-Pruner: a learned layer-wise channel-removal distribution, then KD fine-tuning.

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
        reset_drop: relative validation-accuracy drop between steps that resets the distribution
            (None = never).
        criterion: which channels go within a group: ``l1`` (sum of |w| per weight, the filter
            L1 of every producer), ``l1_bn`` (times the following BatchNorm's |gamma|/sigma),
            ``l2`` or ``random``.
        eval_samples: validation samples scoring each candidate (None = the whole split).
        eval_batch_size: samples per evaluation forward pass.
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

    def __init__(self, sparsity: float = 0.5, prune_steps: int = 3, rl_epochs: int = 2, sample_num: int = 4,
                 lookahead_depth: int = 1, noise_var: float = 0.04, step_length: float = 0.5,
                 ppo_clip: float = 0.2, discount: float = 0.9, flop_coef: float = 0.5,
                 param_coef: float = 0.0, greedy_epsilon: float = 0.0, reset_drop: float | None = 0.1,
                 criterion: str = "l1", eval_samples: int | None = 512, eval_batch_size: int = 256,
                 kd_temperature: float = 2.0, kd_weight: float = 1.0, pretrain: bool = True,
                 min_channels: int = 1, seed: int = 0, input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity}")
        for key, value in (("prune_steps", prune_steps), ("rl_epochs", rl_epochs), ("sample_num", sample_num),
                           ("lookahead_depth", lookahead_depth), ("min_channels", min_channels),
                           ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key, value in (("step_length", step_length), ("discount", discount), ("greedy_epsilon", greedy_epsilon)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        if not 0.0 <= float(ppo_clip) < 1.0:
            raise ValueError(f"ppo_clip must be in [0, 1), got {ppo_clip}")
        if float(noise_var) < 0 or float(kd_weight) < 0 or float(kd_temperature) <= 0:
            raise ValueError("noise_var and kd_weight must be >= 0 and kd_temperature > 0")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if eval_samples is not None and int(eval_samples) < 1:
            raise ValueError(f"eval_samples must be >= 1 or None, got {eval_samples}")
        self.sparsity = float(sparsity)
        self.prune_steps = int(prune_steps)
        self.rl_epochs = int(rl_epochs)
        self.sample_num = int(sample_num)
        self.lookahead_depth = int(lookahead_depth)
        self.noise_var = float(noise_var)
        self.step_length = float(step_length)
        self.ppo_clip = float(ppo_clip)
        self.discount = float(discount)
        self.flop_coef = float(flop_coef)
        self.param_coef = float(param_coef)
        self.greedy_epsilon = float(greedy_epsilon)
        self.reset_drop = None if reset_drop is None else float(reset_drop)
        self.criterion = criterion
        self.eval_samples = None if eval_samples is None else int(eval_samples)
        self.eval_batch_size = int(eval_batch_size)
        self.kd_temperature = float(kd_temperature)
        self.kd_weight = float(kd_weight)
        self.pretrain = bool(pretrain)
        self.min_channels = int(min_channels)
        self.seed = int(seed)
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        self.report: dict[str, Any] = {}
        # Private state (kept out of config()).
        self._datamodule: Any = None
        self._groups: list[ChannelGroup] = []      # the prunable groups (the distribution's support)
        self._all_groups: list[ChannelGroup] = []  # every group, for mask completion
        self._candidates_evaluated = 0
        self._ranking: list[Tensor] = []        # per group: channel indices, least important first
        self._distribution_history: list[list[float]] = []
        self._step_log: list[dict[str, Any]] = []
        self._teacher: nn.Module | None = None
        self._distilling = False
        self._val_batches: list[tuple[Tensor, Tensor]] = []
        self._dense_state: dict[str, Tensor] = {}
        self._work: nn.Module | None = None
        self._layer_cost: dict[str, Any] = {}

    # -------------------------------------------------------------------------- protocol
    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        phases = [Phase("pretrain", epochs, prunes=False)] if self.pretrain and epochs > 0 else []
        if finetune_epochs > 0:
            phases.append(Phase("finetune", finetune_epochs, prunes=False))
        return phases

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Keep the data module (only its ``val_dataloader`` is read by the search)."""
        super().setup(model, datamodule)
        self._datamodule = datamodule
        shape = getattr(datamodule, "input_shape", None)
        if shape:
            self.input_shape = [int(s) for s in shape]
        if self.input_shape is None:
            raise ValueError("rl_pruner needs input_shape=(C, H, W) (or a data module that has one)")

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "pretrain":
            self._ensure_pruned(model)
        elif phase.name == "finetune":
            self._distilling = False

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "finetune":
            self._ensure_pruned(model)  # no pretrain phase: the model given is the trained one
            self._distilling = self.kd_weight > 0 and self._teacher is not None

    def distillation_loss(self, model: nn.Module, inputs: Tensor, logits: Tensor) -> Tensor | None:
        """``kd_weight * T**2 * KL(softmax(teacher(x) / T) || softmax(logits / T))`` during the
        fine-tune phase (batch mean); None otherwise."""
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
        """Run the search if no phase did, stop distilling, and return the channel masks."""
        self._ensure_pruned(model)
        self._distilling = False
        self._teacher = None  # free the copy; the student is the result
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
    def _ensure_pruned(self, model: nn.Module) -> None:
        if self.masks is None:
            self.prune(model)

    def _prepare(self, model: nn.Module) -> None:
        """Groups, within-group ranking, per-layer dense costs, teacher and working copy."""
        if self.input_shape is None:
            raise ValueError("rl_pruner: call setup(model, datamodule) first")
        shape = tuple(self.input_shape)
        modules = dict(model.named_modules())
        self._all_groups = channel_groups(model, shape)
        order = {name: i for i, name in enumerate(modules)}  # distribution in network order
        self._groups = sorted((g for g in self._all_groups if g.prunable and g.producers
                               and all(isinstance(modules[p], _PRODUCERS) for p in g.producers)),
                              key=lambda g: order[g.root])
        gen = torch.Generator().manual_seed(self.seed + 1)
        self._ranking = [torch.argsort(self._channel_scores(model, g, modules, gen), stable=True)
                         for g in self._groups]
        from prunelib.flops import layer_flops  # lazy: keeps import order simple

        total_flops, per_layer = layer_flops(model, shape)
        self._layer_cost = {"flops": per_layer, "total_flops": total_flops,
                            "total_params": sum(p.numel() for p in model.parameters())}
        self._teacher = copy.deepcopy(model).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)
        self._dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._work = copy.deepcopy(model).eval()

    def _channel_scores(self, model: nn.Module, group: ChannelGroup, modules: dict[str, nn.Module],
                        gen: torch.Generator) -> Tensor:
        """Importance of each channel of ``group`` (lower = removed first)."""
        if self.criterion == "random":
            return torch.rand(group.size, generator=gen, dtype=torch.float64)
        scores = torch.zeros(group.size, dtype=torch.float64)
        for name, index in group.producers.items():
            w = modules[name].weight.detach().double().cpu()
            flat = w.reshape(w.shape[0], -1)
            per = flat.abs().sum(1) if self.criterion != "l2" else flat.pow(2).sum(1).sqrt()
            scores += (per / flat.shape[1])[index]
        if self.criterion == "l1_bn" and group.norms:
            scale = torch.zeros(group.size, dtype=torch.float64)
            for name, index in group.norms.items():
                bn = modules[name]
                s = 1.0 / torch.sqrt(bn.running_var.double().cpu() + bn.eps)
                if bn.weight is not None:
                    s = s * bn.weight.detach().double().abs().cpu()
                scale += s[index]
            scores = scores * scale / len(group.norms)
        return scores

    def _read_validation(self) -> None:
        """Cache up to ``eval_samples`` validation samples (only the validation split is read)."""
        if self._datamodule is None or not hasattr(self._datamodule, "val_dataloader"):
            raise ValueError("rl_pruner scores candidates on validation data: pass a data module "
                             "with val_dataloader()")
        xs, ys, have = [], [], 0
        for x, y in self._datamodule.val_dataloader():
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
                keep[index[drop].to(keep.device)] = False
                masks.set(key, keep, "channel")
        return complete_channel_masks(model, masks, tuple(self.input_shape or ()), self._all_groups)

    def estimated_cost(self, model: nn.Module, removed: Sequence[int]) -> tuple[int, int]:
        """``(flops, params)`` per sample of the model with those channels physically removed.

        Each Conv/Linear layer's dense FLOPs scale with its kept output fraction times its kept
        input fraction (as :func:`prunelib.flops.count_flops` counts the surgered model); its
        weight parameters likewise, its bias with the kept outputs, a coupled BatchNorm loses
        two parameters (gamma, beta) per removed channel.
        """
        modules = dict(model.named_modules())
        out_removed: dict[str, int] = {}
        in_removed: dict[str, int] = {}
        norm_removed = 0
        for group, ranking, count in zip(self._groups, self._ranking, removed):
            if count <= 0:
                continue
            gone = torch.zeros(group.size, dtype=torch.bool)
            gone[ranking[:count]] = True
            for name in group.producers:
                out_removed[name] = out_removed.get(name, 0) + count
            for name, (root_idx, _input_idx) in group.consumers.items():
                in_removed[name] = in_removed.get(name, 0) + int(gone[root_idx].sum())
            norm_removed += 2 * count * len(group.norms)
        flops = 0.0
        params_removed = norm_removed
        for name, dense in self._layer_cost["flops"].items():
            module = modules[name]
            w = module.weight
            n_out, n_in = w.shape[0], w.shape[1]
            kept_out = (n_out - out_removed.get(name, 0)) / n_out
            kept_in = (n_in - in_removed.get(name, 0)) / n_in
            flops += dense * kept_out * kept_in
            params_removed += w.numel() * (1.0 - kept_out * kept_in)
            if getattr(module, "bias", None) is not None:
                params_removed += out_removed.get(name, 0)
        return int(round(flops)), int(round(self._layer_cost["total_params"] - params_removed))

    @torch.no_grad()
    def _evaluate(self, removed: Sequence[int]) -> tuple[float, float, float]:
        """``(reward Q, val_acc, flops_reduction)`` of the dense model with ``removed`` channels."""
        work = self._work
        assert work is not None
        work.load_state_dict(self._dense_state)
        self.channel_masks(work, removed).apply(work)
        correct = total = 0
        for x, y in self._val_batches:
            correct += int((work(x).argmax(1) == y).sum())
            total += int(y.numel())
        self.cost.extra_forward_passes += len(self._val_batches)
        self._candidates_evaluated += 1
        acc = correct / total
        flops, params = self.estimated_cost(work, removed)
        flops_red = 1.0 - flops / max(1, self._layer_cost["total_flops"])
        params_red = 1.0 - params / max(1, self._layer_cost["total_params"])
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

    @torch.no_grad()
    def prune(self, model: nn.Module) -> MaskSet:
        """Run the RL search on validation data and apply the chosen channel masks to ``model``."""
        self._prepare(model)
        self._read_validation()
        sizes = torch.tensor([g.size for g in self._groups], dtype=torch.float64)
        total = int(sizes.sum())
        target = min(int(round(self.sparsity * total)), total - self.min_channels * len(self._groups))
        targets = [int(round(target * s / self.prune_steps)) for s in range(1, self.prune_steps + 1)]
        gen = torch.Generator().manual_seed(self.seed)
        distribution = sizes / sizes.sum() if total else sizes
        self._distribution_history = [distribution.tolist()]
        self._step_log = []
        removed = [0] * len(self._groups)
        previous_acc = self._evaluate(removed)[1] if self._groups else 0.0
        for step in range(self.prune_steps if self._groups else 0):
            best_value = -math.inf
            kept: list[_Candidate] = []
            for _ in range(self.rl_epochs):
                candidates = self._sample(removed, step, 0, distribution, targets, gen)
                kept = sorted(kept + candidates, key=lambda c: c.value, reverse=True)[: self.sample_num]
                round_best = max(candidates, key=lambda c: c.value)
                if round_best.value > best_value:  # the policy moves only on improvement
                    best_value = round_best.value
                    distribution = update_distribution(distribution, round_best.action, self.step_length,
                                                       self.ppo_clip)
            if self.greedy_epsilon > 0 and float(torch.rand((), generator=gen)) < self.greedy_epsilon:
                chosen = kept[int(torch.randint(len(kept), (), generator=gen))]
            else:
                chosen = kept[0]
            removed = chosen.removed
            reset = (self.reset_drop is not None and previous_acc > 0
                     and chosen.val_acc < (1.0 - self.reset_drop) * previous_acc)
            if reset:  # the reference code's reset: proportional to what each group has left
                left = torch.tensor([g.size - r for g, r in zip(self._groups, removed)], dtype=torch.float64)
                distribution = _normalise(left)
            previous_acc = chosen.val_acc
            self._distribution_history.append(distribution.tolist())
            self._step_log.append({"step": step + 1, "removed": list(removed), "val_acc": chosen.val_acc,
                                   "reward": chosen.reward, "value": chosen.value, "reset": bool(reset)})
            log.info("rl_pruner: step %d/%d removed %d/%d channels, val_acc %.4f, Q %.4f%s", step + 1,
                     self.prune_steps, sum(removed), total, chosen.val_acc, chosen.reward,
                     " (distribution reset)" if reset else "")
        masks = self.channel_masks(model, removed)
        masks.apply(model)
        flops, params = self.estimated_cost(model, removed)
        self.report = {"groups": self.group_names, "removed": list(removed), "channels": total,
                       "target": target, "estimated_flops": flops, "estimated_params": params,
                       "dense_flops": self._layer_cost["total_flops"],
                       "candidates_evaluated": self._candidates_evaluated,
                       "validation_samples": sum(int(y.numel()) for _, y in self._val_batches)}
        masks.metadata.update({"method": self.name, "config": self.config(), "rl_pruner": self.report})
        self.masks = masks
        self._work = None  # the working copy is only needed during the search
        self._dense_state = {}
        return masks
