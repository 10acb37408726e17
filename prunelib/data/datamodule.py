"""In-memory data modules: whole splits held as tensors, batches sliced without worker processes.

The reference data sets are small (at most 60k images), so keeping them resident (on the CPU, or
on the GPU next to the model) removes the DataLoader worker pool and the host-to-device copy,
which dominate the step time of the small models that pruning searches train many times.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning
import torch
from torch import Tensor

__all__ = ["ArrayDataModule", "ResidentBatches"]

_SPLITS = ("train", "val", "test")


class ResidentBatches:
    """An iterable of ``(x, y)`` batches sliced from tensors that stay where they are.

    Each iteration started (first batch requested) is one epoch. With ``shuffle=True`` the order is a
    ``torch.randperm`` drawn on the tensors' device from a ``torch.Generator`` seeded with
    ``seed + epoch``, where ``epoch`` counts the iterations started so far (from 0); so the same seed
    gives the same sequence of epochs (bit-identical on CPU) and successive epochs differ.
    Call :meth:`set_epoch` to pin the epoch (e.g. when resuming).

    Args:
        x: inputs, first dimension = samples.
        y: labels, same first dimension.
        batch_size: samples per batch (>= 1).
        shuffle: draw a fresh permutation every epoch; otherwise slices in stored order.
        seed: base seed of the shuffling generator.
        drop_last: drop a final batch smaller than ``batch_size``.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` use this epoch number (0-based)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: the epoch number is taken when the first batch is requested, so an
        # ``iter()`` that is never advanced (Lightning makes one while setting up) costs no epoch.
        n = self.x.shape[0]
        epoch = self.epoch
        self.epoch += 1
        bs = self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        if not self.shuffle:
            # Plain slices are views: no copy at all for evaluation passes.
            for i in range(0, stop, bs):
                yield self.x[i : i + bs], self.y[i : i + bs]
            return
        device = self.x.device
        g = torch.Generator(device=device)
        g.manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g, device=device)
        for i in range(0, stop, bs):
            idx = order[i : i + bs]
            yield self.x[idx], self.y[idx]


class ArrayDataModule(lightning.LightningDataModule):
    """Train/val/test tensors held in memory (optionally on the training device).

    Args:
        name: data set name (e.g. ``"digits"``).
        train, val, test: ``(x, y)`` pairs; ``x`` float of shape ``(N, C, H, W)`` (images) or
            ``(N, F)`` (tables), ``y`` int64 ``(N,)``.
        num_classes: number of classes.
        batch_size: training batch size (samples).
        eval_batch_size: batch size of validation and test passes (samples).
        seed: seed of the training shuffle and of :meth:`sample_batch`'s default generator.
        device: where the tensors live; ``"cuda"`` keeps the whole data set on the GPU.

    Attributes:
        input_shape: the shape of one sample (``(C, H, W)``, or ``(F,)`` for a table).
        mean, std: per-channel normalisation statistics in raw input units (0..255 pixels, 0..16
            for digits) applied as ``(x - mean) / std``, if known (set by
            :func:`prunelib.data.build_datamodule`), so exported models can document their input.
    """

    def __init__(
        self,
        name: str,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        num_classes: int,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        for split, (x, y) in zip(_SPLITS, (train, val, test)):
            if x.dim() < 2:
                raise ValueError(f"{split} inputs must be (N, ...) with one sample per row, got shape {tuple(x.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{split}: {x.shape[0]} inputs but {y.shape[0]} labels")
            self._data[split] = (x, y)
        # (C, H, W) for images, (features,) for tables.
        self.input_shape: tuple[int, ...] = tuple(int(s) for s in train[0].shape[1:])
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        # (lo, hi) of the normalised inputs, from the training split's raw range (set by
        # build_datamodule): data-free methods bound activations with it (PAODING).
        self.input_range: tuple[float, float] | None = None
        self.to(device)

    # -- tensors --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the resident tensors."""
        return self._data["train"][0].device

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole ``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in self._data:
            raise ValueError(f"unknown split {split!r}; expected one of {list(_SPLITS)}")
        return self._data[split]

    def split_labels(self, split: str) -> Tensor:
        """Every label of one split (the resident tensor), for the pre-flight's label checks."""
        return self.split(split)[1]

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per split, e.g. ``{"train": 1293, "val": 144, "test": 360}``."""
        return {s: int(x.shape[0]) for s, (x, _) in self._data.items()}

    def to(self, device: str | torch.device) -> "ArrayDataModule":
        """Move the resident tensors to ``device``; returns ``self``."""
        self._data = {s: (x.to(device), y.to(device)) for s, (x, y) in self._data.items()}
        return self

    # -- Lightning hooks ------------------------------------------------------------------
    def train_dataloader(self) -> ResidentBatches:
        """Shuffled training batches of ``batch_size``; each new loader restarts at epoch 0."""
        x, y = self._data["train"]
        return ResidentBatches(x, y, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> ResidentBatches:
        """Validation batches of ``eval_batch_size`` in stored order."""
        x, y = self._data["val"]
        return ResidentBatches(x, y, self.eval_batch_size, shuffle=False, seed=self.seed)

    def test_dataloader(self) -> ResidentBatches:
        """Test batches of ``eval_batch_size`` in stored order."""
        x, y = self._data["test"]
        return ResidentBatches(x, y, self.eval_batch_size, shuffle=False, seed=self.seed)

    # -- probes ---------------------------------------------------------------------------
    def sample_batch(
        self, split: str = "train", n: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """A random batch drawn without replacement from one split (for SNIP, probes, calibration).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            n: samples wanted (default ``batch_size``); capped at the split's size.
            generator: source of randomness; by default a CPU generator seeded with ``seed``,
                so repeated calls return the same batch. Pass your own to draw different ones.

        Returns:
            ``(x, y)`` on the data module's device.
        """
        x, y = self.split(split)
        total = int(x.shape[0])
        n = self.batch_size if n is None else int(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        n = min(n, total)
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        # Draw on the generator's device (CPU unless the caller passes a CUDA generator).
        idx = torch.randperm(total, generator=generator, device=generator.device)[:n].to(x.device)
        return x[idx], y[idx]

    def __str__(self) -> str:  # Lightning's own __str__ assumes DataLoader objects
        return self.__repr__()

    def __repr__(self) -> str:
        return (
            f"ArrayDataModule(name={self.name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"sizes={self.sizes}, batch_size={self.batch_size}, device={str(self.device)!r})"
        )
