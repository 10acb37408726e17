"""KEN_viz: pictures of what KEN kept, written as PNG files (matplotlib, no display needed).

* :func:`plot_kept_heatmaps`: one heat map per matrix. Kept entries show their *fine-tuned*
  value, reverted entries are blank (the reference ``KEN_viz.py`` passed its two matrices in
  swapped order and coloured kept positions with the *pretrained* values). A matrix larger than
  ``max_side`` on a side is shown block-averaged as the kept fraction per block instead.
* :func:`plot_kept_fraction` : a bar chart of the kept fraction per tensor (fraction 0..1).

Rows are the first axis (as KEN selects them); Conv weights are shown as
``[out, in * kh * kw]``, 1-D tensors as one row. Figures are built with
``matplotlib.figure.Figure`` directly (the Agg canvas), so no pyplot state and no GUI backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["plot_kept_heatmaps", "plot_kept_fraction", "ken_pictures"]


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib types stay lazy
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _as_matrix(t: Tensor) -> Tensor:
    t = t.detach().to("cpu")
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def _block_mean(m: Tensor, max_side: int) -> Tensor:
    """Average ``m`` over blocks so that neither side exceeds ``max_side`` (padding ignored)."""
    rows, cols = m.shape
    br, bc = math.ceil(rows / max_side), math.ceil(cols / max_side)
    pr, pc = (-rows) % br, (-cols) % bc
    padded = torch.nn.functional.pad(m.float(), (0, pc, 0, pr), value=float("nan"))
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    return torch.nanmean(blocks.permute(0, 2, 1, 3).reshape(blocks.shape[0], blocks.shape[2], -1), dim=2)


def plot_kept_heatmaps(masks: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], path: str | os.PathLike,
                       names: list[str] | None = None, max_matrices: int = 12, max_side: int = 512,
                       columns: int = 3) -> Path:
    """Heat maps of the kept fine-tuned values of up to ``max_matrices`` tensors; returns the PNG path.

    Args:
        masks: name -> bool keep mask (True = fine-tuned value kept).
        finetuned: name -> fine-tuned tensor (the colours of kept entries).
        names: which tensors (default: the multi-dimensional masked ones, in order).
        max_side: larger matrices are shown as kept fraction per block (0..1).
        columns: heat maps per row of the figure.
    """
    chosen = names if names is not None else [n for n, m in masks.items() if m.dim() >= 2]
    chosen = (chosen or list(masks))[:max_matrices]
    if not chosen:
        raise ValueError("no masks to draw")
    cols = min(columns, len(chosen))
    lines = math.ceil(len(chosen) / cols)
    fig = _figure(4.2 * cols, 3.4 * lines)
    for i, name in enumerate(chosen):
        ax = fig.add_subplot(lines, cols, i + 1)
        keep = _as_matrix(masks[name]).bool()
        values = _as_matrix(finetuned[name]).float()
        frac = float(keep.float().mean())
        if max(keep.shape) > max_side:
            shown = _block_mean(keep.float(), max_side)
            image = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            label = "kept fraction per block"
        else:
            shown = torch.where(keep, values, torch.full_like(values, float("nan")))
            finite = shown[keep]
            lim = float(finite.abs().max()) if finite.numel() else 1.0
            image = ax.imshow(shown.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim,
                              interpolation="nearest")
            label = "kept fine-tuned value"
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
        ax.set_title(f"{name}\nkept {frac:.1%}", fontsize=8)
        ax.set_xlabel("column", fontsize=7)
        ax.set_ylabel("row", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("KEN: kept fine-tuned entries (blank = reverted to pretrained)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_kept_fraction(masks: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Bar chart of the kept fraction (0..1) of every masked tensor; returns the PNG path."""
    if not masks:
        raise ValueError("no masks to draw")
    names = list(masks)
    fractions = [float(m.float().mean()) for m in masks.values()]
    fig = _figure(max(6.0, 0.35 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), fractions, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=6)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("kept fraction (fine-tuned values)")
    total = sum(int(m.numel()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    ax.set_title(f"KEN: kept fraction per tensor (overall {kept / total:.1%} of {total:,} entries)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def ken_pictures(masks: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], out_dir: str | os.PathLike,
                 max_matrices: int = 12) -> list[Path]:
    """Both pictures under ``out_dir`` (``ken_heatmaps.png``, ``ken_kept_fraction.png``)."""
    out = Path(out_dir)
    return [plot_kept_heatmaps(masks, finetuned, out / "ken_heatmaps.png", max_matrices=max_matrices),
            plot_kept_fraction(masks, out / "ken_kept_fraction.png")]
