"""MaskSet: apply, enforce through training, reports, file round trip and every error."""

import json

import pytest
import torch
from torch import nn

from prunelib.masks import MaskFileError, MaskMismatchError, MaskSet, prunable_parameters, sparsity_report
from prunelib.methods import MagnitudePruning


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_prunable_parameters_are_conv_and_linear_weights_only():
    assert list(prunable_parameters(small_net())) == ["0.weight", "4.weight", "6.weight"]


def test_unstructured_apply_and_report():
    net = small_net()
    masks = MaskSet.ones_like(net)
    masks.masks["4.weight"][:, :72] = False  # half of layer 4
    masks.apply(net)
    assert torch.count_nonzero(net[4].weight[:, :72]) == 0
    report = sparsity_report(net)
    assert report["layers"]["4.weight"]["sparsity"] == pytest.approx(0.5)
    total = sum(p.numel() for p in prunable_parameters(net).values())
    assert report["global"]["sparsity"] == pytest.approx(16 * 72 / total)
    assert masks.sparsity(net) == pytest.approx(report["global"]["sparsity"])
    # BatchNorm and biases are listed apart, never counted.
    assert report["other_params"] == 4 + 8 + 16 + 3


def test_structured_channel_mask_zeroes_filters_and_biases():
    net = small_net()
    masks = MaskSet()
    keep = torch.tensor([True, False, True, False])
    masks.set("0.weight", keep, "channel")
    masks.apply(net)
    assert torch.count_nonzero(net[0].weight[1]) == 0 and torch.count_nonzero(net[0].bias[1]) == 0
    assert torch.count_nonzero(net[0].weight[0]) > 0
    assert masks.layer_sparsity(net)["0.weight"] == pytest.approx(0.5)


def test_pruned_weights_stay_zero_through_training():
    net = small_net()
    masks = MagnitudePruning(sparsity=0.7).finalize(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        masks.enforce(net)
    for name, p in prunable_parameters(net).items():
        assert torch.all(p[~masks.masks[name]] == 0), name
    assert sparsity_report(net)["global"]["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_save_load_round_trip_with_metadata(tmp_path):
    net = small_net()
    masks = MagnitudePruning(sparsity=0.5).finalize(net)
    masks.set("0.weight", torch.tensor([True, True, False, True]), "channel")
    path = masks.save(tmp_path / "m.safetensors", net, method="magnitude",
                      config={"sparsity": 0.5}, flops={"flops_dense": 123})
    loaded = MaskSet.load(path, small_net(1))
    assert loaded.names() == masks.names()
    for n in masks.names():
        assert torch.equal(loaded.masks[n], masks.masks[n])
        assert loaded.granularity[n] == masks.granularity[n]
    meta = MaskSet.read_metadata(path)
    assert meta["method"] == "magnitude" and meta["config"] == {"sparsity": 0.5}
    assert meta["model_class"].endswith("Sequential")
    assert meta["param_shapes"]["4.weight"] == [16, 144]
    assert 0 < meta["sparsity"] < 1 and meta["flops"]["flops_dense"] == 123
    assert not list(tmp_path.glob("*.tmp"))


def test_load_onto_model_with_other_names_names_the_parameter(tmp_path):
    net = small_net()
    path = MaskSet.ones_like(net).save(tmp_path / "m.safetensors", net)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(MaskMismatchError, match=r"'0\.weight'"):
        MaskSet.load(path, other)


def test_load_onto_model_with_other_shapes_names_parameter_and_shapes(tmp_path):
    net = small_net()
    path = MaskSet.ones_like(net).save(tmp_path / "m.safetensors", net)
    wider = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(MaskMismatchError, match=r"'0\.weight'.*\(4, 1, 3, 3\).*\(8, 1, 3, 3\)"):
        MaskSet.load(path, wider)


def test_truncated_file_fails_clearly(tmp_path):
    net = small_net()
    path = MaskSet.ones_like(net).save(tmp_path / "m.safetensors", net)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="truncated or corrupt"):
        MaskSet.load(path)


def test_foreign_files_fail_clearly(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(MaskFileError, match="not a prunesearch masks file"):
        MaskSet.load(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(MaskFileError):
        MaskSet.load(junk)
    with pytest.raises(MaskFileError, match="does not exist"):
        MaskSet.load(tmp_path / "missing.safetensors")


def test_bad_granularity_rejected():
    with pytest.raises(ValueError, match="granularity"):
        MaskSet().set("w", torch.ones(3), "block")
