"""Pruning masks: the one place where the mask format lives.

A :class:`MaskSet` maps parameter names (``model.named_parameters()`` keys) to masks.
Two granularities exist:

* ``"weight"``: the mask has the parameter's shape (unstructured pruning);
* ``"channel"``: the mask has one entry per output channel / neuron (dim 0 of the
  weight); a zero removes the whole filter or row, and the matching bias entry.

Masks are stored as ``bool`` tensors (True = kept). On disk a mask set is one
safetensors file: the masks as ``uint8`` tensors and a JSON document in the header
metadata (key ``"prunesearch"``) holding the method, its config, the model class,
parameter shapes, sparsity and FLOPs.

Sparsity convention (used everywhere in prunesearch): the fraction of zeroed entries
among the weights of Conv and Linear layers. Biases, norms and embeddings are reported
separately and never counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "GRANULARITIES",
    "FORMAT_VERSION",
    "MaskFileError",
    "MaskMismatchError",
    "MaskSet",
    "is_hf_conv1d",
    "prunable_modules",
    "prunable_parameters",
    "sparsity_report",
]

GRANULARITIES = ("weight", "channel")
FORMAT_VERSION = 1
_METADATA_KEY = "prunesearch"
_PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MaskFileError(ValueError):
    """A masks file is truncated, corrupt, or was not written by prunesearch."""


class MaskMismatchError(ValueError):
    """A mask set does not fit a model (missing parameter names or wrong shapes)."""


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight stored
    ``[in, out]``); by duck type, so prunelib does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), Tensor)


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear modules by qualified name: the layers whose weights count in sparsity
    (Hugging Face's ``Conv1D``, a linear layer, included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _PRUNABLE_TYPES) or is_hf_conv1d(m)}


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of Conv and Linear layers, keyed by parameter name (``"features.0.weight"``)."""
    out: dict[str, nn.Parameter] = {}
    for name, module in prunable_modules(model).items():
        out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def _bias_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


@dataclass
class MaskSet:
    """Named masks over a model's parameters (True = kept).

    Attributes:
        masks: parameter name -> bool mask; the parameter's shape for ``"weight"``
            granularity, ``(out_channels,)`` for ``"channel"``.
        granularity: parameter name -> ``"weight"`` or ``"channel"``.
        metadata: free-form JSON-serialisable facts (method, config, FLOPs...).
    """

    masks: dict[str, Tensor] = field(default_factory=dict)
    granularity: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def ones_like(cls, model: nn.Module, names: Iterable[str] | None = None,
                  granularity: str = "weight") -> MaskSet:
        """A mask set that keeps everything, over ``names`` (default: all Conv/Linear weights)."""
        params = dict(model.named_parameters())
        names = list(names) if names is not None else list(prunable_parameters(model))
        out = cls()
        for n in names:
            p = params[n]
            shape = p.shape if granularity == "weight" else p.shape[:1]
            out.set(n, torch.ones(shape, dtype=torch.bool, device=p.device), granularity)
        return out

    def set(self, name: str, mask: Tensor, granularity: str = "weight") -> None:
        """Store ``mask`` (any dtype; nonzero = kept) for parameter ``name``."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.masks[name] = mask.detach().to(torch.bool)
        self.granularity[name] = granularity

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def names(self) -> list[str]:
        """Parameter names that carry a mask, in insertion order."""
        return list(self.masks)

    def clone(self) -> MaskSet:
        """A deep copy (masks cloned, metadata copied through JSON)."""
        return MaskSet({k: v.clone() for k, v in self.masks.items()}, dict(self.granularity),
                       json.loads(json.dumps(self.metadata, default=str)))

    def to(self, device: torch.device | str) -> MaskSet:
        """Move every mask to ``device`` in place; returns self."""
        for k, v in self.masks.items():
            self.masks[k] = v.to(device)
        return self

    def expanded(self, name: str, like: Tensor) -> Tensor:
        """The mask of ``name`` broadcast to the shape of ``like`` (the parameter)."""
        mask = self.masks[name]
        if self.granularity[name] == "channel":
            mask = mask.reshape((-1,) + (1,) * (like.dim() - 1)).expand_as(like)
        return mask.to(like.device)

    def intersect(self, other: MaskSet) -> MaskSet:
        """Entries kept by both mask sets (names present in only one are kept as they are)."""
        out = self.clone()
        for n, m in other.masks.items():
            if n in out.masks and out.granularity[n] == other.granularity[n]:
                out.masks[n] = out.masks[n] & m.to(out.masks[n].device)
            else:
                out.set(n, m.clone(), other.granularity[n])
        return out

    # ------------------------------------------------------------------ apply
    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`MaskMismatchError` naming the first parameter that is missing or misshapen."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                close = [p for p in params if p.split(".")[-1] == name.split(".")[-1]][:3]
                raise MaskMismatchError(
                    f"mask for parameter {name!r} has no match in {type(model).__name__}; "
                    f"the model has e.g. {close or list(params)[:3]}")
            expect = params[name].shape if self.granularity[name] == "weight" else params[name].shape[:1]
            if tuple(mask.shape) != tuple(expect):
                raise MaskMismatchError(
                    f"mask for parameter {name!r} has shape {tuple(mask.shape)} "
                    f"({self.granularity[name]} granularity) but the model needs {tuple(expect)}")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned entries of ``model`` in place (and the biases of pruned channels)."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            p = params[name]
            p.mul_(self.expanded(name, p).to(p.dtype))
            if self.granularity[name] == "channel":
                bias = params.get(_bias_name(name))
                if bias is not None:
                    bias.mul_(mask.to(device=bias.device, dtype=bias.dtype))

    # Enforcing after an optimizer step is the same operation: named for the call sites.
    enforce = apply

    # ---------------------------------------------------------------- report
    def kept_fraction(self, name: str) -> float:
        """Fraction (0..1) of the entries of ``name``'s mask that are kept."""
        m = self.masks[name]
        return float(m.float().mean()) if m.numel() else 1.0

    def sparsity(self, model: nn.Module) -> float:
        """Global weight sparsity (fraction) the masks give over the model's Conv/Linear weights."""
        return sparsity_report(model, self)["global"]["sparsity"]

    def layer_sparsity(self, model: nn.Module) -> dict[str, float]:
        """Per-layer weight sparsity (fraction) under these masks, by parameter name."""
        return {k: v["sparsity"] for k, v in sparsity_report(model, self)["layers"].items()}

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, model: nn.Module | None = None,
             **metadata: Any) -> Path:
        """Write the masks as a safetensors file with JSON metadata; returns the path.

        ``model`` (optional) adds its class, parameter shapes and sparsity to the metadata;
        keyword arguments (``method=``, ``config=``, ``flops=``...) are stored as given.
        The file is written to a temporary name, fsynced, loaded back and renamed
        (:func:`prunelib.atomic.atomic_save`), so a crash or a full disk leaves no half file.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"format_version": FORMAT_VERSION, **self.metadata, **metadata}
        meta["granularity"] = dict(self.granularity)
        if model is not None:
            params = dict(model.named_parameters())
            meta["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
            meta["param_shapes"] = {n: list(params[n].shape) for n in self.masks if n in params}
            report = sparsity_report(model, self)
            meta["sparsity"] = report["global"]["sparsity"]
            meta["layer_sparsity"] = {k: v["sparsity"] for k, v in report["layers"].items()}
        tensors = {n: m.detach().to("cpu", torch.uint8).contiguous() for n, m in self.masks.items()}
        from prunelib.atomic import atomic_save

        # Read back before the rename: a file the disk truncated never takes the name.
        return atomic_save(path, lambda tmp: save_file(tensors, str(tmp),
                                                       metadata={_METADATA_KEY: json.dumps(meta, default=str)}),
                           lambda tmp: MaskSet.load(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> MaskSet:
        """Read a masks file; with ``model``, also check names and shapes against it.

        Raises :class:`MaskFileError` for a missing, truncated or foreign file and
        :class:`MaskMismatchError` when the masks do not fit ``model``.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MaskFileError(f"masks file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for bad bytes
            raise MaskFileError(
                f"{str(path)!r} is not a readable safetensors masks file "
                f"(truncated or corrupt?): {exc}") from exc
        if _METADATA_KEY not in header:
            raise MaskFileError(
                f"{str(path)!r} is a safetensors file but not a prunesearch masks file "
                f"(no {_METADATA_KEY!r} metadata)")
        try:
            meta = json.loads(header[_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise MaskFileError(f"{str(path)!r} has corrupt prunesearch metadata: {exc}") from exc
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise MaskFileError(f"{str(path)!r} uses masks format {meta['format_version']}, "
                                f"newer than this prunelib ({FORMAT_VERSION}); upgrade prunesearch")
        granularity = meta.pop("granularity", {})
        out = cls()
        for name, t in tensors.items():
            out.set(name, t.to(torch.bool), granularity.get(name, "weight"))
        out.metadata = meta
        if model is not None:
            out.check_compatible(model)
        return out

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The JSON metadata of a masks file, without loading the tensors."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as exc:
            raise MaskFileError(f"{str(path)!r} is not a readable masks file: {exc}") from exc
        if _METADATA_KEY not in header:
            raise MaskFileError(f"{str(path)!r} is not a prunesearch masks file")
        return json.loads(header[_METADATA_KEY])


def sparsity_report(model: nn.Module, masks: MaskSet | None = None) -> dict[str, Any]:
    """Weight sparsity of a model's Conv/Linear weights, per layer and global.

    With ``masks`` the sparsity is what the masks would give (their zeros plus weights that
    are already exactly zero); without, it is read from the weights' zeros.

    Returns ``{"layers": {name: {"numel", "zeros", "sparsity"}}, "global": {...},
    "other_params": count of parameters outside Conv/Linear weights (not counted)}``.
    """
    layers: dict[str, dict[str, float]] = {}
    total = zeros = 0
    prunable = prunable_parameters(model)
    for name, p in prunable.items():
        alive = p.detach() != 0
        if masks is not None and name in masks:
            alive = alive & masks.expanded(name, p)
        n, z = p.numel(), int(p.numel() - int(alive.sum()))
        layers[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
        total += n
        zeros += z
    other = sum(p.numel() for n, p in model.named_parameters() if n not in prunable)
    return {"layers": layers,
            "global": {"numel": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0},
            "other_params": other}


def masks_from_mapping(masks: Mapping[str, Tensor], granularity: str = "weight") -> MaskSet:
    """A :class:`MaskSet` from a plain ``{name: tensor}`` mapping (nonzero = kept)."""
    out = MaskSet()
    for n, m in masks.items():
        out.set(n, m, granularity)
    return out
