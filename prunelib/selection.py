"""From importance scores to masks: exact-count selection, global or per layer.

Importance (how much a weight matters) is the method's business; this module only turns
scores into a :class:`~prunelib.masks.MaskSet` that hits a target sparsity exactly, with
per-layer floors so no layer collapses. Ties are broken by position, so the same scores
always give the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunelib.masks import MaskSet, prunable_parameters

__all__ = ["select_masks", "largest_remainder"]


def largest_remainder(quotas: Mapping[str, float], total: int,
                      caps: Mapping[str, int]) -> dict[str, int]:
    """Integer counts summing to ``total`` that follow real ``quotas`` (Hamilton's method).

    Each name gets ``floor(quota)``, clipped to ``[0, cap]``, and the remaining units go to
    the largest fractional parts that still have room. Used so that per-layer rounding never
    moves the global sparsity off its target.
    """
    counts = {k: min(caps[k], max(0, math.floor(q))) for k, q in quotas.items()}
    left = total - sum(counts.values())
    order = sorted(quotas, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))
    while left > 0:
        progressed = False
        for k in order:
            if left == 0:
                break
            if counts[k] < caps[k]:
                counts[k] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {total} units within caps {dict(caps)}")
    return counts


def _stable_topk_keep(score: Tensor, k: int) -> Tensor:
    """Boolean mask keeping the ``k`` largest entries; ties broken by lower index."""
    flat = score.detach().flatten().float()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        # A stable sort on -score keeps earlier indices first among equals.
        idx = torch.sort(-flat, stable=True).indices[:k]
        keep[idx] = True
    return keep.view_as(score)


def select_masks(model: nn.Module, scores: Mapping[str, Tensor], sparsity: float | Mapping[str, float],
                 scope: str = "global", min_density: float = 0.0,
                 previous: MaskSet | None = None) -> MaskSet:
    """Masks that prune the lowest-scored weights to a target sparsity.

    Args:
        model: the model; its Conv/Linear weights form the sparsity denominator.
        scores: parameter name -> importance (same shape as the weight; higher = keep).
            Weights without a score are not pruned but still count in the denominator.
        sparsity: global target (fraction of all Conv/Linear weights), or a per-layer map
            ``{name: fraction}`` (implies ``scope="layer"``).
        scope: ``"global"`` ranks all scored weights together; ``"layer"`` gives every
            scored layer the same sparsity, with rounding remainders spread so the global
            figure is exact.
        min_density: fraction of each scored layer that is always kept (layer-collapse guard).
        previous: masks already applied; pruned entries stay pruned (scores there ignored).

    Returns:
        A weight-granularity :class:`MaskSet` over the scored parameters.
    """
    params = prunable_parameters(model)
    unknown = [n for n in scores if n not in params]
    if unknown:
        raise KeyError(f"scores for parameters that are not Conv/Linear weights: {unknown[:3]}")
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(f"min_density must be in [0, 1], got {min_density}")
    total = sum(p.numel() for p in params.values())
    names = list(scores)
    sizes = {n: params[n].numel() for n in names}
    floors = {n: math.ceil(min_density * sizes[n]) for n in names}
    prev_alive = {n: (previous.expanded(n, params[n]) if previous is not None and n in previous
                      else torch.ones_like(params[n], dtype=torch.bool)) for n in names}
    caps = {n: int(prev_alive[n].sum()) for n in names}  # at most this many can be kept
    floors = {n: min(floors[n], caps[n]) for n in names}

    if isinstance(sparsity, Mapping):
        scope = "layer"
        per_layer = {n: float(sparsity.get(n, 0.0)) for n in names}
        target_zeros = round(sum(per_layer[n] * sizes[n] for n in names))
    else:
        per_layer = {n: float(sparsity) for n in names}
        target_zeros = round(float(sparsity) * total)
    for n, s in per_layer.items():
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity for {n!r} must be in [0, 1], got {s}")
    scored_total = sum(sizes.values())
    keep_total = scored_total - target_zeros
    if keep_total < sum(floors.values()):
        raise ValueError(
            f"target sparsity removes {target_zeros} of {total} weights, but only "
            f"{scored_total - sum(floors.values())} may be pruned (min_density={min_density}, "
            f"unscored layers stay dense)")
    keep_total = min(keep_total, sum(caps.values()))

    masked_scores = {n: torch.where(prev_alive[n], scores[n].detach().float().to(params[n].device),
                                    torch.tensor(-math.inf, device=params[n].device))
                     for n in names}
    out = MaskSet()
    if scope == "layer":
        quotas = {n: max(floors[n], (1.0 - per_layer[n]) * sizes[n]) for n in names}
        total_quota = sum(quotas.values())
        if total_quota > keep_total and total_quota > 0:
            # Unscored layers stay dense, so the scored ones share the extra pruning evenly.
            quotas = {n: max(floors[n], q * keep_total / total_quota) for n, q in quotas.items()}
        counts = largest_remainder(quotas, keep_total, caps)
        for n in names:
            out.set(n, _stable_topk_keep(masked_scores[n], counts[n]))
    elif scope == "global":
        # Reserve each layer's floor first, then rank everything else together.
        keep = {n: _stable_topk_keep(masked_scores[n], floors[n]) for n in names}
        rest = keep_total - sum(floors.values())
        if rest > 0:
            flat = torch.cat([torch.where(keep[n], torch.tensor(-math.inf, device=keep[n].device),
                                          masked_scores[n]).flatten().cpu() for n in names])
            chosen = _stable_topk_keep(flat, rest)
            offset = 0
            for n in names:
                part = chosen[offset: offset + sizes[n]].view_as(keep[n]).to(keep[n].device)
                keep[n] = keep[n] | part
                offset += sizes[n]
        for n in names:
            out.set(n, keep[n])
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return out
