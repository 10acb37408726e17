"""Consensus sub-network with polarization regularization (Zhi et al., arXiv 2302.10798).

Binary gates sit on the channels of the coupled channel groups that
:func:`prunelib.surgery.channel_groups` finds (the groups surgery cuts: a convolution with the
BatchNorm after it and its readers; every writer of a residual stream; the branches a
concatenation joins; a depthwise layer with the layer feeding it), one gate per group channel,
and on the branch of every BasicBlock-style residual block. A closed gate therefore zeroes a
channel that surgery can physically remove. The gates are trained together with the weights
in one run by the run's own optimizer: hard 0/1 in the forward pass, a straight-through
gradient in the backward pass, a *cost pressure* that pushes the expensive units' gates down and
a *polarization* loss that pushes every gate away from the open/closed boundary, so the static
sub-network the gates agree on is well defined. The gates and their hooks leave the model at the
end of training (no cost at inference) and the masked network is fine-tuned.

Variants (``variant``; the scheme, one registry name with a setting, is explained in
:mod:`prunelib.methods.variants`). **The default is ``"extended"``, which is not the paper's.**

* ``"paper"`` (``hold="losses"``): the user's sparsity is reached *through the losses*: the
  sparsity loss ``lambda_s * (live fraction of the cost - (1 - sparsity))**2`` (default
  ``lambda_s=20``; on the binary gates with a straight-through gradient, ``sparsity_values``)
  and the polarization loss, enabled after the warm-up, ``lambda_p`` ramped. The hard gate of
  every unit, at every step and at the end, is read out by threshold: open iff
  ``sigmoid(logit) > 0.5`` (the paper's binarised gate; static gates, so the "firing rate" is the
  gate itself). Gates start open (``sigmoid = 0.95``). No projection, no budget ramp, no floor
  (``ramp_fraction`` and ``min_open_fraction`` other than 0 are refused). The sparsity the gates
  end at is what is exported and reported (``report["sparsity"]``, the trial's measured
  sparsity): off target if the losses end off target, never forced. Silent in the paper, so
  settings: ``lambda_s``, ``lambda_p``, ``polarization``, ``warmup_fraction``,
  ``polarization_ramp``, ``gate_init``, ``gate_scale``, ``ste``, ``logit_clip``,
  ``cost_weighting``, ``sparsity_values``, ``block_gates``.
* ``"extended"`` (``hold="projection"``, the default today; the lead's 3-seed rerun decides):
  the top-k projection described below, under a ramped budget with a 25 % floor per group; the
  sparsity loss becomes a linear cost pressure that only ranks units.

No code of the paper is public and its body was not available: this follows the
reconstruction in ``reference/algorithms.md`` section 2.1; every open detail is a setting of
:class:`PolarizationGates`. Decisions worth knowing:

* **The target is held during training** (extended variant), by projection: after every optimizer step the open
  set is the most open-leaning units (highest logits) that fit the current budget, every gated
  group keeping its floor (``min_open_fraction``, ``min_channels``) open. The budget ramps from
  0 to ``sparsity`` (cubic, over ``ramp_fraction`` of the steps after the warm-up), then stays.
  So the hard gates are at the budget at every step, and what training ends with is what is
  exported: no gate is reopened or closed after the fact. The logits decide *which* units are
  open; the paper's sparsity loss (which would hold the level only approximately) becomes the
  linear cost pressure ``lambda_s * E[live fraction]``, which makes a unit's logit fall with
  what it costs (importance per weight, not per unit).
* The gates' logits are parameters of the model trained by the ordinary optimizer (SGD in the
  runner). ``logit = gate_scale * theta`` for the parameter ``theta``: the regularisers are
  means over units, so per-logit gradients are O(1 / units) and a shared SGD learning rate would
  barely move them; the scale moves the logits ``gate_scale**2`` times faster under SGD without
  a private optimizer (a per-unit Adam, which normalised every gradient to the same step, made
  whole layers close together).
* Static gates only (one learnable logit per unit). The paper's input-conditioned (dynamic)
  gates, collapsed to a static mask by their firing rate, are **not implemented**.
* Sparsity is the library's convention (zeroed Conv/Linear weights over all Conv/Linear
  weights; ``cost_weighting="flops"``: removed Conv/Linear FLOPs over all of them). A closed
  group channel zeroes every producer's filter/row (and bias, and the affine of the BatchNorm
  after it) and, with ``prune_inputs=True`` (default), the consumers' weights that read it:
  exactly what physical channel removal deletes.
* BatchNorm statistics (pitfall 2.3 #4): gates act after the BatchNorm that follows a producer,
  so the statistics BN saw in training are those of the final network.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunelib.flops import layer_flops
from prunelib.masks import MaskSet, prunable_modules, sparsity_report
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field, train_then_finetune
from prunelib.methods.baselines import check_fraction
from prunelib.methods.variants import PAPER, equals, resolve_variant
from prunelib.surgery import ChannelGroup, channel_groups, complete_channel_masks

__all__ = ["PolarizationGates", "PolarizationSettings", "GateModule", "GATES_ATTR"]

log = logging.getLogger("prunelib")

#: Name under which the gate module is registered on the model while training.
GATES_ATTR = "_prunesearch_gates"

_POLARIZERS = ("p(1-p)", "binary_entropy", "bimodal")
_STES = ("sigmoid", "identity")
_COSTS = ("params", "flops", "uniform")
_HOLDS = ("losses", "projection")
_SPARSITY_VALUES = ("ste", "soft")

#: logit of 0.95: the reconstruction's initial gate (every unit starts open, sigmoid = 0.95).
OPEN_INIT = math.log(0.95 / 0.05)

#: Settings whose default depends on ``variant``: key -> (paper, extended).
VARIANT_DEFAULTS: dict[str, tuple[object, object]] = {
    "hold": ("losses", "projection"),
    "lambda_s": (20.0, 0.1),
    "gate_init": (OPEN_INIT, 0.0),
    "ramp_fraction": (0.0, 0.5),
    "min_open_fraction": (0.0, 0.25),
}
#: What the paper variant refuses: key -> (test, what the paper does).
PAPER_RULES = {
    "hold": (equals("losses"), "reaches the sparsity through its sparsity and polarization losses"),
    "ramp_fraction": (equals(0.0), "has no budget ramp: the losses alone set the level"),
    "min_open_fraction": (equals(0.0), "has no per-group floor"),
}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolarizationSettings(MethodSettings):
    """The settings of :class:`PolarizationGates` (see there for each one)."""

    variant: str = "extended"
    hold: str | None = None
    sparsity: float = 0.5
    cost_weighting: str = "params"
    lambda_s: float | None = None
    lambda_p: float = 0.2
    sparsity_values: str = "ste"
    polarization: str = "p(1-p)"
    polarization_t: float = 0.0
    warmup_fraction: float = 0.1
    ramp_fraction: float | None = None
    polarization_ramp: float = 0.3
    gate_init: float | None = None
    gate_scale: float = 10.0
    temperature: float = 1.0
    ste: str = "sigmoid"
    block_gates: bool = True
    logit_clip: float = 6.0
    prune_inputs: bool = True
    min_open_fraction: float | None = None
    min_channels: int = 1
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # None = the variant's default (VARIANT_DEFAULTS); the paper variant refuses extensions.
        for key in ("ramp_fraction", "min_open_fraction"):
            if getattr(self, key) is not None:
                set_field(self, key, float(getattr(self, key)))
        resolve_variant(self, VARIANT_DEFAULTS, PAPER_RULES)
        set_field(self, "sparsity", check_fraction("sparsity", self.sparsity))
        for key, allowed in (("polarization", _POLARIZERS), ("ste", _STES), ("cost_weighting", _COSTS),
                             ("hold", _HOLDS), ("sparsity_values", _SPARSITY_VALUES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        set_field(self, "warmup_fraction", check_fraction("warmup_fraction", self.warmup_fraction))
        for key in ("ramp_fraction", "polarization_ramp", "min_open_fraction"):
            set_field(self, key, check_fraction(key, getattr(self, key), high_closed=True))
        for key in ("temperature", "gate_scale", "logit_clip"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
            set_field(self, key, float(getattr(self, key)))
        for key in ("lambda_s", "lambda_p"):
            if float(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
            set_field(self, key, float(getattr(self, key)))
        if int(self.min_channels) < 1:
            raise ValueError(f"min_channels must be >= 1, got {self.min_channels}")
        set_field(self, "min_channels", int(self.min_channels))
        set_field(self, "polarization_t", float(self.polarization_t))
        set_field(self, "gate_init", float(self.gate_init))
        set_field(self, "block_gates", bool(self.block_gates))
        set_field(self, "prune_inputs", bool(self.prune_inputs))
        set_field(self, "exclude", tuple(self.exclude))


# ---------------------------------------------------------------------------------------------
# Gates and their hooks
# ---------------------------------------------------------------------------------------------
@dataclass
class _Host:
    """A module whose output a set of gates multiplies: channel ``channels[k]`` of its output
    by gate ``units[k]`` (block gates: the whole output by one unit)."""

    name: str
    channel_dim: int
    channels: Tensor
    units: Tensor
    block: bool = False


class GateModule(nn.Module):
    """The gate parameters and their forward hooks; registered on the model while training.

    Attributes:
        theta: the trained parameter; ``logits = gate_scale * theta`` (one per unit: group
            channels first, then residual blocks).
        state: the hard 0/1 gate of every unit the forward applies (set by the method's
            projection; all open before the budget ramps).
        threshold: the logit boundary between open and closed units (for the soft values).
        active: whether the forward applies the gates at all (False: warm-up bookkeeping off).
    """

    def __init__(self, hosts: list[_Host], n_units: int, gate_init: float, gate_scale: float,
                 temperature: float, ste: str, logit_clip: float) -> None:
        super().__init__()
        self.hosts = hosts
        self.gate_scale = float(gate_scale)
        self.theta = nn.Parameter(torch.full((n_units,), float(gate_init) / gate_scale))
        self.register_buffer("state", torch.ones(n_units))
        self.threshold = 0.0
        self.temperature = float(temperature)
        self.ste = ste
        self.logit_clip = float(logit_clip)
        self.active = True
        self._values: Tensor | None = None
        self._handles: list[Any] = []

    @property
    def logits(self) -> Tensor:
        """``gate_scale * theta`` (differentiable)."""
        return self.theta * self.gate_scale

    def probabilities(self) -> Tensor:
        """Soft open value of every unit: ``sigmoid((logit - threshold) / temperature)``."""
        return torch.sigmoid((self.logits - self.threshold) / self.temperature)

    def values(self) -> Tensor:
        """What the forward multiplies by: exactly the hard state, with a straight-through
        gradient to the logits (``d sigmoid`` or identity)."""
        if self.ste == "identity":
            soft = self.logits
        else:
            soft = self.probabilities()
        return self.state + (soft - soft.detach())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the logits within ``[-logit_clip, logit_clip]`` around the threshold."""
        lo = (self.threshold - self.logit_clip) / self.gate_scale
        hi = (self.threshold + self.logit_clip) / self.gate_scale
        self.theta.clamp_(lo, hi)

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self._handles.append(model.register_forward_pre_hook(self._start))
        self._handles.append(model.register_forward_hook(self._end))
        for host in self.hosts:
            self._handles.append(modules[host.name].register_forward_hook(self._hook(host, modules[host.name])))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _start(self, _module: nn.Module, _inputs: Any) -> None:
        self._values = self.values() if self.active else None

    def _end(self, _module: nn.Module, _inputs: Any, _out: Any) -> None:
        # Not kept past the forward: a non-leaf tensor would make the model impossible to
        # deep-copy (surgery and FLOPs counting work on copies).
        self._values = None

    def _hook(self, host: _Host, owner: nn.Module):
        def hook(module: nn.Module, _inputs: Any, out: Tensor) -> Tensor | None:
            values = self._values
            # A deep copy of the model carries this hook along (a surgered copy counting the
            # projected masks' FLOPs, with fewer channels): gate only the module attached to.
            if values is None or module is not owner:
                return None
            if host.block:
                return out * values[host.units[0]]
            dim = host.channel_dim % out.dim()
            scale = out.new_ones(out.shape[dim])
            scale = scale.index_copy(0, host.channels.to(out.device), values[host.units.to(out.device)].to(out.dtype))
            shape = [1] * out.dim()
            shape[dim] = out.shape[dim]
            return out * scale.reshape(shape)
        return hook


# ---------------------------------------------------------------------------------------------
# Live-weight bookkeeping
# ---------------------------------------------------------------------------------------------
@dataclass
class _LayerCost:
    """One Conv/Linear layer for the live-cost count.

    ``out_units`` / ``in_units`` index the extended unit vector (the units, then a constant 1
    at index ``n_units``): which unit keeps each output / input channel alive. ``block``: the
    block unit gating the whole layer (``n_units`` = none). ``unit_cost``: cost of one weight
    (1 for params, FLOPs per weight for flops).
    """

    name: str
    numel: int
    groups: int
    per_pair: int
    out_units: Tensor
    in_units: Tensor
    block: int
    unit_cost: float


class PolarizationGates(PruningMethod):
    """Consensus sub-network: group-channel gates, polarization, a budget held in training.

    Plan: ``train`` (gates open for the warm-up, then the budget ramps in and the projection
    holds it) -> the gates become channel masks (the state training ended in), the gates leave
    the model -> ``finetune`` with the masks fixed.

    Losses (returned by :meth:`regularization`, added to the cross-entropy at every step), with
    ``p_u = sigmoid((logit_u - threshold) / temperature)``:

    * cost pressure: ``lambda_s * D(p)``, ``D`` the expected live fraction of the cost (each
      weight is live with the probability that its output channel and its input channel are
      open). It does not set the level (the projection does); it ranks units by what they cost.
    * polarization: ``lambda_p * R(p)`` summed over the gates (so the force on each gate does
      not shrink as the model grows). ``"p(1-p)"`` (default): ``sum p(1-p)``;
      ``"binary_entropy"``: ``sum H(p)``; ``"bimodal"`` (Zhuang et al. 2020): ``sum (t * p -
      |p - mean p|)`` with ``t = polarization_t``.

    Args:
        variant: ``"extended"`` (default; not the paper's) or ``"paper"`` (module doc). Settings
            marked *variant* below take the variant's value when None.
        hold: *variant*: ``"losses"`` (paper: the losses set the level, gates by threshold) or
            ``"projection"`` (extended: top-k projection under the ramped budget).
        sparsity_values: paper variant's sparsity loss on the binary gates with a
            straight-through gradient (``"ste"``, default) or on the soft values (``"soft"``).
        sparsity: target fraction of the cost removed (weights by default), default 0.5.
        cost_weighting: ``"params"`` (Conv/Linear weights, the library's sparsity), ``"flops"``
            (Conv/Linear FLOPs per sample: each weight weighs its layer's FLOPs per weight) or
            ``"uniform"`` (the fraction of gated channels).
        lambda_s: *variant*: paper 20, the weight of the squared sparsity loss (47-56 % for a 50 %
            target on digits' MLP in 64-128 steps); extended: weight of the cost pressure (0.1; tuned on Fashion-MNIST LeNet-5 at
            80 %: 0 ranks by task importance alone and keeps more of the convolutions (more
            FLOPs), 1 strips the convolutions to their floor).
        lambda_p: weight of the polarization loss after its ramp (default 0.2: 90-99 % of the
            gates end within 0.1 of their state on digits in 64 steps; at 0.05 about half did;
            at 0.5 the gates commit before the task loss has ranked them, and on Fashion-MNIST
            LeNet-5 at 80 % the convolutions were stripped to their floor, -4 points).
        polarization: ``"p(1-p)"`` | ``"binary_entropy"`` | ``"bimodal"`` (see above).
        polarization_t: ``t`` of the bimodal form (default 0).
        warmup_fraction: fraction of the training phase's steps with every gate open and no
            regulariser (default 0.1; the logits already learn from the task loss).
        ramp_fraction: the budget grows from 0 to ``sparsity`` (cubic, as GMP's schedule) over
            this fraction of the steps after the warm-up (default 0.5), then stays.
        polarization_ramp: ``lambda_p`` grows linearly from 0 over this fraction of the steps
            after the warm-up (default 0.3).
        gate_init: initial logit of every gate, *variant* (paper 2.944: sigmoid 0.95, open;
            extended 0).
        gate_scale: ``logit = gate_scale * theta``, ``theta`` the parameter the optimizer steps
            (default 10: SGD moves logits 100 times faster than other weights).
        temperature: of the soft values (default 1); the hard state comes from the projection.
        ste: gradient of the hard gate: ``"sigmoid"`` (``d p / d logit``) or ``"identity"``.
        block_gates: one extra gate per residual block (any module with ``shortcut``, ``conv1``
            and ``conv2``): ``y = shortcut(x) + g_b * F(x)``, on the branch's last BatchNorm (or
            ``conv2``). A closed block masks the branch. Default True.
        logit_clip: logits stay within this of the threshold (default 6): a unit far on either
            side still gets a gradient and can cross back.
        prune_inputs: also zero the consumers' weights that read closed channels (default True).
        min_open_fraction: each gated group keeps at least this fraction of its channels open
            at every step (default 0.25): the per-layer floor. Without a floor one layer was
            left with 1 of 32 channels at 80 % sparsity; with 0.1, on Fashion-MNIST LeNet-5 at
            80 % the convolutions sank to their floor (1 of 6, 2 of 16) and one seed of three
            ended at chance; with 0.25 the three seeds reached 85-87 % (validation).
        min_channels: and at least this many (default 1).
        exclude: module-name prefixes whose groups get no gates (still counted).
    """

    name = "polarization"
    needs_data = True
    Settings = PolarizationSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gates: GateModule | None = None
        self._groups: list[ChannelGroup] = []
        self._gated: list[tuple[ChannelGroup, int]] = []  # (group, first unit)
        self._blocks: list[tuple[str, int]] = []  # (block module name, unit)
        self._costs: list[_LayerCost] = []
        self._costs_device: tuple[torch.device, list[_LayerCost]] | None = None
        self._n_units = 0
        self._n_channel_units = 0
        self._unit_block: Tensor | None = None  # per unit: block unit of its group or n_units
        self._floor: Tensor | None = None  # per group: channels kept open at least
        self._group_of: Tensor | None = None  # per channel unit: index into self._gated
        self._input_shape: tuple[int, ...] = ()
        self._warmup_steps = 0
        self._ramp_steps = 0
        self._pol_ramp_steps = 0
        self._step = 0
        self._training = False
        self._final_probs: dict[str, Tensor] = {}
        self._flips: int = 0
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ plan
    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return train_then_finetune(epochs, finetune_epochs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The gate parameter (the training optimizer must step it)."""
        return [self._gates.theta] if self._gates is not None else []

    # ----------------------------------------------------------------------------- setup
    def _excluded(self, name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in self.exclude)

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
        modules = dict(model.named_modules())
        prunable = prunable_modules(model)
        self._groups = channel_groups(model, shape)
        offset = 0
        for group in self._groups:
            if not group.prunable or not group.producers:
                continue
            if any(self._excluded(p) or p not in prunable for p in group.producers):
                continue
            self._gated.append((group, offset))
            offset += group.size
        self._n_channel_units = offset
        blocks = self._find_blocks(modules, prunable) if self.block_gates else []
        for name in blocks:
            self._blocks.append((name, offset))
            offset += 1
        self._n_units = offset
        hosts = self._hosts(model, modules)
        gates = GateModule(hosts, offset, self.gate_init, self.gate_scale, self.temperature,
                           self.ste, self.logit_clip).to(device)
        gates.attach(model)
        model.add_module(GATES_ATTR, gates)
        self._gates = gates
        self.cost.extra_params = offset
        self._costs = self._layer_costs(model, modules, prunable)
        self._group_of = torch.zeros(self._n_channel_units, dtype=torch.long)
        floors = []
        for gi, (group, first) in enumerate(self._gated):
            self._group_of[first:first + group.size] = gi
            floors.append(min(group.size, max(self.min_channels, math.ceil(self.min_open_fraction * group.size))))
        self._floor = torch.tensor(floors, dtype=torch.long)
        log.info("polarization: %d channel gates in %d coupled groups, %d block gates",
                 self._n_channel_units, len(self._gated), len(self._blocks))

    @staticmethod
    def _find_blocks(modules: dict[str, nn.Module], prunable: dict[str, nn.Module]) -> list[str]:
        out = []
        for name, block in modules.items():
            if name and all(isinstance(getattr(block, a, None), nn.Module) for a in ("shortcut", "conv1", "conv2")):
                if any(n.startswith(name + ".") and not n.startswith(name + ".shortcut") for n in prunable):
                    out.append(name)
        return out

    def _in_block(self, layer: str) -> str | None:
        for name, _unit in self._blocks:
            if layer.startswith(name + ".") and not layer.startswith(name + ".shortcut"):
                return name
        return None

    def _hosts(self, model: nn.Module, modules: dict[str, nn.Module]) -> list[_Host]:
        """Where each gate multiplies: after the BatchNorm that follows a producer, else the
        producer's own output; one host per producer, so a channel written by several layers
        (a residual stream) is gated in each of them."""
        hosts: list[_Host] = []
        for group, first in self._gated:
            for producer, index in group.producers.items():
                covered = torch.nonzero(index >= 0).flatten()
                host = group.norm_after.get(producer, producer)
                dim = -1 if isinstance(modules[host], nn.Linear) else 1
                hosts.append(_Host(host, dim, index[covered].clone(), covered + first))
        for name, unit in self._blocks:
            block = modules[name]
            conv2 = f"{name}.conv2"
            host = next((g.norm_after[conv2] for g in self._groups if conv2 in g.norm_after), conv2)
            del block
            hosts.append(_Host(host, 1, torch.zeros(0, dtype=torch.long), torch.tensor([unit]), block=True))
        return hosts

    def _layer_costs(self, model: nn.Module, modules: dict[str, nn.Module],
                     prunable: dict[str, nn.Module]) -> list[_LayerCost]:
        """Which unit keeps each output / input channel of every Conv/Linear layer alive."""
        n = self._n_units
        out_units = {name: torch.full((m.weight.shape[0],), n, dtype=torch.long) for name, m in prunable.items()}
        in_units = {name: torch.full((m.weight.shape[1] * getattr(m, "groups", 1),), n, dtype=torch.long)
                    for name, m in prunable.items()}
        unit_block = torch.full((n,), n, dtype=torch.long)
        block_unit = dict(self._blocks)
        for group, first in self._gated:
            for producer, index in group.producers.items():
                covered = torch.nonzero(index >= 0).flatten()
                out_units[producer][index[covered]] = covered + first
            for consumer, (root_idx, in_idx) in group.consumers.items():
                if consumer in in_units:
                    in_units[consumer][in_idx] = root_idx + first
            inside = {self._in_block(p) for p in group.producers}
            if len(inside) == 1 and None not in inside:  # written only inside one block's branch
                unit_block[first:first + group.size] = block_unit[inside.pop()]
        self._unit_block = unit_block
        if self.cost_weighting == "flops":
            _, per_layer = layer_flops(model, self._input_shape)
        costs = []
        for name, m in prunable.items():
            w = m.weight
            block = self._in_block(name)
            unit_cost = 1.0
            if self.cost_weighting == "flops":
                unit_cost = per_layer.get(name, 0) / w.numel()
            costs.append(_LayerCost(name, w.numel(), int(getattr(m, "groups", 1)), int(w[0, 0].numel()),
                                    out_units[name], in_units[name],
                                    block_unit[block] if block is not None else n, unit_cost))
        return costs

    # ------------------------------------------------------------------------ densities
    def _costs_on(self, device: torch.device) -> list[_LayerCost]:
        if self._costs_device is None or self._costs_device[0] != device:
            moved = [_LayerCost(c.name, c.numel, c.groups, c.per_pair, c.out_units.to(device),
                                c.in_units.to(device), c.block, c.unit_cost) for c in self._costs]
            self._costs_device = (device, moved)
        return self._costs_device[1]

    def _effective(self, values: Tensor) -> Tensor:
        """Unit values times the value of the block whose branch alone writes them, plus the
        constant 1 at index ``n_units`` (ungated channels)."""
        assert self._unit_block is not None
        ext = torch.cat([values, values.new_ones(1)])
        return torch.cat([values * ext[self._unit_block.to(values.device)], values.new_ones(1)])

    def _density(self, values: Tensor) -> Tensor:
        """Live fraction of the cost (see ``cost_weighting``) for per-unit open ``values``."""
        ext = self._effective(values)
        if self.cost_weighting == "uniform":
            return ext[: self._n_channel_units].mean() if self._n_channel_units else ext.new_ones(())
        live = values.new_zeros(())
        total = 0.0
        raw = torch.cat([values, values.new_ones(1)])
        for c in self._costs_on(values.device):
            pout = ext[c.out_units].reshape(c.groups, -1).sum(1)
            pin = ext[c.in_units].reshape(c.groups, -1).sum(1)
            layer = c.per_pair * (pout * pin).sum() * raw[c.block]
            live = live + c.unit_cost * layer
            total += c.unit_cost * c.numel
        return live / max(total, 1e-12)

    def expected_density(self) -> float:
        """Live fraction of the cost under the soft gate values (what the cost pressure sees)."""
        if self._gates is None:
            raise RuntimeError("no gates (setup not run, or already removed)")
        with torch.no_grad():
            return float(self._density(self._gates.probabilities()))

    def hard_sparsity(self) -> float:
        """Fraction of the cost the current hard gates remove."""
        if self._gates is None:
            raise RuntimeError("no gates (setup not run, or already removed)")
        with torch.no_grad():
            return 1.0 - float(self._density(self._gates.state.double()))

    # ------------------------------------------------------------------------ projection
    def budget_at(self, step: int) -> float:
        """Target fraction of the cost removed after optimizer step ``step`` of the phase."""
        after = step - self._warmup_steps
        if after <= 0:
            return 0.0
        if self._ramp_steps <= 0:
            return self.sparsity
        u = min(1.0, after / self._ramp_steps)
        return self.sparsity * (1.0 - (1.0 - u) ** 3)

    @torch.no_grad()
    def project(self, budget: float) -> Tensor:
        """The hard state for ``budget``: every group's floor open (its highest logits), then
        units in decreasing logit order while the removed cost stays at least ``budget``
        (closest to it, channel granularity)."""
        gates = self._gates
        assert gates is not None and self._floor is not None and self._group_of is not None
        logits = gates.logits.detach().double().cpu()
        n, nc = self._n_units, self._n_channel_units
        state = torch.zeros(n, dtype=torch.float64)
        if budget <= 0:
            return torch.ones(n, dtype=torch.float64)
        # Floors first: the best channels of each gated group.
        order_c = torch.argsort(-logits[:nc], stable=True)
        rank_in_group = torch.zeros(nc, dtype=torch.long)
        seen = torch.zeros(len(self._gated), dtype=torch.long)
        for u in order_c.tolist():
            g = int(self._group_of[u])
            rank_in_group[u] = seen[g]
            seen[g] += 1
        forced = torch.zeros(n, dtype=torch.bool)
        forced[:nc] = rank_in_group < self._floor[self._group_of]
        state[forced] = 1.0
        rest = [u for u in torch.argsort(-logits, stable=True).tolist() if not forced[u]]
        target_density = 1.0 - budget

        def density_with(k: int) -> float:
            s = state.clone()
            if k:
                s[torch.tensor(rest[:k], dtype=torch.long)] = 1.0
            return float(self._density(s))

        lo, hi = 0, len(rest)  # smallest k with density >= target lies in [lo, hi]
        if density_with(0) >= target_density:
            hi = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if density_with(mid) >= target_density:
                hi = mid
            else:
                lo = mid + 1
        k = hi
        prefix = state.clone()
        if k:
            prefix[torch.tensor(rest[:k], dtype=torch.long)] = 1.0
        if k == 0:
            return prefix
        # The k-th unit may cost far more than the gap (a convolution channel feeding a flatten
        # owns thousands of weights): fill the gap below it with the next units in logit order
        # whose marginal cost fits, then keep whichever of the two lands closer to the budget.
        filled = state.clone()
        if k > 1:
            filled[torch.tensor(rest[:k - 1], dtype=torch.long)] = 1.0
        values = filled.clone().requires_grad_(True)
        with torch.enable_grad():
            base = self._density(values)
            (marginal,) = torch.autograd.grad(base, values)
        gap = target_density - float(base)
        for u in rest[k - 1:]:
            cost = float(marginal[u])
            if cost <= gap:
                filled[u] = 1.0
                gap -= cost
        # Or from the prefix (at or above the budget's density), close the least open-leaning
        # open units whose marginal cost fits what is left over.
        trimmed = prefix.clone()
        values = trimmed.clone().requires_grad_(True)
        with torch.enable_grad():
            base = self._density(values)
            (marginal,) = torch.autograd.grad(base, values)
        spare = float(base) - target_density
        for u in reversed(rest[:k]):
            cost = float(marginal[u])
            if cost <= spare:
                trimmed[u] = 0.0
                spare -= cost
        options = [prefix, filled, trimmed]
        return min(options, key=lambda s: abs(float(self._density(s)) - target_density))

    def _set_state(self, state: Tensor) -> None:
        gates = self._gates
        assert gates is not None
        new = state.to(gates.state.device, gates.state.dtype)
        self._flips += int((new != gates.state).sum())
        gates.state.copy_(new)
        if self.hold == "losses":
            gates.threshold = 0.0  # soft values sigmoid(logit / T): the state is p > 0.5
            return
        logits = gates.logits.detach().cpu()
        open_ = state.bool()
        if bool(open_.all()) or not bool(open_.any()):
            gates.threshold = float(logits.min()) - 1.0 if bool(open_.all()) else float(logits.max()) + 1.0
        else:
            gates.threshold = 0.5 * (float(logits[~open_].max()) + float(logits[open_].min()))

    # -------------------------------------------------------------------------- training
    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name != "train" or self._gates is None:
            return
        self._step = 0
        total = phase.epochs * self.steps_per_epoch
        self._warmup_steps = int(math.floor(self.warmup_fraction * total))
        after = max(1, total - self._warmup_steps)
        # The budget reaches the target before the last step, so training ends on it.
        self._ramp_steps = min(int(math.ceil(self.ramp_fraction * after)), max(after - 1, 0))
        self._pol_ramp_steps = int(math.ceil(self.polarization_ramp * after))
        self._training = True
        self._set_state(self._next_state(0))
        self._flips = 0

    def _next_state(self, step: int) -> Tensor:
        """The hard gates after step ``step``: the projection at the budget (``hold=
        "projection"``), or every unit whose gate value is above 0.5 (``hold="losses"``:
        the paper's binarised gate, ``p = sigmoid(logit) > 0.5``, i.e. logit > 0)."""
        if self.hold == "projection":
            return self.project(self.budget_at(step))
        return self.threshold_state()

    @torch.no_grad()
    def threshold_state(self) -> Tensor:
        """Hard gates read out by threshold: open iff ``sigmoid(logit) > 0.5`` (logit > 0)."""
        assert self._gates is not None
        return (self._gates.logits.detach().double().cpu() > 0).double()

    def on_train_batch_end(self, model: nn.Module, batch: Any, step: int) -> None:
        if self._gates is None or not self._training:
            return
        self._step += 1
        self._gates.clamp_()
        self._set_state(self._next_state(self._step))

    def regularization(self, model: nn.Module) -> Tensor | None:
        gates = self._gates
        if gates is None or not self._training or self._step < self._warmup_steps:
            return None
        p = gates.probabilities()
        loss = p.new_zeros(())
        if self.lambda_s > 0 and self.hold == "losses":
            # The paper's sparsity loss: (live fraction of the cost - (1 - sparsity))^2, on the
            # binary gates the forward uses (straight-through gradient) or on the soft values.
            live = self._density(gates.values() if self.sparsity_values == "ste" else p)
            loss = loss + self.lambda_s * (live - (1.0 - self.sparsity)) ** 2
        elif self.lambda_s > 0:
            loss = loss + self.lambda_s * self._density(p)
        lam_p = self.current_lambda_p()
        if lam_p > 0:
            loss = loss + lam_p * self._polarizer(p)
        return loss

    def current_lambda_p(self) -> float:
        """``lambda_p`` at the current step (linear ramp after the warm-up)."""
        if self._pol_ramp_steps <= 0:
            return self.lambda_p
        done = max(0, self._step - self._warmup_steps)
        return self.lambda_p * min(1.0, done / self._pol_ramp_steps)

    def _polarizer(self, p: Tensor) -> Tensor:
        # Sums over the gates: the force on each gate does not shrink as the model grows.
        if self.polarization == "p(1-p)":
            return (p * (1 - p)).sum()
        if self.polarization == "binary_entropy":
            q = p.clamp(1e-6, 1 - 1e-6)
            return -(q * q.log() + (1 - q) * (1 - q).log()).sum()
        return (self.polarization_t * p - (p - p.mean()).abs()).sum()

    # --------------------------------------------------------------------------- reports
    def _unit_names(self) -> list[tuple[str, int, int]]:
        out = [(group.root, first, group.size) for group, first in self._gated]
        return out + [(name, unit, 1) for name, unit in self._blocks]

    def gate_states(self) -> dict[str, Tensor]:
        """Soft gate values by unit (channel groups: their root module; block gates: the
        block). After the gates are removed: their final values."""
        if self._gates is None:
            return {k: v.clone() for k, v in self._final_probs.items()}
        with torch.no_grad():
            p = self._gates.probabilities().detach().cpu()
        return {name: p[first:first + size].clone() for name, first, size in self._unit_names()}

    def polarization_stats(self, margin: float = 0.05) -> dict[str, float]:
        """``polarized``: fraction of gates whose soft value is within ``margin`` of its hard
        state; ``open``: fraction open; ``mean_p``; ``gates``: how many."""
        if self._gates is None:
            states = self._final_probs
            if not states:
                return {"polarized": 0.0, "open": 0.0, "mean_p": 0.0, "gates": 0}
            p = torch.cat(list(states.values()))
            hard = (p > 0.5).double()
        else:
            with torch.no_grad():
                p = self._gates.probabilities().detach().cpu()
            hard = self._gates.state.detach().cpu().double()
        return {"polarized": float(((p.double() - hard).abs() <= margin).double().mean()),
                "open": float(hard.mean()), "mean_p": float(p.mean()), "gates": int(p.numel())}

    # ------------------------------------------------------------------------ conversion
    @torch.no_grad()
    def projected_masks(self, model: nn.Module) -> MaskSet | None:
        """While the gates train: the masks of the projection at the target budget from the
        logits as they are now (not applied, the gates untouched), i.e. what training would
        export if the budget stood at its target already; after the gates leave, the exported
        masks. Early stopping then compares this trial by the FLOPs it heads for, not by the
        dense count a gated model reports before its export."""
        if self._gates is None or self._floor is None:
            return self.masks
        if self.hold == "losses":  # where the gates stand now: what the losses reached so far
            return self._masks_for_state(model, self.threshold_state())
        return self._masks_for_state(model, self.project(self.sparsity))

    def _masks_for_state(self, model: nn.Module, state: Tensor) -> MaskSet:
        """Masks (completed for surgery) of a hard gate state: closed channels' filters, biases,
        the BatchNorm after them and, with ``prune_inputs``, their consumers' inputs."""
        ext = self._effective(state).bool()
        raw = torch.cat([state, torch.ones(1, dtype=torch.float64)]).bool()
        masks = MaskSet()
        params = dict(model.named_parameters())
        for c in self._costs:
            w = params[f"{c.name}.weight"]
            alive = bool(raw[c.block])
            keep_out = ext[c.out_units] & alive
            keep_in = ext[c.in_units] if self.prune_inputs else torch.ones(c.in_units.numel(), dtype=torch.bool)
            if bool(keep_out.all()) and bool(keep_in.all()):
                continue
            if bool(keep_in.all()):
                masks.set(f"{c.name}.weight", keep_out.to(w.device), "channel")
                continue
            out = keep_out.numel()
            gi = keep_in.reshape(c.groups, -1)  # (groups, inputs per group)
            go = torch.arange(out) // (out // c.groups)  # group of each output
            full = keep_out[:, None] & gi[go]
            full = full.reshape(full.shape + (1,) * (w.dim() - 2)).expand_as(w)
            masks.set(f"{c.name}.weight", full.to(w.device), "weight")
            bias = params.get(f"{c.name}.bias")
            if bias is not None and not bool(keep_out.all()):
                masks.set(f"{c.name}.bias", keep_out.to(w.device), "weight")
        modules = dict(model.named_modules())
        for c in self._costs:  # the BatchNorm after a producer: its affine goes with the channel
            norm = next((g.norm_after[c.name] for g, _ in self._gated if c.name in g.norm_after), None)
            if norm is None:
                norm = next((g.norm_after[c.name] for g in self._groups if c.name in g.norm_after), None)
            if norm is None or getattr(modules[norm], "weight", None) is None:
                continue
            keep_out = ext[c.out_units] & bool(raw[c.block])
            if not bool(keep_out.all()):
                masks.set(f"{norm}.weight", keep_out.to(modules[norm].weight.device), "channel")
        if len(masks):
            masks = complete_channel_masks(model, masks, self._input_shape, self._groups)
        return masks

    def export_masks(self, model: nn.Module) -> MaskSet:
        """The hard state training ended with -> masks (completed for surgery)."""
        gates = self._gates
        if gates is None:
            raise RuntimeError("no gates to export (setup not run, or already removed)")
        self._final_probs = self.gate_states()
        state = gates.state.detach().cpu().double()
        masks = self._masks_for_state(model, state)
        closed_blocks = [name for name, unit in self._blocks if state[unit] <= 0]
        stats = self.polarization_stats()
        masks.metadata.update({"method": self.name, "config": self.config()})
        self.masks = masks
        achieved = sparsity_report(model, masks)["global"]["sparsity"]
        self.report = {"sparsity_target": self.sparsity, "sparsity_gates": self.hard_sparsity(),
                       "sparsity": achieved, "closed_blocks": closed_blocks,
                       "polarized": stats["polarized"], "open_fraction": stats["open"],
                       "gate_flips": self._flips, "gate_params": self.cost.extra_params}
        masks.metadata.update({"polarization": self.report})
        log.info("polarization: gates remove %.4f of the %s (target %.4f), weight sparsity %.4f; "
                 "%.0f%% of gates polarized; closed blocks: %s", self.report["sparsity_gates"],
                 self.cost_weighting, self.sparsity, achieved, 100 * stats["polarized"], closed_blocks or "none")
        return masks

    @torch.no_grad()
    def remove_gates(self, model: nn.Module) -> None:
        """Take the gates and their hooks out of the model and apply the masks.

        Open gates are exactly 1 and closed channels are exactly zero under the masks (filters,
        biases, the BatchNorm after them and the consumers' inputs), so the outputs do not change.
        """
        if self._gates is None:
            return
        if self.masks is None:
            self.export_masks(model)
        self._gates.detach_hooks()
        if getattr(model, GATES_ATTR, None) is self._gates:
            delattr(model, GATES_ATTR)
        self._gates = None
        self._training = False
        assert self.masks is not None
        self.masks.apply(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name == "train" and self._gates is not None:
            self.export_masks(model)
            self.remove_gates(model)

    def finalize(self, model: nn.Module) -> MaskSet:
        if self._gates is not None:
            if not self._training:  # never trained: hold the budget on the initial logits
                self._set_state(self.project(self.sparsity) if self.hold == "projection"
                                else self.threshold_state())
            self.export_masks(model)
            self.remove_gates(model)
        return super().finalize(model)
