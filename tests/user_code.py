"""A user's own code, as tests bring it through ``_target_``: models, data and a LightningModule."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class PlainNet(nn.Module):
    """An ordinary model class: knows in_channels and num_classes, has its own width default."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.pool(self.act(self.conv(x)))))


def not_a_module(num_classes: int) -> str:
    return "not a model"


class RaisingNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        raise RuntimeError("my net cannot be built")


class ThreeLogits(nn.Module):
    """Ignores num_classes: three outputs whatever the data."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(64 * in_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(np.asarray(d.images, dtype=np.float32)[:, None] / 16.0)
    return x, torch.tensor(d.target, dtype=torch.long)


def digits_datasets(seed: int = 0, n_test: int = 300) -> tuple[Dataset, None, Dataset]:
    """(train, None, test) Datasets: validation is split off by the door (val_fraction)."""
    x, y = _digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), None, TensorDataset(x[test], y[test])


class DigitsDataModule(L.LightningDataModule):
    """A user's LightningDataModule with its own DataLoaders."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_classes = 10

    def setup(self, stage: str) -> None:
        x, y = _digits()
        self.train_set = TensorDataset(x[:1200], y[:1200])
        self.val_set = TensorDataset(x[1200:1500], y[1200:1500])
        self.test_set = TensorDataset(x[1500:], y[1500:])

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.test_set, batch_size=256)


def macro_f1(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    pred = logits.argmax(1)
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (y == c)).sum().float()
        fp = ((pred == c) & (y != c)).sum().float()
        fn = ((pred != c) & (y == c)).sum().float()
        scores.append(2 * tp / (2 * tp + fp + fn).clamp(min=1))
    return torch.stack(scores).mean()


class F1Module(L.LightningModule):
    """A user's training step: label-smoothed loss, Adam, logs val_loss and val_f1 (no val_acc)."""

    def __init__(self, model: nn.Module, num_classes: int, lr: float = 1e-3, smoothing: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.lr = lr
        self.smoothing = smoothing
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.smoothing)
        self.steps += 1
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val_f1", macro_f1(logits, y, self.num_classes), on_epoch=True)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)


class ForgetfulModule(F1Module):
    """Logs val_f1 only until its ``marker`` file exists (it writes it after its first
    validation): the pre-flight sees val_f1, the trials never log it."""

    def __init__(self, model: nn.Module, num_classes: int, marker: str, lr: float = 1e-3) -> None:
        super().__init__(model, num_classes, lr=lr)
        self.marker = marker

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        import os

        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True)
        if not os.path.exists(self.marker):
            self.log("val_f1", macro_f1(logits, y, self.num_classes), on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        open(self.marker, "w").close()


class SelfBuiltF1Module(F1Module):
    """A user's LightningModule that builds its own network (takes no ``model``): the pruned
    network is its ``model`` attribute, rebuilt from the module's own arguments."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 8, lr: float = 1e-3) -> None:
        super().__init__(PlainNet(in_channels, num_classes, width), num_classes, lr=lr)


import prunelib.methods  # noqa: E402,F401  (first: it imports prunelib.llm.methods to register the LLM pruners)
from prunelib.llm.methods import Wanda  # noqa: E402


class RecordingWanda(Wanda):
    """Wanda as a user's own class (``method._target_``): counts the models it was set up on in
    this process, so a test sees which class a trial built."""

    setups = 0

    def setup(self, model: nn.Module, datamodule=None) -> None:
        type(self).setups += 1
        super().setup(model, datamodule)
