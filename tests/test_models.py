"""Tests for prunelib.models: shapes, parameter counts, determinism, FLOP counting, custom targets."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelib.models import MODELS, BasicBlock, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry() -> None:
    assert set(MODELS) == {"mlp", "lenet5", "vgg_small", "resnet20", "resnet56"}


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        build_model("alexnet", (3, 32, 32), 10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_flops(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    x = torch.randn(2, *shape)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    assert out.shape == (2, 7)
    assert counter.get_total_flops() > 0
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_params(name: str) -> None:
    shape = (3, 32, 32)
    small, base, big = (n_params(build_model(name, shape, 10, width=w)) for w in (0.5, 1.0, 1.5))
    assert small < base < big


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_init(name: str) -> None:
    torch.manual_seed(42)
    a = build_model(name, (1, 28, 28), 10)
    torch.manual_seed(42)
    b = build_model(name, (1, 28, 28), 10)
    torch.manual_seed(43)
    c = build_model(name, (1, 28, 28), 10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_known_param_counts() -> None:
    assert n_params(build_model("mlp", (1, 28, 28), 10)) == 266_610
    assert n_params(build_model("lenet5", (1, 28, 28), 10)) == 61_706
    lenet = build_model("lenet5", (1, 28, 28), 10)
    assert lenet.flat_features == 400 and lenet.conv2_padding == 0  # type: ignore[attr-defined]
    assert build_model("lenet5", (1, 8, 8), 10).conv2_padding == 2  # type: ignore[attr-defined]
    # ResNet-20 with option-A shortcuts has 0.27 M; option B adds two 1x1 projections (2,752).
    r20 = n_params(build_model("resnet20", (3, 32, 32), 10))
    assert 265_000 < r20 < 280_000
    r56 = n_params(build_model("resnet56", (3, 32, 32), 10))
    assert 840_000 < r56 < 870_000


def test_mlp_hidden_override_and_width_rounding() -> None:
    m = build_model("mlp", (1, 8, 8), 10, hidden=(50,))
    linears = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [l.out_features for l in linears] == [50, 10]
    m = build_model("mlp", (1, 8, 8), 10, width=0.001)
    assert [l.out_features for l in m.modules() if isinstance(l, nn.Linear)] == [1, 1, 10]


def test_resnet_blocks_are_findable() -> None:
    model = build_model("resnet20", (3, 32, 32), 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    projections = [b for b in blocks if len(b.shortcut) > 0]
    assert len(projections) == 2  # first block of stages 2 and 3
    for b in projections:
        assert isinstance(b.shortcut[0], nn.Conv2d) and b.shortcut[0].kernel_size == (1, 1)
        assert isinstance(b.shortcut[1], nn.BatchNorm2d)
    assert all(hasattr(b, a) for b in blocks for a in ("conv1", "bn1", "conv2", "bn2", "shortcut"))
    assert len([m for m in build_model("resnet56", (3, 32, 32), 10).modules() if isinstance(m, BasicBlock)]) == 27


def test_vgg_small_skips_pools_on_tiny_inputs() -> None:
    model = build_model("vgg_small", (1, 2, 2), 4)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    assert model(torch.randn(3, 1, 2, 2)).shape == (3, 4)


# --------------------------------------------------------------------------------------------
# custom targets
# --------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A user's own model: constructor takes input_shape and num_classes keywords."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 8) -> None:
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def wide_tiny(input_shape: Sequence[int], num_classes: int, width: float = 1.0) -> nn.Module:
    return TinyNet(input_shape, num_classes, hidden=int(16 * width))


def not_a_module(input_shape: Sequence[int], num_classes: int) -> str:
    return "nope"


def test_custom_target() -> None:
    model = build_model("custom", (1, 8, 8), 5, target=f"{__name__}.TinyNet", hidden=4)
    assert isinstance(model, TinyNet) and model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert model.net[1].out_features == 4
    # Hydra's key, splatted from the model config, works too; "module:attr" form as well.
    model = build_model("custom", (1, 8, 8), 5, _target_=f"{__name__}:TinyNet")
    assert isinstance(model, TinyNet)
    # width reaches a target only when given (never injected), and one that does not take it refuses it.
    assert build_model("custom", (1, 8, 8), 5, width=0.5, target=f"{__name__}.wide_tiny").net[1].out_features == 8
    assert build_model("custom", (1, 8, 8), 5, target=f"{__name__}.wide_tiny").net[1].out_features == 16
    with pytest.raises(ValueError, match="width"):
        build_model("custom", (1, 8, 8), 5, width=0.5, target=f"{__name__}.TinyNet")


class PlainNet(nn.Module):
    """An ordinary model class: it knows in_channels, not input_shape."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_custom_target_gets_only_the_keys_it_accepts() -> None:
    from prunelib.models import model_from_config

    model = model_from_config({"name": "custom", "_target_": f"{__name__}.PlainNet"}, (3, 8, 8), 7)
    assert model.conv.in_channels == 3 and model.head.out_features == 7
    assert model.conv.out_channels == 32  # its own default width, not an injected 1.0
    model = model_from_config({"name": "custom", "_target_": f"{__name__}.PlainNet", "width": 4}, (3, 8, 8), 7)
    assert model.conv.out_channels == 4
    with pytest.raises(ValueError, match=r"model._target_=.*PlainNet: does not accept \['depth'\]"):
        model_from_config({"name": "custom", "_target_": f"{__name__}.PlainNet", "depth": 2}, (3, 8, 8), 7)


def test_mlp_takes_a_table_row() -> None:
    assert build_model("mlp", (13,), 3)(torch.randn(4, 13)).shape == (4, 3)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet5", (13,), 3)


def test_custom_target_errors() -> None:
    with pytest.raises(ValueError, match="could not be imported"):
        build_model("custom", (1, 8, 8), 5, target="no_such_pkg_xyz.Net")
    with pytest.raises(ValueError, match="no attribute"):
        build_model("custom", (1, 8, 8), 5, target=f"{__name__}.NoSuchNet")
    with pytest.raises(ValueError, match="target"):
        build_model("custom", (1, 8, 8), 5)
    with pytest.raises(ValueError, match="dotted path"):
        build_model("custom", (1, 8, 8), 5, target="???")
    with pytest.raises(TypeError, match="nn.Module"):
        build_model("custom", (1, 8, 8), 5, target=f"{__name__}.not_a_module")
