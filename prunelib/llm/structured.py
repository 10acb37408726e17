"""Structured pruning of Hugging Face transformers: FFN channels, attention heads (whole KV groups
under GQA), the hidden size, and whole blocks; block by block on calibration text.

The result is a physically smaller model of the same class (no masks, no zeros): every weight
matrix loses rows and columns, the config says the new sizes, and
:mod:`prunelib.llm.structured_export` saves it as a checkpoint ``transformers`` loads back.

Families (found from the block's modules, not the class name, so Mistral/Qwen2-style decoders
and RoBERTa-style encoders come along):

* **Llama family** (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``): grouped-query
  attention keeps or removes a KV head *with* the ``num_attention_heads / num_key_value_heads``
  query heads that read it (``repeat_kv`` maps query head ``h`` to KV head ``h // n_rep``), so
  the group size never changes and the stock attention runs on any number of groups;
* **GPT-2** (``attn.c_attn`` fused q|k|v and ``attn.c_proj``, ``mlp.c_fc``/``mlp.c_proj``): the
  ``Conv1D`` weights are stored ``[in, out]``; a head removes its channels from each third of
  ``c_attn``;
* **BERT-style encoders** (``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``).

Importance (``importance=``), from the calibration tokens (padding excluded):

* ``"activation"`` (Minitron, Muralidharan et al. 2024): an FFN channel's score is the RMS over
  tokens of its activation (the input of the down projection); a head's, the L2 norm over its
  channels of that RMS of its output (the input of the output projection); a KV group sums its
  query heads; an embedding (hidden) channel sums the mean square of the normalised hidden
  states every block reads (the inputs of q/k/v and of the FFN's first layer), over all blocks;
* ``"fluctuation"`` (FLAP, An et al. 2024): a channel's score is the variance over tokens of the
  output projection's input channel times the squared L2 norm of that weight column; a head sums
  its channels. With ``bias_compensation`` the removed channels' mean contribution
  ``W[:, removed] @ mean(x[removed])`` is added to the output projection's bias (a bias is
  added where the layer had none; Llama's config then says ``attention_bias``/``mlp_bias``);
* ``"magnitude"``: the L2 norm of the weights that read and write the channel (data-free; the
  uniform magnitude width baseline). Hidden channels: the L2 norm of the embedding columns.

Depth (ShortGPT, Men et al. 2024): block influence ``BI = 1 - mean_t cos(x_in, x_out)`` over the
real tokens of a dense pass; the ``round(depth_sparsity * L)`` blocks of lowest influence are
removed (``num_hidden_layers`` and every module's ``layer_idx`` follow).

Allocation of the width over blocks (``allocation=``): ``"uniform"``; ``"owl"`` (OWL's rule,
:func:`~prunelib.llm.sparsity.owl_block_sparsities`, on each block's outlier ratio of Wanda
scores: outlier-rich blocks keep more width, the mean fraction stays the target); or
``"per_layer"``: explicit per-block fractions (``ffn_fractions``, ``head_fractions``), the vector
an orchestrator searches.

Order of work: (1) capture the first block's calibration inputs; (2) when depth, hidden or OWL
need it, one dense pass block by block (block influence, hidden-channel scores, outlier
ratios); (3) remove blocks, then hidden channels; (4) one sequential pass: each block's
statistics are collected on the outputs of the already-pruned blocks before it, its heads and
FFN channels are removed (and compensated), and its pruned outputs feed the next block. Memory
holds one block's calibration activations, as in :func:`prunelib.llm.oneshot.prune_model`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.flops import ModelCost
from prunelib.llm.blocks import BlockInputs, capture_block_inputs, find_blocks, run_block
from prunelib.llm.sparsity import outlier_ratio, owl_block_sparsities, wanda_scores
from prunelib.masks import MaskSet, is_hf_conv1d

__all__ = ["ALLOCATIONS", "IMPORTANCES", "BlockParts", "DistillResult", "StructuredResult", "StructuredSettings",
           "block_influence", "block_parts", "distill_logits", "logit_kl", "prune_structured"]

IMPORTANCES = ("activation", "fluctuation", "magnitude")
ALLOCATIONS = ("uniform", "owl", "per_layer")


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{key}: must be a fraction in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StructuredSettings:
    """How :func:`prune_structured` prunes (all fractions are of the dense model's counts).

    Attributes:
        ffn_sparsity: fraction of each block's FFN intermediate channels removed (mean over
            blocks under OWL).
        head_sparsity: fraction of each block's attention heads removed, counted in whole KV
            groups under GQA (rounded to the nearest group; at least one group is kept).
        keep_heads: query heads kept per block, instead of ``head_sparsity`` (must be a whole
            number of GQA groups); None = from ``head_sparsity``.
        hidden_sparsity: fraction of the hidden (embedding) channels removed, everywhere: the
            embeddings, every norm, every projection, the LM head (tied weights stay tied).
        depth_sparsity: fraction of the blocks removed (``round(depth_sparsity * L)``).
        importance: ``"activation"`` (Minitron), ``"fluctuation"`` (FLAP) or ``"magnitude"``.
        bias_compensation: fold the removed channels' mean output into the output projection's
            bias (FLAP); needs calibration data.
        allocation: ``"uniform"``, ``"owl"`` or ``"per_layer"``.
        ffn_fractions / head_fractions: per-block removed fractions (one per block of the dense
            model; entries of removed blocks are ignored) with ``allocation="per_layer"``; a
            missing list falls back to the uniform ``ffn_sparsity``/``head_sparsity``.
        owl_m / owl_lambda: OWL's outlier threshold (x mean Wanda score) and spread of the block
            fractions around the target.
        max_fraction: no block loses more than this fraction of its channels or heads.
        round_to: kept FFN channels are a multiple of this (hardware-friendly widths; 1 = exact).
        blocks_path: dotted path of the blocks' ModuleList (None = found).
        distill_steps: steps of logit distillation from the dense model on the calibration text
            after pruning (0 = none).
        distill_lr: AdamW learning rate of that distillation.
        distill_temperature: softmax temperature of the KL (the loss is scaled by T^2).
    """

    ffn_sparsity: float = 0.0
    head_sparsity: float = 0.0
    keep_heads: int | None = None
    hidden_sparsity: float = 0.0
    depth_sparsity: float = 0.0
    importance: str = "activation"
    bias_compensation: bool = False
    allocation: str = "uniform"
    ffn_fractions: tuple[float, ...] | None = None
    head_fractions: tuple[float, ...] | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    max_fraction: float = 0.95
    round_to: int = 1
    blocks_path: str | None = None
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        for key in ("ffn_sparsity", "head_sparsity", "hidden_sparsity", "depth_sparsity", "owl_lambda"):
            object.__setattr__(self, key, _fraction(key, getattr(self, key)))
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance: must be one of {list(IMPORTANCES)}, got {self.importance!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if not isinstance(self.bias_compensation, bool):
            raise ValueError(f"bias_compensation: must be true or false, got {self.bias_compensation!r}")
        if self.keep_heads is not None:
            if isinstance(self.keep_heads, bool) or not isinstance(self.keep_heads, int) or self.keep_heads < 1:
                raise ValueError(f"keep_heads: must be an integer >= 1 or null, got {self.keep_heads!r}")
            if self.head_sparsity:
                raise ValueError("keep_heads: give keep_heads or head_sparsity, not both")
        for key in ("ffn_fractions", "head_fractions"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"{key}: must be a list of per-block fractions, got {value!r}")
            fractions = tuple(_fraction(f"{key}[{i}]", v) for i, v in enumerate(value))
            if not fractions:
                raise ValueError(f"{key}: is empty; give one fraction per block")
            if self.allocation != "per_layer":
                raise ValueError(f"{key}: per-block fractions need allocation=per_layer (got {self.allocation!r})")
            object.__setattr__(self, key, fractions)
        if self.allocation == "per_layer" and self.ffn_fractions is None and self.head_fractions is None:
            raise ValueError("allocation: per_layer needs ffn_fractions and/or head_fractions (one fraction per block)")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m: must be > 0, got {self.owl_m!r}")
        if not 0.0 < float(self.max_fraction) < 1.0:
            raise ValueError(f"max_fraction: must be a fraction in (0, 1), got {self.max_fraction!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to: must be an integer >= 1, got {self.round_to!r}")
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"distill_steps: must be an integer >= 0, got {self.distill_steps!r}")
        if not float(self.distill_lr) > 0:
            raise ValueError(f"distill_lr: must be > 0, got {self.distill_lr!r}")
        if not float(self.distill_temperature) > 0:
            raise ValueError(f"distill_temperature: must be > 0, got {self.distill_temperature!r}")
        for key in ("owl_m", "max_fraction", "distill_lr", "distill_temperature"):
            object.__setattr__(self, key, float(getattr(self, key)))

    @property
    def prunes_width(self) -> bool:
        """Whether FFN channels or heads are removed."""
        return bool(self.ffn_sparsity or self.head_sparsity or self.keep_heads is not None
                    or any(self.ffn_fractions or ()) or any(self.head_fractions or ()))

    @property
    def needs_data(self) -> bool:
        """Whether calibration batches are needed (only uniform magnitude width pruning is data-free)."""
        return (self.importance != "magnitude" or self.allocation == "owl" or self.depth_sparsity > 0
                or self.bias_compensation or self.distill_steps > 0)


# ----------------------------------------------------------------------------------------------
# Linear layers of either layout
# ----------------------------------------------------------------------------------------------
def _w(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view; ``Conv1D`` stores ``[in, out]``)."""
    return module.weight.data.t() if is_hf_conv1d(module) else module.weight.data


def _out_features(module: nn.Module) -> int:
    return int(_w(module).shape[0])


def _new_param(data: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def _slice_linear(module: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``cols`` of a Linear or Conv1D (in place; bias follows rows)."""
    conv = is_hf_conv1d(module)
    w = _w(module)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    module.weight = _new_param(w.t() if conv else w, module.weight)
    if rows is not None and getattr(module, "bias", None) is not None:
        module.bias = _new_param(module.bias.data.index_select(0, rows.to(w.device)), module.bias)
    out_f, in_f = int(w.shape[0]), int(w.shape[1])
    if conv:
        module.nf, module.nx = out_f, in_f
    else:
        module.out_features, module.in_features = out_f, in_f


@torch.no_grad()
def _ensure_bias(module: nn.Module) -> Tensor:
    """The layer's bias, a zero one added (float32 of the weight's dtype) when it has none."""
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(_out_features(module), dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    return module.bias.data


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or ("norm" in name and isinstance(getattr(module, "weight", None), Tensor)
                                                and module.weight.dim() == 1)


# ----------------------------------------------------------------------------------------------
# The parts of one block
# ----------------------------------------------------------------------------------------------
@dataclass
class BlockParts:
    """The layers of one transformer block that structured pruning cuts.

    Attributes:
        arch: ``"llama"``, ``"gpt2"`` or ``"bert"`` (the family, found from the modules).
        attention: the module holding the attention's head attributes.
        qkv: the query/key/value projections (one fused ``c_attn`` for GPT-2).
        attn_out: the attention's output projection (its inputs are the heads' channels).
        ffn_in: the FFN's first layers (gate and up for a gated FFN).
        ffn_out: the FFN's output projection (its inputs are the FFN channels).
        norms: the block's norms over the hidden size.
        head_dim: channels per head.
    """

    arch: str
    attention: nn.Module
    qkv: list[nn.Module]
    attn_out: nn.Module
    ffn_in: list[nn.Module]
    ffn_out: nn.Module
    norms: list[nn.Module]
    head_dim: int

    @property
    def heads(self) -> int:
        """Query heads now."""
        return self.attn_q_channels // self.head_dim

    @property
    def attn_q_channels(self) -> int:
        """Channels of the concatenated heads (the output projection's inputs)."""
        return int(_w(self.attn_out).shape[1])

    @property
    def kv_heads(self) -> int:
        """KV heads now (= query heads without GQA)."""
        if self.arch == "llama":
            return _out_features(self.qkv[1]) // self.head_dim
        return self.heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.heads // max(1, self.kv_heads)

    @property
    def ffn_channels(self) -> int:
        """FFN intermediate channels now."""
        return int(_w(self.ffn_out).shape[1])

    @property
    def hidden_readers(self) -> list[nn.Module]:
        """Layers whose inputs are the (normalised) hidden states."""
        return [*self.qkv, *self.ffn_in]


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def block_parts(block: nn.Module) -> BlockParts | None:
    """The prunable parts of a Llama-family, GPT-2 or BERT-style block (None = not one of those)."""
    norms = [m for m in block.children() if _is_norm(m)]
    if _get(block, "self_attn.q_proj") is not None and _get(block, "mlp.down_proj") is not None:
        attn, mlp = block.self_attn, block.mlp
        ffn_in = [m for m in (_get(mlp, "gate_proj"), _get(mlp, "up_proj")) if m is not None]
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        if not head_dim or _get(attn, "k_proj") is None or _get(attn, "o_proj") is None:
            return None
        return BlockParts("llama", attn, [attn.q_proj, attn.k_proj, attn.v_proj], attn.o_proj, ffn_in, mlp.down_proj,
                          norms, head_dim)
    if _get(block, "attn.c_attn") is not None and _get(block, "mlp.c_fc") is not None:
        if _get(block, "crossattention") is not None:
            return None  # cross-attention blocks would need their own head bookkeeping
        attn = block.attn
        return BlockParts("gpt2", attn, [attn.c_attn], attn.c_proj, [block.mlp.c_fc], block.mlp.c_proj, norms,
                          int(attn.head_dim))
    if _get(block, "attention.self.query") is not None and _get(block, "intermediate.dense") is not None \
            and _get(block, "output.dense") is not None:
        sa = block.attention.self
        norms = [m for m in (_get(block, "attention.output.LayerNorm"), _get(block, "output.LayerNorm")) if m is not None]
        return BlockParts("bert", sa, [sa.query, sa.key, sa.value], block.attention.output.dense,
                          [block.intermediate.dense], block.output.dense, norms, int(sa.attention_head_size))
    return None


def _model_parts(model: nn.Module, blocks_path: str | None) -> tuple[str, nn.ModuleList, list[BlockParts]]:
    """Blocks and their parts; one-line ValueErrors for a model that is not a supported transformer."""
    try:
        path, blocks = find_blocks(model, blocks_path)
    except ValueError as exc:
        if blocks_path is not None:
            raise
        raise ValueError(f"model: {type(model).__name__} is not a transformer structured pruning knows "
                         f"(no list of blocks found; name it with blocks_path=...)") from exc
    parts = [block_parts(b) for b in blocks]
    if any(p is None for p in parts):
        raise ValueError(f"model: the blocks at {path!r} of {type(model).__name__} ({type(blocks[0]).__name__}) are "
                         f"not Llama-family, GPT-2 or BERT-style transformer blocks (blocks_path={blocks_path!r})")
    kinds = {p.arch for p in parts}  # type: ignore[union-attr]
    if len(kinds) != 1:
        raise ValueError(f"model: the blocks at {path!r} mix families {sorted(kinds)}")
    return path, blocks, parts  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
class _ChannelStats:
    """Running per-channel sum and sum of squares of a layer's input over real tokens (float64)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.double()
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        self.tokens += int(x.shape[0])

    @property
    def mean(self) -> Tensor:
        """Mean over tokens ``[channels]`` (float32)."""
        return (self.sum / max(1, self.tokens)).float()

    @property
    def sq_mean(self) -> Tensor:
        """Mean over tokens of the square ``[channels]`` (float32)."""
        return (self.sq / max(1, self.tokens)).float()

    @property
    def var(self) -> Tensor:
        """Variance over tokens (population; FLAP's fluctuation) ``[channels]``."""
        n = max(1, self.tokens)
        return (self.sq / n - (self.sum / n) ** 2).clamp_min(0).float()


@torch.no_grad()
def _block_pass(block: nn.Module, layers: list[nn.Module], inputs: BlockInputs,
                keep_outputs: bool) -> tuple[dict[int, _ChannelStats], list[Tensor], float, int]:
    """One pass of ``block`` over ``inputs`` with hooks on ``layers``' inputs.

    Returns ``(stats by id(layer), outputs if keep_outputs, sum over real tokens of
    cos(x_in, x_out), real tokens)``; outputs are also computed (not kept) for the cosine.
    """
    device = next(block.parameters()).device
    stats = {id(m): _ChannelStats(int(_w(m).shape[1]), device) for m in layers}
    current: dict[str, Tensor] = {}

    def make_hook(key: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            mask = current["mask"].to(x.device).reshape(-1)
            if mask.numel() == flat.shape[0] and not bool(mask.all()):
                flat = flat[mask]
            stats[key].add(flat)
        return hook

    handles = [m.register_forward_hook(make_hook(id(m))) for m in layers]
    outputs: list[Tensor] = []
    cos_sum, tokens = 0.0, 0
    try:
        for i in range(len(inputs.hidden)):
            current["mask"] = inputs.token_masks[i]
            one = BlockInputs([inputs.hidden[i]], [inputs.args[i]], [inputs.kwargs[i]], [inputs.token_masks[i]])
            out = run_block(block, one)[0]
            mask = inputs.token_masks[i].to(out.device).bool()
            cos = F.cosine_similarity(inputs.hidden[i].to(out.device).float(), out.float(), dim=-1)
            cos_sum += float(cos[mask].sum())
            tokens += int(mask.sum())
            if keep_outputs:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs, cos_sum, tokens


def block_influence(cos_sum: float, tokens: int) -> float:
    """ShortGPT's block influence ``1 - mean cos(x_in, x_out)`` from a cosine sum over tokens."""
    return 1.0 - cos_sum / max(1, tokens)


# ----------------------------------------------------------------------------------------------
# Scores and selection
# ----------------------------------------------------------------------------------------------
def _channel_scores(importance: str, out_proj: nn.Module, stats: _ChannelStats | None,
                    readers: list[nn.Module]) -> Tensor:
    """Score per input channel of ``out_proj`` (FFN channels or head channels), float32."""
    w_out = _w(out_proj).float()
    if importance == "magnitude":
        score = (w_out ** 2).sum(0)
        for r in readers:  # the rows that write the channel
            score = score + (_w(r).float() ** 2).sum(1)
        return score.sqrt()
    assert stats is not None
    if importance == "activation":
        return stats.sq_mean
    return stats.var.to(w_out.device) * (w_out ** 2).sum(0)  # fluctuation


def _keep_top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (stable ties)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _keep_count(total: int, fraction: float, multiple: int = 1) -> int:
    """Units kept out of ``total`` when ``fraction`` is removed: a multiple of ``multiple``, at least one."""
    kept = (1.0 - fraction) * total
    if multiple > 1:
        return int(min(total, max(multiple, multiple * round(kept / multiple))))
    return int(min(total, max(1, round(kept))))


def _head_channels(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Cutting
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _compensate(out_proj: nn.Module, removed: Tensor, mean: Tensor) -> None:
    """FLAP's bias compensation: the removed inputs' mean contribution into the bias."""
    if removed.numel() == 0:
        return
    w = _w(out_proj).float()
    shift = w[:, removed.to(w.device)] @ mean.to(w.device)[removed.to(w.device)].float()
    bias = _ensure_bias(out_proj)
    bias += shift.to(bias.dtype)


@torch.no_grad()
def _cut_heads(parts: BlockParts, kv_keep: Tensor) -> None:
    """Keep the KV heads ``kv_keep`` (and their query heads) of one block."""
    hd, g = parts.head_dim, parts.group_size
    q_heads = (kv_keep[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
    q_ch = _head_channels(q_heads, hd)
    if parts.arch == "llama":
        kv_ch = _head_channels(kv_keep, hd)
        _slice_linear(parts.qkv[0], rows=q_ch)
        _slice_linear(parts.qkv[1], rows=kv_ch)
        _slice_linear(parts.qkv[2], rows=kv_ch)
    elif parts.arch == "gpt2":
        width = parts.attn_q_channels
        _slice_linear(parts.qkv[0], rows=torch.cat([q_ch, q_ch + width, q_ch + 2 * width]))
        parts.attention.split_size = int(q_ch.numel())
        parts.attention.num_heads = int(q_heads.numel())
    else:
        for m in parts.qkv:
            _slice_linear(m, rows=q_ch)
        parts.attention.num_attention_heads = int(q_heads.numel())
        parts.attention.all_head_size = int(q_ch.numel())
    _slice_linear(parts.attn_out, cols=q_ch)


@torch.no_grad()
def _cut_ffn(parts: BlockParts, keep: Tensor) -> None:
    for m in parts.ffn_in:
        _slice_linear(m, rows=keep)
    _slice_linear(parts.ffn_out, cols=keep)


@torch.no_grad()
def _cut_hidden(model: nn.Module, blocks: nn.ModuleList, parts: list[BlockParts], keep: Tensor) -> None:
    """Keep hidden channels ``keep`` everywhere: embeddings, norms, every projection, heads."""
    # old parameter id -> (old, new): the old one is held so its id is not reused while cutting
    cache: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    width = int(_w(parts[0].attn_out).shape[0])

    def cut_param(module: nn.Module, attr: str, dim: int) -> None:
        p = getattr(module, attr, None)
        if p is None:
            return
        if id(p) not in cache:  # a tied tensor is cut once and stays shared
            cache[id(p)] = (p, _new_param(p.data.index_select(dim, keep.to(p.device)), p))
        setattr(module, attr, cache[id(p)][1])

    def cut_linear(module: nn.Module, as_reader: bool, as_writer: bool) -> None:
        conv = is_hf_conv1d(module)
        if as_reader:
            cut_param(module, "weight", 0 if conv else 1)
        if as_writer:
            cut_param(module, "weight", 1 if conv else 0)
            cut_param(module, "bias", 0)
        w = _w(module)
        if conv:
            module.nf, module.nx = int(w.shape[0]), int(w.shape[1])
        else:
            module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])

    def cut_norm(module: nn.Module) -> None:
        cut_param(module, "weight", 0)
        cut_param(module, "bias", 0)
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (int(keep.numel()),)

    inside: set[int] = set()
    for block, bp in zip(blocks, parts):
        inside.update(id(m) for m in block.modules())
        for m in bp.hidden_readers:
            cut_linear(m, True, False)
        for m in (bp.attn_out, bp.ffn_out):
            cut_linear(m, False, True)
        for m in bp.norms:
            cut_norm(m)
    for _name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.Embedding) and m.embedding_dim == width:
            cut_param(m, "weight", 1)
            m.embedding_dim = int(keep.numel())
        elif _is_norm(m) and m.weight.shape == (width,):
            cut_norm(m)
        elif isinstance(m, nn.Linear) or is_hf_conv1d(m):
            out_f, in_f = _w(m).shape
            if in_f == width or out_f == width:
                cut_linear(m, in_f == width, out_f == width)


def _remove_blocks(model: nn.Module, path: str, blocks: nn.ModuleList, drop: list[int]) -> nn.ModuleList:
    """A new ModuleList without ``drop``; ``layer_idx`` of every kept module renumbered."""
    kept = nn.ModuleList([b for i, b in enumerate(blocks) if i not in set(drop)])
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, kept)
    for new_index, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_index
    return kept


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _update_config(model: nn.Module, parts: list[BlockParts], hidden: int | None, old_layers: int,
                   dropped: list[int]) -> None:
    """Write the new sizes into ``model.config`` (per-layer sizes go to the export's config)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    arch = parts[0].arch
    if dropped:
        config.num_hidden_layers = len(parts)  # GPT-2's attribute_map sends it to n_layer
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == old_layers:
            config.layer_types = [t for i, t in enumerate(types) if i not in set(dropped)]
    ffn = max(p.ffn_channels for p in parts)
    if arch == "gpt2":
        config.n_inner = ffn
    else:
        config.intermediate_size = ffn
    if hidden is not None:
        config.hidden_size = hidden
    if arch == "llama":
        config.head_dim = parts[0].head_dim  # explicit: no longer hidden_size // heads
        heads, kv_heads = max(p.heads for p in parts), max(p.kv_heads for p in parts)
        # transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0 even with an
        # explicit head_dim: a head count that breaks it stays at the dense value in the config,
        # and the export then stores the real shapes per module (trust_remote_code format).
        if config.hidden_size % heads == 0:
            config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
        if any(getattr(p.attn_out, "bias", None) is not None for p in parts):
            config.attention_bias = True
        if any(getattr(p.ffn_out, "bias", None) is not None for p in parts):
            config.mlp_bias = True


@torch.no_grad()
def _harmonise_llama_biases(parts: list[BlockParts]) -> None:
    """Llama's config has one ``attention_bias`` (q, k, v, o) and one ``mlp_bias`` (gate, up, down)
    flag: once compensation gave an output projection a bias, every such layer gets one (zeros)."""
    if parts[0].arch != "llama":
        return
    if any(getattr(p.attn_out, "bias", None) is not None for p in parts):
        for p in parts:
            for m in (*p.qkv, p.attn_out):
                _ensure_bias(m)
    if any(getattr(p.ffn_out, "bias", None) is not None for p in parts):
        for p in parts:
            for m in (*p.ffn_in, p.ffn_out):
                _ensure_bias(m)


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    """What :func:`distill_logits` did and cost.

    Attributes:
        steps: optimizer steps; seconds: wall time (seconds).
        forward_passes / backward_passes: passes over one calibration batch (teacher and student
            forwards both counted, the KL measurements before and after included).
        kl_before / kl_after: mean KL(teacher || student) per predicted position (nats).
    """

    steps: int = 0
    seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    kl_before: float = float("nan")
    kl_after: float = float("nan")


def _model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    """Mean over (real) positions of KL(softmax(t/T) || softmax(s/T)) * T^2."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per = (t.exp() * (t - s)).sum(-1) * temperature ** 2
    if mask is not None and per.dim() == 2 and mask.shape == per.shape:
        m = mask.to(per.device).float()
        return (per * m).sum() / m.sum().clamp_min(1.0)
    return per.mean()


@torch.no_grad()
def logit_kl(student: nn.Module, teacher: nn.Module, batches: list[dict[str, Tensor]],
             temperature: float = 1.0) -> float:
    """Mean KL(teacher || student) of the logits per position over ``batches`` (nats)."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    was_s, was_t = student.training, teacher.training
    student.eval()
    teacher.eval()
    for batch in batches:
        inputs = _model_inputs(batch, device)
        kl = _kl(student(**inputs).logits, teacher(**inputs).logits, inputs.get("attention_mask"), temperature)
        total += float(kl)
        count += 1
    student.train(was_s)
    teacher.train(was_t)
    return total / max(1, count)


def distill_logits(student: nn.Module, teacher: nn.Module, batches: list[dict[str, Tensor]], steps: int,
                   lr: float, temperature: float = 1.0,
                   progress: Callable[[str], None] | None = None) -> DistillResult:
    """Train ``student`` for ``steps`` AdamW steps on KL(teacher || student) of the logits over
    ``batches`` (cycled; padding excluded); the teacher stays frozen. Returns its cost."""
    start = time.perf_counter()
    result = DistillResult()
    result.kl_before = logit_kl(student, teacher, batches, temperature)
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was = student.training
    student.train()
    teacher.eval()
    for step in range(steps):
        inputs = _model_inputs(batches[step % len(batches)], device)
        with torch.no_grad():
            target = teacher(**inputs).logits
        loss = _kl(student(**inputs).logits, target, inputs.get("attention_mask"), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step + 1) % max(1, steps // 5) == 0:
            progress(f"distillation step {step + 1}/{steps}: KL {float(loss):.4f}")
    student.train(was)
    optimizer.zero_grad(set_to_none=True)
    result.kl_after = logit_kl(student, teacher, batches, temperature)
    result.steps = steps
    result.forward_passes = 2 * steps + 4 * len(batches)
    result.backward_passes = steps
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
@dataclass
class StructuredResult:
    """What :func:`prune_structured` did.

    Attributes:
        arch: the block family (``llama``, ``gpt2``, ``bert``).
        removed_blocks: indices (in the dense model) of the removed blocks.
        block_influence: ShortGPT's influence of every dense block (empty without depth pruning).
        ffn_fractions / head_fractions: the target fraction of each kept block.
        ffn_kept / heads_kept / kv_heads_kept: what each kept block has now.
        hidden_kept: hidden size now.
        outlier_ratios: OWL's per-block outlier share of the dense blocks (empty unless OWL).
        params_before / params_after: parameters of the whole model (physical counts).
        calibration_tokens: real tokens the statistics were collected over.
        distill: the distillation's cost and KL (None without distillation).
        seconds: wall time of pruning (distillation included).
        cost: physical params and FLOPs per sequence of the pruned model (set by the method
            when it has an example input; None otherwise).
        masks: an empty MaskSet (the model itself is smaller; nothing is masked), with the
            structured result in its metadata.
    """

    arch: str
    removed_blocks: list[int] = field(default_factory=list)
    block_influence: list[float] = field(default_factory=list)
    ffn_fractions: list[float] = field(default_factory=list)
    head_fractions: list[float] = field(default_factory=list)
    ffn_kept: list[int] = field(default_factory=list)
    heads_kept: list[int] = field(default_factory=list)
    kv_heads_kept: list[int] = field(default_factory=list)
    hidden_kept: int = 0
    outlier_ratios: list[float] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    calibration_tokens: int = 0
    distill: DistillResult | None = None
    seconds: float = 0.0
    masks: MaskSet = field(default_factory=MaskSet)
    cost: ModelCost | None = None

    @property
    def uniform(self) -> bool:
        """Whether every kept block has the same shape (then a stock config describes the model)."""
        return len(set(zip(self.ffn_kept, self.heads_kept, self.kv_heads_kept))) <= 1

    @property
    def pruned_sparsity(self) -> float:
        """Fraction of the model's parameters removed (physically)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    # What search.llm_trial reads from a one-shot result (a structured result holds no layer masks).
    @property
    def block_sparsity(self) -> list[float]:
        """The per-block FFN fractions (the name the one-shot trials read)."""
        return self.ffn_fractions

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """Per kept block: its FFN channels, heads and KV heads."""
        return {str(i): {"ffn": f, "heads": h, "kv_heads": k}
                for i, (f, h, k) in enumerate(zip(self.ffn_kept, self.heads_kept, self.kv_heads_kept))}

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly dict of the result (no masks)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("masks", "distill", "cost")}
        out["distill"] = asdict(self.distill) if self.distill is not None else None
        out["cost"] = self.cost.as_dict() if self.cost is not None else None
        out["pruned_sparsity"] = self.pruned_sparsity
        out["uniform"] = self.uniform
        return out


def _block_fractions(settings: StructuredSettings, n_dense: int, ratios: list[float],
                     heads_total: int) -> tuple[list[float], list[float]]:
    """Per dense block: the FFN and head fractions removed."""
    ffn = [settings.ffn_sparsity] * n_dense
    heads = [settings.head_sparsity] * n_dense
    if settings.allocation == "owl" and ratios:
        if settings.ffn_sparsity:
            ffn = owl_block_sparsities(ratios, settings.ffn_sparsity, settings.owl_lambda, settings.max_fraction)
        if settings.head_sparsity:
            heads = owl_block_sparsities(ratios, settings.head_sparsity, settings.owl_lambda, settings.max_fraction)
    if settings.allocation == "per_layer":
        for key, values in (("ffn_fractions", settings.ffn_fractions), ("head_fractions", settings.head_fractions)):
            if values is not None and len(values) != n_dense:
                raise ValueError(f"{key}: {len(values)} fractions given, the model has {n_dense} blocks")
        ffn = list(settings.ffn_fractions) if settings.ffn_fractions is not None else ffn
        heads = list(settings.head_fractions) if settings.head_fractions is not None else heads
    ffn = [min(f, settings.max_fraction) for f in ffn]
    heads = [min(h, settings.max_fraction) for h in heads]
    return ffn, heads


def _check_against_model(settings: StructuredSettings, model: nn.Module, parts: list[BlockParts]) -> None:
    """The checks that need the model: heads vs GQA groups, depth vs block count."""
    n = len(parts)
    first = parts[0]
    if settings.keep_heads is not None:
        if settings.keep_heads > first.heads:
            raise ValueError(f"keep_heads: {settings.keep_heads} heads asked, the blocks have {first.heads}")
        if settings.keep_heads % first.group_size:
            raise ValueError(f"keep_heads: {settings.keep_heads} query heads is not a whole number of GQA groups "
                             f"({first.group_size} query heads share each of the {first.kv_heads} KV heads)")
    removed = int(round(settings.depth_sparsity * n))
    if settings.depth_sparsity and removed >= n:
        raise ValueError(f"depth_sparsity: {settings.depth_sparsity} of {n} blocks removes all {n}; keep at least one")
    config = getattr(model, "config", None)
    if removed and bool(getattr(config, "scale_attn_by_inverse_layer_idx", False)):
        raise ValueError("depth_sparsity: this GPT-2 scales attention by 1/layer_idx; renumbered blocks would "
                         "compute differently (set depth_sparsity=0)")


@torch.no_grad()
def prune_structured(model: nn.Module, batches: Iterable[dict[str, Tensor]] | None, settings: StructuredSettings,
                     device: torch.device | str | None = None,
                     progress: Callable[[str], None] | None = None) -> StructuredResult:
    """Prune ``model`` structurally, in place (see the module docstring); returns what was done.

    Args:
        model: a Hugging Face Llama-family decoder, GPT-2 or BERT-style encoder (any head).
        batches: calibration batches (dicts with ``input_ids``, ``attention_mask``); only
            uniform magnitude width pruning without compensation, depth or distillation runs
            without them.
        device: where each block is processed (None = the model's device); the model stays
            where it is, each block visits ``device`` in turn (distillation runs where the
            model is).
        progress: called with one line per step.

    Raises:
        ValueError: one line naming the setting: a model that is not a supported transformer,
            blocks that cannot be found, a head count that breaks a GQA group, a depth that
            removes every block, per-block fractions of the wrong length, no calibration data.
    """
    start = time.perf_counter()
    path, blocks, parts = _model_parts(model, settings.blocks_path)
    _check_against_model(settings, model, parts)
    batches = list(batches) if batches is not None else None
    if settings.needs_data and not batches:
        raise ValueError(f"importance: {settings.importance!r} (or depth, OWL, bias compensation, distillation) "
                         f"needs calibration batches")
    home = next(model.parameters()).device
    work = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    params_before = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model) if settings.distill_steps > 0 else None
    n_dense = len(blocks)
    result = StructuredResult(arch=parts[0].arch, params_before=params_before)
    say = progress or (lambda _line: None)

    def on_work(block: nn.Module) -> None:
        if work != home:
            block.to(work)

    def back_home(block: nn.Module) -> None:
        if work != home:
            block.to(home)

    # (2) the dense pass: block influence, hidden-channel scores, OWL outlier ratios
    need_hidden_stats = settings.hidden_sparsity > 0 and settings.importance != "magnitude"
    owl = settings.allocation == "owl"
    influence: list[float] = []
    hidden_score: Tensor | None = None
    if batches and (settings.depth_sparsity > 0 or need_hidden_stats or owl):
        inputs = capture_block_inputs(model, blocks, batches, storage=work)
        result.calibration_tokens = inputs.tokens
        for i, (block, bp) in enumerate(zip(blocks, parts)):
            on_work(block)
            readers = bp.hidden_readers if need_hidden_stats else []
            every = list({id(m): m for m in (*bp.qkv, bp.attn_out, *bp.ffn_in, bp.ffn_out)}.values()) if owl else []
            layers = list({id(m): m for m in (*readers, *every)}.values())
            stats, outs, cos_sum, tokens = _block_pass(block, layers, inputs, keep_outputs=i < n_dense - 1)
            influence.append(block_influence(cos_sum, tokens))
            if need_hidden_stats:
                part = sum(stats[id(m)].sq_mean.cpu() for m in readers)
                hidden_score = part if hidden_score is None else hidden_score + part
            if owl:
                scores = torch.cat([wanda_scores(_w(m), stats[id(m)].sq_mean).reshape(-1) for m in every])
                result.outlier_ratios.append(outlier_ratio(scores, settings.owl_m))
            back_home(block)
            inputs.hidden = outs
        del inputs
        say("dense pass: block influence " + " ".join(f"{b:.4f}" for b in influence))
    ffn_fr, head_fr = _block_fractions(settings, n_dense, result.outlier_ratios, parts[0].heads)

    # (3a) depth
    dropped: list[int] = []
    if settings.depth_sparsity > 0:
        count = int(round(settings.depth_sparsity * n_dense))
        order = sorted(range(n_dense), key=lambda i: (influence[i], i))
        dropped = sorted(order[:count])
        if dropped:
            blocks = _remove_blocks(model, path, blocks, dropped)
            parts = [p for i, p in enumerate(parts) if i not in set(dropped)]
            ffn_fr = [f for i, f in enumerate(ffn_fr) if i not in set(dropped)]
            head_fr = [h for i, h in enumerate(head_fr) if i not in set(dropped)]
        say(f"depth: removed blocks {dropped} of {n_dense} (lowest block influence)")
    result.removed_blocks = dropped
    result.block_influence = influence

    # (3b) hidden channels
    width = int(_w(parts[0].attn_out).shape[0])
    new_hidden: int | None = None
    if settings.hidden_sparsity > 0:
        multiple = settings.round_to
        heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 1) or 1)
        # transformers' configs check hidden_size % num_attention_heads (GPT-2 and BERT derive the
        # head size from it): the kept hidden size stays a multiple of the dense head count
        if heads > 1:
            multiple = multiple * heads // math.gcd(multiple, heads)
        keep_n = _keep_count(width, settings.hidden_sparsity, multiple)
        if hidden_score is None:  # magnitude: the embedding columns
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is None:
                raise ValueError("hidden_sparsity: the model has no input embeddings to score hidden channels by")
            hidden_score = emb.weight.detach().float().norm(dim=0).cpu()
        keep = _keep_top(hidden_score, keep_n)
        _cut_hidden(model, blocks, parts, keep)
        new_hidden = keep_n
        say(f"hidden: kept {keep_n} of {width} channels")

    # (4) width, block by block on the pruned predecessors' outputs
    if settings.prunes_width:
        data_stats = settings.importance != "magnitude" or settings.bias_compensation
        inputs = capture_block_inputs(model, blocks, batches, storage=work) if data_stats else None
        if inputs is not None:
            result.calibration_tokens = inputs.tokens
        for i, (block, bp) in enumerate(zip(blocks, parts)):
            t0 = time.perf_counter()
            on_work(block)
            stats: dict[int, _ChannelStats] = {}
            if inputs is not None:
                stats, _outs, _c, _t = _block_pass(block, [bp.attn_out, bp.ffn_out], inputs, keep_outputs=False)
            # heads: whole KV groups
            kv_total, g = bp.kv_heads, bp.group_size
            if settings.keep_heads is not None:
                kv_keep_n = settings.keep_heads // g
            else:
                kv_keep_n = _keep_count(kv_total, head_fr[i])
            if kv_keep_n < kv_total:
                ch = _channel_scores(settings.importance, bp.attn_out, stats.get(id(bp.attn_out)), bp.qkv[:1]
                                     if bp.arch != "gpt2" else [])
                head_scores = ch.reshape(bp.heads, bp.head_dim).sum(1)
                if settings.importance == "activation":
                    head_scores = head_scores.sqrt()
                group_scores = head_scores.reshape(kv_total, g).sum(1)
                kv_keep = _keep_top(group_scores, kv_keep_n)
                if settings.bias_compensation:
                    q_heads = (kv_keep[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
                    kept_ch = _head_channels(q_heads, bp.head_dim)
                    removed = torch.tensor(sorted(set(range(bp.attn_q_channels)) - set(kept_ch.tolist())),
                                           dtype=torch.long)
                    _compensate(bp.attn_out, removed, stats[id(bp.attn_out)].mean)
                _cut_heads(bp, kv_keep)
            # FFN channels
            total = bp.ffn_channels
            keep_n = _keep_count(total, ffn_fr[i], settings.round_to)
            if keep_n < total:
                scores = _channel_scores(settings.importance, bp.ffn_out, stats.get(id(bp.ffn_out)), bp.ffn_in)
                keep = _keep_top(scores, keep_n)
                if settings.bias_compensation:
                    mask = torch.ones(total, dtype=torch.bool)
                    mask[keep] = False
                    _compensate(bp.ffn_out, mask.nonzero().reshape(-1), stats[id(bp.ffn_out)].mean)
                _cut_ffn(bp, keep)
            if inputs is not None and i < len(blocks) - 1:
                inputs.hidden = run_block(block, inputs)
            back_home(block)
            say(f"block {i + 1}/{len(blocks)}: {bp.heads} heads ({bp.kv_heads} KV), {bp.ffn_channels} FFN channels "
                f"in {time.perf_counter() - t0:.2f}s")
        del inputs
    _harmonise_llama_biases(parts)
    _update_config(model, parts, new_hidden, n_dense, dropped)
    result.ffn_fractions = [float(f) for f in ffn_fr]
    result.head_fractions = [float(h) for h in head_fr]
    result.ffn_kept = [p.ffn_channels for p in parts]
    result.heads_kept = [p.heads for p in parts]
    result.kv_heads_kept = [p.kv_heads for p in parts]
    result.hidden_kept = int(_w(parts[0].attn_out).shape[0])
    model.train(was_training)
    if teacher is not None:
        assert batches is not None
        with torch.enable_grad():
            result.distill = distill_logits(model, teacher, batches, settings.distill_steps, settings.distill_lr,
                                            settings.distill_temperature, progress)
        model.train(was_training)
        del teacher
    result.params_after = sum(p.numel() for p in model.parameters())
    result.seconds = time.perf_counter() - start
    result.masks.metadata.update({"structured": result.summary(), "settings": asdict(settings), "blocks_path": path})
    return result
