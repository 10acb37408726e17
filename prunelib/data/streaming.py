"""The Lightning data modules of :mod:`prunelib.data.custom`: streamed Datasets and a user's own
LightningDataModule (imported when such data is built, never to check a config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from prunelib.data.custom import _collate, _item, _pair_collate
from prunelib.data.labels import DataSourceError, class_count, dataset_labels, reading_error

__all__ = ["LightningDataAdapter", "StreamingDataModule"]


class StreamingDataModule(lightning.LightningDataModule):
    """Train/val/test Datasets read through DataLoaders with worker processes.

    For data sets too big to hold in memory. Training batches are shuffled by a generator seeded
    with ``seed + epoch``. ``sample_batch`` draws random items for the methods' probes.

    Args:
        name: a label.
        train, val, test: Datasets of ``(input, label)`` items.
        num_classes: labels are ``0 .. num_classes - 1``.
        input_shape: one input's shape.
        batch_size / eval_batch_size: samples per training / evaluation batch.
        num_workers: DataLoader worker processes (0 = load in the training process).
        seed: shuffling seed.
        pin_memory: pin host batches (for GPU training).
    """

    def __init__(self, name: str, train: Dataset, val: Dataset, test: Dataset, num_classes: int,
                 input_shape: Sequence[int], batch_size: int = 128, eval_batch_size: int = 1024,
                 num_workers: int = 2, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.name = name
        self.datasets = {"train": train, "val": val, "test": test}
        self.num_classes = int(num_classes)
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in input_shape)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed, self.pin_memory = int(num_workers), int(seed), bool(pin_memory)
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.input_range: tuple[float, float] | None = None
        self._epoch = 0

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {s: len(d) for s, d in self.datasets.items()}  # type: ignore[arg-type]

    def split_labels(self, split: str) -> Tensor:
        """Every label of one split (one pass unless the dataset has ``targets``; its
        ``__len__`` checked against what it yields), for the pre-flight's label checks."""
        return dataset_labels(self.datasets[split], split)

    def restart(self) -> None:
        """Start the shuffling again at epoch 0: a new run on the same data (a trial on a reused
        worker) draws the batches a fresh data module would."""
        self._epoch = 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = None
        if shuffle:
            gen = torch.Generator().manual_seed(self.seed + self._epoch)
            self._epoch += 1
        return DataLoader(self.datasets[split], batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                          shuffle=shuffle, generator=gen, num_workers=self.num_workers, collate_fn=_pair_collate,
                          pin_memory=self.pin_memory, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size``."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size`` in stored order."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``eval_batch_size`` in stored order."""
        return self._loader("test", False)

    def sample_batch(self, split: str = "train", n: int | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A random batch of ``n`` items (default ``batch_size``) from one split, on the CPU."""
        ds = self.datasets[split]
        total = len(ds)  # type: ignore[arg-type]
        n = min(self.batch_size if n is None else int(n), total)
        generator = generator or torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(total, generator=generator)[:n].tolist()
        return _collate([ds[i] for i in idx], f"{self.name} {split}")

    def __repr__(self) -> str:
        return (f"StreamingDataModule(name={self.name!r}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, sizes={self.sizes}, workers={self.num_workers})")


class LightningDataAdapter(lightning.LightningDataModule):
    """A user's LightningDataModule with what the pruning methods need added around it.

    The user's module is not changed: its loaders and batch-transfer hooks are used as they
    are; ``input_shape``/``num_classes`` come from its attributes or a first training batch;
    ``sample_batch`` reads items from its loaders.
    """

    def __init__(self, inner: lightning.LightningDataModule, name: str, num_classes: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self._stages: set[str] = set()
        self.prepare_data()
        self.setup("fit")
        x, y = _item(next(iter(inner.train_dataloader())), f"{name} train_dataloader()")
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in x.shape[1:])
        declared = getattr(inner, "num_classes", None)
        train_labels = None
        if not (num_classes or declared):
            train_labels = self.split_labels("train")
            if train_labels is None:
                raise DataSourceError(f"data: the training batches of {name} are not (inputs, class indices); "
                                      "set data.num_classes (or a num_classes attribute on the data module)")
        self.num_classes = class_count(train_labels, num_classes, declared)
        self.batch_size = int(getattr(inner, "batch_size", x.shape[0]))
        self.mean = getattr(inner, "mean", None)
        self.std = getattr(inner, "std", None)
        self.input_range = getattr(inner, "input_range", None)

    def split_labels(self, split: str) -> Tensor | None:
        """Every label of one split, read from the user's loader (one pass), or None where the
        module has no such loader or its batches are not ``(inputs, class indices)``."""
        loader_of = {"train": self.train_dataloader, "val": self.val_dataloader, "test": self.test_dataloader}[split]
        if getattr(type(self.inner), f"{split}_dataloader") is getattr(lightning.LightningDataModule,
                                                                        f"{split}_dataloader"):
            return None  # the user's module does not provide this split
        labels = []
        try:
            for batch in loader_of():
                if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], Tensor) \
                        or batch[1].is_floating_point():
                    return None  # not a classifier's batches: nothing to hold to a class count
                labels.append(batch[1].reshape(-1).long())
        except Exception as exc:
            raise reading_error(split, exc) from exc
        return torch.cat(labels) if labels else None

    def prepare_data(self) -> None:
        if "prepare" not in self._stages:
            self.inner.prepare_data()
            self._stages.add("prepare")

    def setup(self, stage: str) -> None:
        if stage not in self._stages:
            self.inner.setup(stage)
            self._stages.add(stage)

    def train_dataloader(self) -> Any:
        return self.inner.train_dataloader()

    def val_dataloader(self) -> Any:
        self.setup("validate")
        return self.inner.val_dataloader()

    def test_dataloader(self) -> Any:
        self.setup("test")
        return self.inner.test_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.inner.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_after_batch_transfer(batch, dataloader_idx)

    def sample_batch(self, split: str = "train", n: int | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """About ``n`` items (default one batch) from the split's loader, in its own order."""
        loader = {"train": self.train_dataloader, "val": self.val_dataloader, "test": self.test_dataloader}[split]()
        want = self.batch_size if n is None else int(n)
        xs, ys, have = [], [], 0
        for batch in loader:
            x, y = _item(batch, f"{self.name} {split}")
            xs.append(x)
            ys.append(y)
            have += int(y.shape[0])
            if have >= want:
                break
        return torch.cat(xs)[:want], torch.cat(ys)[:want]
