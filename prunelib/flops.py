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
  (structured pruning; the model's dependency graph is traced once and reused, so a cost per
  epoch costs a copy and a cut, not a trace), or counts a ``physical_model`` the caller already made. For
  unstructured masks (nothing to remove) physical equals dense. A surgery that fails raises
  (:class:`prunelib.surgery.SurgeryError`): a cost is never silently reported as dense.

What a user gets is one artifact: :func:`deployable` makes it (the surgered model for
structured masks, the masked model otherwise) and measures its cost. **deployed** is that
artifact's own figure: ``flops_deployed`` / ``params_deployed`` equal the physical figures for
a surgered model and the effective ones for masks only; they are the numbers trials report,
fronts are drawn on and exports select on by default (declared in README's Conventions and in
each sweep's MLflow parent, ``search.tracking.CONVENTIONS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelib.masks import MaskSet, prunable_modules


__all__ = ["ARTIFACT_KINDS", "Deployable", "ModelCost", "count_flops", "deployable", "layer_flops", "pruned_cost",
           "count_params", "model_cost"]

#: What :func:`deployable` hands out: a physically smaller model, or the masked original.
ARTIFACT_KINDS = ("surgered", "masked")


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
        params_deployed / flops_deployed: the figures of the artifact a user gets: the
            physical ones when a surgered model was counted, else the effective ones.
    """

    params_dense: int
    params_effective: int
    params_physical: int
    flops_dense: int
    flops_effective: int
    flops_physical: int
    params_deployed: int
    flops_deployed: int

    def as_dict(self) -> dict[str, int]:
        """The counts as a flat dict (metric names used by search and MLflow)."""
        return asdict(self)


def _surgered_or_none(model: nn.Module, input_shape: tuple[int, ...], masks: MaskSet,
                      round_to: int | str | None) -> nn.Module | None:
    """The surgered copy of ``model`` for structured masks; None when nothing is structured.

    Raises:
        SurgeryError: the masks are structured but the model cannot be cut (its physical cost
            cannot be measured; it is not reported as dense).
    """
    from prunelib.surgery import SurgeryError, has_structured_masks, surgery  # torch-pruning: lazy

    if not has_structured_masks(masks):
        return None
    try:
        return surgery(model, masks, input_shape, round_to=round_to, verify=False).model
    except SurgeryError as exc:
        raise SurgeryError(f"physical cost of {type(model).__name__} cannot be measured: surgery "
                           f"failed ({exc})") from exc


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
    flops_effective = int(round(total - saved))
    if physical_model is not None:  # the artifact is the surgered model
        flops_physical = count_flops(physical_model, input_shape, example_input)
        params_physical = sum(p.numel() for p in physical_model.parameters())
        flops_deployed, params_deployed = flops_physical, params_physical
    else:  # the artifact is the masked model
        flops_physical, params_physical = total, params_dense
        flops_deployed, params_deployed = flops_effective, params_effective
    return ModelCost(params_dense=params_dense, params_effective=params_effective,
                     params_physical=params_physical, flops_dense=total,
                     flops_effective=flops_effective, flops_physical=flops_physical,
                     params_deployed=params_deployed, flops_deployed=flops_deployed)


class Deployable(NamedTuple):
    """The artifact a user gets from a pruned model, and its cost measured on it.

    Attributes:
        model: the surgered (physically smaller) model for structured masks, else the masked
            model itself (the masks applied; the same object that was passed in).
        cost: dense / effective / physical figures; physical ones counted on ``model``.
        kind: ``"surgered"`` or ``"masked"`` (:data:`ARTIFACT_KINDS`).
        surgery: the :class:`~prunelib.surgery.SurgeryResult` (structure file, removed channels)
            for ``"surgered"``, else None.
    """

    model: nn.Module
    cost: ModelCost
    kind: str
    surgery: Any = None

    @property
    def flops(self) -> int:
        """FLOPs per sample of the artifact (``flops_deployed``: physical when surgered,
        effective when masked)."""
        return self.cost.flops_deployed

    @property
    def params(self) -> int:
        """Parameters of the artifact (``params_deployed``: physical when surgered, effective
        (nonzero) when masked)."""
        return self.cost.params_deployed

    def metrics(self) -> dict[str, Any]:
        """``artifact`` (its kind) and every :class:`ModelCost` figure (``flops_deployed``,
        ``params_deployed`` included), flat."""
        return {"artifact": self.kind, **self.cost.as_dict()}


def deployable(model: nn.Module, masks: MaskSet | None, input_shape: tuple[int, ...],
               round_to: int | str | None = "auto", verify: bool = True) -> Deployable:
    """The model a user gets from ``model`` pruned by ``masks``, and its measured cost.

    Structured masks (any ``"channel"`` entry) give the physically smaller model
    (:func:`prunelib.surgery.surgery` on a copy; ``model`` is not changed); other masks give
    ``model`` itself with the masks applied. Measure accuracy on :attr:`Deployable.model`.

    Args:
        model: the trained model at its original shapes.
        masks: its masks (None: nothing pruned; the model is its own artifact).
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        round_to: channel rounding of the surgery (``"auto"``: multiples of 8 on CUDA).
        verify: check the surgered model against the masked one on a random batch (a warning
            when they differ; the difference is in ``surgery.max_abs_diff``).

    Raises:
        SurgeryError: structured masks that cannot be cut: the artifact and its cost cannot be
            measured (never reported as the dense model).
    """
    from prunelib.surgery import SurgeryError, has_structured_masks, surgery  # torch-pruning: lazy

    if masks is not None and has_structured_masks(masks):
        try:
            result = surgery(model, masks, input_shape, round_to=round_to, verify=verify)
        except SurgeryError as exc:
            raise SurgeryError(f"no deployable model: surgery of {type(model).__name__} failed ({exc})") from exc
        cost = model_cost(model, input_shape, masks, physical_model=result.model)
        return Deployable(result.model, cost, "surgered", result)
    if masks is not None:
        masks.apply(model)
    return Deployable(model, model_cost(model, input_shape, masks), "masked", None)


def pruned_cost(model: nn.Module, input_shape: tuple[int, ...], groups: list[Any],
                removed: dict[str, torch.Tensor],
                dense_layers: tuple[int, dict[str, int]] | None = None) -> tuple[int, int]:
    """``(flops, params)`` per sample of ``model`` with group channels physically removed,
    without building that model: what :func:`count_flops` and a parameter count give on the
    model :func:`prunelib.surgery.surgery` would make (exact channel counts, no rounding).

    A Conv/Linear layer's FLOPs are its dense FlopCounter figure times its kept output fraction
    times its kept fraction of inputs per group (a depthwise layer keeps one input per output,
    so it scales with its outputs alone). Parameters: the kept weights, biases and BatchNorm
    affines of every layer a removed channel touches; other parameters are unchanged.

    Args:
        model: the model at its original shapes.
        input_shape: one sample's shape.
        groups: its :func:`prunelib.surgery.channel_groups`.
        removed: group root name -> bool ``(group size,)``, True = the channel is removed.
        dense_layers: :func:`layer_flops` of ``model`` when the caller has it (saves a count).
    """
    total, per_layer = dense_layers if dense_layers is not None else layer_flops(model, input_shape)
    modules = dict(model.named_modules())
    out_gone: dict[str, int] = {}
    in_gone: dict[str, int] = {}
    norm_gone: dict[str, int] = {}
    for group in groups:
        gone = removed.get(group.root)
        if gone is None or not bool(gone.any()):
            continue
        for name, index in group.producers.items():
            out_gone[name] = out_gone.get(name, 0) + int((gone & (index >= 0)).sum())
        for name, (root_idx, _in_idx) in group.consumers.items():
            in_gone[name] = in_gone.get(name, 0) + int(gone[root_idx].sum())
        for name, index in group.norms.items():
            norm_gone[name] = norm_gone.get(name, 0) + int((gone & (index >= 0)).sum())
    flops = float(total)
    params = sum(p.numel() for p in model.parameters())
    for name in set(out_gone) | set(in_gone):
        m = modules[name]
        w = m.weight
        out, groups_n = int(w.shape[0]), int(getattr(m, "groups", 1))
        inputs = int(w.shape[1]) * groups_n
        kept_out = out - out_gone.get(name, 0)
        if groups_n > 1:  # depthwise: its inputs are its outputs; one input per output
            kept_per_group_frac, kept_numel = 1.0, kept_out * int(w[0].numel())
        else:
            kept_in = inputs - in_gone.get(name, 0)
            kept_per_group_frac = kept_in / inputs
            kept_numel = kept_out * kept_in * int(w[0, 0].numel())
        dense = per_layer.get(name, 0)
        flops -= dense - dense * (kept_out / out) * kept_per_group_frac
        params -= w.numel() - kept_numel
        if getattr(m, "bias", None) is not None:
            params -= out - kept_out
    for name, gone in norm_gone.items():
        if getattr(modules[name], "weight", None) is not None:
            params -= 2 * gone
    return int(round(flops)), int(params)
