"""Importance scores: how much each Conv/Linear weight or channel matters (higher = keep).

The one place for every score in the library. Weight scores are plain ``{parameter name:
tensor of the weight's shape}`` dicts, turned into masks by
:func:`prunelib.selection.select_masks`; channel scores give one value per channel of a coupled
group (:class:`prunelib.surgery.ChannelGroup`), for the structured methods (PAODING, RL-Pruner).
Keeping importance apart from selection follows Torch-Pruning's split of importance from pruner.

Channel criteria (:data:`CHANNEL_CRITERIA`), for the channel ``r`` of a group, averaged over
the group's producers that write it (a residual stream has several):

* ``l1``: mean ``|w|`` of the producer's filter / row (L1 per weight, PAODING's score);
* ``l1_bn``: that times ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm directly after the
  producer (the filter the network effectively applies: a BatchNorm rescales its input, so the
  raw L1 of the filter before it says little). A depthwise producer (one input channel per
  output channel) scores ``|gamma|`` instead: its ``running_var`` is the spread of its filter
  times the spread of its one input channel, so the filter cancels out of ``L1 / sigma`` and
  what is left ranks channels by the inverse of their input's spread (the most active inputs
  first out); ``|gamma|`` is the spread the BatchNorm gives the channel's output;
* ``l2``: root mean square of the filter;
* ``taylor``: first-order Taylor, mean ``|w * dL/dw|`` of the filter, the gradient summed over a
  few calibration batches (:func:`taylor_scores`; RL-Pruner's paper criterion);
* ``random``: uniform random (a control).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.masks import prunable_parameters

if TYPE_CHECKING:
    from prunelib.surgery import ChannelGroup

__all__ = ["CHANNEL_CRITERIA", "bn_scale", "channel_scores", "filter_l1", "filter_l2", "magnitude_scores",
           "random_scores", "scored_names", "snip_scores", "taylor_scores"]

CHANNEL_CRITERIA = ("l1", "l1_bn", "l2", "taylor", "random")


def scored_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Conv/Linear weight names, minus any whose name starts with an ``exclude`` prefix."""
    exclude = tuple(exclude)
    return [n for n in prunable_parameters(model) if not (exclude and n.startswith(exclude))]


def magnitude_scores(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``|w|`` for each selected weight tensor."""
    params = prunable_parameters(model)
    names = list(names) if names is not None else list(params)
    return {n: params[n].detach().abs().clone() for n in names}


def random_scores(model: nn.Module, names: Iterable[str] | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Uniform random scores from a dedicated generator (the global RNG is left untouched)."""
    params = prunable_parameters(model)
    names = list(names) if names is not None else list(params)
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(params[n].shape, generator=gen).to(params[n].device) for n in names}


def taylor_scores(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                  names: Iterable[str] | None = None,
                  loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """First-order Taylor importance ``|w * dL/dw|``, the gradient summed over ``batches``.

    ``loss_fn(model, x, y)`` is the task loss (default: cross-entropy of the logits; a user's
    LightningModule supplies its own). The model's mode is left as given (SNIP scores in train
    mode, a calibration pass of a trained model in eval mode); gradients are cleared afterwards
    so no optimizer step sees them.
    """
    params = prunable_parameters(model)
    names = list(names) if names is not None else list(params)
    grads = {n: torch.zeros_like(params[n]) for n in names}
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches:
            loss = loss_fn(model, x, y) if loss_fn is not None else F.cross_entropy(model(x), y)
            loss.backward()
            for n in names:
                if params[n].grad is not None:
                    grads[n] += params[n].grad.detach()
            model.zero_grad(set_to_none=True)
    return {n: (params[n].detach() * grads[n]).abs() for n in names}


def snip_scores(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                names: Iterable[str] | None = None,
                loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """SNIP connection sensitivity (Lee et al. 2019): :func:`taylor_scores` at initialisation.

    ``|w * dL/dw|`` summed over ``batches``; the caller keeps the model in train mode, as in
    the paper's scoring pass.
    """
    return taylor_scores(model, batches, names, loss_fn)


def filter_l1(weight: Tensor) -> Tensor:
    """Mean ``|w|`` of each output channel's filter / row (L1 per weight), float64, on CPU."""
    flat = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    return flat.abs().mean(1)


def filter_l2(weight: Tensor) -> Tensor:
    """Root mean square of each output channel's filter / row, float64, on CPU."""
    flat = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    return flat.pow(2).mean(1).sqrt()


def bn_scale(bn: nn.Module) -> Tensor:
    """What a BatchNorm in eval mode multiplies each channel by: ``gamma / sqrt(var + eps)``
    (``1 / sqrt(var + eps)`` without an affine), float64, on CPU, signed."""
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().double().cpu()
    return scale


def _is_depthwise(module: nn.Module) -> bool:
    """A convolution with one input channel per output channel (``groups == in == out``)."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == getattr(module, "in_channels", 0) == getattr(module, "out_channels", -1)


def channel_scores(model: nn.Module, group: ChannelGroup, criterion: str = "l1",
                   weight_scores: Mapping[str, Tensor] | None = None,
                   generator: torch.Generator | None = None) -> Tensor:
    """One importance per channel of a coupled ``group`` (float64, shape ``(group.size,)``).

    Args:
        model: the model the group belongs to.
        group: a :class:`~prunelib.surgery.ChannelGroup` of ``model``.
        criterion: one of :data:`CHANNEL_CRITERIA` (see the module doc).
        weight_scores: ``taylor`` only: :func:`taylor_scores` of the producers' weights.
        generator: ``random`` only: the source of the random scores.
    """
    if criterion not in CHANNEL_CRITERIA:
        raise ValueError(f"criterion must be one of {list(CHANNEL_CRITERIA)}, got {criterion!r}")
    if criterion == "random":
        return torch.rand(group.size, generator=generator, dtype=torch.float64)
    modules = dict(model.named_modules())
    total = torch.zeros(group.size, dtype=torch.float64)
    count = torch.zeros(group.size, dtype=torch.float64)
    for name, index in group.producers.items():
        weight = modules[name].weight
        if criterion == "taylor":
            if weight_scores is None or f"{name}.weight" not in weight_scores:
                raise ValueError(f"criterion 'taylor' needs taylor_scores for {name}.weight")
            per = filter_l1(weight_scores[f"{name}.weight"])
        elif criterion == "l2":
            per = filter_l2(weight)
        else:
            per = filter_l1(weight)
            norm = group.norm_after.get(name) if criterion == "l1_bn" else None
            if norm is not None and _is_depthwise(modules[name]) and modules[norm].weight is not None:
                per = modules[norm].weight.detach().double().abs().cpu()  # see the module doc
            elif norm is not None:
                per = per * bn_scale(modules[norm]).abs()
        covered = index >= 0
        total[covered] += per[index[covered]]
        count[covered] += 1
    return total / count.clamp_min(1)
