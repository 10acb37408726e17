"""Held-out measures of text models: perplexity and next-token accuracy, classification accuracy.

* :func:`evaluate_lm`: over fixed-length sequences (``labels`` = ``input_ids``), the mean
  next-token cross-entropy over every predicted token (nats per token), its exponential (the
  perplexity, as the Wanda/SparseGPT evaluations compute it over non-overlapping windows) and
  the top-1 next-token accuracy (fraction);
* :func:`evaluate_classifier`: accuracy (fraction) and mean cross-entropy per example.

:func:`evaluate_text` picks by the data module's task. Batches are dicts of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["evaluate_classifier", "evaluate_lm", "evaluate_text"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """``{"loss": nats per predicted token, "ppl": exp(loss), "acc": next-token accuracy, "tokens"}``."""
    was_training = model.training
    model.eval()
    device = _device(model)
    nll = 0.0
    correct = total = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = mask.to(device) if mask is not None else torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = ids[:, 1:]
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
        pred = logits[:, :-1]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
        nll += float(loss[valid.reshape(-1)].sum())
        correct += int(((pred.argmax(-1) == target) & valid).sum())
        total += int(valid.sum())
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_lm got no predicted token")
    loss = nll / total
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / total, "tokens": float(total)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """``{"loss": mean cross-entropy per example, "acc": accuracy (fraction), "samples"}``."""
    was_training = model.training
    model.eval()
    device = _device(model)
    loss_sum = 0.0
    correct = total = 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        labels = batch["labels"].to(device)
        logits = model(**inputs).logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_classifier got no sample")
    return {"loss": loss_sum / total, "acc": correct / total, "samples": float(total)}


def evaluate_text(model: nn.Module, datamodule: Any, split: str = "val") -> dict[str, float]:
    """:func:`evaluate_lm` or :func:`evaluate_classifier` on one split, by ``datamodule.task``."""
    batches = datamodule.batches(split)
    if datamodule.task == "lm":
        return evaluate_lm(model, batches)
    return evaluate_classifier(model, batches)
