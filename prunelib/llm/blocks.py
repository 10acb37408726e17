"""Where a transformer's blocks and their linear layers are, and how calibration flows through them.

* :func:`find_blocks`: the ``nn.ModuleList`` of transformer blocks (Llama/Mistral/Qwen
  ``model.layers``, OPT ``model.decoder.layers``, GPT-2 ``transformer.h``, GPT-NeoX
  ``gpt_neox.layers``, BERT/RoBERTa ``*.encoder.layer``, DistilBERT ``*.transformer.layer``;
  otherwise the longest list of identical modules that hold linear layers).
* :func:`block_linears`: the linear layers inside one block, each seen as ``W [out, in]``;
  Hugging Face's ``Conv1D`` (GPT-2) stores ``[in, out]`` and is transposed in the view.
* :func:`capture_block_inputs`: the inputs of the first block for each calibration batch (the
  model runs up to the first block and stops), with the extra arguments the model passes to
  its blocks (attention masks, rotary embeddings) and the token mask of each batch.
* :func:`run_block`: one block over the stored inputs, moved batch by batch to the device the
  block is on; its outputs are the next block's inputs (sequential calibration).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunelib.masks import is_hf_conv1d

__all__ = ["BlockInputs", "LinearView", "block_linears", "capture_block_inputs", "find_blocks", "move_to", "run_block"]

_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers",
                "bert.encoder.layer", "roberta.encoder.layer", "deberta.encoder.layer", "electra.encoder.layer",
                "encoder.layer", "distilbert.transformer.layer", "transformer.layer", "layers")


@dataclass
class LinearView:
    """One linear layer of a block seen as ``W [out, in]``.

    Attributes:
        name: module name relative to the block (``"self_attn.q_proj"``).
        param_name: the weight's full parameter name in the model (``"model.layers.0.self_attn.q_proj.weight"``).
        module: the layer.
        transposed: True for ``Conv1D`` (weight stored ``[in, out]``).
    """

    name: str
    param_name: str
    module: nn.Module
    transposed: bool

    @property
    def weight(self) -> Tensor:
        """The weight as ``[out, in]`` (a view; transposed for ``Conv1D``)."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        """Inputs (columns of the ``[out, in]`` view)."""
        return int(self.weight.shape[1])

    @torch.no_grad()
    def set_weight(self, w: Tensor) -> None:
        """Write an ``[out, in]`` weight back in the layer's own layout and dtype."""
        target = self.module.weight.data
        self.module.weight.data.copy_((w.t() if self.transposed else w).to(dtype=target.dtype, device=target.device))

    def mask_for_param(self, keep: Tensor) -> Tensor:
        """An ``[out, in]`` keep mask in the parameter's own layout."""
        return keep.t().contiguous() if self.transposed else keep


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's transformer blocks.

    Raises:
        ValueError: ``path`` does not name a ModuleList, or no list of blocks is found.
    """
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"blocks_path: {type(model).__name__} has no module {path!r}") from exc
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"blocks_path: {path!r} is a {type(found).__name__}, not a ModuleList of blocks")
        return path, found
    for candidate in _KNOWN_PATHS:
        try:
            found = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) and _linears(found[0]):
            return candidate, found
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1 \
                and _linears(module[0]) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks with linear layers; "
                         f"name it with blocks_path=...")
    return best


def _linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) or is_hf_conv1d(m)]


def block_linears(block: nn.Module, prefix: str) -> list[LinearView]:
    """The linear layers of ``block`` (registration order); ``prefix`` = the block's model path."""
    return [LinearView(n, f"{prefix}.{n}.weight", m, is_hf_conv1d(m)) for n, m in _linears(block)]


def move_to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """The calibration inputs of one block, per batch.

    Attributes:
        hidden: ``[batch, tokens, width]`` hidden states per batch (kept on ``storage``).
        args / kwargs: the other arguments the model passed to its first block, per batch.
        token_masks: ``[batch, tokens]`` bool of the real (non-padding) tokens per batch.
    """

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    token_masks: list[Tensor] = field(default_factory=list)

    def clone(self) -> "BlockInputs":
        """A copy with the hidden states cloned (the extra arguments are shared, read-only)."""
        return BlockInputs([h.clone() for h in self.hidden], list(self.args), list(self.kwargs), list(self.token_masks))

    @property
    def tokens(self) -> int:
        """Real tokens over all batches."""
        return int(sum(int(m.sum()) for m in self.token_masks))


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model need not run."""


_CACHE_KEYS = ("past_key_values", "past_key_value", "cache", "layer_past")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[dict[str, Tensor]],
                         storage: torch.device | str | None = None) -> BlockInputs:
    """Run the model up to its first block on each batch and keep what the block receives.

    The model runs where it is (the embeddings are cheap); ``storage`` is where the hidden
    states are kept (default: the model's device). Caches are switched off.
    """
    device = next(model.parameters()).device
    storage = torch.device(storage) if storage is not None else device
    out = BlockInputs()

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
        if "use_cache" in kw:
            kw["use_cache"] = False
        out.hidden.append(hidden.detach().to(storage))
        out.args.append(move_to(rest, storage))
        out.kwargs.append(move_to(kw, storage))
        raise _Stop

    config = getattr(model, "config", None)
    saved_cache = getattr(config, "use_cache", None)
    if config is not None and saved_cache is not None:
        config.use_cache = False
    was_training = model.training
    model.eval()
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            mask = inputs.get("attention_mask")
            try:
                model(**inputs)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model never called its first block; is blocks_path right?")
            ids = inputs["input_ids"]
            out.token_masks.append((mask if mask is not None else torch.ones_like(ids)).bool().to(storage))
    finally:
        handle.remove()
        model.train(was_training)
        if config is not None and saved_cache is not None:
            config.use_cache = saved_cache
    if not out.hidden:
        raise ValueError("no calibration batch was given")
    return out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, store_outputs: bool = True) -> list[Tensor]:
    """Run ``block`` on every stored batch (moved to the block's device); returns the outputs.

    Outputs are kept where the inputs are stored. With ``store_outputs=False`` the block still
    runs (forward hooks collect statistics) but nothing is kept.
    """
    device = next(block.parameters()).device
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        result = block(hidden.to(device), *move_to(args, device), **move_to(kwargs, device))
        result = result[0] if isinstance(result, (tuple, list)) else result
        if store_outputs:
            outputs.append(result.detach().to(hidden.device))
    return outputs
