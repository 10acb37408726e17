"""Cost of a pruned text model: FLOPs per sequence and the bytes of a sparse export.

* :func:`text_model_cost`: :func:`prunelib.flops.model_cost` on one sequence of the data's
  ``max_length`` tokens (FLOPs per sequence). Attention runs in its eager (matmul) form while
  counting, so the attention score and value products are counted as well as the linear
  layers; effective FLOPs scale each linear layer by its weight density (zeros skipped).
* :func:`sparse_storage_bytes`: bytes of the parameters when each pruned weight is stored as
  its kept values plus their positions: for an N:M pattern ``ceil(log2 M)`` bits per kept value
  (the compressed N:M format), otherwise a bit mask or ``int32`` flat indices, whichever is
  smaller; other parameters stored dense. Tied parameters are counted once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from prunelib.flops import ModelCost, model_cost
from prunelib.llm.sparsity import NMPattern
from prunelib.masks import MaskSet

__all__ = ["sparse_storage_bytes", "text_model_cost"]


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face models count attention with FlopCounterMode only in their eager form."""
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switched = False
    if callable(setter) and before not in (None, "eager"):
        try:
            setter("eager")
            switched = True
        except (ValueError, ImportError, AttributeError):  # a model without an eager path: count as it is
            switched = False
    try:
        yield
    finally:
        if switched:
            setter(before)


def text_model_cost(model: nn.Module, example_input: dict[str, Any], masks: MaskSet | None = None,
                    physical_model: nn.Module | None = None) -> ModelCost:
    """Dense/effective/physical params and FLOPs per sequence of ``example_input`` (one sequence).

    ``physical_model``: the model as deployed when it was made physically smaller (structured
    pruning passes the pruned model itself): the deployed figures are then its physical ones.
    """
    with _eager_attention(model):
        return model_cost(model, None, masks, physical_model=physical_model, example_input=example_input)


def sparse_storage_bytes(model: nn.Module, masks: MaskSet, pattern: NMPattern | None = None) -> int:
    """Bytes of ``model``'s parameters with the masked weights stored sparse (see module doc)."""
    total = 0
    index_bits = math.ceil(math.log2(pattern.m)) if pattern is not None else 0
    for name, p in model.named_parameters():  # named_parameters lists a tied tensor once
        size = p.element_size()
        if name in masks:
            keep = masks.expanded(name, p)
            kept = int(keep.sum())
            if pattern is not None:
                total += kept * size + math.ceil(kept * index_bits / 8)
            else:
                total += kept * size + min(math.ceil(p.numel() / 8), kept * 4)
        else:
            total += p.numel() * size
    return total
