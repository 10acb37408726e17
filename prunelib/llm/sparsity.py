"""The math of one-shot LLM pruning on one weight matrix ``W [out, in]`` (rows = output neurons).

* **magnitude**: score ``|W|``; the lowest scores of the whole matrix (``group="layer"``, as the
  Wanda repository's magnitude baseline) or of each row (``group="row"``) are pruned.
* **Wanda** (Sun et al. 2023, ``locuslab/wanda`` ``lib/prune.py``): score
  ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over the calibration
  tokens; compared per output row (``group="row"``, the paper's choice).
* **SparseGPT** (Frantar & Alistarh 2023, ``IST-DASLab/sparsegpt`` ``sparsegpt.py``): the
  layer-wise OBS reconstruction ``min ||W X - W' X||^2``. With ``H = 2 X X^T / n`` damped by
  ``percdamp * mean(diag H)``, and ``U`` the upper Cholesky factor of ``H^-1``, columns are
  processed left to right in blocks of ``blocksize``: at the start of each block the pruned set
  of the block is chosen by ``w^2 / U_jj^2`` (the OBS saliency; for N:M, at every group of M
  columns, by the same score on the updated weights), then column by column the pruned weights
  are zeroed and their error ``(w - q) / U_jj`` is spread over the not-yet-processed columns
  with row ``j`` of ``U`` (lazy batch updates across blocks).
* **N:M**: at most ``N`` nonzero weights in every group of ``M`` consecutive inputs of a row
  (2:4 and 4:8 keep half). The count pruned per group is ``M - N``.
* **OWL** (Yin et al. 2023, ``luuyin/OWL`` ``lib/prune_all.py``): the outlier ratio of block
  ``l`` is the share of its Wanda scores above ``m`` times their mean; ratios are rescaled to
  ``[0, 2 * lambda]``, centred, and added to the target density, so outlier-rich blocks are
  pruned less and the mean sparsity over blocks stays the target.

Exact counts: an unstructured group of ``n`` weights loses ``floor(n * sparsity)`` of them (ties
broken by position, stable sort). The references prune every weight with a score ``<=`` the
threshold (one more, plus ties, in the magnitude and SparseGPT code); the counts here are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NMPattern", "SparseGPTResult", "magnitude_scores", "owl_block_sparsities", "outlier_ratio",
           "parse_pattern", "prune_mask_from_scores", "sparsegpt_prune", "wanda_scores"]


@dataclass(frozen=True)
class NMPattern:
    """``n`` kept weights in every ``m`` consecutive inputs of a row (``n < m``)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """Fraction pruned: ``(m - n) / m``."""
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | None) -> NMPattern | None:
    """``"unstructured"``/None -> None; ``"2:4"`` -> ``NMPattern(2, 4)``.

    Raises:
        ValueError: a malformed pattern or ``n >= m``.
    """
    if pattern is None or str(pattern) == "unstructured":
        return None
    text = str(pattern)
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r}: need 0 < N < M (N weights kept in every M)")
    return NMPattern(n, m)


def magnitude_scores(weight: Tensor) -> Tensor:
    """``|W|`` in float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: Tensor, input_sq_mean: Tensor) -> Tensor:
    """Wanda's ``|W_ij| * sqrt(mean_t x_tj^2)`` (proportional to ``|W_ij| * ||X_j||_2``).

    Args:
        weight: ``[out, in]``.
        input_sq_mean: ``[in]``, the mean over calibration tokens of each squared input feature.
    """
    if input_sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"input statistics have shape {tuple(input_sq_mean.shape)}, the weight has "
                         f"{weight.shape[1]} inputs")
    return weight.detach().float().abs() * input_sq_mean.float().clamp_min(0).sqrt()[None, :]


def prune_mask_from_scores(scores: Tensor, sparsity: float, pattern: NMPattern | None = None,
                           group: str = "row") -> Tensor:
    """Keep mask (True = kept) pruning the lowest ``scores``.

    Args:
        scores: ``[out, in]`` importance (higher = keep).
        sparsity: fraction pruned (unstructured only; N:M fixes it).
        pattern: N:M along each row (the input dimension); its width must divide ``in``.
        group: ``"row"`` (each output row loses ``floor(in * sparsity)``) or ``"layer"``
            (the matrix loses ``floor(numel * sparsity)``); unstructured only.
    """
    rows, cols = scores.shape
    if pattern is not None:
        if cols % pattern.m:
            raise ValueError(f"N:M {pattern}: the layer has {cols} inputs, not a multiple of {pattern.m}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool)
        keep.scatter_(2, drop, False)
        return keep.reshape(rows, cols)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity}")
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if group == "row":
        k = int(cols * sparsity)
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
            keep.scatter_(1, idx, False)
        return keep
    if group == "layer":
        k = int(scores.numel() * sparsity)
        if k:
            idx = torch.sort(scores.reshape(-1), stable=True).indices[:k]
            keep.view(-1)[idx] = False
        return keep
    raise ValueError(f"group must be 'row' or 'layer', got {group!r}")


@dataclass
class SparseGPTResult:
    """What :func:`sparsegpt_prune` returns.

    Attributes:
        weight: the pruned and reconstructed ``[out, in]`` weight (float32).
        keep: the keep mask (True = kept); dead inputs (zero Hessian diagonal) are pruned too.
        loss: the OBS estimate of the layer's squared reconstruction error, summed over rows.
        damp: the damping added to the Hessian diagonal (absolute).
    """

    weight: Tensor
    keep: Tensor
    loss: float
    damp: float


def _inverse_cholesky_upper(hessian: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; retries with 10x the damping if H is not PD."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    damp = percdamp * float(torch.mean(torch.diag(hessian)))
    for _ in range(4):
        h = hessian.clone()
        h[diag, diag] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError("SparseGPT: the calibration Hessian is not positive definite even with 1000x the "
                     "damping; use more calibration samples or a larger percdamp")


@torch.no_grad()
def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, pattern: NMPattern | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> SparseGPTResult:
    """SparseGPT on one layer (see the module docstring); ``weight`` is not changed.

    Args:
        weight: ``[out, in]``.
        hessian: ``[in, in]``, ``2 X X^T / n`` over the calibration inputs ``X [in, n]``.
        sparsity: fraction pruned per column block (unstructured; N:M fixes it).
        blocksize: columns per block (lazy updates; also the mask-selection window). For N:M it
            must be a multiple of M.
        percdamp: damping as a fraction of the mean Hessian diagonal.
    """
    w = weight.detach().clone().float()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"the Hessian has shape {tuple(hessian.shape)}, the weight has {cols} inputs")
    if pattern is not None and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of the N:M width {pattern.m}")
    if pattern is not None and cols % pattern.m:
        raise ValueError(f"N:M {pattern}: the layer has {cols} inputs, not a multiple of {pattern.m}")
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv, damp = _inverse_cholesky_upper(h, percdamp)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, device=w.device, dtype=torch.float32)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].contiguous().clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        prune1 = torch.zeros(rows, count, dtype=torch.bool, device=w.device)
        if pattern is None:
            k = int(w1.numel() * sparsity)
            if k:
                score = (w1 ** 2 / d1[None, :] ** 2).reshape(-1)
                prune1.view(-1)[torch.sort(score, stable=True).indices[:k]] = True
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if pattern is not None and i % pattern.m == 0:
                score = w1[:, i:i + pattern.m] ** 2 / d1[i:i + pattern.m][None, :] ** 2
                drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
                prune1[:, i:i + pattern.m].scatter_(1, drop, True)
            q = col.clone()
            q[prune1[:, i]] = 0.0
            q1[:, i] = q
            losses += (col - q) ** 2 / d ** 2 / 2
            err = (col - q) / d
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep[:, dead] = False
    return SparseGPTResult(w, keep, float(losses.sum()), damp)


def outlier_ratio(scores: Tensor, m: float) -> float:
    """OWL's layerwise outlier share: fraction of ``scores`` above ``m`` times their mean."""
    flat = scores.reshape(-1).float()
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).float().mean())


def owl_block_sparsities(ratios: list[float], target: float, lam: float,
                         max_sparsity: float = 0.99) -> list[float]:
    """Per-block sparsities from OWL outlier ratios (mean = ``target`` before clipping).

    ``density_l = (r_l - min r) / (max r - min r) * 2 * lam``, centred on its mean, plus
    ``1 - target``; sparsity is ``1 - density`` clipped to ``[0, max_sparsity]``. Equal ratios
    (or ``lam = 0``) give the uniform distribution.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {target}")
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"owl_lambda must be a fraction in [0, 1), got {lam}")
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0 or lam == 0:
        return [float(target)] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2.0 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [float(min(max_sparsity, max(0.0, 1.0 - (s - mean + 1.0 - target)))) for s in scaled]

