"""Parameter and FLOP counts: the one place where FLOPs are defined.

Convention: FLOPs per sample, forward pass, one multiply-add = 2 FLOPs, as counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix multiplies, attention;
element-wise ops, norms and pooling are not counted). Three figures per model:

* **dense**: the model as it is, every weight used;
* **effective**: zeros skipped. Each Conv/Linear layer's FLOPs are scaled by the fraction
  of its weight entries that are nonzero (and kept by the masks, when given): what
  unstructured sparsity could give on sparse hardware;
* **physical**: the dense FLOPs of the model after surgery (physically removed channels);
  what a GPU actually runs. :func:`model_cost` makes that model itself with
  :func:`prunelib.surgery.surgery` when the masks hold any ``"channel"`` granularity entry
  (structured pruning), or counts a ``physical_model`` the caller already made. For
  unstructured masks (nothing to remove) physical equals dense.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelib.masks import MaskSet, prunable_modules

log = logging.getLogger("prunelib")

__all__ = ["ModelCost", "count_flops", "layer_flops", "count_params", "model_cost"]


def _example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return torch.zeros((1, *input_shape), device=device, dtype=dtype)


def _run(model: nn.Module, input_shape: tuple[int, ...] | None, example_input: Any) -> None:
    if example_input is None:
        if input_shape is None:
            raise ValueError("FLOP counting needs input_shape or example_input")
        model(_example_input(model, input_shape))
    elif isinstance(example_input, dict):
        model(**example_input)  # keyword inputs: a Hugging Face model's input_ids, attention_mask
    else:
        model(example_input)


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...] | None,
                example_input: Any = None) -> tuple[int, dict[str, int]]:
    """Dense FLOPs per sample of the whole model and of each Conv/Linear layer.

    Args:
        model: any module taking one tensor of shape ``(N, *input_shape)``.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        example_input: one sample to run instead of zeros of ``input_shape`` (a tensor, or a
            dict of keyword inputs such as a text model's ``input_ids`` of one sequence: FLOPs
            per sequence).

    Returns:
        ``(total, {module_name: flops})``; FLOPs per sample, 1 multiply-add = 2 FLOPs.
    """
    per_layer: dict[str, int] = {}
    handles = []
    counter = FlopCounterMode(display=False)

    def pre_hook(module: nn.Module, _inputs: Any) -> None:
        module._flops_before = counter.get_total_flops()  # type: ignore[attr-defined]

    def post_hook(name: str):
        def hook(module: nn.Module, _inputs: Any, _output: Any) -> None:
            per_layer[name] = per_layer.get(name, 0) + counter.get_total_flops() - module._flops_before
        return hook

    for name, module in prunable_modules(model).items():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook(name)))
    was_training = model.training
    model.eval()  # batch of one: BatchNorm in train mode would fail or move its statistics
    try:
        with counter:
            _run(model, input_shape, example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for module in prunable_modules(model).values():
            if hasattr(module, "_flops_before"):
                del module._flops_before
    return int(counter.get_total_flops()), per_layer


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | None, example_input: Any = None) -> int:
    """Dense FLOPs per sample (forward, 1 multiply-add = 2 FLOPs) of ``model``."""
    return layer_flops(model, input_shape, example_input)[0]


def _weight_density(module: nn.Module, name: str, masks: MaskSet | None) -> float:
    w = module.weight.detach()
    alive = w != 0
    key = f"{name}.weight" if name else "weight"
    if masks is not None and key in masks:
        alive = alive & masks.expanded(key, w)
    return float(alive.float().mean()) if w.numel() else 1.0


def count_params(model: nn.Module, masks: MaskSet | None = None) -> tuple[int, int]:
    """``(dense, effective)`` parameter counts: all parameters, and those nonzero and kept."""
    dense = effective = 0
    for name, p in model.named_parameters():
        dense += p.numel()
        alive = p.detach() != 0
        if masks is not None and name in masks:
            alive = alive & masks.expanded(name, p)
        effective += int(alive.sum())
    return dense, effective


@dataclass(frozen=True)
class ModelCost:
    """Size and compute of one model, per sample.

    Attributes:
        params_dense: all parameters of the model as given.
        params_effective: parameters that are nonzero and kept by the masks.
        params_physical: parameters of the physical model (after surgery; = dense if none).
        flops_dense / flops_effective / flops_physical: FLOPs per sample (see module doc).
    """

    params_dense: int
    params_effective: int
    params_physical: int
    flops_dense: int
    flops_effective: int
    flops_physical: int

    def as_dict(self) -> dict[str, int]:
        """The counts as a flat dict (metric names used by search and MLflow)."""
        return asdict(self)


def _surgered_or_none(model: nn.Module, input_shape: tuple[int, ...], masks: MaskSet,
                      round_to: int | str | None) -> nn.Module | None:
    """The surgered copy of ``model`` for structured masks; None if none is needed or possible."""
    from prunelib.surgery import SurgeryError, has_structured_masks, surgery  # torch-pruning: lazy

    if not has_structured_masks(masks):
        return None
    try:
        return surgery(model, masks, input_shape, round_to=round_to, verify=False).model
    except SurgeryError as exc:
        # A cost figure must not end a training run: report dense for what cannot be traced.
        log.warning("physical FLOPs: surgery failed, reporting dense figures (%s)", exc)
        return None


def model_cost(model: nn.Module, input_shape: tuple[int, ...] | None, masks: MaskSet | None = None,
               physical_model: nn.Module | None = None,
               round_to: int | str | None = "auto", example_input: Any = None) -> ModelCost:
    """Dense, effective and physical parameter and FLOP counts of a (masked) model.

    Args:
        model: the model at its original shapes (possibly with zeroed weights).
        input_shape: one sample's shape, e.g. ``(1, 8, 8)``.
        masks: optional masks to take into account on top of zeros already in the weights.
        physical_model: the model after surgery, if the caller made one. When None and
            ``masks`` holds ``"channel"`` entries, surgery is run here on a copy (``model`` is
            not changed); otherwise physical = dense.
        round_to: channel rounding of that surgery (see :func:`prunelib.surgery.surgery`:
            ``"auto"`` = multiples of 8 on a CUDA model, exact counts on CPU), so the physical
            figure is that of the model an export on the same device would give.
        example_input: one sample to count with instead of zeros of ``input_shape`` (see
            :func:`layer_flops`); surgery is not run for it (text models have no channel masks).
    """
    if physical_model is None and masks is not None and example_input is None:
        physical_model = _surgered_or_none(model, input_shape, masks, round_to)
    total, per_layer = layer_flops(model, input_shape, example_input)
    modules = prunable_modules(model)
    saved = sum(flops * (1.0 - _weight_density(modules[name], name, masks))
                for name, flops in per_layer.items())
    params_dense, params_effective = count_params(model, masks)
    if physical_model is not None:
        flops_physical = count_flops(physical_model, input_shape, example_input)
        params_physical = sum(p.numel() for p in physical_model.parameters())
    else:
        flops_physical, params_physical = total, params_dense
    return ModelCost(params_dense=params_dense, params_effective=params_effective,
                     params_physical=params_physical, flops_dense=total,
                     flops_effective=int(round(total - saved)), flops_physical=flops_physical)
