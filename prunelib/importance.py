"""Importance scores: how much each Conv/Linear weight matters (higher = keep).

Scores are plain ``{parameter name: tensor of the weight's shape}`` dicts, turned into masks
by :func:`prunelib.selection.select_masks`. Keeping importance apart from selection follows
Torch-Pruning's split of importance from pruner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.masks import prunable_parameters

__all__ = ["magnitude_scores", "random_scores", "snip_scores", "scored_names"]


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


def snip_scores(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                names: Iterable[str] | None = None,
                loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``|w * dL/dw|`` summed over ``batches`` (Lee et al. 2019).

    ``loss_fn(model, x, y)`` is the task loss (default: cross-entropy of the logits). The model
    stays in train mode (as in the paper's scoring pass); gradients are cleared afterwards so
    the first optimizer step is not polluted.
    """
    params = prunable_parameters(model)
    names = list(names) if names is not None else list(params)
    grads = {n: torch.zeros_like(params[n]) for n in names}
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        loss = loss_fn(model, x, y) if loss_fn is not None else F.cross_entropy(model(x), y)
        loss.backward()
        for n in names:
            if params[n].grad is not None:
                grads[n] += params[n].grad.detach()
        model.zero_grad(set_to_none=True)
    return {n: (params[n].detach() * grads[n]).abs() for n in names}
