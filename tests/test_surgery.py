"""Channel surgery: structured masks -> a physically smaller model with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunelib.flops import count_flops, model_cost
from prunelib.masks import MaskMismatchError, MaskSet
from prunelib.models import build_model
from prunelib.surgery import (
    StructureMismatchError,
    SurgeryError,
    channel_groups,
    complete_channel_masks,
    export_onnx,
    load_surgered,
    surgery,
)

from tests.topologies import randomise_bn as _randomise_bn

SHAPE = (1, 16, 16)


def _random_channel_masks(model: nn.Module, fraction: float, seed: int = 0,
                          skip_last: bool = True) -> MaskSet:
    masks = MaskSet.ones_like(model, granularity="channel")
    names = masks.names()[:-1] if skip_last else masks.names()
    gen = torch.Generator().manual_seed(seed)
    for n in names:
        m = masks.masks[n]
        m[torch.randperm(m.numel(), generator=gen)[: int(fraction * m.numel())]] = False
    for n in set(masks.names()) - set(names):
        del masks.masks[n], masks.granularity[n]
    return masks


def _masked_reference(model: nn.Module, masks: MaskSet) -> nn.Module:
    ref = copy.deepcopy(model)
    complete_channel_masks(ref, masks, SHAPE).apply(ref)
    return ref.eval()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "lenet5", "vgg_small"])
def test_surgered_model_computes_what_the_masked_model_computes(name):
    torch.manual_seed(0)
    model = _randomise_bn(build_model(name, SHAPE, 10, width=0.5))
    before = copy.deepcopy(model.state_dict())
    masks = _random_channel_masks(model, 0.5)
    result = surgery(model, masks, SHAPE, round_to=None)
    x = torch.randn(8, *SHAPE)
    torch.testing.assert_close(result.model.eval()(x), _masked_reference(model, masks)(x),
                               rtol=1e-4, atol=1e-5)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    # Every masked output channel of a non-output layer is gone, and only those.
    for key, mask in masks.masks.items():
        module = key[: -len(".weight")]
        assert result.kept_channels[module] == int(mask.sum()), key
    assert _n_params(result.model) < 0.6 * _n_params(model)
    # The input model is untouched (surgery works on a copy).
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_without_completion_the_bn_shift_of_a_removed_channel_would_leak():
    """Why masks are completed: masking only the conv leaves relu(BN shift) flowing downstream."""
    model = _randomise_bn(build_model("vgg_small", SHAPE, 10, width=0.25))
    masks = _random_channel_masks(model, 0.5)
    naive = copy.deepcopy(model)
    masks.apply(naive)  # conv filters zeroed, BatchNorm after them left as is
    result = surgery(model, masks, SHAPE, round_to=None)
    x = torch.randn(4, *SHAPE)
    assert not torch.allclose(naive.eval()(x), result.model.eval()(x), atol=1e-4)
    completed = result.masks
    bn_keys = [k for k in completed.names() if k.startswith("features.1.")]
    assert bn_keys and completed.granularity[bn_keys[0]] == "channel"


def test_resnet20_residual_stream_goes_only_when_every_writer_is_masked():
    model = _randomise_bn(build_model("resnet20", SHAPE, 10, width=0.5))
    groups = channel_groups(model, SHAPE)
    stream = next(g for g in groups if "conv1" in g.producers and "layer1.0.conv2" in g.producers)
    assert {"layer1.1.conv2", "layer1.2.conv2"} <= set(stream.producers)
    assert "bn1" in stream.norms
    masks = MaskSet.ones_like(model, granularity="channel")
    del masks.masks["fc.weight"], masks.granularity["fc.weight"]
    for producer in stream.producers:  # stream channels 0 and 1: every writer masked
        masks.masks[f"{producer}.weight"][[0, 1]] = False
    masks.masks["layer1.1.conv2.weight"][5] = False  # one branch only: the stream keeps channel 5
    masks.masks["layer2.0.conv1.weight"][:3] = False  # inside a block: removable
    result = surgery(model, masks, SHAPE, round_to=None)
    small = result.model
    width = model.conv1.out_channels
    assert small.conv1.out_channels == width - 2
    assert small.layer1[1].conv2.out_channels == width - 2
    assert small.layer2[0].conv1.out_channels == model.layer2[0].conv1.out_channels - 3
    assert small.layer2[0].shortcut[0].in_channels == width - 2
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(small.eval()(x), _masked_reference(model, masks)(x), rtol=1e-4, atol=1e-5)


def test_flatten_between_conv_and_linear_removes_the_matching_features():
    model = build_model("lenet5", (1, 28, 28), 10).eval()
    masks = MaskSet()
    keep = torch.ones(16, dtype=torch.bool)
    keep[[2, 9, 15]] = False
    masks.set("features.3.weight", keep, "channel")
    result = surgery(model, masks, (1, 28, 28), round_to=None)
    assert result.model.features[3].out_channels == 13
    assert result.model.classifier[0].in_features == 13 * 5 * 5
    x = torch.randn(3, 1, 28, 28)
    ref = copy.deepcopy(model)
    complete_channel_masks(ref, masks, (1, 28, 28)).apply(ref)
    torch.testing.assert_close(result.model(x), ref(x), rtol=1e-4, atol=1e-5)


class TwoBranchConcat(nn.Module):
    """Two convolution branches concatenated along channels, then a consumer convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.merge = nn.Conv2d(10, 5, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.head(self.pool(self.merge(y)).flatten(1))


def test_concatenation_cuts_the_right_slice_of_the_consumer():
    torch.manual_seed(0)
    model = TwoBranchConcat().eval()
    masks = MaskSet()
    keep_a = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    keep_b = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    masks.set("a.weight", keep_a, "channel")
    masks.set("b.weight", keep_b, "channel")
    result = surgery(model, masks, (1, 8, 8), round_to=None)
    assert result.model.merge.in_channels == 6
    kept = torch.cat([keep_a, keep_b])
    torch.testing.assert_close(result.model.merge.weight, model.merge.weight[:, kept])
    ref = copy.deepcopy(model)
    masks.apply(ref)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(result.model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_round_to_keeps_multiples_and_the_function():
    model = _randomise_bn(build_model("vgg_small", SHAPE, 10, width=0.5))
    masks = _random_channel_masks(model, 0.6, seed=3)
    result = surgery(model, masks, SHAPE, round_to=8)
    for name, count in result.kept_channels.items():
        if name != "classifier":
            assert count % 8 == 0, (name, count)
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(result.model(x), _masked_reference(model, masks)(x), rtol=1e-4, atol=1e-5)
    # "auto" on a CPU model means exact counts.
    exact = surgery(model, masks, SHAPE)
    assert exact.structure["round_to"] is None
    assert any(v % 8 for k, v in exact.kept_channels.items() if k != "classifier")


def test_a_fully_masked_layer_keeps_one_channel_and_output_layers_are_kept():
    model = build_model("mlp", SHAPE, 10, width=0.1).eval()
    masks = MaskSet.ones_like(model, granularity="channel")
    masks.masks["net.1.weight"][:] = False
    masks.masks["net.5.weight"][:2] = False  # classifier outputs: never removed
    result = surgery(model, masks, SHAPE, round_to=None)
    assert result.model.net[1].out_features == 1
    assert result.model.net[5].out_features == 10


def test_structure_file_rebuilds_the_model_from_code(tmp_path):
    spec = {"name": "resnet20", "input_shape": list(SHAPE), "num_classes": 10, "width": 0.5}
    model = _randomise_bn(build_model("resnet20", SHAPE, 10, width=0.5))
    masks = _random_channel_masks(model, 0.4, seed=1)
    result = surgery(model, masks, SHAPE, round_to=None)
    out = result.save(tmp_path / "small", model_spec=spec)
    structure = json.loads((out / "structure.json").read_text())
    assert structure["format"] == "prunesearch-structure"
    assert structure["out_channels"]["layer1.0.conv1"] == result.model.layer1[0].conv1.out_channels
    assert structure["kept_indices"]
    rebuilt = load_surgered(out).eval()
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(rebuilt(x), result.model.eval()(x), rtol=0, atol=0)
    # Without a model spec, the caller passes the original model.
    result.save(tmp_path / "nospec")
    with pytest.raises(SurgeryError, match="base_model"):
        load_surgered(tmp_path / "nospec")
    rebuilt2 = load_surgered(tmp_path / "nospec", base_model=build_model("resnet20", SHAPE, 10, width=0.5))
    torch.testing.assert_close(rebuilt2.eval()(x), result.model(x), rtol=0, atol=0)
    # The wrong original (other width) is refused with a clear error.
    with pytest.raises(StructureMismatchError):
        load_surgered(tmp_path / "nospec", base_model=build_model("resnet20", SHAPE, 10, width=1.0))
    with pytest.raises(StructureMismatchError):
        load_surgered(tmp_path / "nospec", base_model=build_model("vgg_small", SHAPE, 10, width=0.5))
    with pytest.raises(SurgeryError, match="lacks"):
        load_surgered(tmp_path / "missing")


def test_bad_inputs_give_clear_errors():
    model = build_model("lenet5", SHAPE, 10)
    other = build_model("mlp", SHAPE, 10)
    with pytest.raises(MaskMismatchError, match="no match"):
        surgery(model, _random_channel_masks(other, 0.5), SHAPE)
    wrong_shape = MaskSet()
    wrong_shape.set("features.0.weight", torch.ones(7, dtype=torch.bool), "channel")
    with pytest.raises(MaskMismatchError, match="shape"):
        surgery(model, wrong_shape, SHAPE)
    with pytest.raises(SurgeryError, match="cannot trace"):
        surgery(build_model("mlp", SHAPE, 10), MaskSet(), (3, 5, 5))
    with pytest.raises(ValueError, match="round_to"):
        surgery(model, MaskSet(), SHAPE, round_to=0)


def test_physical_cost_uses_the_surgered_model_for_structured_masks():
    model = _randomise_bn(build_model("vgg_small", SHAPE, 10, width=0.25))
    masks = _random_channel_masks(model, 0.5)
    small = surgery(model, masks, SHAPE, round_to=None).model
    with torch.inference_mode():  # as in a Lightning validation hook
        cost = model_cost(model, SHAPE, masks, round_to=None)
    assert cost.flops_physical == count_flops(small, SHAPE) < 0.5 * cost.flops_dense
    assert cost.params_physical == _n_params(small)
    unstructured = MaskSet.ones_like(model)  # weight granularity: nothing to remove
    assert model_cost(model, SHAPE, unstructured).flops_physical == cost.flops_dense


def test_onnx_export_runs_with_the_same_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _randomise_bn(build_model("lenet5", SHAPE, 10))
    result = surgery(model, _random_channel_masks(model, 0.5), SHAPE, round_to=None)
    path = export_onnx(result.model, tmp_path / "small.onnx", SHAPE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *SHAPE)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), result.model(x).detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Residual + depthwise + concat (tests/topologies.py), the artifact a user gets, pruned costs
# ---------------------------------------------------------------------------------------------
def _group_masks(model: nn.Module, groups, drop: dict[str, list[int]], skip: tuple[str, ...] = ()) -> MaskSet:
    """Channel masks on every producer of each group for the group channels in ``drop``."""
    modules = dict(model.named_modules())
    masks = MaskSet()
    for group in groups:
        if group.root not in drop:
            continue
        idx = torch.tensor(drop[group.root], dtype=torch.long)
        for producer, index in group.producers.items():
            if producer in skip:
                continue
            key = f"{producer}.weight"
            keep = masks.masks[key].clone() if key in masks else torch.ones(
                modules[producer].weight.shape[0], dtype=torch.bool)
            picked = index[idx]
            keep[picked[picked >= 0]] = False
            masks.set(key, keep, "channel")
    return masks


def test_a_concat_feeding_a_residual_in_part_and_a_depthwise_block_are_cut():
    from tests.topologies import SHAPE as TSHAPE, ResidualDepthwiseConcat

    torch.manual_seed(0)
    model = _randomise_bn(ResidualDepthwiseConcat())
    groups = {g.root: g for g in channel_groups(model, TSHAPE)}
    stream = groups["stem"]
    assert stream.prunable and set(stream.producers) == {"stem", "a", "b1", "dw"}
    assert stream.covered("a").tolist() == [True] * 8 + [False] * 8  # the concat's first slice
    assert stream.covered("dw").tolist() == [False] * 8 + [True] * 8
    assert stream.depthwise == {"dw": ["b1"]} and stream.norm_after["dw"] == "bndw"
    masks = _group_masks(model, groups.values(), {"stem": [0, 3, 9, 12], "c": [1, 5, 6]})
    result = surgery(model, masks, TSHAPE, round_to=None)
    small = result.model
    assert (small.stem.out_channels, small.a.out_channels, small.b1.out_channels, small.dw.out_channels,
            small.dw.groups, small.c.in_channels, small.c.out_channels) == (12, 6, 6, 6, 6, 12, 21)
    x = torch.randn(6, *TSHAPE)
    ref = copy.deepcopy(model)
    complete_channel_masks(ref, masks, TSHAPE).apply(ref)
    torch.testing.assert_close(small.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    assert result.max_abs_diff < 1e-4 and _n_params(small) < _n_params(model)
    # The depthwise series is dead when either link is masked; the stream only when its writer is.
    for skip, removed in ((("dw",), True), (("b1",), True), (("stem",), False)):
        partial = _group_masks(model, groups.values(), {"stem": [9]}, skip=skip)
        cut = surgery(model, partial, TSHAPE, round_to=None)
        assert (cut.model.stem.out_channels == 15) is removed, skip
        torch.testing.assert_close(cut.model.eval()(x), _masked_reference_of(model, partial, TSHAPE)(x),
                                   rtol=1e-4, atol=1e-5)


def _masked_reference_of(model: nn.Module, masks: MaskSet, shape) -> nn.Module:
    ref = copy.deepcopy(model)
    complete_channel_masks(ref, masks, shape).apply(ref)
    return ref.eval()


@pytest.mark.parametrize("name", ["lenet5", "vgg_small", "resnet20", "topology"])
def test_pruned_cost_is_the_flop_count_of_the_surgered_model(name):
    from prunelib.flops import pruned_cost
    from tests.topologies import SHAPE as TSHAPE, ResidualDepthwiseConcat

    torch.manual_seed(0)
    if name == "topology":
        model, shape = ResidualDepthwiseConcat().eval(), TSHAPE
    else:
        model, shape = build_model(name, SHAPE, 10, width=0.5).eval(), SHAPE
    groups = channel_groups(model, shape)
    gen = torch.Generator().manual_seed(1)
    removed, drop = {}, {}
    for g in groups:
        if g.prunable:
            gone = torch.rand(g.size, generator=gen) < 0.4
            gone[0] = False
            removed[g.root], drop[g.root] = gone, torch.nonzero(gone).flatten().tolist()
    small = surgery(model, _group_masks(model, groups, drop), shape, round_to=None).model
    assert pruned_cost(model, shape, groups, removed) == (count_flops(small, shape), _n_params(small))


def test_deployable_is_the_surgered_model_or_the_masked_one_with_its_own_cost():
    from prunelib.flops import deployable

    model = _randomise_bn(build_model("vgg_small", SHAPE, 10, width=0.25))
    masks = _random_channel_masks(model, 0.5)
    art = deployable(model, masks, SHAPE, round_to=None)
    assert art.kind == "surgered" and art.model is not model and art.surgery is not None
    assert art.flops == count_flops(art.model, SHAPE) == art.cost.flops_physical < art.cost.flops_dense
    assert art.params == _n_params(art.model) == art.cost.params_physical
    assert art.metrics()["flops_deployed"] == art.flops and art.metrics()["artifact"] == "surgered"
    assert art.metrics()["params_deployed"] == art.params
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(art.model(x), _masked_reference(model, masks)(x), rtol=1e-4, atol=1e-5)
    weights = MaskSet.ones_like(model)
    weights.masks["features.0.weight"].view(-1)[::2] = False
    art = deployable(model, weights, SHAPE)
    assert art.kind == "masked" and art.model is model and art.surgery is None
    assert art.flops == art.cost.flops_effective == art.cost.flops_deployed < art.cost.flops_dense
    assert art.params == art.cost.params_effective == art.cost.params_deployed
    assert float(model.features[0].weight.detach().view(-1)[::2].abs().sum()) == 0  # applied


def test_a_cost_that_cannot_be_measured_raises_instead_of_reporting_dense():
    from prunelib.flops import deployable

    model = build_model("mlp", SHAPE, 10, width=0.1)
    masks = MaskSet.ones_like(model, granularity="channel")
    masks.masks["net.1.weight"][:3] = False
    with pytest.raises(SurgeryError, match="cannot be measured"):
        model_cost(model, (3, 5, 5), masks)  # the forward fails at this shape: no trace
    with pytest.raises(SurgeryError, match="no deployable model"):
        deployable(model, masks, (3, 5, 5))


def test_one_trace_serves_groups_costs_and_surgeries_until_the_layout_changes(monkeypatch):
    import gc

    import prunelib.surgery as surgery_module

    traced = []
    build = surgery_module._build_graph
    monkeypatch.setattr(surgery_module, "_build_graph", lambda m, s: traced.append(id(m)) or build(m, s))
    model = _randomise_bn(build_model("vgg_small", SHAPE, 10, width=0.25))
    groups = channel_groups(model, SHAPE)
    assert len(traced) == 1
    for seed in range(3):
        masks = _random_channel_masks(model, 0.5, seed=seed)
        with torch.no_grad():  # training moves the weights; the trace stays, the copy is of now
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        before = len(traced)
        cost = model_cost(model, SHAPE, masks, round_to=None)
        result = surgery(model, masks, SHAPE, round_to=None)
        assert channel_groups(model, SHAPE) == groups
        assert len(traced) == before  # the model's one trace serves every cost and cut
        fresh = copy.deepcopy(model)  # a new object: traced on its own, as every call was before
        assert model_cost(fresh, SHAPE, masks, round_to=None) == cost
        again = surgery(fresh, masks, SHAPE, round_to=None)
        assert len(traced) == before + 1
        assert again.structure == result.structure and again.removed == result.removed
        assert cost.flops_physical == count_flops(result.model, SHAPE)
        x = torch.randn(4, *SHAPE)
        torch.testing.assert_close(result.model.eval()(x), _masked_reference(model, masks)(x), rtol=1e-4, atol=1e-5)
    before = len(traced)
    model.double()  # another layout: traced again, and the first one is still kept
    assert channel_groups(model, SHAPE)[0].root == groups[0].root and len(traced) == before + 1
    model.float()
    assert channel_groups(model, SHAPE) == groups and len(traced) == before + 1
    kept = len(surgery_module._TRACES)
    del model, fresh
    gc.collect()
    assert len(surgery_module._TRACES) < kept  # the trace goes with its model
