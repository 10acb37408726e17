"""Per-layer sparsity distributions: how a global target is shared among layers.

A method with a global sparsity target (magnitude, random, SNIP, GMP, IMP, GaP, BINGO's
weight mode) must decide how many weights each layer loses. :class:`LayerDistribution` makes
that decision an explicit, searchable object with a few shape parameters:

* ``global``: no a-priori shape; one ranking of all scored weights decides (the layers'
  shares follow the scores).
* ``uniform``: every scored layer gets the same sparsity.
* ``protect_ends``: the first and the last scored layer (in registration order: the stem and
  the classifier of a sequential network) keep ``end_protection`` of their share, i.e. their
  sparsity is ``(1 - end_protection)`` times the middle layers' sparsity.
* ``depth_increasing``: sparsity grows linearly with depth (registration order); the last
  layer's sparsity is ``(1 + depth_slope) / (1 - depth_slope)`` times the first's.

Every shaped distribution gives layer ``l`` the sparsity ``min(cap_l, c * w_l)`` with shape
weights ``w_l > 0`` and one scale ``c`` solved so the size-weighted mean is the target: a layer
clipped at its cap (``max_layer_sparsity``, and ``1 - min_density``) passes its excess on to
the unclipped ones ("water filling"). The real-valued shares are then rounded to integer
weight counts with :func:`~prunelib.selection.largest_remainder`, so the number of pruned
weights is exactly ``round(target * all Conv/Linear weights)``, whatever the rounding per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from prunelib.masks import MaskSet, prunable_parameters
from prunelib.selection import largest_remainder, select_masks

__all__ = ["DISTRIBUTIONS", "LayerDistribution", "select_distributed"]

#: The distribution names a method's ``distribution`` setting accepts.
DISTRIBUTIONS = ("global", "uniform", "protect_ends", "depth_increasing")


def _fraction(name: str, value: float, high_inclusive: bool = False) -> float:
    value = float(value)
    ok = 0.0 <= value <= 1.0 if high_inclusive else 0.0 <= value < 1.0
    if not ok or math.isnan(value):
        bound = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ValueError(f"{name} must be a fraction in {bound}, got {value}")
    return value


@dataclass(frozen=True)
class LayerDistribution:
    """How a global sparsity target is shared among the scored layers.

    Attributes:
        kind: one of :data:`DISTRIBUTIONS`.
        end_protection: ``protect_ends`` only: fraction in [0, 1) by which the first and last
            layers' sparsity is lowered relative to the middle layers' (0 = uniform; 0.5 = the
            ends are pruned half as much as the middle).
        depth_slope: ``depth_increasing`` only: fraction in [0, 1); shape weight of layer
            ``i`` of ``L`` is ``1 - slope + 2 * slope * i / (L - 1)`` (0 = uniform).
        max_layer_sparsity: fraction in (0, 1]; no layer is pruned beyond it (a layer-collapse
            guard). The excess of a clipped layer goes to the other layers. For ``global`` it
            acts as a per-layer floor of ``1 - max_layer_sparsity`` kept weights.
    """

    kind: str = "uniform"
    end_protection: float = 0.5
    depth_slope: float = 0.5
    max_layer_sparsity: float = 0.99

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {self.kind!r}")
        _fraction("end_protection", self.end_protection)
        _fraction("depth_slope", self.depth_slope)
        _fraction("max_layer_sparsity", self.max_layer_sparsity, high_inclusive=True)
        if self.max_layer_sparsity == 0.0:
            raise ValueError("max_layer_sparsity must be > 0")

    @property
    def ranked(self) -> bool:
        """True for ``global``: the scores, not a shape, decide each layer's share."""
        return self.kind == "global"

    def as_dict(self) -> dict[str, object]:
        """The settings as a JSON-friendly dict."""
        return asdict(self)

    def shape_weights(self, n_layers: int) -> list[float]:
        """Relative sparsity weights (all > 0) of ``n_layers`` layers in depth order."""
        if self.kind in ("uniform", "global") or n_layers <= 1:
            return [1.0] * n_layers
        if self.kind == "protect_ends":
            if n_layers == 2:  # both layers are ends: nothing left to protect them against
                return [1.0, 1.0]
            ends = 1.0 - self.end_protection
            return [ends] + [1.0] * (n_layers - 2) + [ends]
        return [1.0 - self.depth_slope + 2.0 * self.depth_slope * i / (n_layers - 1)
                for i in range(n_layers)]

    def layer_caps(self, sizes: Mapping[str, int], min_density: float = 0.0) -> dict[str, int]:
        """The most weights each layer may lose (``max_layer_sparsity`` and ``min_density``)."""
        _fraction("min_density", min_density, high_inclusive=True)
        # The floor matches select_masks' (ceil(min_density * size) kept), so the two agree.
        return {n: max(0, min(math.floor(self.max_layer_sparsity * size + 1e-9),
                              size - math.ceil(min_density * size)))
                for n, size in sizes.items()}

    def shares(self, sizes: Mapping[str, int], zeros: float, min_density: float = 0.0,
               weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """Real-valued pruned-weight counts per layer that sum to ``zeros`` (water filling).

        Args:
            sizes: layer name -> weight count, in depth order.
            zeros: weights to prune in all (may be fractional; the caller rounds).
            min_density: fraction of each layer always kept.
            weights: relative sparsity weights per layer (> 0) replacing the shape's.

        Raises:
            ValueError: ``zeros`` exceeds what the caps allow.
        """
        names = list(sizes)
        caps = self.layer_caps(sizes, min_density)
        if zeros > sum(caps.values()) + 1e-9:
            raise ValueError(
                f"cannot prune {zeros:.0f} weights: with max_layer_sparsity={self.max_layer_sparsity} "
                f"and min_density={min_density} the layers allow at most {sum(caps.values())} "
                f"of {sum(sizes.values())}")
        if weights is None:
            weights = dict(zip(names, self.shape_weights(len(names))))
        elif any(not float(weights[n]) > 0 for n in names):
            raise ValueError("layer weights must be > 0 for every layer")
        clipped: set[str] = set()
        # Each pass clips at least one layer or ends, so it stops within len(names) passes.
        while True:
            free = [n for n in names if n not in clipped and sizes[n] > 0]
            left = zeros - sum(caps[n] for n in clipped)
            denom = sum(weights[n] * sizes[n] for n in free)
            scale = left / denom if denom > 0 else 0.0
            over = [n for n in free if scale * weights[n] * sizes[n] > caps[n] + 1e-12]
            if not over:
                break
            clipped.update(over)
        return {n: float(caps[n]) if n in clipped else scale * weights[n] * sizes[n] for n in names}

    def allocate(self, sizes: Mapping[str, int], zeros: int, min_density: float = 0.0,
                 weights: Mapping[str, float] | None = None) -> dict[str, int]:
        """Integer pruned-weight counts per layer summing exactly to ``zeros``.

        ``global`` has no a-priori shape; it is allocated like ``uniform`` here (GaP uses this
        only for its groups' quotas, where proportional shares are what a global ranking of
        equally-sparse groups keeps).
        """
        shares = self.shares(sizes, zeros, min_density, weights)
        return largest_remainder(shares, int(zeros), self.layer_caps(sizes, min_density))

    def layer_sparsities(self, sizes: Mapping[str, int], target: float, total: int | None = None,
                         min_density: float = 0.0,
                         weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-layer sparsity (fraction) of each layer in ``sizes`` for a global ``target``.

        Args:
            sizes: scored layer name -> weight count, in depth order.
            target: global sparsity (fraction of ``total`` weights).
            total: the denominator (all Conv/Linear weights, including unscored layers that
                stay dense); default ``sum(sizes)``.
            min_density: fraction of each layer always kept.
            weights: relative sparsity weights per layer replacing the shape's (see :meth:`shares`).
        """
        _fraction("target", target)
        total = sum(sizes.values()) if total is None else int(total)
        counts = self.allocate(sizes, round(target * total), min_density, weights)
        return {n: counts[n] / sizes[n] if sizes[n] else 0.0 for n in sizes}


def select_distributed(model: nn.Module, scores: Mapping[str, Tensor], sparsity: float,
                       distribution: LayerDistribution, min_density: float = 0.0,
                       previous: MaskSet | None = None,
                       layer_weights: Mapping[str, float] | None = None) -> MaskSet:
    """Masks pruning the lowest-scored weights to a global ``sparsity`` under ``distribution``.

    Args:
        model: the model; all its Conv/Linear weights form the denominator.
        scores: parameter name -> importance (higher = keep), in depth order.
        sparsity: global target, fraction of all Conv/Linear weights.
        distribution: the per-layer shares (``global``: one ranking of all scored weights,
            each layer keeping at least ``1 - max_layer_sparsity``).
        min_density: fraction of each scored layer always kept.
        previous: masks already applied; their pruned entries stay pruned.
        layer_weights: explicit relative sparsity weights per layer (> 0) instead of the
            distribution's shape (its caps still apply); BINGO's damage allocation.
    """
    if distribution.ranked and layer_weights is None:
        floor = max(min_density, 1.0 - distribution.max_layer_sparsity)
        return select_masks(model, scores, sparsity, scope="global", min_density=floor,
                            previous=previous)
    params = prunable_parameters(model)
    sizes = {n: params[n].numel() for n in scores}
    total = sum(p.numel() for p in params.values())
    per_layer = distribution.layer_sparsities(sizes, sparsity, total, min_density, layer_weights)
    return select_masks(model, scores, per_layer, min_density=min_density, previous=previous)
