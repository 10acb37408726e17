"""Channel surgery: a structured :class:`~prunelib.masks.MaskSet` -> a physically smaller model.

Torch-Pruning's ``DependencyGraph`` (DepGraph) finds which tensors are coupled to an output
channel: the BatchNorm after a convolution, the next layer's input channels, every branch of a
residual add, the slice of a concatenation, the ``C*H*W`` features a flatten makes of one
channel. This module decides *which* channels can go and lets DepGraph cut all coupled tensors.

Which channels are removed. A channel (an index in a coupled group) is removed when every layer
that *produces* it (the Conv/Linear layers whose output channels are in the group) has it
masked: a ``"channel"`` mask entry that is False, or a ``"weight"`` mask whose whole row is
False. A residual stream channel therefore goes only when the stem, every block's last
convolution and every projection writing into it are masked there; a branch alone stays
(masked, its zeros kept). A group a concatenation feeds in part (``cat([a, b]) + x``: ``a``
writes the first channels of the stream, ``b`` the rest) counts, for each channel, only the
producers that write it. A depthwise convolution (``groups == in == out channels``) is a
producer of the group of the layer feeding it (its input and output channels are the same
channels) and a link in a series: the channel is dead along ``feeder -> depthwise`` when either
is masked there. Other grouped convolutions make their groups unprunable. Channels of the
model's output layer are never removed (that would change the output's shape); at least one
channel of every group is kept.

Exactness. Before cutting, the masks are *completed* (:func:`complete_channel_masks`): every
removed channel's bias and the affine of the BatchNorm that follows it are masked too, so the
masked dense model and the surgered model compute the same function. Without that completion a
masked convolution still feeds ``relu(beta - gamma * mean / std)`` to the next layer through
its BatchNorm; physical removal drops that constant (as Keras-surgeon and Torch-Pruning do), and
the completed masks make the masked model drop it too. :func:`surgery` checks the equivalence
on a random batch and reports the largest absolute difference.

Rounding. ``round_to=k`` keeps a multiple of ``k`` channels per group (masked channels are kept
back, lowest index first; they stay zero, so outputs do not change): GPU kernels run faster on
channel counts that are multiples of 8. ``round_to="auto"`` (the default) means 8 when the
model's parameters are on a CUDA device and no rounding on CPU.

Tracing once. DepGraph's trace is the slow step (seconds for a ResNet on a CPU), and the groups,
every cost (:func:`prunelib.flops.model_cost`), every surgery and the methods that need groups
read the same graph. It is traced once per model object and layout (module names and types,
parameter and buffer shapes, dtypes and devices, the input shape) on a copy of the model, and
kept as long as the model lives; a surgery maps it onto a fresh copy of the model as it is now
and cuts that. A model whose layout changes (a module added, a tensor moved) is traced again.

Files. :meth:`SurgeryResult.save` writes the smaller model as a safetensors state dict plus a
JSON *structure file* (the pruning operations and the kept channel indices per layer);
:func:`load_surgered` rebuilds the original model from its code (:func:`prunelib.models.build_model`
or a module you pass), replays the operations, checks every shape and loads the weights.
:func:`export_onnx` writes an ONNX file with a dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunelib.masks import MaskSet, prunable_modules

__all__ = [
    "STRUCTURE_FORMAT",
    "ChannelGroup",
    "SurgeryError",
    "StructureMismatchError",
    "SurgeryResult",
    "channel_groups",
    "complete_channel_masks",
    "dead_channels",
    "export_onnx",
    "has_structured_masks",
    "load_surgered",
    "removed_inputs",
    "surgery",
]

log = logging.getLogger("prunelib")

STRUCTURE_FORMAT = "prunesearch-structure"
STRUCTURE_VERSION = 1
_PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SurgeryError(ValueError):
    """The model or masks cannot be cut (untraceable model, masks for another model...)."""


class StructureMismatchError(SurgeryError):
    """A structure file does not fit the model it is applied to (other code, width or shapes)."""


# ---------------------------------------------------------------------------------------------
# Dependency groups
# ---------------------------------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """Output channels coupled by the model's graph: they can only be removed together.

    Attributes:
        root: name of the Conv/Linear module the group was grown from.
        size: number of channels (the root's output channels).
        producers: Conv/Linear module name -> LongTensor ``(size,)``: which of that module's
            output channels is the group's channel ``r`` (identity for a plain layer).
        norms: BatchNorm module name -> LongTensor ``(size,)``, the same for their channels.
            ``-1`` where that module does not write the channel (a branch of a concatenation
            added to a stream writes only its slice).
        norms: BatchNorm module name -> LongTensor ``(size,)``, the same for their channels.
        consumers: Conv/Linear module name -> ``(root_idx, input_idx)`` LongTensors of equal
            length: which input channels/features of that module read channel ``root_idx``
            (several per channel after a flatten). A depthwise convolution is listed here and
            among the producers.
        norm_after: producer name -> the BatchNorm that directly and only reads its output.
        depthwise: depthwise producer name -> the producers feeding it inside the group whose
            output only it reads (the series ``feeder -> depthwise``).
        prunable: False when the group holds the model's output layer, a producer that is not
            a Conv/Linear module or a grouped (not depthwise) convolution (never cut).
    """

    root: str
    size: int
    producers: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)
    consumers: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    norm_after: dict[str, str] = field(default_factory=dict)
    depthwise: dict[str, list[str]] = field(default_factory=dict)
    prunable: bool = True

    def covered(self, producer: str) -> Tensor:
        """Bool ``(size,)``: the group channels ``producer`` writes."""
        return self.producers[producer] >= 0


def _example_inputs(model: nn.Module, input_shape: Sequence[int]) -> Tensor:
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return torch.zeros((1, *[int(s) for s in input_shape]), device=device, dtype=dtype)


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """Autograd recording on, even when called from ``no_grad``/``inference_mode`` code (a
    Lightning validation hook): DepGraph traces autograd's graph, and copies made under
    inference mode would be inference tensors it cannot trace."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _build_graph(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """A Torch-Pruning DependencyGraph of ``model`` (traced in eval mode: BN stats untouched)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()  # a traced forward in train mode would move the BatchNorm running statistics
    try:
        with _autograd_on():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=_example_inputs(model, input_shape), verbose=False)
    except Exception as exc:  # tracing runs the user's forward: any error can come out
        raise SurgeryError(
            f"cannot trace {type(model).__name__} for surgery with input shape "
            f"{tuple(input_shape)}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)


def _output_layers(graph: Any) -> set[nn.Module]:
    """Conv/Linear modules whose outputs reach the model output without another Conv/Linear."""
    out: set[nn.Module] = set()
    for module, node in graph.module2node.items():
        if not isinstance(module, _PRODUCER_TYPES):
            continue
        stack, seen = list(node.outputs), set()
        reaches_output = not node.outputs
        while stack and not reaches_output:
            nxt = stack.pop()
            if id(nxt) in seen:
                continue
            seen.add(id(nxt))
            if isinstance(nxt.module, _PRODUCER_TYPES):
                continue
            if not nxt.outputs or nxt.type == graph.ops.OPTYPE.OUTPUT:
                reaches_output = True
            stack.extend(nxt.outputs)
        if reaches_output:
            out.add(module)
    return out


def _is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return (isinstance(module, _CONV_TYPES) and groups > 1
            and groups == module.in_channels == module.out_channels)


def _neighbours(node: Any, forward: bool) -> set[nn.Module]:
    """Conv/Linear modules reached from ``node`` (forward: its outputs; else: its inputs)
    through any number of other ops (BatchNorm, activations, pooling, reshapes)."""
    found: set[nn.Module] = set()
    stack, seen = list(node.outputs if forward else node.inputs), set()
    while stack:
        nxt = stack.pop()
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if isinstance(nxt.module, _PRODUCER_TYPES):
            found.add(nxt.module)
            continue
        stack.extend(nxt.outputs if forward else nxt.inputs)
    return found


def _groups_from_graph(graph: Any, model: nn.Module) -> list[ChannelGroup]:
    names = {m: n for n, m in model.named_modules()}
    outputs = _output_layers(graph)
    groups: list[ChannelGroup] = []
    for group in graph.get_all_groups(root_module_types=_PRODUCER_TYPES):
        root_module = group[0].dep.target.module
        size = len(group[0].idxs)
        cg = ChannelGroup(root=names[root_module], size=size)
        for item in group:
            module = item.dep.target.module
            if (graph.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, _PRODUCER_TYPES)
                    and module in names):
                root_idx = torch.tensor([int(r) for r in item.root_idxs], dtype=torch.long)
                in_idx = torch.tensor([int(i) for i in item.idxs], dtype=torch.long)
                cg.consumers[names[module]] = (root_idx, in_idx)
                if getattr(module, "groups", 1) > 1:
                    if not _is_depthwise(module):
                        cg.prunable = False  # grouped convolution: do not guess its layout
                        continue
                    # A depthwise convolution writes the channels it reads: a producer too.
                    index = torch.full((size,), -1, dtype=torch.long)
                    index[root_idx] = in_idx
                    cg.producers[names[module]] = index
                continue
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or not isinstance(module, nn.Module):
                continue
            if not isinstance(module, _PRODUCER_TYPES + _NORM_TYPES):
                continue  # activations, pools, TP's placeholder ops: no parameters to keep in step
            if module not in names:  # a layer outside the model's module tree: do not cut
                cg.prunable = False
                continue
            if isinstance(module, _PRODUCER_TYPES):
                if getattr(module, "groups", 1) > 1 and not _is_depthwise(module):
                    cg.prunable = False
                target = cg.producers
                if module in outputs:
                    cg.prunable = False
            else:
                target = cg.norms
            index = torch.full((size,), -1, dtype=torch.long)
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                index[int(root_idx)] = int(idx)
            if names[module] in target:  # seen already (a depthwise layer): merge the maps
                index = torch.where(index >= 0, index, target[names[module]])
            target[names[module]] = index
        if cg.producers:
            covered = torch.zeros(size, dtype=torch.bool)
            for index in cg.producers.values():
                covered |= index >= 0
            if not bool(covered.all()):  # a channel nobody writes: not a group we understand
                cg.prunable = False
        modules = {names[m]: m for m in names}
        for name in cg.producers:
            node = graph.module2node.get(modules[name])
            if node is None:
                continue
            after = [o.module for o in node.outputs]
            if len(after) == 1 and isinstance(after[0], _NORM_TYPES) and names.get(after[0]) in cg.norms:
                cg.norm_after[name] = names[after[0]]
            if _is_depthwise(modules[name]):
                feeders = [names[m] for m in _neighbours(node, forward=False)
                           if names.get(m) in cg.producers and names[m] != name
                           and _neighbours(graph.module2node[m], forward=True) == {modules[name]}]
                cg.depthwise[name] = feeders
        groups.append(cg)
    return groups


@dataclass
class _Trace:
    """DepGraph's graph of one model layout, traced on ``template`` (a copy of the model, so
    the cache never holds the model it is keyed by), and the groups read from it."""

    template: nn.Module
    graph: Any
    groups: list[ChannelGroup]


# model -> {layout: trace}; an entry goes with its model. A few layouts per model: a method may
# add modules during training (polarization's gates) and take them out again.
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Trace]] = weakref.WeakKeyDictionary()
_LAYOUTS_PER_MODEL = 4


def _layout(model: nn.Module, input_shape: Sequence[int]) -> tuple:
    """What a trace depends on besides the code: module names and types, tensor shapes,
    dtypes and devices, and the traced input shape."""
    def tensors(named: Iterator[tuple[str, Tensor]]) -> tuple:
        return tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in named)

    return (tuple(int(s) for s in input_shape), tuple((n, type(m)) for n, m in model.named_modules()),
            tensors(model.named_parameters()), tensors(model.named_buffers()))


def _trace(model: nn.Module, input_shape: Sequence[int]) -> _Trace:
    """The model's trace at its current layout, traced now if there is none (see the module doc).

    Raises:
        SurgeryError: the model's forward cannot be traced with that input shape.
    """
    layout = _layout(model, input_shape)
    traces = _TRACES.get(model)
    if traces is not None and layout in traces:
        return traces[layout]
    try:
        with _autograd_on():
            template = copy.deepcopy(model)
    except Exception:  # a model that cannot be copied: traced as it is, not kept
        graph = _build_graph(model, input_shape)
        return _Trace(model, graph, _groups_from_graph(graph, model))
    graph = _build_graph(template, input_shape)
    trace = _Trace(template, graph, _groups_from_graph(graph, template))
    traces = _TRACES.setdefault(model, {})
    if len(traces) >= _LAYOUTS_PER_MODEL:
        traces.pop(next(iter(traces)))
    traces[layout] = trace
    return trace


def _working_copy(trace: _Trace, model: nn.Module) -> tuple[nn.Module, Any]:
    """A deep copy of ``model`` as it is now, and the trace's graph mapped onto that copy (the
    same layout: the template's modules, parameters and buffers stand for the copy's)."""
    with _autograd_on():
        work = copy.deepcopy(model)
    graph = trace.graph
    memo: dict[int, Any] = {id(graph.ops): graph.ops}  # Torch-Pruning's ops module: shared
    for named in ("named_modules", "named_parameters", "named_buffers"):
        now = dict(getattr(work, named)())
        for name, obj in getattr(trace.template, named)():
            memo[id(obj)] = now[name]
    for node in graph.module2node.values():
        memo[id(node.grad_fn)] = None  # autograd's record of the trace: cutting does not read it
    for pruner in (*graph.REGISTERED_PRUNERS.values(), *graph.CUSTOMIZED_PRUNERS.values()):
        memo[id(pruner)] = pruner  # stateless handlers, shared by every graph as in Torch-Pruning
    with _autograd_on():
        return work, copy.deepcopy(graph, memo)


def channel_groups(model: nn.Module, input_shape: Sequence[int]) -> list[ChannelGroup]:
    """The coupled output-channel groups of ``model`` (one per independent channel set).

    Traced once per model and layout and shared with surgery and costs (see the module doc):
    treat the groups as read-only.

    Args:
        model: any module DepGraph can trace with one ``(1, *input_shape)`` tensor.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.

    Raises:
        SurgeryError: the model's forward cannot be traced with that input shape.
    """
    return list(_trace(model, input_shape).groups)


# ---------------------------------------------------------------------------------------------
# Masks -> removable channels
# ---------------------------------------------------------------------------------------------
def has_structured_masks(masks: MaskSet | None) -> bool:
    """Whether ``masks`` holds any ``"channel"`` granularity entry (what triggers surgery)."""
    return masks is not None and any(g == "channel" for g in masks.granularity.values())


def dead_channels(model: nn.Module, masks: MaskSet) -> dict[str, Tensor]:
    """Per Conv/Linear module name, a bool ``(out_channels,)``: True where its output channel
    is masked whole (a False ``"channel"`` entry, or a ``"weight"`` mask whose row is all False)."""
    out: dict[str, Tensor] = {}
    for name, module in prunable_modules(model).items():
        key = f"{name}.weight" if name else "weight"
        if key not in masks:
            continue
        mask = masks.masks[key].cpu()
        if masks.granularity[key] == "channel":
            out[name] = ~mask
        else:
            out[name] = ~mask.reshape(mask.shape[0], -1).any(dim=1)
    return out


def _removable(group: ChannelGroup, dead: dict[str, Tensor]) -> Tensor:
    """Bool ``(size,)``: channels of the group that every producer writing them has masked
    (a depthwise layer and the producers feeding only it count as one series link)."""
    if not group.prunable or not group.producers:
        return torch.zeros(group.size, dtype=torch.bool)

    def dead_at(name: str) -> Tensor:
        """Per group channel: True where ``name`` does not write it or has it masked."""
        index = group.producers[name]
        covered = index >= 0
        out = ~covered
        if name in dead:
            out = out | (covered & dead[name][index.clamp_min(0)])
        return out

    in_series = {f for feeders in group.depthwise.values() for f in feeders}
    removable = torch.ones(group.size, dtype=torch.bool)
    for name in group.producers:
        if name in in_series:
            continue  # counted with the depthwise layer it feeds
        link = dead_at(name)
        feeders = group.depthwise.get(name)
        if feeders:
            fed = torch.ones(group.size, dtype=torch.bool)
            for f in feeders:
                fed &= dead_at(f)
            link = link | fed
        removable &= link
    return removable


def removed_inputs(model: nn.Module, masks: MaskSet, groups: list[ChannelGroup]) -> dict[str, Tensor]:
    """Per Conv/Linear consumer name, a bool over its input channels/features: True where the
    input reads a channel that surgery would remove under ``masks`` (its columns are dead)."""
    dead = dead_channels(model, masks)
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for group in groups:
        removable = _removable(group, dead)
        if not bool(removable.any()):
            continue
        for name, (root_idx, in_idx) in group.consumers.items():
            m = modules[name]
            if name not in out:
                out[name] = torch.zeros(m.weight.shape[1] * getattr(m, "groups", 1), dtype=torch.bool)
            out[name][in_idx[removable[root_idx]]] = True
    return out


def _apply_rounding(removable: Tensor, round_to: int | None) -> Tensor:
    """Keep at least one channel, and a multiple of ``round_to`` when given (lowest index first)."""
    size = removable.numel()
    keep = size - int(removable.sum())
    want = max(keep, 1)
    if round_to:
        want = min(size, int(math.ceil(want / round_to)) * round_to)
    if want == keep:
        return removable
    out = removable.clone()
    back = torch.nonzero(out).flatten()[: want - keep]
    out[back] = False  # kept back: masked (zero) channels, so the function does not change
    return out


def _resolve_round_to(model: nn.Module, round_to: int | str | None) -> int | None:
    if round_to == "auto":
        try:
            on_gpu = next(model.parameters()).is_cuda
        except StopIteration:
            on_gpu = False
        return 8 if on_gpu else None
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, None or 'auto', got {round_to!r}")
    return round_to


def _written(index: Tensor, removable: Tensor) -> Tensor:
    """A module's own channel indices of the group channels ``removable`` that it writes."""
    picked = index[removable]
    return picked[picked >= 0]


def complete_channel_masks(model: nn.Module, masks: MaskSet, input_shape: Sequence[int],
                           groups: list[ChannelGroup] | None = None) -> MaskSet:
    """``masks`` plus what makes removable channels contribute exactly zero.

    For every channel that :func:`surgery` would remove, the producers' biases (their
    ``"channel"`` masks already zero them; a ``"weight"``-granularity producer gets a bias mask)
    and the affine of every BatchNorm coupled to it are masked. Applying the returned masks to
    the dense model gives the function the surgered model computes.

    Args:
        model: the model the masks belong to (original shapes).
        masks: structured and/or unstructured masks; left unchanged.
        input_shape: one sample's shape, for tracing.
        groups: precomputed :func:`channel_groups` of ``model`` (saves a trace).
    """
    masks.check_compatible(model)
    groups = channel_groups(model, input_shape) if groups is None else groups
    dead = dead_channels(model, masks)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = masks.clone()
    for group in groups:
        removable = _removable(group, dead)
        if not bool(removable.any()):
            continue
        for name, index in group.producers.items():
            key, bias_key = f"{name}.weight", f"{name}.bias"
            written = _written(index, removable)
            if out.granularity.get(key) == "channel":
                # Also a link of a series whose other link is masked (a depthwise layer after a
                # masked feeder): its filter and bias go with the channel.
                keep = out.masks[key].clone()
                keep[written.to(keep.device)] = False
                out.set(key, keep, "channel")
                continue
            if bias_key not in params:
                continue
            keep = out.masks[bias_key].clone() if bias_key in out else torch.ones_like(
                params[bias_key], dtype=torch.bool)
            keep[written.to(keep.device)] = False
            out.set(bias_key, keep, "weight")
        for name, index in group.norms.items():
            bn = modules[name]
            if getattr(bn, "weight", None) is None:
                log.warning("surgery: %s has no affine; removing its channels drops a nonzero "
                            "constant (-mean/std), the surgered model will differ", name)
                continue
            key = f"{name}.weight"
            keep = out.masks[key].clone() if key in out else torch.ones(
                bn.weight.shape[0], dtype=torch.bool, device=bn.weight.device)
            keep[_written(index, removable).to(keep.device)] = False
            out.set(key, keep, "channel")  # a channel mask on BN weight zeroes its bias too
    return out


# ---------------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------------
@dataclass
class SurgeryResult:
    """The physically smaller model and how it was made.

    Attributes:
        model: the surgered model (a new module; the input model is left as it was).
        structure: JSON-ready description that rebuilds ``model`` from the original code
            (see :meth:`save` and :func:`load_surgered`).
        removed: group root name -> removed channel indices (in the root's numbering).
        masks: the completed masks whose application to the dense model equals ``model``.
        max_abs_diff: largest |output difference| between the masked dense model and ``model``
            on a random batch (None when not verified).
    """

    model: nn.Module
    structure: dict[str, Any]
    removed: dict[str, list[int]]
    masks: MaskSet
    max_abs_diff: float | None = None

    @property
    def kept_channels(self) -> dict[str, int]:
        """Output channels per Conv/Linear module of the surgered model."""
        return dict(self.structure["out_channels"])

    def save(self, directory: str | os.PathLike, model_spec: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` (state dict) and ``structure.json`` into ``directory``.

        Args:
            directory: created if missing; returned.
            model_spec: how to build the original model with :func:`prunelib.models.build_model`:
                ``{"name": "vgg_small", "input_shape": [1, 28, 28], "num_classes": 10,
                "width": 0.25, "kwargs": {}}``. Without it, :func:`load_surgered` needs the
                original (unpruned) model passed as ``base_model``.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        structure = dict(self.structure)
        if model_spec is not None:
            structure["model_spec"] = json.loads(json.dumps(model_spec))
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        from prunelib.artifact import check_safetensors
        from prunelib.atomic import atomic_save

        text = json.dumps(structure, indent=1)
        atomic_save(directory / "model.safetensors", lambda tmp: save_file(state, str(tmp)), check_safetensors)
        atomic_save(directory / "structure.json", lambda tmp: tmp.write_text(text),
                    lambda tmp: json.loads(tmp.read_text()))
        return directory


def _param_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in model.state_dict().items()}


def _channel_counts(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, m in prunable_modules(model).items():
        out[name] = int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)
    return out


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, input_shape: Sequence[int]) -> float:
    was_a, was_b = a.training, b.training
    a.eval()
    b.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((4, *input_shape), generator=gen).to(_example_inputs(a, input_shape))
        return float((a(x) - b(x)).abs().max())
    finally:
        a.train(was_a)
        b.train(was_b)


def surgery(model: nn.Module, masks: MaskSet, input_shape: Sequence[int],
            round_to: int | str | None = "auto", verify: bool = True) -> SurgeryResult:
    """Remove the channels ``masks`` prune whole; return the physically smaller model.

    Args:
        model: the model at its original shapes (masks applied or not; it is not modified).
        masks: a :class:`MaskSet` of this model. Only whole output channels are removed (see the
            module doc); other zeros stay as zeros in the smaller model.
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` (used to trace the graph).
        round_to: keep a multiple of this many channels per group; ``"auto"``: 8 on a CUDA
            model, None (exact counts) on CPU.
        verify: compare the surgered model with the masked dense model on a random batch and
            warn if they differ (the result carries the difference).

    Raises:
        MaskMismatchError: the masks name parameters the model lacks or have other shapes.
        SurgeryError: the model's graph cannot be traced.
    """
    masks.check_compatible(model)
    step = _resolve_round_to(model, round_to)
    with _autograd_on():
        return _surgery(model, masks, input_shape, step, verify)


def _surgery(model: nn.Module, masks: MaskSet, input_shape: Sequence[int], step: int | None,
             verify: bool) -> SurgeryResult:
    trace = _trace(model, input_shape)
    work, graph = _working_copy(trace, model)
    groups = trace.groups
    completed = complete_channel_masks(work, masks, input_shape, groups=groups)
    completed.apply(work)  # the smaller model computes what the (completed) masked model does
    reference = copy.deepcopy(work) if verify else None
    dead = dead_channels(work, completed)
    named = dict(work.named_modules())
    removed: dict[str, list[int]] = {}
    kept: dict[str, list[int]] = {}
    for group in groups:
        remove = _apply_rounding(_removable(group, dead), step)
        if bool(remove.any()):
            removed[group.root] = torch.nonzero(remove).flatten().tolist()
            kept[group.root] = torch.nonzero(~remove).flatten().tolist()
    for root, idxs in removed.items():
        module = named[root]
        pruner = graph.get_pruner_of_module(module)
        graph.get_pruning_group(module, pruner.prune_out_channels, idxs).prune()
    structure = {
        "format": STRUCTURE_FORMAT,
        "version": STRUCTURE_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "input_shape": [int(s) for s in input_shape],
        "round_to": step,
        # Torch-Pruning's history: (module name, is-output-channel pruning, indices), replayed
        # in order on a freshly built original model by load_surgered.
        "pruning_history": [[n, bool(o), [int(i) for i in idx]] for n, o, idx in graph.pruning_history()],
        "kept_indices": kept,
        "out_channels": _channel_counts(work),
        "param_shapes": _param_shapes(work),
    }
    result = SurgeryResult(model=work, structure=structure, removed=removed, masks=completed)
    if reference is not None:
        result.max_abs_diff = _max_diff(reference, work, input_shape)
        scale = max(1.0, _max_abs_output(reference, input_shape))
        if result.max_abs_diff > 1e-4 * scale:
            log.warning("surgery: the smaller model differs from the masked model by %.3g "
                        "(largest output %.3g); a removed channel still contributed", result.max_abs_diff, scale)
    return result


@torch.no_grad()
def _max_abs_output(model: nn.Module, input_shape: Sequence[int]) -> float:
    was = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((4, *input_shape), generator=gen).to(_example_inputs(model, input_shape))
        return float(model(x).abs().max())
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def load_surgered(directory: str | os.PathLike, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild a surgered model saved with :meth:`SurgeryResult.save`.

    Args:
        directory: holds ``structure.json`` and ``model.safetensors``.
        base_model: the *original* (unpruned) model; default: built from the structure's
            ``model_spec`` with :func:`prunelib.models.build_model`. It is cut in place.

    Raises:
        SurgeryError: missing or foreign files, or no way to build the base model.
        StructureMismatchError: the structure does not fit the base model (other width/code).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    spath, wpath = directory / "structure.json", directory / "model.safetensors"
    if not spath.is_file() or not wpath.is_file():
        raise SurgeryError(f"{str(directory)!r} lacks structure.json or model.safetensors")
    try:
        structure = json.loads(spath.read_text())
    except json.JSONDecodeError as exc:
        raise SurgeryError(f"{str(spath)!r} is not valid JSON: {exc}") from exc
    if structure.get("format") != STRUCTURE_FORMAT:
        raise SurgeryError(f"{str(spath)!r} is not a prunesearch structure file")
    if int(structure.get("version", 0)) > STRUCTURE_VERSION:
        raise SurgeryError(f"{str(spath)!r} has structure version {structure['version']}, newer "
                           f"than this prunelib ({STRUCTURE_VERSION})")
    if base_model is None:
        spec = structure.get("model_spec")
        if spec is None:
            raise SurgeryError(f"{str(spath)!r} has no model_spec: pass the original model as base_model")
        from prunelib.models import build_model

        base_model = build_model(spec["name"], tuple(spec["input_shape"]), int(spec["num_classes"]),
                                 width=float(spec.get("width", 1.0)), **dict(spec.get("kwargs") or {}))
    apply_structure(base_model, structure)
    state = load_file(str(wpath))
    base_model.load_state_dict(state, strict=True)
    return base_model


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Cut the original ``model`` in place to the shapes a structure describes; returns it.

    Raises:
        StructureMismatchError: a named module is missing, or the resulting parameter shapes
            differ from the structure's (the model was built with other code or settings).
    """
    expected = {k: list(v) for k, v in structure["param_shapes"].items()}
    before = _param_shapes(model)
    missing = sorted(set(expected) - set(before))
    if missing:
        raise StructureMismatchError(
            f"the structure names tensors {missing[:3]} that {type(model).__name__} does not have; "
            f"was it saved from another model?")
    named = dict(model.named_modules())
    for name, _is_out, _idx in structure["pruning_history"]:
        if name not in named:
            raise StructureMismatchError(f"the structure prunes module {name!r}, which "
                                         f"{type(model).__name__} does not have")
    graph = _build_graph(model, structure["input_shape"])
    try:
        with _autograd_on():
            graph.load_pruning_history([tuple(h) for h in structure["pruning_history"]])
    except (IndexError, RuntimeError) as exc:
        raise StructureMismatchError(f"replaying the structure failed ({exc}); the model was "
                                     f"built with other widths than the saved one") from exc
    after = _param_shapes(model)
    for key, shape in expected.items():
        if after.get(key) != shape:
            raise StructureMismatchError(
                f"after replaying the structure, {key!r} has shape {after.get(key)} but the saved "
                f"model has {shape}; the model was built with other settings than the saved one")
    return model


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int],
                dynamic_batch: bool = True, dynamo: bool = True) -> Path:
    """Export ``model`` (e.g. :attr:`SurgeryResult.model`) to ONNX, in eval mode.

    Args:
        model: the module to export (left in its training mode afterwards).
        path: output ``.onnx`` file.
        input_shape: one sample's shape; the exported input is ``(batch, *input_shape)``.
        dynamic_batch: make the batch dimension symbolic.
        dynamo: use ``torch.export`` (the default exporter; needs ``onnxscript``) rather than the
            legacy TorchScript exporter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    x = torch.zeros((2, *input_shape), dtype=_example_inputs(model, input_shape).dtype,
                    device=_example_inputs(model, input_shape).device)
    try:
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["output"], dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes=axes)
    finally:
        model.train(was)
    return path
