"""Save a structurally pruned transformer as a Hugging Face checkpoint directory, and as ONNX.

:func:`save_structured` writes one of two formats, chosen by whether the model's config alone
describes every weight shape (checked by building the stock class from the config on the meta
device and comparing every parameter's shape):

* ``"stock"``: every layer has the shape the config implies (e.g. a Llama with uniform FFN
  width and KV groups: ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``
  and an explicit ``head_dim``; GPT-2 or BERT with a uniform FFN width and fewer blocks). The
  directory is a plain checkpoint::

      AutoModelForCausalLM.from_pretrained(DIR)      # or AutoModelForSequenceClassification, ...

* ``"remote_code"``: shapes the stock config cannot say (per-layer FFN widths or head counts; a
  GPT-2 or BERT with fewer heads, whose stock attention derives the head size from
  ``hidden_size / num_heads``; a pruned hidden size in GPT-2/BERT). The config keeps the stock
  ``model_type`` and gains two keys: ``prunelib_structured`` (per module: ``[out, in, bias,
  "linear"|"conv1d"]`` of every projection whose shape differs from the stock one, and the
  attention attributes that differ: ``num_heads``, ``split_size``, ``head_dim``,
  ``attention_head_size``, ``all_head_size``, ``num_attention_heads``, ``scaling``) and
  ``auto_map``, pointing the Auto class at ``prunelib_structured.Pruned<Class>`` in the file
  ``prunelib_structured.py`` saved beside the weights. That file imports only ``torch`` and
  ``transformers``: its class subclasses the stock one, lets it build from the config, then
  replaces the listed projections by ones of the stored shapes before the weights load. It
  loads in a fresh process without prunesearch::

      AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

  (``trust_remote_code`` runs the short loader file in the directory; read it first, as with any
  remote code.)

Either way the directory is written atomically (:func:`prunelib.models.hf.save_hf_model`: a
temporary directory, fsynced, weights opened back, then renamed) with the tokenizer if given.

:func:`export_onnx_structured` writes ``logits = f(input_ids, attention_mask)`` with dynamic
batch and sequence axes through ``torch.onnx.export`` (the dynamo exporter, which needs
``onnxscript``, as :func:`prunelib.surgery.export_onnx`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelib.masks import is_hf_conv1d

__all__ = ["ATTENTION_ATTRIBUTES", "REMOTE_CODE_FILE", "StructuredExport", "export_onnx_structured",
           "save_structured", "structured_spec"]

#: The attention attributes the stock classes compute from the config and a pruned block changes.
ATTENTION_ATTRIBUTES = ("num_heads", "split_size", "head_dim", "attention_head_size", "all_head_size",
                        "num_attention_heads", "scaling", "num_key_value_groups")
REMOTE_CODE_FILE = "prunelib_structured.py"
_AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
               "masked_lm": "AutoModelForMaskedLM", "base": "AutoModel"}

_LOADER = '''"""Loads a checkpoint pruned by prunelib's structured pruning whose layers differ in shape
from what the stock config implies (written by prunelib.llm.structured_export; imports only
torch and transformers).

``config.prunelib_structured["modules"]``: module name -> [out_features, in_features, has_bias,
"linear" | "conv1d"]; ``["attributes"]``: module name -> {attribute: value}. The stock class
builds the model from the config, then each listed projection is replaced by an empty one of
the stored shape (on the device and dtype the stock one had) and the attention attributes are
set; ``from_pretrained`` then loads the weights into them.
"""

import torch
from torch import nn
from transformers import {base} as _Base
from transformers.pytorch_utils import Conv1D


def _resize(model, spec):
    for name, (out_f, in_f, has_bias, kind) in spec["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        like = old.weight
        if kind == "conv1d":
            new = Conv1D(int(out_f), int(in_f)).to(device=like.device, dtype=like.dtype)
        else:
            new = nn.Linear(int(in_f), int(out_f), bias=bool(has_bias), device=like.device, dtype=like.dtype)
        setattr(parent, child, new)
    for name, attrs in spec["attributes"].items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)


class Pruned{base}(_Base):
    """{base} with per-module shapes from ``config.prunelib_structured``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _resize(self, config.prunelib_structured)
'''


@dataclass(frozen=True)
class StructuredExport:
    """Where and how :func:`save_structured` saved a model.

    Attributes:
        path: the checkpoint directory.
        format: ``"stock"`` (plain ``from_pretrained``) or ``"remote_code"`` (needs
            ``trust_remote_code=True``; the loader file is in the directory).
        auto_class: the ``transformers`` Auto class that loads it.
        resized_modules: how many projections the loader resizes (0 for ``"stock"``).
    """

    path: Path
    format: str
    auto_class: str
    resized_modules: int

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``from_pretrained`` needs."""
        return {"trust_remote_code": True} if self.format == "remote_code" else {}


def _stock_model(model: nn.Module) -> nn.Module:
    """The stock class built from the model's (new) config, on the meta device (no memory)."""
    config = copy.deepcopy(model.config)
    for key in ("prunelib_structured", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):
        return type(model)(config)


def _attr_value(value: Any) -> Any:
    return float(value) if isinstance(value, float) else int(value)


def structured_spec(model: nn.Module) -> dict[str, Any]:
    """What differs from the stock model the config builds: ``{"modules": {name: [out, in, bias,
    kind]}, "attributes": {name: {attr: value}}}`` (empty dicts when the config says it all).

    Raises:
        ValueError: a parameter of the model that the stock class lacks, or one it has that the
            model lacks, outside the resizable projections (the config is wrong).
    """
    stock = _stock_model(model)
    stock_modules = dict(stock.named_modules())
    modules: dict[str, list[Any]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        ref = stock_modules.get(name)
        if ref is None:
            continue
        if isinstance(m, nn.Linear) or is_hf_conv1d(m):
            conv = is_hf_conv1d(m)
            w = m.weight
            out_f, in_f = (w.shape[1], w.shape[0]) if conv else (w.shape[0], w.shape[1])
            has_bias = getattr(m, "bias", None) is not None
            if tuple(ref.weight.shape) != tuple(w.shape) or (getattr(ref, "bias", None) is not None) != has_bias:
                modules[name] = [int(out_f), int(in_f), bool(has_bias), "conv1d" if conv else "linear"]
        changed = {a: _attr_value(getattr(m, a)) for a in ATTENTION_ATTRIBUTES
                   if isinstance(getattr(m, a, None), (int, float)) and not isinstance(getattr(m, a), bool)
                   and getattr(ref, a, None) != getattr(m, a)}
        if changed:
            attributes[name] = changed
    ours = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    theirs = {n: tuple(p.shape) for n, p in stock.state_dict().items()}
    resized = {f"{n}.{k}" for n in modules for k in ("weight", "bias")}
    for name in sorted(set(ours) ^ set(theirs)):
        if name not in resized:
            raise ValueError(f"model: parameter {name!r} is in {'the model' if name in ours else 'the config'} only; "
                             f"the pruned model's config does not describe it")
    for name in sorted(set(ours) & set(theirs)):
        if ours[name] != theirs[name] and name not in resized:
            raise ValueError(f"model: {name} has shape {ours[name]}, its config implies {theirs[name]}")
    return {"modules": modules, "attributes": attributes}


def save_structured(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> StructuredExport:
    """Save a (structurally pruned) Hugging Face model so ``transformers`` loads it back (see the
    module docstring for the two formats); written atomically. The model is not changed."""
    from prunelib.models.hf import _transformers, hf_task_of, save_hf_model

    _transformers()  # quiet logging and no progress bars, as every prunelib save
    spec = structured_spec(model)
    auto_class = _AUTO_CLASS.get(hf_task_of(model), "AutoModel")
    if not spec["modules"] and not spec["attributes"]:
        path = save_hf_model(model, tokenizer, out_dir)
        return StructuredExport(Path(path), "stock", auto_class, 0)
    base = type(model).__name__
    config = model.config
    config.prunelib_structured = spec
    config.auto_map = {auto_class: f"{REMOTE_CODE_FILE[:-3]}.Pruned{base}"}
    try:
        from prunelib.atomic import atomic_save_dir
        from prunelib.artifact import check_safetensors

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            (tmp / REMOTE_CODE_FILE).write_text(_LOADER.replace("{base}", base))
            saved = json.loads((tmp / "config.json").read_text())
            if saved.get("prunelib_structured") != json.loads(json.dumps(spec)):
                raise ValueError("save_structured: config.json lost the per-module shapes")

        def check(tmp: Path) -> None:
            for weights in tmp.glob("*.safetensors"):
                check_safetensors(weights)

        path = atomic_save_dir(out_dir, write, check)
    finally:
        del config.prunelib_structured
        del config.auto_map
    return StructuredExport(Path(path), "remote_code", auto_class, len(spec["modules"]))


class _Logits(nn.Module):
    """``model(input_ids, attention_mask).logits`` (no cache): the exported graph's one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if getattr(getattr(self.model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def export_onnx_structured(model: nn.Module, path: str | os.PathLike, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> Path:
    """Export ``logits = model(input_ids, attention_mask)`` to ONNX (dynamic batch and sequence).

    Args:
        input_ids / attention_mask: an example batch ``[batch, tokens]`` (batch >= 2 and tokens
            >= 2 so the exporter does not specialise the dynamic axes on 1).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    was = model.training
    model.eval()
    wrapper = _Logits(model).eval()
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=2)
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, (input_ids, mask), str(path), dynamo=True,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 1: tokens}), verbose=False)
    finally:
        model.train(was)
    return path
