"""A small model with every topology surgery must handle: a residual add, a depthwise block and
a channel concatenation that feeds the residual stream in part."""

from __future__ import annotations

import torch
from torch import nn

SHAPE = (1, 8, 8)


class ResidualDepthwiseConcat(nn.Module):
    """stem -> [branch a: 1x1 conv | branch b: 1x1 conv -> depthwise 3x3] -> cat + stem
    (residual) -> conv -> global pool -> linear. Every conv has a BatchNorm after it.

    Coupled groups: the stem's 16 channels are written by the stem, by ``a`` (channels 0..7
    through the concat) and by the ``b1 -> dw`` series (channels 8..15); ``c``'s 24 channels
    are a plain group; the classifier's outputs are never cut.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        half = width // 2
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.a = nn.Conv2d(width, half, 1, bias=False)
        self.bna = nn.BatchNorm2d(half)
        self.b1 = nn.Conv2d(width, half, 1, bias=False)
        self.bnb1 = nn.BatchNorm2d(half)
        self.dw = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bndw = nn.BatchNorm2d(half)
        self.c = nn.Conv2d(width, 24, 3, padding=1, bias=False)
        self.bnc = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        a = torch.relu(self.bna(self.a(x)))
        b = torch.relu(self.bndw(self.dw(torch.relu(self.bnb1(self.b1(x))))))
        y = torch.cat([a, b], 1) + x
        y = torch.relu(self.bnc(self.c(y)))
        return self.fc(y.mean((2, 3)))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine, so a removed channel's BN shift matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()
