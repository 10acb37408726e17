"""Compact storage of a KEN model: only the kept fine-tuned values, relative to the pretrained one.

A KEN model equals its pretrained model except where a mask keeps a fine-tuned value, so the
task-specific part is stored as one safetensors file:

* per selected tensor, the positions of the kept entries, as a bit-packed mask (1 bit per
  entry, ``uint8``) or as ``int32``/``int64`` flat indices, whichever is smaller (indices win
  below a kept fraction of about 1/32), plus the kept values in the tensor's own dtype;
* tensors KEN did not touch (the head under ``layers="no_head"``, buffers) stored whole;
* JSON metadata (key ``"prunesearch_ken"``): format version, per-tensor encoding, shape and
  dtype, and a fingerprint (SHA-256) of the pretrained tensors it was made against, so a file
  applied to the wrong base model fails loudly instead of producing a silently wrong model.

:func:`load_ken_delta` rebuilds the KEN model's state dict from the pretrained weights and the
file exactly (bit for bit). Sizes are in bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["KEN_FORMAT_VERSION", "KenDeltaError", "KenDeltaReport", "load_ken_delta", "read_ken_metadata",
           "save_ken_delta", "state_dict_bytes"]

KEN_FORMAT_VERSION = 1
_METADATA_KEY = "prunesearch_ken"
_BITS_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class KenDeltaError(ValueError):
    """A KEN delta file is unreadable, or does not fit the pretrained model it is applied to."""


@dataclass(frozen=True)
class KenDeltaReport:
    """Sizes of a KEN delta file against the full fine-tuned state dict.

    Attributes:
        path: the file written.
        file_bytes: size of the delta file on disk (header included).
        finetuned_bytes: bytes of every tensor of the full fine-tuned state dict (what a
            safetensors file of the fine-tuned model holds, header excluded).
        ratio: ``file_bytes / finetuned_bytes`` (fraction; below 1 is a saving).
        kept_values: fine-tuned values stored for the masked tensors.
        whole_tensors: tensors stored whole (not processed by KEN).
    """

    path: Path
    file_bytes: int
    finetuned_bytes: int
    ratio: float
    kept_values: int
    whole_tensors: int

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-friendly values (metric names used by search)."""
        return {"ken_file_bytes": self.file_bytes, "finetuned_bytes": self.finetuned_bytes,
                "ken_file_ratio": self.ratio, "ken_kept_values": self.kept_values,
                "ken_whole_tensors": self.whole_tensors}


def _state(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {n: t.detach() for n, t in model_or_state.state_dict().items()}
    return {n: t.detach() for n, t in model_or_state.items()}


def state_dict_bytes(model_or_state: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of all tensors of a state dict (numel times element size)."""
    return sum(t.numel() * t.element_size() for t in _state(model_or_state).values())


def _fingerprint(state: Mapping[str, Tensor], names: list[str]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``state[names]``."""
    h = hashlib.sha256()
    for n in sorted(names):
        t = state[n].detach().to("cpu").contiguous()
        h.update(f"{n}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _pack_bits(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    bits = (packed[:, None] & _BITS_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def save_ken_delta(path: str | os.PathLike, pretrained: nn.Module | Mapping[str, Tensor],
                   ken_model: nn.Module | Mapping[str, Tensor], masks: Mapping[str, Tensor],
                   finetuned: nn.Module | Mapping[str, Tensor] | None = None,
                   **metadata: Any) -> KenDeltaReport:
    """Write the KEN delta of ``ken_model`` against ``pretrained`` to ``path``.

    Args:
        pretrained: the base model (or its state dict) the delta is relative to.
        ken_model: the KEN model (or state dict): fine-tuned where ``masks`` is True,
            pretrained elsewhere; tensors without a mask are stored whole.
        masks: parameter name -> bool keep mask (True = fine-tuned value kept).
        finetuned: the full fine-tuned model, only to report its size (default: the size of
            ``ken_model``'s state dict, which has the same shapes).
        **metadata: extra JSON-serialisable facts stored in the header (method config...).

    Raises:
        KenDeltaError: a mask's name or shape does not match the models.
    """
    from safetensors.torch import save_file

    pre, ken = _state(pretrained), _state(ken_model)
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    kept_values = 0
    for name, t in ken.items():
        t = t.to("cpu").contiguous()
        if name in masks:
            mask = masks[name].to("cpu", torch.bool)
            if name not in pre or pre[name].shape != t.shape or mask.shape != t.shape:
                raise KenDeltaError(f"mask {name!r} ({tuple(mask.shape)}) does not fit the models "
                                    f"(KEN {tuple(t.shape)}, pretrained "
                                    f"{tuple(pre[name].shape) if name in pre else 'missing'})")
            flat_mask = mask.reshape(-1)
            kept = int(flat_mask.sum())
            index_dtype = torch.int32 if t.numel() < 2**31 else torch.int64
            index_bytes = kept * (4 if index_dtype == torch.int32 else 8)
            bits_bytes = (t.numel() + 7) // 8
            if index_bytes < bits_bytes:
                tensors[f"{name}::indices"] = flat_mask.nonzero().squeeze(1).to(index_dtype)
                encoding = "indices"
            else:
                tensors[f"{name}::bits"] = _pack_bits(flat_mask)
                encoding = "bits"
            tensors[f"{name}::values"] = t.reshape(-1)[flat_mask].contiguous()
            kept_values += kept
            entries[name] = {"encoding": encoding, "shape": list(t.shape), "dtype": str(t.dtype), "kept": kept}
        else:
            tensors[f"{name}::whole"] = t.clone()  # a copy: tied weights share storage, which safetensors refuses
            entries[name] = {"encoding": "whole", "shape": list(t.shape), "dtype": str(t.dtype)}
    unknown = [n for n in masks if n not in ken]
    if unknown:
        raise KenDeltaError(f"masks name tensors the KEN model does not have: {unknown[:3]}")
    meta = {"format_version": KEN_FORMAT_VERSION, "entries": entries,
            "pretrained_fingerprint": _fingerprint(pre, list(masks)), **metadata}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(meta, default=str)})
    os.replace(tmp, path)
    full = state_dict_bytes(finetuned if finetuned is not None else ken)
    size = path.stat().st_size
    return KenDeltaReport(path, size, full, size / full if full else 0.0, kept_values,
                          sum(1 for e in entries.values() if e["encoding"] == "whole"))


def load_ken_delta(path: str | os.PathLike, pretrained: nn.Module | Mapping[str, Tensor],
                   verify: bool = True) -> dict[str, Tensor]:
    """Rebuild the KEN model's state dict from ``pretrained`` and the delta file (exactly).

    Returns a new state dict (on the pretrained tensors' devices); load it with
    ``model.load_state_dict(state)``. ``verify`` checks the pretrained fingerprint.

    Raises:
        KenDeltaError: unreadable file, newer format, or a pretrained model that is not the
            one the file was made against.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for bad bytes
        raise KenDeltaError(f"{str(path)!r} is not a readable KEN delta file: {exc}") from exc
    if _METADATA_KEY not in header:
        raise KenDeltaError(f"{str(path)!r} is not a prunesearch KEN delta file (no {_METADATA_KEY!r} metadata)")
    meta = json.loads(header[_METADATA_KEY])
    if meta.get("format_version", 0) > KEN_FORMAT_VERSION:
        raise KenDeltaError(f"{str(path)!r} uses KEN format {meta['format_version']}, newer than this prunelib")
    pre = _state(pretrained)
    masked = [n for n, e in meta["entries"].items() if e["encoding"] != "whole"]
    missing = [n for n in masked if n not in pre]
    if missing:
        raise KenDeltaError(f"the pretrained model lacks tensors the delta needs: {missing[:3]}")
    if verify and _fingerprint(pre, masked) != meta["pretrained_fingerprint"]:
        raise KenDeltaError(f"{str(path)!r} was made against a different pretrained model "
                            f"(fingerprint mismatch); pass the same base checkpoint")
    out: dict[str, Tensor] = {}
    for name, entry in meta["entries"].items():
        if entry["encoding"] == "whole":
            out[name] = stored[f"{name}::whole"].to(pre[name].device if name in pre else "cpu")
            continue
        base = pre[name]
        flat = base.detach().to("cpu").reshape(-1).clone()
        if list(base.shape) != entry["shape"]:
            raise KenDeltaError(f"{name!r}: the delta has shape {entry['shape']}, the pretrained "
                                f"model {list(base.shape)}")
        if entry["encoding"] == "bits":
            keep = _unpack_bits(stored[f"{name}::bits"], flat.numel())
            flat[keep] = stored[f"{name}::values"].to(flat.dtype)
        else:
            flat[stored[f"{name}::indices"].long()] = stored[f"{name}::values"].to(flat.dtype)
        out[name] = flat.reshape(base.shape).to(base.device)
    return out


def read_ken_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a KEN delta file, without loading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if _METADATA_KEY not in header:
        raise KenDeltaError(f"{str(path)!r} is not a prunesearch KEN delta file")
    return json.loads(header[_METADATA_KEY])
