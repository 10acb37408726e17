"""PAODING: data-free, robustness-preserving pruning of a pretrained model.

After Meng et al., "Supervised Robustness-preserving Data-free Neural Network Pruning" (arXiv
2204.00783) and the PAODING toolkit (arXiv 2405.00074; reference/algorithms.md section 4).
Pipeline: *sampling* (choose what to remove), *surgery* (the choice becomes a structured mask;
:mod:`prunelib.surgery` removes it physically), *reconstruction* (dense neurons are merged so
the next layer absorbs the removed one). No training data is read at any point.

* Convolutions: each filter scores ``sum|W_f| / (k_h * k_w * c_in)`` (L1 per weight) and the
  ``ceil(conv_ratio * n)`` lowest go. With ``fold_bn=True`` (default; an extension) the score is
  that of the filter with the following BatchNorm folded in (times ``|gamma| / sigma``): a
  BatchNorm rescales its input, so the raw L1 of the filter before it says nothing. Coupled channels (a residual stream written by several
  convolutions) are scored together, by the mean of their producers' scores, and removed
  together: a channel of one residual branch alone cannot shrink the model. Not robustness-aware.
* Dense layers (the hidden layers of a plain chain ``Linear -> act -> Linear ...``): pairs of
  neurons ``(i, j)`` are ranked by the saliency
  ``s_ij = (||w_i - w_j|| + |b_i - b_j| / (|b_i| + |b_j| + eps)) * ||a_j||``
  (``w``: incoming weights, ``b``: bias, ``a``: outgoing weights). The paper's bias term
  ``|(b_i - b_j) / (b_i + b_j)|`` explodes when ``b_i + b_j`` is near 0; this form is bounded
  (pitfall 4.6 #3). Both orientations are scored (``j`` merged into ``i`` or the reverse).
  Disjoint pairs are taken greedily, lowest saliency first; merging ``j`` into ``i`` sets
  ``a_i += a_j`` and ``a_j = 0``, which is exact when the two neurons fire alike. Each of the
  ``ceil(dense_ratio / step)`` iterations merges ``ceil(step * n)`` pairs per layer.
  ``mode="impact"`` first takes ``pooling_multiplier`` times as many candidates and keeps those
  with the smallest *output impact*: the change the merge can make to the chain's output,
  bounded by interval arithmetic from the ``input_interval`` box (``[lo, hi]`` per neuron
  through the chain; the merge moves the next pre-activation by ``a_j * ([x_i] - [x_j])``, plus
  the impact of the pairs already merged in that layer; then propagated to the output), scored
  ``alpha * sigmoid(L1 width) + beta * sigmoid(interval entropy)``. ``mode="baseline"`` skips
  the impact step (the paper's 50 % cap in that mode is not reproduced).

Reconstruction of removed convolution channels (``compensate=True``, an extension): the paper
deletes a filter and the next layer simply loses its input. After a BatchNorm that input is not
centred on zero, so removing it shifts every consumer. The channel's expected activation is
known without data (the BatchNorm's ``beta`` and ``gamma`` are the mean and spread of its output
on the training data) and is folded into the consumers' biases (or their BatchNorm's running
mean), as the dense merge folds a neuron into its partner. ``compensate=False`` is the paper.

Differences from the paper's Keras code: the interval of ``x_i - x_j`` is also bounded through
the pair's pre-activation difference over the layer's input box (the paper's difference of two
independent intervals cannot see that two neurons are alike; identical neurons now score 0);
the interval box is propagated through
the layers before the dense chain (convolutions, BatchNorm, pooling) when they form a plain
chain of modules, so CNN heads get impact scores too (the paper starts at the dense input); a
dense chain after a branching trunk falls back to ``baseline`` ranking with a warning. The
paper's STOCHASTIC (simulated annealing) sampler and its stepwise-convolution mode are not
implemented. Stopping rules that read the test set are dropped (pitfall 8: no decision sees
test data; there is no data at all here): the method stops at ``dense_ratio``.

The model is changed in place by :meth:`PAODING.finalize` (merged outgoing weights, removed
channels zeroed); :func:`prunelib.surgery.surgery` then gives the physically smaller model,
whose outputs equal the masked model's.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.data import normalized_interval  # noqa: F401  (public here too: PAODING's input box)
from prunelib.masks import MaskSet, sparsity_report
from prunelib.methods.base import Phase, PruningMethod
from prunelib.surgery import ChannelGroup, channel_groups, complete_channel_masks

__all__ = ["PAODING", "normalized_interval", "pair_saliency", "merge_neurons", "output_impact"]

log = logging.getLogger("prunelib")

_MODES = ("impact", "baseline")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MONOTONE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.ELU)
_PASS = (nn.Identity, nn.Dropout, nn.Flatten)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
# Largest slope of each monotone activation: bounds how much a change d of its input moves it.
_LIPSCHITZ = {nn.Sigmoid: 0.25}


DEFAULT_INPUT_INTERVAL = (-3.0, 3.0)


# ---------------------------------------------------------------------------------------------
# Dense pairs: saliency, merge, impact
# ---------------------------------------------------------------------------------------------
def pair_saliency(w: Tensor, b: Tensor | None, a: Tensor, bias_aware: bool = True,
                  eps: float = 1e-8) -> Tensor:
    """``S[i, j]``: saliency of merging neuron ``j`` into ``i`` (lower = safer); diagonal = inf.

    Args:
        w: ``(n, n_prev)`` incoming weights; b: ``(n,)`` biases or None; a: ``(n_next, n)``
            outgoing weights (the next layer's weight matrix).
    """
    dist = torch.cdist(w[None].double(), w[None].double())[0]
    if bias_aware and b is not None:
        bd = b.double()
        dist = dist + (bd[:, None] - bd[None, :]).abs() / (bd.abs()[:, None] + bd.abs()[None, :] + eps)
    out = dist * a.double().norm(dim=0)[None, :]
    out.fill_diagonal_(math.inf)
    return out


@torch.no_grad()
def merge_neurons(consumer: nn.Linear, keep: int, remove: int) -> None:
    """Merge neuron ``remove`` into ``keep``: the consumer adds its outgoing weights to ``keep``'s
    (``a_keep += a_remove``) and zeroes them (``a_remove = 0``). Exact when both fire alike."""
    w = consumer.weight
    w[:, keep] += w[:, remove]
    w[:, remove] = 0.0


def _interval_entropy(lo: Tensor, hi: Tensor, threshold: float = 0.9) -> Tensor:
    """PAODING's interval entropy ``-sum_u p_u log p_u`` over output intervals (see module doc)."""
    union = torch.maximum(hi[:, None], hi[None, :]) - torch.minimum(lo[:, None], lo[None, :])
    diff = 0.5 * ((lo[:, None] - lo[None, :]).abs() + (hi[:, None] - hi[None, :]).abs())
    sim = torch.where(union > 0, 1.0 - diff / union.clamp_min(1e-12), torch.ones_like(union))
    p = (sim >= threshold).double().mean(dim=1)
    return -(p * p.clamp_min(1e-12).log()).sum()


def output_impact(delta_lo: Tensor, delta_hi: Tensor, rest: list[tuple[nn.Module | None, nn.Linear]],
                  alpha: float, beta: float) -> float:
    """Score of a change ``[delta_lo, delta_hi]`` of a layer's pre-activation, after propagating
    it to the chain's output through ``rest`` = ``[(activation, next Linear), ...]``:
    ``alpha * sigmoid(sum of widths) + beta * sigmoid(interval entropy)``."""
    lo, hi = delta_lo.double(), delta_hi.double()
    for act, linear in rest:
        # A monotone activation moves by at most slope * |d|, with the sign of d.
        slope = _LIPSCHITZ.get(type(act), 1.0)
        lo, hi = slope * lo.clamp(max=0), slope * hi.clamp(min=0)
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        wt = linear.weight.detach().double()
        c, r = center @ wt.T, radius @ wt.abs().T
        lo, hi = c - r, c + r
    width = float((hi - lo).sum())
    ent = float(_interval_entropy(lo, hi))
    return alpha * (1 / (1 + math.exp(-min(width, 50.0)))) + beta * (1 / (1 + math.exp(-ent)))


# ---------------------------------------------------------------------------------------------
# Tracing: leaf-module chain, dense chains, interval propagation
# ---------------------------------------------------------------------------------------------
@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: int
    out: int


@dataclass
class _DenseChain:
    """Linear layers ``linears[k]`` with the activation ``acts[k]`` after each (None = none)."""

    linears: list[str]
    acts: list[str | None]
    start: int  # index in the call list of the first Linear


def _trace_calls(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[_Call], int]:
    """Leaf-module calls in execution order, with the ids of their input/output tensors."""
    calls: list[_Call] = []
    keep: list[Any] = []  # hold the tensors so their ids cannot be reused during the trace
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0] if inputs else None
            keep.extend([x, output])
            calls.append(_Call(name, module, id(x), id(output)))
        return fn

    for name, m in model.named_modules():
        if name and not list(m.children()):
            handles.append(m.register_forward_hook(hook(name)))
    ref = next(model.parameters())
    x = torch.zeros((1, *input_shape), device=ref.device, dtype=ref.dtype)
    keep.append(x)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return calls, id(x)


def _dense_chains(calls: list[_Call]) -> list[_DenseChain]:
    chains: list[_DenseChain] = []
    i = 0
    while i < len(calls):
        if not isinstance(calls[i].module, nn.Linear):
            i += 1
            continue
        chain = _DenseChain([calls[i].name], [], i)
        j, last = i + 1, calls[i].out
        act: str | None = None
        while j < len(calls):
            c = calls[j]
            if c.inp != last:
                break
            if isinstance(c.module, nn.Linear):
                chain.acts.append(act)
                chain.linears.append(c.name)
                act, last = None, c.out
            elif isinstance(c.module, _MONOTONE) and act is None:
                act, last = c.name, c.out
            elif isinstance(c.module, (nn.Identity, nn.Dropout)):
                last = c.out
            else:
                break
            j += 1
        chain.acts.append(act)
        if len(chain.linears) >= 2:
            chains.append(chain)
        i = j if j > i + 1 else i + 1
    return chains


@torch.no_grad()
def _propagate(module: nn.Module, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor] | None:
    """Interval bounds of ``module``'s output for inputs in ``[lo, hi]`` (None: unsupported)."""
    if isinstance(module, (nn.Linear,) + _CONV_TYPES + _BN):
        if isinstance(module, _CONV_TYPES) and module.padding_mode != "zeros":
            return None
        center, radius = (lo + hi) / 2, (hi - lo) / 2
        c = module(center)
        if isinstance(module, nn.Linear):
            r = F.linear(radius, module.weight.abs())
        elif isinstance(module, _BN):
            scale = 1.0 / torch.sqrt(module.running_var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            shape = (1, -1) + (1,) * (radius.dim() - 2)
            r = radius * scale.abs().reshape(shape)
        else:
            conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
            r = conv(radius, module.weight.abs(), None, module.stride, module.padding,
                     module.dilation, module.groups)
        return c - r, c + r
    if isinstance(module, _MONOTONE + _PASS + _POOLS):  # monotone or positive-linear
        return module(lo), module(hi)
    return None


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
class PAODING(PruningMethod):
    """PAODING: data-free pruning of a pretrained model (see the module doc).

    Args:
        conv_ratio: fraction (0..1) of each convolution group's channels removed, lowest
            L1-per-weight first (0 = leave convolutions alone).
        dense_ratio: fraction (0..1) of each hidden dense layer's neurons merged away (the
            paper's ``target``; a fraction of neurons, not of parameters).
        step: fraction of each hidden dense layer's neurons merged per iteration (paper 0.025).
        mode: ``"impact"`` (rank candidate pairs by output impact) or ``"baseline"``.
        alpha, beta: weights of the impact score's width and entropy terms.
        pooling_multiplier: candidates per kept pair in ``impact`` mode.
        bias_aware: include the bias term in the pair saliency.
        input_interval: ``(lo, hi)`` box of the model's inputs in the units it receives
            (normalised): e.g. :func:`normalized_interval` of the data module's statistics.
            None: the data module's ``input_range`` at :meth:`setup` (else (-3, 3)).
            Default (-3, 3): three standard deviations around the mean.
        input_shape: one sample's shape ``(C, H, W)``; taken from the data module when one is
            given to :meth:`setup`, needed here otherwise.
        pretrain: when True, :meth:`plan` asks the runner for one ``"pretrain"`` phase of the
            trial's epochs (the dense model stands in for a pretrained checkpoint; the method does
            not touch the data); False: the model given is already trained (no phases).
        finetune: append a fine-tune phase of ``finetune_epochs`` with the masks fixed (an
            extension; the paper prunes without fine-tuning).
        fold_bn: score a filter after folding the BatchNorm that follows it into it (its L1
            times ``|gamma| / sqrt(running_var + eps)``: the filter the network effectively
            applies); False = the paper's raw L1, which a BatchNorm makes scale-free.
        compensate: replace a removed convolution channel by its expected activation instead of
            zero (an extension, see the module doc; False = the paper's plain removal).
        min_channels: channels/neurons every layer keeps.
        exclude: module-name prefixes left alone.
    """

    name = "paoding"
    needs_data = False

    def __init__(self, conv_ratio: float = 0.25, dense_ratio: float = 0.25, step: float = 0.05,
                 mode: str = "impact", alpha: float = 0.5, beta: float = 0.5,
                 pooling_multiplier: int = 2, bias_aware: bool = True,
                 input_interval: Sequence[float] | None = DEFAULT_INPUT_INTERVAL,
                 input_shape: Sequence[int] | None = None, pretrain: bool = True,
                 finetune: bool = False, compensate: bool = True, fold_bn: bool = True,
                 min_channels: int = 1,
                 exclude: Sequence[str] = ()) -> None:
        super().__init__()
        for key, value in (("conv_ratio", conv_ratio), ("dense_ratio", dense_ratio)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{key} must be a fraction in [0, 1), got {value}")
        if not 0.0 < float(step) <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {step}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if int(pooling_multiplier) < 1:
            raise ValueError(f"pooling_multiplier must be >= 1, got {pooling_multiplier}")
        interval = None if input_interval is None else tuple(float(v) for v in input_interval)
        if interval is not None and (len(interval) != 2 or not interval[0] < interval[1]):
            raise ValueError(f"input_interval must be (lo, hi) with lo < hi, got {input_interval}")
        if int(min_channels) < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels}")
        self.conv_ratio = float(conv_ratio)
        self.dense_ratio = float(dense_ratio)
        self.step = float(step)
        self.mode = mode
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.pooling_multiplier = int(pooling_multiplier)
        self.bias_aware = bool(bias_aware)
        self.input_interval = None if interval is None else list(interval)
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        self.pretrain = bool(pretrain)
        self.finetune = bool(finetune)
        self.compensate = bool(compensate)
        self.fold_bn = bool(fold_bn)
        self.min_channels = int(min_channels)
        self.exclude = list(exclude)
        self.report: dict[str, Any] = {}

    # -------------------------------------------------------------------------- protocol
    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        phases = [Phase("pretrain", epochs, prunes=False)] if self.pretrain and epochs > 0 else []
        if self.finetune and finetune_epochs > 0:
            phases.append(Phase("finetune", finetune_epochs, prunes=False))
        return phases

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Record the input shape (from ``datamodule.input_shape`` if given: no sample is read)."""
        super().setup(model, datamodule)
        if self.input_interval is None:
            # From the data module's statistics (no sample is read), else the library default.
            box = getattr(datamodule, "input_range", None) if datamodule is not None else None
            self.input_interval = list(box if box is not None else DEFAULT_INPUT_INTERVAL)
        shape = getattr(datamodule, "input_shape", None) if datamodule is not None else None
        if shape:
            self.input_shape = [int(s) for s in shape]
        if self.input_shape is None:
            raise ValueError("paoding needs input_shape=(C, H, W) when no data module is given")

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        # Prune right after pretraining so a fine-tune phase trains the pruned model.
        if phase.name == "pretrain" and self.finetune and self.masks is None:
            self.prune(model)

    def finalize(self, model: nn.Module) -> MaskSet:
        """Prune ``model`` (a trained model) data-free, in place, and return the masks."""
        if self.masks is None:
            self.prune(model)
        return super().finalize(model)

    # --------------------------------------------------------------------------- pruning
    def _excluded(self, name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in self.exclude)

    @torch.no_grad()
    def prune(self, model: nn.Module) -> MaskSet:
        """Sampling, reconstruction and masks for surgery; changes ``model`` in place."""
        if self.input_shape is None:
            raise ValueError("paoding: call setup(model) first or pass input_shape=(C, H, W)")
        shape = tuple(self.input_shape)
        groups = channel_groups(model, shape)
        masks = MaskSet()
        removed_conv = self._sample_convolutions(model, groups, masks, shape)
        compensated = self._compensate(model, groups, masks, shape) if self.compensate and len(masks) else 0
        if len(masks):
            complete_channel_masks(model, masks, shape, groups).apply(model)
        merged = self._sample_dense(model, shape, masks)
        if len(masks):
            masks = complete_channel_masks(model, masks, shape, groups)
            masks.apply(model)
        masks.metadata.update({"method": self.name, "config": self.config()})
        self.report = {"conv_channels_removed": removed_conv, "conv_channels_compensated": compensated,
                       "dense_neurons_merged": merged,
                       "sparsity": sparsity_report(model, masks)["global"]["sparsity"]}
        masks.metadata["paoding"] = self.report
        self.masks = masks
        log.info("paoding: removed %d conv channels in %d groups, merged %d dense neurons in %d "
                 "layers (mode %s)", sum(removed_conv.values()), len(removed_conv),
                 sum(v["merged"] for v in merged.values()), len(merged), self.mode)
        return masks

    def _sample_convolutions(self, model: nn.Module, groups: list[ChannelGroup],
                             masks: MaskSet, shape: tuple[int, ...]) -> dict[str, int]:
        """L1-per-weight filter removal, one decision per coupled group."""
        if self.conv_ratio <= 0:
            return {}
        modules = dict(model.named_modules())
        bn_scale: dict[str, Tensor] = {}
        if self.fold_bn:  # the BatchNorm reading each producer's output, folded into its filters
            calls, _ = _trace_calls(model, shape)
            reader = {c.inp: c for c in calls}
            for c in calls:
                nxt = reader.get(c.out)
                if isinstance(c.module, _CONV_TYPES) and nxt is not None and isinstance(nxt.module, _BN):
                    bn = nxt.module
                    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
                    if bn.weight is not None:
                        scale = scale * bn.weight.detach().double().abs()
                    bn_scale[c.name] = scale.cpu()
        removed: dict[str, int] = {}
        for group in groups:
            if not group.prunable or not group.producers:
                continue
            if not all(isinstance(modules[p], _CONV_TYPES) for p in group.producers):
                continue
            if any(self._excluded(p) for p in group.producers):
                continue
            scores = torch.zeros(group.size, dtype=torch.float64)
            for name, index in group.producers.items():
                w = modules[name].weight.detach()
                per_filter = w.abs().reshape(w.shape[0], -1).sum(1).double().cpu() / w[0].numel()
                if name in bn_scale:
                    per_filter = per_filter * bn_scale[name]
                scores += per_filter[index]
            count = min(math.ceil(self.conv_ratio * group.size), group.size - self.min_channels)
            if count <= 0:
                continue
            drop = torch.argsort(scores, stable=True)[:count]
            for name, index in group.producers.items():
                key = f"{name}.weight"
                keep = masks.masks[key].clone() if key in masks else torch.ones(
                    modules[name].weight.shape[0], dtype=torch.bool, device=modules[name].weight.device)
                keep[index[drop].to(keep.device)] = False
                masks.set(key, keep, "channel")
            removed[group.root] = int(count)
        return removed

    @torch.no_grad()
    def _compensate(self, model: nn.Module, groups: list[ChannelGroup], masks: MaskSet,
                    shape: tuple[int, ...]) -> int:
        """Fold each removed channel's expected activation into its consumers (data-free).

        For a channel ``Conv -> BatchNorm(gamma, beta) -> ReLU`` the BatchNorm output has mean
        ``beta`` and standard deviation ``|gamma|`` over the data it was trained on; modelled as
        ``N(beta, gamma^2)``, the ReLU output's mean is ``beta Phi(beta/|gamma|) + |gamma|
        phi(beta/|gamma|)`` (``beta`` without an activation). The consumers' response to that
        constant (its weights over the channel, summed over the kernel) is added to their bias,
        or subtracted from the running mean of the BatchNorm that follows them when they have
        none. Exact for dense consumers, approximate at a convolution's zero-padded border.
        Single-producer groups only (a residual stream's post-add activation is not modelled).
        Returns the number of channels compensated.
        """
        modules = dict(model.named_modules())
        calls, _ = _trace_calls(model, shape)
        reader = {c.inp: c for c in calls}  # tensor id -> the call that reads it
        by_name = {c.name: c for c in calls}
        done = 0
        for group in groups:
            if len(group.producers) != 1 or len(group.norms) > 1:
                continue
            (producer, index), = group.producers.items()
            key = f"{producer}.weight"
            if key not in masks or producer not in by_name:
                continue
            dropped = torch.nonzero(~masks.masks[key].cpu()[index]).flatten()
            if dropped.numel() == 0:
                continue
            bn_name = next(iter(group.norms), None)
            after = reader.get(by_name[producer].out)
            if bn_name is None or after is None or after.name != bn_name:
                continue  # the channel's distribution is only known through its BatchNorm
            bn = modules[bn_name]
            if bn.weight is None:
                continue
            act = reader.get(after.out)
            beta = bn.bias.detach().double()[group.norms[bn_name][dropped]]
            gamma = bn.weight.detach().double()[group.norms[bn_name][dropped]].abs().clamp_min(1e-12)
            if act is not None and isinstance(act.module, nn.ReLU):
                z = beta / gamma
                normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
                mean = beta * normal.cdf(z) + gamma * normal.log_prob(z).exp()
            elif act is not None and isinstance(act.module, (nn.Identity, nn.Dropout) + _POOLS):
                mean = beta
            else:
                continue
            value = torch.zeros(group.size, dtype=torch.float64, device=mean.device)
            value[dropped.to(mean.device)] = mean
            for name, (root_idx, in_idx) in group.consumers.items():
                consumer = modules[name]
                if isinstance(consumer, _CONV_TYPES) and consumer.groups != 1:
                    continue
                w = consumer.weight.detach().double()
                per_input = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # (out, in)
                shift = (per_input[:, in_idx.to(w.device)] * value[root_idx].to(w.device)[None]).sum(1)
                self._shift_output(model, modules, calls, reader, name, shift)
            done += int(dropped.numel())
        return done

    @staticmethod
    def _shift_output(model: nn.Module, modules: dict[str, nn.Module], calls: list[_Call],
                      reader: dict[int, _Call], name: str, shift: Tensor) -> None:
        """Add ``shift`` to module ``name``'s output: to its bias, else through its BatchNorm."""
        consumer = modules[name]
        if getattr(consumer, "bias", None) is not None:
            consumer.bias.add_(shift.to(consumer.bias.dtype))
            return
        call = next((c for c in calls if c.name == name), None)
        follower = reader.get(call.out) if call is not None else None
        if follower is not None and isinstance(follower.module, _BN) and follower.module.running_mean is not None:
            follower.module.running_mean.sub_(shift.to(follower.module.running_mean.dtype))

    def _chain_input_box(self, calls: list[_Call], x_id: int, chain: _DenseChain,
                         shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor] | None:
        """Interval box of the chain's first Linear input, propagated from ``input_interval``
        through the modules before it (None when they are not a plain chain of supported ops)."""
        box_lo, box_hi = self.input_interval or DEFAULT_INPUT_INTERVAL  # None when setup() was skipped
        lo = torch.full((1, *shape), box_lo, device=device, dtype=torch.float64)
        hi = torch.full((1, *shape), box_hi, device=device, dtype=torch.float64)
        last = x_id
        for call in calls[: chain.start]:
            if call.inp != last:
                return None
            module = call.module
            out = _propagate(_as_double(module), lo, hi)
            if out is None:
                return None
            lo, hi = out
            last = call.out
        if calls[chain.start].inp != last:
            return None
        return lo.reshape(-1), hi.reshape(-1)

    def _sample_dense(self, model: nn.Module, shape: tuple[int, ...], masks: MaskSet) -> dict[str, dict[str, int]]:
        if self.dense_ratio <= 0:
            return {}
        calls, x_id = _trace_calls(model, shape)
        chains = _dense_chains(calls)
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        merged: dict[str, dict[str, int]] = {}
        for chain in chains:
            linears: list[nn.Linear] = [modules[n] for n in chain.linears]  # type: ignore[misc]
            acts = [modules[a] if a is not None else None for a in chain.acts]
            box = None
            if self.mode == "impact":
                box = self._chain_input_box(calls, x_id, chain, shape, device)
                if box is None:
                    log.warning("paoding: the layers before %s are not a plain chain of supported "
                                "modules; its pairs are ranked by saliency only (baseline)", chain.linears[0])
            hidden = [k for k in range(len(linears) - 1) if not self._excluded(chain.linears[k])]
            alive = {k: torch.ones(linears[k].out_features, dtype=torch.bool) for k in hidden}
            targets = {k: min(math.ceil(self.dense_ratio * linears[k].out_features),
                              linears[k].out_features - self.min_channels) for k in hidden}
            done = {k: 0 for k in hidden}
            cumulative = {k: None for k in hidden}
            iterations = math.ceil(self.dense_ratio / self.step)
            for _ in range(iterations):
                progressed = False
                for k in hidden:
                    n = linears[k].out_features
                    want = min(math.ceil(self.step * n), targets[k] - done[k])
                    if want <= 0:
                        continue
                    pairs = self._merge_step(linears, acts, k, alive[k], want, box, cumulative)
                    for i, j in pairs:
                        merge_neurons(linears[k + 1], i, j)
                        alive[k][j] = False
                    done[k] += len(pairs)
                    progressed = progressed or bool(pairs)
                if not progressed:
                    break
            for k in hidden:
                if done[k]:
                    w = linears[k].weight
                    masks.set(f"{chain.linears[k]}.weight", alive[k].to(w.device), "channel")
                    merged[chain.linears[k]] = {"merged": done[k], "neurons": linears[k].out_features}
        return merged

    def _activation_boxes(self, linears: list[nn.Linear], acts: list[nn.Module | None],
                          box: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``[lo, hi]`` of every chain layer's activation output, current weights."""
        lo, hi = box
        out = []
        for linear, act in zip(linears, acts):
            lo, hi = _propagate(_as_double(linear), lo[None], hi[None])  # type: ignore[misc]
            if act is not None:
                lo, hi = act(lo), act(hi)
            lo, hi = lo[0], hi[0]
            out.append((lo, hi))
        return out

    def _merge_step(self, linears: list[nn.Linear], acts: list[nn.Module | None], k: int,
                    alive: Tensor, want: int, box: tuple[Tensor, Tensor] | None,
                    cumulative: dict[int, tuple[Tensor, Tensor] | None]) -> list[tuple[int, int]]:
        """Choose up to ``want`` disjoint (keep, remove) pairs of layer ``k`` of the chain."""
        layer, consumer = linears[k], linears[k + 1]
        sal = pair_saliency(layer.weight.detach().cpu(), None if layer.bias is None else layer.bias.detach().cpu(),
                            consumer.weight.detach().cpu(), self.bias_aware)
        dead = ~alive
        sal[dead, :] = math.inf
        sal[:, dead] = math.inf
        pool = want * (self.pooling_multiplier if box is not None else 1)
        order = torch.argsort(sal.flatten())
        n = sal.shape[0]
        used = torch.zeros(n, dtype=torch.bool)
        candidates: list[tuple[int, int]] = []
        for flat in order.tolist():
            if not math.isfinite(float(sal.view(-1)[flat])) or len(candidates) >= pool:
                break
            i, j = divmod(flat, n)
            if used[i] or used[j]:
                continue
            used[i] = used[j] = True
            candidates.append((i, j))
        if box is None or len(candidates) <= want:
            chosen = candidates[:want]
            if box is not None and chosen:
                self._add_impact(linears, acts, k, chosen, box, cumulative)
            return chosen
        boxes = self._activation_boxes(linears, acts, box)
        in_box = box if k == 0 else boxes[k - 1]
        a = consumer.weight.detach().double()
        rest = [(acts[m], linears[m + 1]) for m in range(k + 1, len(linears) - 1)]
        cum = cumulative[k]
        scores = []
        for i, j in candidates:
            diff = _pair_difference(layer, acts[k], in_box, boxes[k], i, j)
            d_lo, d_hi = _merge_delta(a, diff, j)
            if cum is not None:
                d_lo, d_hi = d_lo + cum[0], d_hi + cum[1]
            scores.append(output_impact(d_lo, d_hi, rest, self.alpha, self.beta))
        ranked = sorted(range(len(candidates)), key=lambda c: (scores[c], c))
        chosen = [candidates[c] for c in ranked[:want]]
        self._add_impact(linears, acts, k, chosen, box, cumulative, boxes)
        return chosen

    def _add_impact(self, linears: list[nn.Linear], acts: list[nn.Module | None], k: int,
                    chosen: list[tuple[int, int]], box: tuple[Tensor, Tensor],
                    cumulative: dict[int, tuple[Tensor, Tensor] | None],
                    boxes: list[tuple[Tensor, Tensor]] | None = None) -> None:
        boxes = boxes or self._activation_boxes(linears, acts, box)
        in_box = box if k == 0 else boxes[k - 1]
        a = linears[k + 1].weight.detach().double()
        for i, j in chosen:
            diff = _pair_difference(linears[k], acts[k], in_box, boxes[k], i, j)
            d_lo, d_hi = _merge_delta(a, diff, j)
            cum = cumulative[k]
            cumulative[k] = (d_lo, d_hi) if cum is None else (cum[0] + d_lo, cum[1] + d_hi)


def _pair_difference(layer: nn.Linear, act: nn.Module | None, in_box: tuple[Tensor, Tensor],
                     out_box: tuple[Tensor, Tensor], i: int, j: int) -> tuple[float, float]:
    """Interval of ``x_i - x_j`` (activations of neurons ``i`` and ``j`` of ``layer``).

    The paper subtracts the two neurons' intervals, ``[lo_i - hi_j, hi_i - lo_j]``, which
    forgets that both read the same input. The pre-activation difference
    ``(w_i - w_j) . z + (b_i - b_j)`` has its own interval over the input box, and a monotone
    activation with slope <= s moves the difference to within ``[s * min(d, 0), s * max(d, 0)]``;
    the intersection of both bounds is kept (identical neurons get exactly 0).
    """
    lo, hi = out_box
    naive_lo, naive_hi = float(lo[i] - hi[j]), float(hi[i] - lo[j])
    w = layer.weight.detach().double()
    dw = w[i] - w[j]
    db = 0.0 if layer.bias is None else float(layer.bias[i].double() - layer.bias[j].double())
    center, radius = (in_box[0] + in_box[1]) / 2, (in_box[1] - in_box[0]) / 2
    c, r = float(dw @ center) + db, float(dw.abs() @ radius)
    slope = 1.0 if act is None else _LIPSCHITZ.get(type(act), 1.0)
    if act is None:
        d_lo, d_hi = c - r, c + r
    else:
        d_lo, d_hi = slope * min(c - r, 0.0), slope * max(c + r, 0.0)
    return max(naive_lo, d_lo), min(naive_hi, d_hi)


def _merge_delta(a: Tensor, diff: tuple[float, float], j: int) -> tuple[Tensor, Tensor]:
    """Interval of the change of the next pre-activation when ``j`` merges into ``i``:
    ``a_j * (x_i - x_j)`` with ``x_i - x_j`` in ``diff`` (see :func:`_pair_difference`)."""
    d_lo, d_hi = diff
    col = a[:, j]
    p, q = col * d_lo, col * d_hi
    return torch.minimum(p, q), torch.maximum(p, q)


def _as_double(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` (interval arithmetic in double avoids rounding noise)."""
    return copy.deepcopy(module).double().eval()
