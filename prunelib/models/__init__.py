"""Reference models for pruning experiments, and a door for any ``nn.Module``.

``build_model(name, input_shape, num_classes, width)`` builds one of :data:`MODELS`;
``name="custom"`` with ``target="my.module.Factory"`` builds any module: the factory gets the
documented keys its signature names (``input_shape``, ``in_channels``, ``num_classes``) and
the config's own keys (see :mod:`prunelib.targets`). :func:`model_from_config` builds either
from a ``model`` config section.

All reference models are plain modules (Conv2d/Linear/BatchNorm2d/ReLU, no parametrisations,
no functional use of weights) so masks, FLOP counting and channel surgery see every weight;
they take ``(N, C, H, W)`` inputs and work for 8x8, 28x28 and 32x32 images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelib.targets import TargetError, call_target, resolve_target

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "LeNet5",
    "MLP",
    "VGGSmall",
    "DOCUMENTED_MODEL_KEYS",
    "TargetError",
    "build_custom_model",
    "build_model",
    "kaiming_init",
    "model_from_config",
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


#: name -> model class (or a class with fixed arguments), called as
#: ``Factory(input_shape, num_classes, width=1.0, **kwargs)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "vgg_small": VGGSmall,
    "resnet20": functools.partial(CifarResNet, depth_n=3),
    "resnet56": functools.partial(CifarResNet, depth_n=9),
}

#: The keys the project offers a user's model factory (each passed only if its signature names it).
DOCUMENTED_MODEL_KEYS = ("input_shape", "in_channels", "num_classes")


# ---------------------------------------------------------------------------------------------
# Any nn.Module by dotted path
# ---------------------------------------------------------------------------------------------
def build_custom_model(target: str | Callable[..., Any], input_shape: Sequence[int], num_classes: int,
                       kwargs: Mapping[str, Any] | None = None, what: str = "model._target_") -> nn.Module:
    """Build a user's model: ``target`` called with the documented keys it names
    (:data:`DOCUMENTED_MODEL_KEYS`) and every key of ``kwargs`` (the config's own).

    Raises:
        TargetError: the target does not import, rejects a key, or raises (names ``what``).
        TypeError: it returned something other than an ``nn.Module``.
    """
    shape = tuple(int(s) for s in input_shape)
    documented = {"input_shape": shape, "in_channels": shape[0] if shape else None, "num_classes": int(num_classes)}
    model = call_target(target, documented, dict(kwargs or {}), what)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}={target}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_from_config(cfg: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model a ``model`` config section describes.

    With ``_target_`` (``model=custom``, or any config naming a factory) the factory is called
    through :func:`build_custom_model` with the section's other keys (``name`` is only a label);
    otherwise ``name`` is one of :data:`MODELS` and the other keys are its arguments.
    """
    own = {k: v for k, v in cfg.items() if k not in ("name", "_target_")}
    if cfg.get("_target_") is not None:
        return build_custom_model(cfg["_target_"], input_shape, num_classes, own)
    return build_model(str(cfg.get("name")), tuple(input_shape), int(num_classes), **own)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, width: float | None = None, **kwargs: Any
) -> nn.Module:
    """Build a model for inputs of ``input_shape`` and ``num_classes`` outputs.

    Args:
        name: one of :data:`MODELS` (``"mlp"``, ``"lenet5"``, ``"vgg_small"``, ``"resnet20"``,
            ``"resnet56"``), or ``"custom"``.
        input_shape: one sample's shape, ``(C, H, W)`` for the convolutional models (e.g.
            ``(1, 28, 28)``); ``mlp`` takes any shape (a table's ``(features,)``).
        num_classes: output logits.
        width: channel/hidden-size multiplier of the reference models (default 1.0 = the
            published model). For ``"custom"`` it is passed only when given.
        **kwargs: passed to the factory (e.g. ``hidden=(500, 150)`` for ``mlp``). For
            ``"custom"``: ``target="my.module.Factory"`` (``_target_`` is accepted as an alias,
            so a Hydra ``model`` config can be splatted in); see :func:`build_custom_model`.

    Raises:
        ValueError: unknown name, or a custom target that does not import (``TargetError``).
    """
    if name == "custom":
        target = kwargs.pop("target", None)
        alias = kwargs.pop("_target_", None)
        target = target if target is not None else alias
        if target is None:
            raise TargetError("model name 'custom' needs target='my.module.Factory' (or _target_ in the config)")
        if width is not None:
            kwargs["width"] = width
        return build_custom_model(target, input_shape, num_classes, kwargs, what="model target")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS) + ['custom']}")
    shape = tuple(int(s) for s in input_shape)
    if name != "mlp" and len(shape) != 3:
        raise ValueError(f"{name}: input_shape must be (C, H, W), got {shape}")
    return MODELS[name](shape, int(num_classes), width=float(1.0 if width is None else width), **kwargs)
