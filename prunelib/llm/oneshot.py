"""One-shot pruning of a transformer, block by block with sequential calibration.

:func:`prune_model` does what the Wanda and SparseGPT repositories do for LLaMA/OPT, for any
model whose blocks :func:`~prunelib.llm.blocks.find_blocks` finds:

1. the calibration batches run through the model up to the first block; what the block
   receives is kept (hidden states, attention masks, rotary embeddings);
2. for each block in order: the block is moved to the work device (only this block: a model
   larger than device memory is pruned one block at a time), its linear layers' input
   statistics are collected in one pass over the calibration inputs (Wanda: mean squared input
   per feature; SparseGPT: ``H = 2 X X^T / n``), every linear layer of the block is pruned, the
   block runs again on the same inputs and its (pruned) outputs become the next block's
   inputs, and the block goes back where it was;
3. with ``distribution="owl"`` a first, dense pass computes each block's outlier ratio (on
   Wanda scores, as OWL does for every method) and the per-block sparsities.

Padding tokens (classification batches) are excluded from the statistics. Only the linear
layers inside the blocks are pruned (embeddings, the LM head and classification heads stay
dense, as in the papers). Weights are changed in place; the result holds the keep masks as a
:class:`~prunelib.masks.MaskSet` (the one mask format) in each parameter's own layout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunelib.llm.blocks import BlockInputs, LinearView, block_linears, capture_block_inputs, find_blocks, run_block
from prunelib.llm.sparsity import (
    NMPattern,
    magnitude_scores,
    outlier_ratio,
    owl_block_sparsities,
    parse_pattern,
    prune_mask_from_scores,
    sparsegpt_prune,
    wanda_scores,
)
from prunelib.masks import MaskSet

__all__ = ["LLM_DISTRIBUTIONS", "LLM_SCORES", "OneShotResult", "OneShotSettings", "collect_input_stats",
           "prune_model"]

LLM_SCORES = ("magnitude", "wanda", "sparsegpt")
LLM_DISTRIBUTIONS = ("uniform", "owl")


@dataclass(frozen=True)
class OneShotSettings:
    """How :func:`prune_model` prunes.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: fraction of each pruned layer's weights set to zero (unstructured; an N:M
            pattern fixes it at ``(M - N) / M``).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``: N kept in every M inputs).
        distribution: ``"uniform"`` (every block at ``sparsity``) or ``"owl"`` (outlier-weighted
            per-block sparsities with mean ``sparsity``; unstructured only).
        owl_m: OWL's outlier threshold, a multiple of the mean score (paper: 5).
        owl_lambda: OWL's spread: block sparsities lie within ``sparsity +- owl_lambda`` (paper: 0.08).
        group: unstructured comparison group, ``"row"`` or ``"layer"``; None = the papers'
            choice (magnitude: layer, Wanda: row). SparseGPT chooses per column block.
        blocksize / percdamp: SparseGPT's column block (128) and Hessian damping (0.01 of the
            mean diagonal).
        sequential: the next block is calibrated on the *pruned* block's outputs (as both
            repositories do); False = on the dense outputs.
        blocks_path: dotted path of the blocks' ModuleList (None = found).
        max_layer_sparsity: OWL never prunes a block beyond this fraction.
    """

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    distribution: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    group: str | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = True
    blocks_path: str | None = None
    max_layer_sparsity: float = 0.99

    def __post_init__(self) -> None:
        if self.method not in LLM_SCORES:
            raise ValueError(f"method must be one of {list(LLM_SCORES)}, got {self.method!r}")
        if self.distribution not in LLM_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {list(LLM_DISTRIBUTIONS)}, got {self.distribution!r}")
        nm = parse_pattern(self.pattern)
        if nm is None and not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1), got {self.sparsity!r}")
        if nm is not None and self.distribution == "owl":
            raise ValueError(f"distribution='owl' needs pattern='unstructured' (got {self.pattern!r}): an N:M "
                             f"pattern fixes every layer's sparsity")
        if self.group not in (None, "row", "layer"):
            raise ValueError(f"group must be 'row', 'layer' or None, got {self.group!r}")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m must be > 0, got {self.owl_m!r}")
        if not 0.0 <= self.owl_lambda < 1.0:
            raise ValueError(f"owl_lambda must be a fraction in [0, 1), got {self.owl_lambda!r}")
        if int(self.blocksize) < 1 or (nm is not None and int(self.blocksize) % nm.m):
            raise ValueError(f"blocksize must be >= 1 and a multiple of the N:M width, got {self.blocksize!r}")
        if not self.percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {self.percdamp!r}")

    @property
    def nm(self) -> NMPattern | None:
        """The parsed N:M pattern (None = unstructured)."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The sparsity every pruned layer gets on average (the pattern's for N:M)."""
        nm = self.nm
        return nm.sparsity if nm is not None else float(self.sparsity)


@dataclass
class OneShotResult:
    """What :func:`prune_model` did.

    Attributes:
        masks: keep masks of every pruned weight (MaskSet, "weight" granularity).
        block_sparsity: the target sparsity of each block (fractions; all equal unless OWL).
        outlier_ratios: OWL's per-block outlier share (fractions), empty otherwise.
        layers: parameter name -> ``{"block", "target", "sparsity", "error"}`` (SparseGPT's
            OBS error estimate, None for other methods).
        calibration_tokens: real tokens the statistics were collected over (0 for magnitude).
        seconds: wall time of the whole pruning.
    """

    masks: MaskSet
    block_sparsity: list[float]
    outlier_ratios: list[float] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration_tokens: int = 0
    seconds: float = 0.0

    @property
    def pruned_sparsity(self) -> float:
        """Fraction of zeroed entries over all pruned layers' weights."""
        total = sum(int(m.numel()) for m in self.masks.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.masks.values())
        return (total - kept) / total if total else 0.0


class _InputStats:
    """Running input statistics of one linear layer (real tokens only)."""

    def __init__(self, view: LinearView, hessian: bool) -> None:
        device = view.module.weight.device
        cols = view.in_features
        self.sq_sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.h = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.float()
        self.sq_sum += (x * x).sum(dim=0, dtype=torch.float64)
        if self.h is not None:
            self.h += x.t() @ x
        self.tokens += int(x.shape[0])

    @property
    def sq_mean(self) -> Tensor:
        """Mean over tokens of each squared input feature ``[in]``."""
        return (self.sq_sum / max(1, self.tokens)).float()

    @property
    def hessian(self) -> Tensor:
        """``2 X X^T / n`` over the real tokens ``[in, in]``."""
        assert self.h is not None
        return self.h * (2.0 / max(1, self.tokens))


@torch.no_grad()
def collect_input_stats(block: nn.Module, views: list[LinearView], inputs: BlockInputs, hessian: bool,
                        keep_outputs: bool) -> tuple[dict[str, _InputStats], list[Tensor]]:
    """One pass of ``block`` over ``inputs`` with hooks on its linear layers; returns
    ``(stats by parameter name, outputs if keep_outputs)``."""
    stats = {v.param_name: _InputStats(v, hessian) for v in views}
    current: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            mask = current["mask"].to(x.device)
            flat = x.reshape(-1, x.shape[-1])
            if mask.numel() == flat.shape[0] and not bool(mask.all()):
                flat = flat[mask.reshape(-1)]
            stats[name].add(flat)
        return hook

    handles = [v.module.register_forward_hook(make_hook(v.param_name)) for v in views]
    outputs: list[Tensor] = []
    try:
        for i in range(len(inputs.hidden)):
            current["mask"] = inputs.token_masks[i]
            one = BlockInputs([inputs.hidden[i]], [inputs.args[i]], [inputs.kwargs[i]], [inputs.token_masks[i]])
            out = run_block(block, one, store_outputs=keep_outputs)
            outputs.extend(out)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device, home: torch.device) -> Iterator[None]:
    """The block on ``device`` for the duration, back ``home`` afterwards (when they differ)."""
    if device != home:
        block.to(device)
    try:
        yield
    finally:
        if device != home:
            block.to(home)


def _prune_layer(view: LinearView, settings: OneShotSettings, sparsity: float,
                 stats: _InputStats | None) -> tuple[Tensor, float | None]:
    """Prune one layer in place; returns ``(keep [out, in], SparseGPT error or None)``."""
    w = view.weight
    nm = settings.nm
    if settings.method == "sparsegpt":
        assert stats is not None
        result = sparsegpt_prune(w, stats.hessian, sparsity, nm, int(settings.blocksize), float(settings.percdamp))
        view.set_weight(result.weight)
        return result.keep, result.loss
    if settings.method == "wanda":
        assert stats is not None
        scores = wanda_scores(w, stats.sq_mean)
        group = settings.group or "row"
    else:
        scores = magnitude_scores(w)
        group = settings.group or "layer"
    keep = prune_mask_from_scores(scores, sparsity, nm, group)
    view.set_weight(w.float() * keep)
    return keep, None


@torch.no_grad()
def prune_model(model: nn.Module, batches: Iterable[dict[str, Tensor]] | None, settings: OneShotSettings,
                device: torch.device | str | None = None,
                progress: Callable[[str], None] | None = None) -> OneShotResult:
    """Prune ``model``'s blocks in place, one block at a time (see the module docstring).

    Args:
        model: a transformer (Hugging Face or any module with a ModuleList of blocks).
        batches: calibration batches (dicts with ``input_ids`` and ``attention_mask``); not
            needed by uniform magnitude pruning.
        device: where each block is processed; the model stays where it is and each block
            visits ``device`` in turn (None = the model's device).
        progress: called with one line per block.

    Raises:
        ValueError: bad settings, no calibration batch when one is needed, or a layer whose
            width does not fit the N:M pattern.
    """
    start = time.perf_counter()
    path, blocks = find_blocks(model, settings.blocks_path)
    home = next(model.parameters()).device
    work = torch.device(device) if device is not None else home
    owl = settings.distribution == "owl"
    prune_needs_data = settings.method != "magnitude"
    inputs: BlockInputs | None = None
    if prune_needs_data or owl:
        if batches is None:
            raise ValueError(f"{settings.method} with distribution={settings.distribution} needs calibration batches")
        was_training = model.training
        model.eval()
        inputs = capture_block_inputs(model, blocks, batches, storage=work)
        model.train(was_training)
    n_blocks = len(blocks)
    targets = [settings.target_sparsity] * n_blocks
    ratios: list[float] = []
    if owl:
        assert inputs is not None
        dense = inputs.clone() if prune_needs_data else inputs
        for i, block in enumerate(blocks):
            with _on_device(block, work, home):
                views = block_linears(block, f"{path}.{i}")
                stats, outs = collect_input_stats(block, views, dense, hessian=False, keep_outputs=i < n_blocks - 1)
                scores = torch.cat([wanda_scores(v.weight, stats[v.param_name].sq_mean).reshape(-1) for v in views])
                ratios.append(outlier_ratio(scores, float(settings.owl_m)))
                dense.hidden = outs
        targets = owl_block_sparsities(ratios, float(settings.sparsity), float(settings.owl_lambda),
                                       float(settings.max_layer_sparsity))
        if progress:
            progress("OWL outlier ratios " + " ".join(f"{r:.4f}" for r in ratios) + " -> block sparsity "
                     + " ".join(f"{s:.3f}" for s in targets))
    calib_tokens = inputs.tokens if inputs is not None else 0
    masks = MaskSet()
    layers: dict[str, dict[str, Any]] = {}
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        with _on_device(block, work, home):
            views = block_linears(block, f"{path}.{i}")
            stats: dict[str, _InputStats] = {}
            dense_outs: list[Tensor] = []
            if prune_needs_data:
                assert inputs is not None
                keep_dense = not settings.sequential and i < n_blocks - 1
                stats, dense_outs = collect_input_stats(block, views, inputs, settings.method == "sparsegpt", keep_dense)
            for view in views:
                keep, error = _prune_layer(view, settings, targets[i], stats.get(view.param_name))
                masks.set(view.param_name, view.mask_for_param(keep).to(home), "weight")
                layers[view.param_name] = {"block": i, "target": targets[i],
                                           "sparsity": 1.0 - float(keep.float().mean()), "error": error}
            stats.clear()
            if prune_needs_data and inputs is not None and i < n_blocks - 1:
                inputs.hidden = run_block(block, inputs) if settings.sequential else dense_outs
        if progress:
            done = [v for k, v in layers.items() if v["block"] == i]
            mean = sum(d["sparsity"] for d in done) / max(1, len(done))
            progress(f"block {i + 1}/{n_blocks}: {len(done)} linear layers pruned to {mean:.3f} "
                     f"({settings.method}, {settings.pattern}) in {time.perf_counter() - t0:.2f}s")
    masks.metadata.update({"method": settings.method, "llm_settings": asdict(settings), "blocks_path": path,
                           "block_sparsity": targets, "outlier_ratios": ratios})
    return OneShotResult(masks, targets, ratios, layers, calib_tokens, time.perf_counter() - start)
