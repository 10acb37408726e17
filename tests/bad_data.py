"""A user's data with something wrong in it, as tests and the reliability drill bring it
through ``data._target_``: a stray label, one class, negative labels, a ``__len__`` that lies."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

N_TRAIN, N_EVAL = 240, 60


def _split(n: int, labels: Tensor | None = None, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = labels if labels is not None else torch.arange(n) % classes
    # Inputs that say their class, so that a tiny model learns something.
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.float().view(-1, 1, 1, 1)
    return TensorDataset(x, y.long())


def fine() -> tuple[Dataset, Dataset, Dataset]:
    """Four classes in every split."""
    return _split(N_TRAIN), _split(N_EVAL, seed=1), _split(N_EVAL, seed=2)


def bad_test_label(label: int = 42, index: int = 7) -> tuple[Dataset, Dataset, Dataset]:
    """Labels 0..3 everywhere but one test item labelled ``label`` (at ``index``)."""
    y = torch.arange(N_EVAL) % 4
    y[index] = label
    return _split(N_TRAIN), _split(N_EVAL, seed=1), _split(N_EVAL, y, seed=2)


def single_class() -> tuple[Dataset, Dataset, Dataset]:
    """Every training (and evaluation) label is 0."""
    zeros = torch.zeros(N_TRAIN, dtype=torch.long)
    return _split(N_TRAIN, zeros), _split(N_EVAL, zeros[:N_EVAL], seed=1), _split(N_EVAL, zeros[:N_EVAL], seed=2)


def negative_labels(index: int = 5) -> tuple[Dataset, Dataset, Dataset]:
    """One validation label is -1."""
    y = torch.arange(N_EVAL) % 4
    y[index] = -1
    return _split(N_TRAIN), _split(N_EVAL, y, seed=1), _split(N_EVAL, seed=2)


def fewer_classes_in_eval() -> tuple[Dataset, Dataset, Dataset]:
    """Training labels 0..3; validation and test hold only 0 and 1 (the count is the training split's: 4)."""
    y = torch.arange(N_EVAL) % 2
    return _split(N_TRAIN), _split(N_EVAL, y, seed=1), _split(N_EVAL, y, seed=2)


class LyingLength(Dataset):
    """``__len__`` says ``claimed`` items; ``__getitem__`` holds ``len(inner)``."""

    def __init__(self, inner: Dataset, claimed: int) -> None:
        self.inner = inner
        self.claimed = claimed

    def __len__(self) -> int:
        return self.claimed

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inner[i]  # IndexError past the real end, as a list or tensor would


def lying_length(split: str = "test", claimed: int = 100) -> tuple[Dataset, Dataset, Dataset]:
    """One split's ``__len__`` says ``claimed`` but it holds ``N_EVAL`` (or ``N_TRAIN``) items."""
    sets = dict(zip(("train", "val", "test"), fine()))
    sets[split] = LyingLength(sets[split], claimed)
    return sets["train"], sets["val"], sets["test"]


class Unreadable(Dataset):
    """Items past ``good`` raise KeyError (a broken file, a missing record)."""

    def __init__(self, inner: Dataset, good: int) -> None:
        self.inner, self.good = inner, good

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if i >= self.good and i < len(self.inner):  # type: ignore[arg-type]
            raise KeyError(f"record {i} is missing")
        return self.inner[i]


def unreadable_val() -> tuple[Dataset, Dataset, Dataset]:
    """The validation split raises KeyError from its 10th item on."""
    train, val, test = fine()
    return train, Unreadable(val, 10), test
