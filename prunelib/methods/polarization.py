"""Consensus sub-network with polarization regularization (Zhi et al., arXiv 2302.10798).

Binary gates sit on the output channels of every Conv/Linear layer (after its BatchNorm when
one follows) and on the residual branch of every BasicBlock-style block. They are trained
together with the weights in one run: hard 0/1 in the forward pass, a straight-through
gradient in the backward pass, a *sparsity* loss that holds the expected fraction of live
weights at the user's target and a *polarization* loss that pushes every gate's probability
to 0 or 1 (so the static sub-network the gates agree on is well defined). At the end of the
training phase the closed gates become a structured mask, the target is enforced to within
``tolerance``, the gates and their hooks leave the model (no cost at inference) and the masked
network is fine-tuned.

No code of the paper is public and its body was not available: this follows the
reconstruction in ``reference/algorithms.md`` section 2.1; every open detail is a setting of
:class:`PolarizationGates` (documented there). Decisions worth knowing:

* Static gates only (one learnable logit per unit). The paper's input-conditioned (dynamic)
  gates, collapsed to a static mask by their firing rate, are **not implemented**.
* Sparsity is the library's convention (zeroed Conv/Linear weights over all Conv/Linear
  weights). A closed output channel zeroes its filter/row (and bias, and the affine of the
  BatchNorm that follows). With ``prune_inputs=True`` (default) the downstream weights that
  only read closed channels are zeroed too (a weight-granularity mask on the consumer layer):
  physical channel removal deletes them as well, and without them channel pruning cannot
  reach a weight-sparsity target. The sparsity loss uses the same count, in expectation: a
  weight ``(o, i)`` of a layer is live with probability ``p_o * q_i`` where ``p_o`` is its
  output unit's gate probability and ``q_i = 1 - prod_s (1 - p_s)`` over the gated sources of
  input ``i`` (a residual stream channel is live while any contributor is open). Which
  sources feed which input is found once, at ``setup``, by a NaN-propagation probe (no model
  rewriting, no name conventions beyond the block-gate rule below).
* Residual channels (pitfall 2.3 #5): each conv gets its own gates; closing a channel of the
  last conv of a branch zeroes that branch's contribution to the stream channel, which
  stays alive through the shortcut. Stream inputs are only counted as pruned when every
  contributor is closed. Physical surgery must respect this (the masks are exact masks).
* BatchNorm statistics (pitfall 2.3 #4): gates act after BN, so the statistics BN saw in
  training are those of the final network; no recomputation is needed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunelib.masks import MaskSet, prunable_modules, sparsity_report
from prunelib.methods.base import Phase, PruningMethod, train_then_finetune

__all__ = ["PolarizationGates", "GateModule", "GATES_ATTR"]

log = logging.getLogger("prunelib")

#: Name under which the gate module is registered on the model while training.
GATES_ATTR = "_prunesearch_gates"

_POLARIZERS = ("p(1-p)", "binary_entropy", "bimodal")
_STES = ("sigmoid", "identity")
_COSTS = ("params", "uniform")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PROBE_CHUNK = 128  # samples per probe forward (one per gated channel)


# ---------------------------------------------------------------------------------------------
# Autograd pieces
# ---------------------------------------------------------------------------------------------
class _HardGate(torch.autograd.Function):
    """``g = 1[logit > 0]`` (= ``1[sigmoid(logit / T) > 0.5]``), straight-through backward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, temperature: float, ste: str) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.temperature, ctx.ste = temperature, ste
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (logits,) = ctx.saved_tensors
        if ctx.ste == "identity":
            return grad, None, None
        s = torch.sigmoid(logits / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None, None


# ---------------------------------------------------------------------------------------------
# Gate bookkeeping
# ---------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """A set of gates sharing one hook.

    ``kind="channel"``: one gate per output channel of prunable module ``layer`` (the hook
    sits on ``host``: the BatchNorm that directly follows ``layer``, or ``layer`` itself).
    ``kind="block"``: one gate on the residual branch of block ``layer`` (hook on ``host``,
    the branch's last op, e.g. ``bn2``).
    """

    kind: str
    layer: str
    host: str
    offset: int
    size: int
    channel_dim: int = 1
    block: int = -1  # index of the block unit gating this channel group's branch (-1: none)


@dataclass
class _LayerCost:
    """Live-weight bookkeeping of one Conv/Linear layer (see the module doc)."""

    name: str
    numel: int
    out: int
    inp: int
    groups: int
    per_pair: int  # weights per (output, input) pair: kernel size
    out_units: Tensor | None  # channel-unit indices of the outputs (None: not gated)
    sources: Tensor  # (inp, k) indices into the unit vector, padded with the "closed" slot
    ungated: Tensor  # (inp,) bool: input has a source without a gate (always live)


class GateModule(nn.Module):
    """The gate logits and their forward hooks; registered on the model while training.

    Attributes:
        logits: one learnable logit per gate (channel units first, then block units).
        active: False = every gate open and no gradient (warm-up, or before training).
        fixed: optional 0/1 tensor overriding the hard gates (the state being exported).
    """

    def __init__(self, groups: list[_Group], n_units: int, gate_init: float, temperature: float,
                 ste: str) -> None:
        super().__init__()
        self.groups = groups
        # A buffer, not a Parameter: the method's own Adam steps the logits (see
        # PolarizationGates.gate_lr), so the user's optimizer must not see them. It is a leaf
        # that requires grad, so backward fills ``logits.grad``.
        self.register_buffer("logits", torch.full((n_units,), float(gate_init)).requires_grad_(True))
        self.register_buffer("adam_m", torch.zeros(n_units))
        self.register_buffer("adam_v", torch.zeros(n_units))
        self.adam_t = 0
        self.temperature = float(temperature)
        self.ste = ste
        self.active = False
        self.fixed: Tensor | None = None
        self.probe_items: dict[int, int] | None = None  # unit -> probe sample (NaN probe)
        self._handles: list[Any] = []

    def _apply(self, fn: Any, recurse: bool = True) -> "GateModule":
        # Moving a buffer that requires grad gives a non-leaf copy: make it a leaf again.
        super()._apply(fn, recurse)
        self._buffers["logits"] = self._buffers["logits"].detach().requires_grad_(True)
        return self

    # -- values ------------------------------------------------------------------------------
    def probabilities(self) -> Tensor:
        """``sigmoid(logit / temperature)`` of every gate (differentiable)."""
        return torch.sigmoid(self.logits / self.temperature)

    def hard(self) -> Tensor:
        """Current 0/1 state of every gate (no gradient)."""
        if self.fixed is not None:
            return self.fixed.to(self.logits.device, self.logits.dtype)
        return (self.logits.detach() > 0).to(self.logits.dtype)

    @torch.no_grad()
    def adam_step(self, lr: float, clip: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8) -> bool:
        """One Adam step on the logits from ``logits.grad`` (then cleared); False if no grad."""
        grad = self.logits.grad
        if grad is None:
            return False
        self.adam_t += 1
        b1, b2 = betas
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.adam_m / (1 - b1 ** self.adam_t)
        v_hat = self.adam_v / (1 - b2 ** self.adam_t)
        self.logits.sub_(lr * m_hat / (v_hat.sqrt() + eps)).clamp_(-clip, clip)
        self.logits.grad = None
        return True

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for group in self.groups:
            self._handles.append(modules[group.host].register_forward_hook(self._hook(group)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, group: _Group):
        def hook(_module: nn.Module, _inputs: Any, out: Tensor) -> Tensor | None:
            if self.probe_items is not None:
                return self._inject(group, out)
            if not self.active and self.fixed is None:
                return None
            sl = slice(group.offset, group.offset + group.size)
            if self.fixed is not None:
                g = self.hard()[sl]
            else:
                g = _HardGate.apply(self.logits[sl], self.temperature, self.ste)
            if group.kind == "block":
                return out * g.reshape(())
            shape = [1] * out.dim()
            shape[group.channel_dim] = group.size
            return out * g.reshape(shape)
        return hook

    def _inject(self, group: _Group, out: Tensor) -> Tensor | None:
        """NaN probe: channel c of the probe sample assigned to its unit becomes NaN."""
        if group.kind == "block":
            return None
        out = out.clone()
        dim = group.channel_dim % out.dim()
        for c in range(group.size):
            j = self.probe_items.get(group.offset + c)  # type: ignore[union-attr]
            if j is not None:
                idx = [j] + [slice(None)] * (out.dim() - 1)
                idx[dim] = c
                out[tuple(idx)] = float("nan")
        return out


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
class PolarizationGates(PruningMethod):
    """Consensus sub-network: binary gates + polarization + sparsity loss, one training run.

    Plan: ``train`` (gates open for the warm-up, then hard gates with STE and the two losses)
    -> at its end closed gates become channel masks, the target is enforced, gates removed ->
    ``finetune`` with the masks fixed.

    Losses (returned by :meth:`regularization`, added to the cross-entropy every step), with
    ``p_u = sigmoid(logit_u / temperature)``:

    * sparsity: ``lambda_s * (D(p) - (1 - sparsity))**2``. ``cost_weighting="params"``:
      ``D`` is the expected fraction of live Conv/Linear weights (each weight is live with
      the probability that its output unit is open times that its input is read from an open
      unit; the brief's ``sum_u w_u p_u / sum_u w_u`` with ``w_u`` = the weights a unit owns,
      in and out, extended to weights between two gated units). ``"uniform"``: ``D`` is the
      mean gate probability of the channel units (the target then counts units, and the final
      enforcement converts to weight sparsity).
    * polarization: ``lambda_p * R(p)`` over all gates. The paper's form is unknown:
      ``"p(1-p)"`` (default): ``mean p(1-p)``, zero exactly at 0/1 (the reconstruction's
      firing-rate form); ``"binary_entropy"``: ``mean H(p)`` (steeper near 0/1);
      ``"bimodal"`` (Zhuang et al. 2020 polarization): ``t * mean p - mean |p - mean p|``
      with ``t = polarization_t``, which spreads the gates away from their mean.

    Args:
        sparsity: target weight sparsity (library convention), default 0.5.
        lambda_s: weight of the sparsity loss, default 20 (tuned on digits LeNet-5/MLP,
            8-epoch runs: the gates land within a few points of the target by themselves; at
            5 the polarizer froze some runs 10+ points short).
        lambda_p: weight of the polarization loss (after its ramp), default 5 (tuned likewise:
            93-100 % of gates within 0.1 of 0/1 at the end; at 1-2 many stayed near 0.5).
        polarization: ``"p(1-p)"`` | ``"binary_entropy"`` | ``"bimodal"`` (see above).
        polarization_t: ``t`` of the bimodal form (default 0: the sparsity loss already sets
            the level; Zhuang et al. use 1.0-1.4 with no separate sparsity loss).
        warmup_fraction: fraction of the training phase's steps with every gate open and no
            regularizer (default 0.1; pitfall 2.3 #2: gates frozen before the weights learn).
        polarization_ramp: ``lambda_p`` grows linearly from 0 to its value over this fraction
            of the steps after the warm-up (default 0.3), then stays. Without a ramp the
            polarizer, acting on gates that all start open, holds them open and only the
            costliest units close; the ramp lets the sparsity and task losses choose first and
            the polarizer commit later.
        gate_init: initial logit of every gate (default 3.0: ``p = 0.95``, open).
        temperature: ``p = sigmoid(logit / temperature)`` (default 1.0); the hard gate is
            ``1[logit > 0]`` whatever the temperature.
        ste: gradient of the hard gate: ``"sigmoid"`` (``d sigmoid(logit/T) / d logit``,
            default) or ``"identity"`` (plain STE, gradient 1).
        cost_weighting: ``"params"`` (default) | ``"uniform"`` (see above).
        block_gates: one extra gate per residual block (any module with ``shortcut``,
            ``conv1`` and ``conv2``): ``y = shortcut(x) + g_b * F(x)``, by a hook on the
            branch's last BatchNorm/conv (``bn2``). A closed block masks all the branch's
            channels; identity shortcuts keep the signal. Default True (no effect on models
            without such blocks).
        gate_lr: step size of the method's own Adam on the gate logits; None (default) =
            automatic, ``min(1, 4 * logit_clip / steps after the warm-up)``: a gate can cross
            the clipped range twice in the run (a fixed 0.1 left most gates half way in short
            runs). The logits are a buffer the training optimizer never sees: the regularisers
            are means over units, so per-logit gradients are O(1/units) and under the runner's
            SGD the gates barely moved (LeNet-5's fc gates stayed at their initial value for
            64 steps); Adam's per-parameter normalisation makes their speed independent of
            model size, loss scale and the user's optimizer, and it works when the gates are
            created after the optimizer (the standalone callback sets up in ``on_fit_start``).
        logit_clip: logits are clamped to ``[-logit_clip, logit_clip]`` after every step, so
            a closed gate can still reopen (the sigmoid STE vanishes for large logits).
            Default 6.
        prune_inputs: also zero the weights that only read closed channels (default True;
            see the module doc); False = output channels only.
        tolerance: the achieved weight sparsity must lie within this of the target (default
            0.01); closed gates with the highest probability are reopened, open ones with the
            lowest are closed, until it does.
        min_channels: channels each gated layer keeps open at least (default 1; layer
            collapse guard; a layer inside a closed block may lose all).
        exclude: module-name prefixes whose outputs get no channel gate (still counted).
    """

    name = "polarization"
    needs_data = True

    def __init__(self, sparsity: float = 0.5, lambda_s: float = 20.0, lambda_p: float = 5.0,
                 polarization: str = "p(1-p)", polarization_t: float = 0.0,
                 warmup_fraction: float = 0.1, polarization_ramp: float = 0.3,
                 gate_init: float = 3.0, temperature: float = 1.0,
                 ste: str = "sigmoid", cost_weighting: str = "params", block_gates: bool = True,
                 gate_lr: float | None = None, logit_clip: float = 6.0, prune_inputs: bool = True,
                 tolerance: float = 0.01, min_channels: int = 1,
                 exclude: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity}")
        if polarization not in _POLARIZERS:
            raise ValueError(f"polarization must be one of {_POLARIZERS}, got {polarization!r}")
        if ste not in _STES:
            raise ValueError(f"ste must be one of {_STES}, got {ste!r}")
        if cost_weighting not in _COSTS:
            raise ValueError(f"cost_weighting must be one of {_COSTS}, got {cost_weighting!r}")
        if not 0.0 <= float(polarization_ramp) <= 1.0:
            raise ValueError(f"polarization_ramp must be in [0, 1], got {polarization_ramp}")
        if not 0.0 <= float(warmup_fraction) < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"gate_lr must be > 0 (or None: automatic), got {gate_lr}")
        if not temperature > 0 or not logit_clip > 0:
            raise ValueError("temperature and logit_clip must be > 0")
        if lambda_s < 0 or lambda_p < 0:
            raise ValueError("lambda_s and lambda_p must be >= 0")
        if not 0.0 < float(tolerance) < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
        if min_channels < 0:
            raise ValueError(f"min_channels must be >= 0, got {min_channels}")
        self.sparsity = float(sparsity)
        self.lambda_s = float(lambda_s)
        self.lambda_p = float(lambda_p)
        self.polarization = polarization
        self.polarization_t = float(polarization_t)
        self.warmup_fraction = float(warmup_fraction)
        self.polarization_ramp = float(polarization_ramp)
        self.gate_init = float(gate_init)
        self.temperature = float(temperature)
        self.ste = ste
        self.cost_weighting = cost_weighting
        self.block_gates = bool(block_gates)
        self.gate_lr = None if gate_lr is None else float(gate_lr)
        self._gate_lr = 0.1
        self.logit_clip = float(logit_clip)
        self.prune_inputs = bool(prune_inputs)
        self.tolerance = float(tolerance)
        self.min_channels = int(min_channels)
        self.exclude = list(exclude)
        self._gates: GateModule | None = None
        self._costs: list[_LayerCost] = []
        self._costs_device: tuple[torch.device, list[_LayerCost]] | None = None
        self._n_channel_units = 0
        self._unit_block: Tensor | None = None  # per channel unit: block unit index or -1
        self._bn_of: dict[str, str] = {}  # gated layer -> BatchNorm that follows it
        self._warmup_steps = 0
        self._ramp_steps = 0
        self._step = 0
        self._final_probs: dict[str, Tensor] = {}
        self._final_open: Tensor | None = None
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ plan
    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return train_then_finetune(epochs, finetune_epochs)

    # ----------------------------------------------------------------------------- setup
    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        super().setup(model, datamodule)
        if self._gates is not None:
            return  # already set up (the runner and a callback may both call it)
        shape = tuple(getattr(datamodule, "input_shape", ()) or ())
        if not shape:
            x, _ = datamodule.sample_batch("train")
            shape = tuple(x.shape[1:])
        self._input_shape = shape
        device = next(model.parameters()).device
        order, bn_after = self._trace(model, shape, device)
        prunable = prunable_modules(model)
        modules = dict(model.named_modules())
        classifier = [n for n in order if n in prunable][-1]
        groups: list[_Group] = []
        offset = 0
        for name in order:
            if name not in prunable or name == classifier:
                continue
            if any(name == e or name.startswith(e + ".") for e in self.exclude):
                continue
            m = prunable[name]
            host = bn_after.get(name, name)
            if host != name:
                self._bn_of[name] = host
            size = int(m.weight.shape[0])
            dim = -1 if isinstance(m, nn.Linear) else 1
            groups.append(_Group("channel", name, host, offset, size, dim))
            offset += size
        self._n_channel_units = offset
        unit_block = torch.full((offset,), -1, dtype=torch.long)
        if self.block_gates:
            for bname, block in modules.items():
                if not all(isinstance(getattr(block, a, None), nn.Module)
                           for a in ("shortcut", "conv1", "conv2")):
                    continue
                inside = [n for n in order if n.startswith(bname + ".")
                          and not n.startswith(bname + ".shortcut")
                          and (n in prunable or isinstance(modules[n], _BN_TYPES))]
                if not inside:
                    continue
                host = inside[-1]
                unit = offset
                groups.append(_Group("block", bname, host, offset, 1))
                offset += 1
                for g in groups:
                    if g.kind == "channel" and g.layer.startswith(bname + ".") \
                            and not g.layer.startswith(bname + ".shortcut"):
                        g.block = unit
                        unit_block[g.offset:g.offset + g.size] = unit
        self._unit_block = unit_block
        gates = GateModule(groups, offset, self.gate_init, self.temperature, self.ste).to(device)
        gates.attach(model)
        model.add_module(GATES_ATTR, gates)
        self._gates = gates
        self.cost.extra_params = offset
        self._costs = self._probe(model, shape, device)
        log.info("polarization: %d channel gates in %d layers, %d block gates", self._n_channel_units,
                 sum(g.kind == "channel" for g in groups), offset - self._n_channel_units)

    @staticmethod
    @torch.no_grad()
    def _trace(model: nn.Module, shape: tuple[int, ...], device: torch.device
               ) -> tuple[list[str], dict[str, str]]:
        """Execution order of leaf-ish modules, and which BatchNorm reads which layer's output."""
        order: list[str] = []
        produced: dict[int, tuple[str, Tensor]] = {}
        bn_after: dict[str, str] = {}
        consumers: dict[str, int] = {}
        handles = []
        prunable = prunable_modules(model)

        def pre(name: str):
            def hook(_m: nn.Module, inputs: Any) -> None:
                for t in inputs:
                    if isinstance(t, Tensor) and id(t) in produced and produced[id(t)][1] is t:
                        src = produced[id(t)][0]
                        consumers[src] = consumers.get(src, 0) + 1
                        if isinstance(_m, _BN_TYPES) and getattr(_m, "num_features", -1) == \
                                prunable[src].weight.shape[0]:
                            bn_after.setdefault(src, name)
            return hook

        def post(name: str):
            def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
                order.append(name)
                if name in prunable and isinstance(out, Tensor):
                    produced[id(out)] = (name, out)
            return hook

        for name, m in model.named_modules():
            if name and (name in prunable or isinstance(m, _BN_TYPES) or not list(m.children())):
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post(name)))
        was_training = model.training
        model.eval()
        try:
            model(torch.zeros((2, *shape), device=device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        # A BatchNorm only hosts the gate when it is the layer's only consumer.
        bn_after = {k: v for k, v in bn_after.items() if consumers.get(k, 0) == 1}
        return order, bn_after

    @torch.no_grad()
    def _probe(self, model: nn.Module, shape: tuple[int, ...], device: torch.device) -> list[_LayerCost]:
        """Which gated channels feed which input of every Conv/Linear layer (NaN propagation).

        Probe sample ``j`` carries a NaN in exactly one gated channel (sample 0 of the first
        forward: NaN model input and NaN outputs of ungated layers). Every Conv/Linear records
        which of its inputs are NaN and replaces NaN by 0 in its output, so a NaN travels one
        layer: through activations, pooling, flattening and residual additions, not further.
        """
        assert self._gates is not None
        gates = self._gates
        prunable = prunable_modules(model)
        gated_layers = {g.layer for g in gates.groups if g.kind == "channel"}
        n = self._n_channel_units
        seen: dict[str, list[tuple[list[int], Tensor]]] = {name: [] for name in prunable}
        state: dict[str, Any] = {}

        def pre(name: str):
            def hook(_m: nn.Module, inputs: Any) -> None:
                x = inputs[0]
                if isinstance(_m, nn.Linear):
                    nan = torch.isnan(x).reshape(x.shape[0], -1, x.shape[-1]).any(1)
                else:
                    nan = torch.isnan(x).flatten(2).any(2)
                seen[name].append((state["items"], nan.cpu()))
            return hook

        def post(name: str):
            def hook(_m: nn.Module, _inputs: Any, out: Tensor) -> Tensor:
                out = torch.nan_to_num(out, nan=0.0)
                if name not in gated_layers and state["items"][0] == -1:
                    out[0] = float("nan")
                return out
            return hook

        handles = []
        for name, m in prunable.items():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name), prepend=True))
        was_training = model.training
        model.eval()
        try:
            batches = [[-1] + list(range(0, min(n, _PROBE_CHUNK - 1)))]
            start = min(n, _PROBE_CHUNK - 1)
            while start < n:
                batches.append(list(range(start, min(n, start + _PROBE_CHUNK))))
                start += _PROBE_CHUNK
            for items in batches:
                state["items"] = items
                gates.probe_items = {u: j for j, u in enumerate(items) if u >= 0}
                x = torch.zeros((len(items), *shape), device=device)
                if items[0] == -1:
                    x[0] = float("nan")
                model(x)
        finally:
            gates.probe_items = None
            model.train(was_training)
            for h in handles:
                h.remove()

        by_layer = {g.layer: g for g in gates.groups if g.kind == "channel"}
        costs = []
        for name, m in prunable.items():
            w = m.weight
            out, per_group_in = int(w.shape[0]), int(w.shape[1])
            groups = int(getattr(m, "groups", 1))
            inp = per_group_in * groups
            srcs: list[list[int]] = [[] for _ in range(inp)]
            ungated = torch.zeros(inp, dtype=torch.bool)
            for items, nan in seen[name]:
                if nan.shape[1] != inp:
                    # Input layout unlike the weight's (functional reshapes): count it dense.
                    ungated[:] = True
                    continue
                for j, u in enumerate(items):
                    hit = nan[j].nonzero().flatten().tolist()
                    if u == -1:
                        ungated[hit] = True
                    else:
                        for i in hit:
                            srcs[i].append(u)
            for i in range(inp):
                if not srcs[i]:
                    ungated[i] = True  # fed by nothing gated (e.g. the model input)
            k = max([len(s) for s in srcs] + [1])
            sources = torch.full((inp, k), n, dtype=torch.long)  # slot n = "closed" (p = 0)
            for i, s in enumerate(srcs):
                if s:
                    sources[i, :len(s)] = torch.tensor(s)
            g = by_layer.get(name)
            out_units = torch.arange(g.offset, g.offset + g.size) if g is not None else None
            costs.append(_LayerCost(name, w.numel(), out, inp, groups, w[0, 0].numel(),
                                    out_units, sources, ungated))
        return costs

    # ------------------------------------------------------------------------ densities
    def _effective(self, probs: Tensor) -> Tensor:
        """Per channel unit: open probability times that of its block gate (if any)."""
        n = self._n_channel_units
        ch = probs[:n]
        assert self._unit_block is not None
        blocks = self._unit_block.to(probs.device)
        if (blocks >= 0).any():
            ext = torch.cat([probs, probs.new_ones(1)])
            ch = ch * ext[torch.where(blocks >= 0, blocks, probs.numel())]
        return ch

    def _costs_on(self, device: torch.device) -> list[_LayerCost]:
        """The layer bookkeeping with its index tensors on ``device`` (cached per device)."""
        if self._costs_device is None or self._costs_device[0] != device:
            moved = [_LayerCost(c.name, c.numel, c.out, c.inp, c.groups, c.per_pair,
                                None if c.out_units is None else c.out_units.to(device),
                                c.sources.to(device), c.ungated.to(device)) for c in self._costs]
            self._costs_device = (device, moved)
        return self._costs_device[1]

    def _density(self, eff: Tensor, inputs: bool | None = None) -> Tensor:
        """Fraction of Conv/Linear weights live, given per-channel-unit open values ``eff``."""
        inputs = self.prune_inputs if inputs is None else inputs
        ext = torch.cat([eff, eff.new_zeros(1)])
        live = eff.new_zeros(())
        total = 0
        for c in self._costs_on(eff.device):
            pout = ext[c.out_units] if c.out_units is not None else eff.new_ones(c.out)
            if inputs:
                q = 1 - torch.prod(1 - ext[c.sources], dim=1)
                q = torch.where(c.ungated, torch.ones_like(q), q)
            else:
                q = eff.new_ones(c.inp)
            live = live + c.per_pair * (pout.reshape(c.groups, -1).sum(1)
                                        * q.reshape(c.groups, -1).sum(1)).sum()
            total += c.numel
        return live / max(total, 1)

    # -------------------------------------------------------------------------- training
    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train" and self._gates is not None:
            self._step = 0
            total = phase.epochs * self.steps_per_epoch
            self._warmup_steps = int(math.floor(self.warmup_fraction * total))
            self._ramp_steps = int(math.ceil(self.polarization_ramp * (total - self._warmup_steps)))
            # Automatic gate step: a gate can cross the clipped range twice after the warm-up.
            self._gate_lr = self.gate_lr or min(1.0, 4 * self.logit_clip / max(1, total - self._warmup_steps))
            self._gates.active = self._warmup_steps == 0

    def on_train_batch_end(self, model: nn.Module, batch: Any, step: int) -> None:
        if self._gates is None:
            return
        self._step += 1
        if self._step >= self._warmup_steps:
            self._gates.active = True

    def after_optimizer_step(self, model: nn.Module) -> None:
        gates = self._gates
        if gates is not None and gates.active and gates.fixed is None:
            gates.adam_step(self._gate_lr, self.logit_clip)
        super().after_optimizer_step(model)

    def regularization(self, model: nn.Module) -> Tensor | None:
        gates = self._gates
        if gates is None or not gates.active or gates.fixed is not None:
            return None
        p = gates.probabilities()
        loss = p.new_zeros(())
        if self.lambda_s > 0:
            density = self._unit_density(p)
            loss = loss + self.lambda_s * (density - (1.0 - self.sparsity)) ** 2
        lam_p = self.current_lambda_p()
        if lam_p > 0:
            loss = loss + lam_p * self._polarizer(p)
        return loss

    def _unit_density(self, g: Tensor) -> Tensor:
        if self.cost_weighting == "params":
            return self._density(self._effective(g))
        return self._effective(g).mean()

    def _ramp(self) -> float:
        """Progress (0..1) of the ramp after the warm-up."""
        if self._ramp_steps <= 0:
            return 1.0
        done = max(0, self._step - self._warmup_steps)
        return min(1.0, done / self._ramp_steps)

    def current_lambda_p(self) -> float:
        """``lambda_p`` at the current step (linear ramp after the warm-up)."""
        return self.lambda_p * self._ramp()

    def _polarizer(self, p: Tensor) -> Tensor:
        if self.polarization == "p(1-p)":
            return (p * (1 - p)).mean()
        if self.polarization == "binary_entropy":
            q = p.clamp(1e-6, 1 - 1e-6)
            return -(q * q.log() + (1 - q) * (1 - q).log()).mean()
        return self.polarization_t * p.mean() - (p - p.mean()).abs().mean()

    # --------------------------------------------------------------------------- reports
    def gate_states(self) -> dict[str, Tensor]:
        """Gate probabilities by module name (channel gates: the gated Conv/Linear; block
        gates: the block). After the gates are removed: their final values."""
        if self._gates is None:
            return {k: v.clone() for k, v in self._final_probs.items()}
        with torch.no_grad():
            p = torch.sigmoid(self._gates.logits / self.temperature).detach().cpu()
        return {g.layer: p[g.offset:g.offset + g.size].clone() for g in self._gates.groups}

    def polarization_stats(self, margin: float = 0.05) -> dict[str, float]:
        """``polarized``: fraction of gates within ``margin`` of 0 or 1; ``open``: fraction
        with p > 0.5; ``mean_p``; ``gates``: how many."""
        states = self.gate_states()
        if not states:
            return {"polarized": 0.0, "open": 0.0, "mean_p": 0.0, "gates": 0}
        p = torch.cat(list(states.values()))
        return {"polarized": float(((p <= margin) | (p >= 1 - margin)).float().mean()),
                "open": float((p > 0.5).float().mean()), "mean_p": float(p.mean()),
                "gates": int(p.numel())}

    def expected_density(self) -> float:
        """Live-weight fraction the current soft gates give (what the sparsity loss holds)."""
        if self._gates is None:
            raise RuntimeError("no gates (setup not run, or already removed)")
        with torch.no_grad():
            return float(self._density(self._effective(torch.sigmoid(self._gates.logits / self.temperature))))

    def hard_sparsity(self) -> float:
        """Weight sparsity the current hard gates give (structural count)."""
        if self._gates is None:
            raise RuntimeError("no gates (setup not run, or already removed)")
        with torch.no_grad():
            return 1.0 - float(self._density(self._effective(self._gates.hard())))

    def _unit_costs(self) -> Tensor:
        """Weights each channel unit owns with everything open: its row/filter plus the
        downstream weights that read it."""
        n = self._n_channel_units
        eff = torch.ones(n, requires_grad=True)
        with torch.enable_grad():
            live = self._density(eff) * sum(c.numel for c in self._costs)
            (grad,) = torch.autograd.grad(live, eff)
        return grad.detach()

    # ------------------------------------------------------------------------ conversion
    def _enforce_target(self, probs: Tensor, own: Tensor) -> tuple[Tensor, int]:
        """Per-channel-unit open states (after block gates) within ``tolerance`` of the target.

        ``own``: each channel unit's own 0/1 state; block gates (already in ``probs``' tail
        via ``self._gates.hard()``) stay as they are. Returns the states and the moves made.
        """
        assert self._gates is not None and self._unit_block is not None
        n = self._n_channel_units
        blocks_open = self._gates.hard()[n:].cpu()
        in_open_block = torch.ones(n, dtype=torch.bool)
        has_block = self._unit_block >= 0
        in_open_block[has_block] = blocks_open[self._unit_block[has_block] - n] > 0
        state = own.clone().bool() & in_open_block
        p = probs[:n].cpu()
        groups = [g for g in self._gates.groups if g.kind == "channel"]
        # Layer-collapse guard: keep the min_channels most probable units of every layer
        # whose block (if any) is open.
        for g in groups:
            sl = slice(g.offset, g.offset + g.size)
            if g.block >= 0 and blocks_open[g.block - n] <= 0:
                continue
            need = min(self.min_channels, g.size) - int(state[sl].sum())
            if need > 0:
                closed = (~state[sl]).nonzero().flatten()
                best = closed[torch.argsort(p[sl][closed], descending=True)[:need]]
                state[g.offset + best] = True
        floor = torch.zeros(n, dtype=torch.long)
        group_of = torch.zeros(n, dtype=torch.long)
        for gi, g in enumerate(groups):
            group_of[g.offset:g.offset + g.size] = gi
            floor[g.offset:g.offset + g.size] = min(self.min_channels, g.size)

        unit_cost = self._unit_costs().double()

        def sparsity_of(s: Tensor) -> float:
            # float64: weight counts are exact, as in sparsity_report.
            return 1.0 - float(self._density(s.double()))

        # A hair inside the band, so rounding never puts the reported figure outside it.
        target, tol = self.sparsity, self.tolerance - 1e-9
        moves = 0
        current = sparsity_of(state)
        tried: set[int] = set()
        while abs(current - target) > tol:
            closing = current < target
            # Lowest (highest) probability first; ties (gates at the clip) cheapest first.
            if closing:
                counts = torch.zeros(len(groups), dtype=torch.long).index_add_(0, group_of, state.long())
                cand = (state & (counts[group_of] > floor)).nonzero().flatten()
                key = p[cand].double() + 1e-9 * unit_cost[cand] / max(float(unit_cost.max()), 1.0)
                order = cand[torch.argsort(key)]
            else:
                cand = (~state & in_open_block).nonzero().flatten()
                key = p[cand].double() - 1e-9 * unit_cost[cand] / max(float(unit_cost.max()), 1.0)
                order = cand[torch.argsort(key, descending=True)]
            order = [int(u) for u in order if int(u) not in tried]
            if not order:
                break
            best_u, best_gap, moved = None, None, False
            for u in order:
                trial = state.clone()
                trial[u] = not closing
                s = sparsity_of(trial)
                overshoot = (s > target + tol) if closing else (s < target - tol)
                if not overshoot:
                    state, current, moved = trial, s, True
                    moves += 1
                    tried.add(u)
                    break
                gap = abs(s - target)
                if best_gap is None or gap < best_gap:
                    best_u, best_gap = u, gap
            if not moved:
                # Every single move overshoots the band: take the one that lands closest,
                # if it beats staying put, and stop.
                if best_u is not None and best_gap is not None and best_gap < abs(current - target):
                    state[best_u] = not closing
                    current = sparsity_of(state)
                    moves += 1
                break
        if abs(current - target) > tol:
            log.warning("polarization: achieved sparsity %.4f is %.4f from the target %.4f "
                        "(whole channels cannot land closer)", current, abs(current - target), target)
        return state, moves

    @torch.no_grad()
    def export_masks(self, model: nn.Module) -> MaskSet:
        """Closed gates -> masks at the target; the gates are fixed to the exported state.

        After this the model (still gated, gates fixed) computes what the masked model without
        gates will compute: :meth:`remove_gates` can then take the gates out.
        """
        gates = self._gates
        if gates is None:
            raise RuntimeError("no gates to export (setup not run, or already removed)")
        n = self._n_channel_units
        probs = torch.sigmoid(gates.logits / self.temperature).detach().cpu()
        self._final_probs = self.gate_states()
        hard_before = gates.hard().cpu()
        state, moves = self._enforce_target(probs, hard_before[:n])
        # Write the exported state back as fixed gates: channel units as enforced (a unit in a
        # closed block keeps its own state: the block gate already closes it).
        fixed = hard_before.clone()
        assert self._unit_block is not None
        in_closed_block = torch.zeros(n, dtype=torch.bool)
        has_block = self._unit_block >= 0
        in_closed_block[has_block] = hard_before[self._unit_block[has_block]] <= 0
        fixed[:n] = torch.where(in_closed_block, hard_before[:n], state.float())
        gates.fixed = fixed.to(gates.logits.device)
        self._final_open = state.clone()

        masks = MaskSet()
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        ext = torch.cat([state, torch.zeros(1, dtype=torch.bool)])
        for c in self._costs:
            wname = f"{c.name}.weight"
            w = params[wname]
            keep_out = ext[c.out_units] if c.out_units is not None else torch.ones(c.out, dtype=torch.bool)
            if self.prune_inputs:
                keep_in = ext[c.sources].any(1) | c.ungated
            else:
                keep_in = torch.ones(c.inp, dtype=torch.bool)
            if bool(keep_in.all()):
                masks.set(wname, keep_out.to(w.device), "channel")
            else:
                gi = keep_in.reshape(c.groups, -1)  # (groups, in per group)
                go = torch.arange(c.out) // (c.out // c.groups)  # group of each output
                full = keep_out[:, None] & gi[go]  # (out, in per group)
                full = full.reshape(full.shape + (1,) * (w.dim() - 2)).expand_as(w)
                masks.set(wname, full.to(w.device), "weight")
                bias = params.get(f"{c.name}.bias")
                if bias is not None and not bool(keep_out.all()):
                    masks.set(f"{c.name}.bias", keep_out.to(w.device), "weight")
            bn_name = self._bn_of.get(c.name)
            if bn_name is not None and c.out_units is not None:
                bn = modules[bn_name]
                if getattr(bn, "weight", None) is not None:
                    masks.set(f"{bn_name}.weight", keep_out.to(w.device), "channel")  # + its bias
                if getattr(bn, "running_mean", None) is not None:
                    bn.running_mean[~keep_out.to(bn.running_mean.device)] = 0.0
        closed_blocks = [g.layer for g in gates.groups
                         if g.kind == "block" and hard_before[g.offset] <= 0]
        stats = self.polarization_stats()
        hard_sp = 1.0 - float(self._density(self._effective(hard_before)))
        masks.metadata.update({"method": self.name, "config": self.config()})
        self.masks = masks
        achieved = sparsity_report(model, masks)["global"]["sparsity"]
        self.report = {"sparsity_target": self.sparsity, "sparsity_gates": hard_sp,
                       "sparsity": achieved, "adjustments": moves,
                       "closed_blocks": closed_blocks, "polarized": stats["polarized"],
                       "open_fraction": float(state.float().mean()) if n else 1.0,
                       "gate_params": self.cost.extra_params}
        masks.metadata.update({"polarization": self.report})
        log.info("polarization: gates gave sparsity %.4f, %d adjustments -> %.4f (target %.4f); "
                 "%.0f%% of gates polarized; closed blocks: %s", hard_sp, moves, achieved,
                 self.sparsity, 100 * stats["polarized"], closed_blocks or "none")
        return masks

    @torch.no_grad()
    def remove_gates(self, model: nn.Module) -> None:
        """Take the gates and their hooks out of the model and apply the masks.

        Open gates are exactly 1 and closed channels are exactly zero under the masks (filter,
        bias and the following BatchNorm's affine), so the outputs do not change.
        """
        if self._gates is None:
            return
        if self.masks is None:
            self.export_masks(model)
        self._gates.detach_hooks()
        if getattr(model, GATES_ATTR, None) is self._gates:
            delattr(model, GATES_ATTR)
        self._gates = None
        assert self.masks is not None
        self.masks.apply(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train" and self._gates is not None:
            self.export_masks(model)
            self.remove_gates(model)

    def finalize(self, model: nn.Module) -> MaskSet:
        if self._gates is not None:
            self.export_masks(model)
            self.remove_gates(model)
        return super().finalize(model)
