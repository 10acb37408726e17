"""Reference models for pruning experiments, and a door for any ``nn.Module``.

``build_model(name, input_shape, num_classes, width)`` builds one of :data:`MODELS`;
``name="custom"`` with ``target="my.module.Factory"`` builds any module whose constructor
takes ``input_shape`` and ``num_classes`` keyword arguments.

All reference models are plain modules (Conv2d/Linear/BatchNorm2d/ReLU, no parametrisations,
no functional use of weights) so masks, FLOP counting and channel surgery see every weight;
they take ``(N, C, H, W)`` inputs and work for 8x8, 28x28 and 32x32 images.
"""

from __future__ import annotations

import importlib
import math
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "LeNet5",
    "MLP",
    "VGGSmall",
    "build_model",
    "kaiming_init",
    "resolve_target",
]


def _scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights for Conv/Linear (ReLU gain), zero biases, BatchNorm at identity.

    Convolutions use ``fan_out`` (as torchvision's ResNets), linear layers ``fan_in``.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# MLP (LeNet-300-100)
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """LeNet-300-100: Flatten, Linear(in, 300), ReLU, Linear(300, 100), ReLU, Linear(100, classes).

    Args:
        input_shape: ``(C, H, W)``; the input is flattened to ``C*H*W`` features.
        num_classes: output logits.
        width: multiplies the hidden sizes (rounded, at least 1).
        hidden: hidden sizes at width 1 (default ``(300, 100)``).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: float = 1.0, hidden: Sequence[int] = (300, 100)
    ) -> None:
        super().__init__()
        in_features = math.prod(int(s) for s in input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            size = _scaled(int(h), width)
            layers += [nn.Linear(prev, size), nn.ReLU()]
            prev = size
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# LeNet-5
# ---------------------------------------------------------------------------------------------
class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool): conv6 5x5 pad 2, pool, conv16 5x5, pool, fc120, fc84, fc classes.

    On 28x28 inputs this is the classic network (flattened size 16*5*5 = 400, 61,706 parameters
    for 10 classes). On inputs too small for an unpadded second convolution (less than 2x2
    left after its pooling, e.g. 8x8 digits), the second convolution also uses padding 2 so the
    spatial size survives. The flattened size is measured with a dummy forward pass.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output logits.
        width: multiplies every channel and hidden size (rounded, at least 1).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        c1, c2, f1, f2 = (_scaled(n, width) for n in (6, 16, 120, 84))
        after_first = min(h, w) // 2
        # Unpadded 5x5 conv then pool-2 needs at least 6 pixels; otherwise pad to keep the size.
        self.conv2_padding = 0 if after_first - 4 >= 2 else 2
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=self.conv2_padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            try:
                flat = self.features(torch.zeros(1, c, h, w)).shape[1]
            except RuntimeError as e:
                raise ValueError(f"lenet5: input {tuple(input_shape)} is too small (needs at least 4x4)") from e
        self.flat_features = int(flat)
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------
# Small VGG
# ---------------------------------------------------------------------------------------------
VGG_SMALL_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGSmall(nn.Module):
    """A CIFAR-style small VGG: (Conv3x3-BN-ReLU) x2, pool, x2, pool, x2, pool, global pool, Linear.

    Conv widths ``64, 64, M, 128, 128, M, 256, 256, M`` times ``width``. A max-pool is skipped
    when the feature map is already 1 pixel wide, so tiny inputs work.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output logits.
        width: multiplies every conv width (rounded, at least 1).
        cfg: layer list (ints = conv widths at width 1, ``"M"`` = 2x2 max-pool).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: float = 1.0, cfg: Sequence[int | str] = VGG_SMALL_CFG
    ) -> None:
        super().__init__()
        c, h, w = (int(s) for s in input_shape)
        size = min(h, w)
        layers: list[nn.Module] = []
        prev = c
        for item in cfg:
            if item == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = _scaled(int(item), width)
            layers += [nn.Conv2d(prev, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            prev = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(prev, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    ``shortcut`` is an empty ``nn.Sequential`` (identity) or a 1x1 conv + BN projection when
    the stride or channel count changes (option B of He et al. 2016), so channel-pruning tools
    see an ordinary layer on every residual path.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` and of the projection.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        # Separate ReLU modules (not one reused) so forward hooks see each activation once.
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016: conv3x3 16, three stages of ``n`` BasicBlocks.

    Stage widths 16/32/64 (times ``width``), stride 2 at the first block of stages 2 and 3,
    global average pooling, Linear. ``n=3`` is ResNet-20 (about 0.27 M parameters), ``n=9``
    ResNet-56 (about 0.86 M).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output logits.
        depth_n: blocks per stage.
        width: multiplies every channel count (rounded, at least 1).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth_n: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = int(input_shape[0])
        widths = [_scaled(n, width) for n in (16, 32, 64)]
        self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(depth_n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


def _mlp(input_shape: Sequence[int], num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return MLP(input_shape, num_classes, width=width, **kw)


def _lenet5(input_shape: Sequence[int], num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return LeNet5(input_shape, num_classes, width=width, **kw)


def _vgg_small(input_shape: Sequence[int], num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return VGGSmall(input_shape, num_classes, width=width, **kw)


def _resnet20(input_shape: Sequence[int], num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return CifarResNet(input_shape, num_classes, depth_n=3, width=width, **kw)


def _resnet56(input_shape: Sequence[int], num_classes: int, width: float = 1.0, **kw: Any) -> nn.Module:
    return CifarResNet(input_shape, num_classes, depth_n=9, width=width, **kw)


#: name -> factory ``(input_shape, num_classes, width=1.0, **kwargs) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "lenet5": _lenet5,
    "vgg_small": _vgg_small,
    "resnet20": _resnet20,
    "resnet56": _resnet56,
}


# ---------------------------------------------------------------------------------------------
# Any nn.Module by dotted path
# ---------------------------------------------------------------------------------------------
def resolve_target(target: str) -> Callable[..., Any]:
    """Import ``"package.module.Attr"`` (or ``"package.module:Attr"``) and return the attribute.

    Raises:
        ValueError: the path is malformed, the module does not import, or the attribute is missing.
    """
    if not isinstance(target, str) or not target or target == "???":
        raise ValueError(f"model target must be a dotted path like 'my.module.Factory', got {target!r}")
    if ":" in target:
        module_name, _, attr_path = target.partition(":")
    else:
        module_name, _, attr_path = target.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"model target {target!r} is not a dotted path like 'my.module.Factory'")
    # Walk back so "pkg.mod.Class.factory" works: import the longest prefix that is a module.
    parts = module_name.split(".") + attr_path.split(".")
    error: Exception | None = None
    for cut in range(len(module_name.split(".")), 0, -1):
        mod_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(mod_name)
        except ImportError as e:
            if error is None:
                error = e
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as e:
            raise ValueError(f"model target {target!r}: module {mod_name!r} has no attribute path {'.'.join(parts[cut:])!r}") from e
        if not callable(obj):
            raise ValueError(f"model target {target!r} is not callable")
        return obj
    raise ValueError(f"model target {target!r} could not be imported: {error}") from error


def _build_custom(
    input_shape: tuple[int, int, int], num_classes: int, width: float, target: str | None, kwargs: dict[str, Any]
) -> nn.Module:
    if target is None:
        raise ValueError("model name 'custom' needs target='my.module.Factory' (or _target_ in the config)")
    factory = resolve_target(target)
    call_kwargs = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
        accepts_width = "width" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # builtins without a signature: do not guess
        accepts_width = False
    if accepts_width:
        call_kwargs["width"] = width
    elif width != 1.0:
        raise ValueError(f"model target {target!r} does not take a 'width' argument, but width={width} was asked")
    model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **call_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model target {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, **kwargs: Any
) -> nn.Module:
    """Build a model for ``(C, H, W)`` inputs and ``num_classes`` outputs.

    Args:
        name: one of :data:`MODELS` (``"mlp"``, ``"lenet5"``, ``"vgg_small"``, ``"resnet20"``,
            ``"resnet56"``), or ``"custom"``.
        input_shape: ``(C, H, W)`` of one sample, e.g. ``(1, 28, 28)``.
        num_classes: output logits.
        width: channel/hidden-size multiplier (1.0 = the published model).
        **kwargs: passed to the factory (e.g. ``hidden=(500, 150)`` for ``mlp``). For
            ``"custom"``: ``target="my.module.Factory"`` (``_target_`` is accepted as an alias,
            so a Hydra ``model`` config can be splatted in) names a callable taking
            ``input_shape=`` and ``num_classes=`` keywords plus the remaining kwargs; ``width``
            is passed only if the callable accepts it.

    Raises:
        ValueError: unknown name, or a custom target that does not import.
    """
    if name == "custom":
        target = kwargs.pop("target", None)
        alias = kwargs.pop("_target_", None)
        return _build_custom(input_shape, num_classes, width, target if target is not None else alias, kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS) + ['custom']}")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return MODELS[name](tuple(int(s) for s in input_shape), int(num_classes), width=float(width), **kwargs)
