"""Slow, obviously-correct Pareto code kept only as a reference for tests and benchmarks.

These are the package's former implementations (before search.pareto used moocore): an
O(n^2 k) non-dominated mask and the exact recursive-slicing hypervolume (HSO), exponential in
the number of objectives. Not used by the package.
"""

from __future__ import annotations

import numpy as np


def reference_non_dominated(good: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``good`` (maximise every column, finite) that no other row dominates;
    exact duplicates do not dominate each other."""
    keep = np.ones(good.shape[0], dtype=bool)
    for i in range(good.shape[0]):
        geq = (good >= good[i]).all(axis=1)
        gt = (good > good[i]).any(axis=1)
        if (geq & gt).any():
            keep[i] = False
    return keep


def reference_hypervolume(points: np.ndarray) -> float:
    """Volume dominated by ``points`` (maximisation, every coordinate > 0) over the origin."""
    n, k = points.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(points[:, 0].max())
    if k == 2:
        order = np.argsort(-points[:, 0], kind="mergesort")
        xs = points[order, 0]
        best_y = np.maximum.accumulate(points[order, 1])
        next_x = np.append(xs[1:], 0.0)
        return float(np.sum((xs - next_x) * best_y))
    # Slice along the last coordinate: between consecutive distinct levels the cross-section is
    # the (k-1)-D hypervolume of the points whose last coordinate reaches the upper level.
    levels = np.unique(points[:, -1])[::-1]
    total = 0.0
    for i, z in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else 0.0
        sub = points[points[:, -1] >= z, :-1]
        sub = sub[reference_non_dominated(sub)]
        total += (z - below) * reference_hypervolume(sub)
    return float(total)


def reference_hypervolume_of(values: np.ndarray, directions: list[str], reference: list[float]) -> float:
    """:func:`reference_hypervolume` in the objectives' own units and directions, as
    search.pareto.hypervolume is called."""
    sign = np.array([1.0 if d == "max" else -1.0 for d in directions])
    gain = np.asarray(values, dtype=float) * sign - np.asarray(reference, dtype=float) * sign
    ok = np.isfinite(gain).all(axis=1) & (gain > 0).all(axis=1)
    pts = gain[ok]
    return reference_hypervolume(pts[reference_non_dominated(pts)]) if len(pts) else 0.0
