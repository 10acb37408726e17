"""Robustness metrics: accuracy under a fast gradient sign (FGSM) attack.

FGSM (Goodfellow et al. 2015) moves every input by ``epsilon`` in the direction of the sign of
the loss gradient: ``x_adv = x + epsilon * sign(d CE(model(x), y) / dx)``. Here ``epsilon`` is in
the units of the tensors the model receives, i.e. *after* the data module's normalisation
(``(pixel - mean) / std``): on Fashion-MNIST (std 0.353) ``epsilon=0.1`` is about 0.035 in
[0, 1] pixel units. Pass ``clamp=(lo, hi)`` (also in normalised units) to keep attacked inputs
inside the valid input domain.

PAODING's evaluator attacks with the *predicted* label and counts the correctly classified
samples whose prediction survives; ``label="predicted"`` does that, ``label="true"`` (default)
is the usual accuracy under attack. The model's parameters get no gradients (the gradient is
taken with respect to the input only) and the attacked forward runs under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RobustnessResult", "fgsm_accuracy", "fgsm_perturb"]


@dataclass(frozen=True)
class RobustnessResult:
    """Accuracy with and without an FGSM attack.

    Attributes:
        epsilon: attack size, in normalised input units.
        clean_accuracy: fraction (0..1) of samples classified correctly.
        attacked_accuracy: fraction (0..1) classified correctly after the attack.
        robust_fraction: among the correctly classified samples, the fraction whose prediction
            the attack does not change (PAODING's "robust instances"; 1.0 when none is correct).
        samples: number of samples evaluated.
    """

    epsilon: float
    clean_accuracy: float
    attacked_accuracy: float
    robust_fraction: float
    samples: int


def fgsm_perturb(model: nn.Module, inputs: Tensor, labels: Tensor, epsilon: float,
                 clamp: tuple[float, float] | None = None) -> Tensor:
    """FGSM-attacked copies of ``inputs`` (``epsilon`` in normalised input units).

    The gradient is taken with respect to the inputs only (no parameter gradients accumulate).
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
    adv = inputs.detach() + epsilon * grad.sign()
    if clamp is not None:
        adv = adv.clamp(clamp[0], clamp[1])
    return adv


def _batches(data: Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor],
             batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
    else:
        for batch in data:
            yield batch[0], batch[1]


def fgsm_accuracy(model: nn.Module, data: Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor],
                  epsilon: float, batch_size: int = 512, label: str = "true",
                  clamp: tuple[float, float] | None = None, max_samples: int | None = None,
                  device: torch.device | str | None = None) -> RobustnessResult:
    """Clean and FGSM-attacked accuracy of ``model`` over a data loader or ``(inputs, labels)``.

    Args:
        model: a classifier returning logits; evaluated in eval mode (its mode is restored).
        data: an iterable of ``(inputs, labels)`` batches (a DataLoader) or one pair of tensors,
            which is cut into ``batch_size`` batches.
        epsilon: attack size in normalised input units (0 = no attack: attacked = clean).
        batch_size: samples per batch when ``data`` is a pair of tensors.
        label: ``"true"`` attacks the true label; ``"predicted"`` attacks the model's own
            prediction (PAODING's evaluator).
        clamp: optional ``(lo, hi)`` bounds for the attacked inputs (normalised units).
        max_samples: stop after this many samples (PAODING evaluates the first batch only).
        device: where to run; default the model's parameters' device.
    """
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if label not in ("true", "predicted"):
        raise ValueError(f"label must be 'true' or 'predicted', got {label!r}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    was_training = model.training
    model.eval()
    n = correct = correct_adv = survived = 0
    try:
        for x, y in _batches(data, batch_size):
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None:
                x, y = x[: max_samples - n], y[: max_samples - n]
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                pred = model(x).argmax(1)
            target = y if label == "true" else pred
            adv = fgsm_perturb(model, x, target, float(epsilon), clamp) if epsilon > 0 else x
            with torch.no_grad():
                pred_adv = model(adv).argmax(1) if epsilon > 0 else pred
            ok = pred == y
            n += int(y.numel())
            correct += int(ok.sum())
            correct_adv += int((pred_adv == y).sum())
            survived += int((ok & (pred_adv == pred)).sum())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("fgsm_accuracy: no samples in data")
    return RobustnessResult(epsilon=float(epsilon), clean_accuracy=correct / n,
                            attacked_accuracy=correct_adv / n,
                            robust_fraction=survived / correct if correct else 1.0, samples=n)
