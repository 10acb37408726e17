"""The labels of a data set's splits: the class count, and the checks that keep one bad label
(or a data set that lies about its length) from silently changing every trial.

:func:`class_count` is the one place the class count is decided: ``data.num_classes`` when
set, else the classes the training data declares (a ``num_classes`` or ``classes`` attribute),
else the largest *training* label + 1. Every data module a trial builds gets its count there,
and the pre-flight holds every split to it with :func:`check_labels`: labels must be class
indices in ``[0, num_classes)``, and the training split must hold at least two classes.

:func:`check_length` and :func:`dataset_labels` read a Dataset as iteration would (items
``0, 1, ...`` until ``IndexError``) and refuse one whose ``__len__`` claims more items than that,
naming the split and both numbers. Everything here raises :class:`DataSourceError` with one line starting
``data:`` that names the split.

This module imports no Lightning (the sweep's driver checks configs with :mod:`prunelib.data`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DataSourceError", "LABEL_BATCH", "check_datamodule_labels", "check_labels", "check_length", "class_count",
           "dataset_labels", "declared_classes", "reading_error"]

#: Items per batch of a label pass (a dataset without a ``targets`` tensor is read once).
LABEL_BATCH = 1024

class DataSourceError(ValueError):
    """A data source cannot be read or has the wrong form; the message names the key."""


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[-1][:200]


def reading_error(split: str, exc: BaseException, index: int | None = None) -> DataSourceError:
    """The one line for an exception raised while reading a split (``data: reading the test
    split raised KeyError: 7``); a :class:`DataSourceError` is passed through as it is."""
    if isinstance(exc, DataSourceError):
        return exc
    at = f" at item {index}" if index is not None else ""
    message = _one_line(exc)
    return DataSourceError(f"data: reading the {split} split raised {type(exc).__name__}{at}"
                           + (f": {message}" if message else ""))


def _has_item(dataset: Dataset, index: int) -> bool:
    """Whether ``dataset[index]`` yields an item, as Python's iteration protocol sees it:
    ``IndexError`` ends iteration; any other exception is a reading error."""
    try:
        dataset[index]
    except IndexError:
        return False
    return True


def _yielded(dataset: Dataset, low: int, high: int) -> int:
    """How many items iteration yields, knowing item ``low - 1`` exists (or ``low == 0``) and
    item ``high`` does not: the first missing index, by bisection (items ``0..k-1`` exist)."""
    while low < high:
        mid = (low + high) // 2
        if _has_item(dataset, mid):
            low = mid + 1
        else:
            high = mid
    return low


def _length_lie(split: str, length: int, yielded: int) -> DataSourceError:
    return DataSourceError(f"data: the {split} split's __len__ says {length} items but iterating it yields "
                           f"{yielded} items; fix its __len__ or __getitem__")


def check_length(dataset: Dataset, split: str) -> int:
    """``len(dataset)``, checked against what iteration yields: its last item (``len - 1``)
    must exist (one read; a bisection finds the true count of a data set that claims more
    items than it has, which every epoch would otherwise crash on).

    A data set that holds more items than its ``__len__`` says is not refused: loaders read
    ``len`` items, and a generated data set may answer any index.

    Raises:
        DataSourceError: the length is more than iteration yields, naming the split and both
            numbers, or reading the split raised (one line naming the split and the exception).
    """
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except Exception as exc:
        raise reading_error(split, exc) from exc
    if length > 0:
        try:
            if not _has_item(dataset, length - 1):
                raise _length_lie(split, length, _yielded(dataset, 0, length - 1))
        except DataSourceError:
            raise
        except Exception as exc:
            raise reading_error(split, exc, length - 1) from exc
    return length


def _targets(dataset: Dataset) -> Tensor | None:
    """The dataset's own label tensor (``targets``, or a ``TensorDataset``'s second tensor; seen
    through ``Subset``s), or None."""
    index = None
    while isinstance(dataset, Subset):
        step = torch.as_tensor(dataset.indices, dtype=torch.long)
        index = step if index is None else step[index]
        dataset = dataset.dataset
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    if targets is None:
        return None
    try:
        t = torch.as_tensor(np.asarray(targets)).reshape(-1)
    except (TypeError, ValueError):
        return None
    if t.is_floating_point() or t.dtype == torch.bool:
        return None  # not class indices: read the items themselves
    t = t.long()
    if index is not None:
        if index.numel() and int(index.max()) >= t.numel():
            return None  # indices beyond the targets: let the item pass say what is wrong
        t = t[index]
    return t


def _label_of(item: Any, split: str) -> Tensor:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataSourceError(f"data: the {split} split's items must be (input, label) pairs, "
                              f"got {type(item).__name__}")
    label = torch.as_tensor(item[1])
    if label.numel() != 1:
        raise DataSourceError(f"data: the {split} split's labels must be one class index per item, "
                              f"got shape {tuple(label.shape)}")
    return label.reshape(())


def dataset_labels(dataset: Dataset, split: str) -> Tensor:
    """Every label of one split, as int64: its ``targets`` when it has them (no item read),
    else one pass (``DataLoader``, batches of :data:`LABEL_BATCH`, no workers).

    Raises:
        DataSourceError: its ``__len__`` disagrees with iteration (naming both numbers), its
            items are not ``(input, label)`` pairs, or reading it raised (naming the exception).
    """
    length = check_length(dataset, split)
    targets = _targets(dataset)
    if targets is not None and targets.numel() == length:
        return targets

    def collate(items: Sequence[Any]) -> Tensor:
        return torch.stack([_label_of(item, split) for item in items])

    labels: list[Tensor] = []
    seen = 0
    try:
        for batch in DataLoader(dataset, batch_size=LABEL_BATCH, num_workers=0, collate_fn=collate):
            labels.append(batch)
            seen += int(batch.shape[0])
    except DataSourceError:
        raise
    except IndexError as exc:  # an item inside the claimed length is missing
        first = next((i for i in range(seen, min(length, seen + LABEL_BATCH)) if not _has_item(dataset, i)), None)
        if first is None:
            raise reading_error(split, exc) from exc
        raise _length_lie(split, length, first) from exc
    except Exception as exc:
        raise reading_error(split, exc) from exc
    out = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if out.is_floating_point():
        if not bool(torch.all(out == out.round())):
            raise DataSourceError(f"data: the {split} split has a non-integer label "
                                  f"{float(out[out != out.round()][0])}; labels must be class indices")
    return out.long()


def declared_classes(dataset: Dataset) -> int | None:
    """The class count a dataset declares (``num_classes``, or the length of ``classes``; seen
    through ``Subset``s), or None."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    for attr in ("num_classes", "classes"):
        value = getattr(dataset, attr, None)
        if value is None:
            continue
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        try:
            return len(value)
        except TypeError:
            continue
    return None


def class_count(train_labels: Tensor | None = None, num_classes: int | None = None,
                declared: int | None = None) -> int:
    """The class count of a data set: ``num_classes`` (``data.num_classes``) when set, else
    ``declared`` (what the training data declares), else the largest training label + 1.

    Only the training split counts: a stray label in validation or test never changes the
    model; :func:`check_labels` refuses it instead.

    Raises:
        DataSourceError: the count must be inferred and the training split has no labels.
    """
    if num_classes is not None:
        return int(num_classes)
    if declared is not None:
        return int(declared)
    if train_labels is None or train_labels.numel() == 0:
        raise DataSourceError("data: the train split is empty")
    return int(train_labels.max()) + 1


def check_labels(labels: Mapping[str, Tensor | None], num_classes: int, configured: bool) -> None:
    """Every split's labels are class indices in ``[0, num_classes)`` and the training split
    holds at least two classes. Splits whose labels are None (not class indices) are skipped.

    Args:
        labels: ``{"train": ..., "val": ..., "test": ...}`` int64 label tensors.
        num_classes: the count (:func:`class_count`).
        configured: the count is ``data.num_classes`` (the message says which to fix).

    Raises:
        DataSourceError: one line naming the split, the label and its index.
    """
    source = "data.num_classes" if configured else "the training split"
    hint = "fix the labels or data.num_classes" if configured else "fix the labels or set data.num_classes"
    for split, y in labels.items():
        if y is None or y.numel() == 0:
            continue
        y = y.reshape(-1)
        negative = torch.nonzero(y < 0)
        if negative.numel():
            i = int(negative[0])
            raise DataSourceError(f"data: the {split} split has label {int(y[i])} at index {i}; labels must be "
                                  f"class indices 0..{num_classes - 1} (none negative)")
        above = torch.nonzero(y >= num_classes)
        if above.numel():
            i = int(above[0])
            raise DataSourceError(f"data: the {split} split has label {int(y[i])} at index {i}, outside the "
                                  f"{num_classes} classes of {source} (labels 0..{num_classes - 1}); {hint}")
    train = labels.get("train")
    if train is not None and train.numel():
        present = torch.unique(train)
        if present.numel() < 2:
            raise DataSourceError(f"data: the training split holds a single class (label {int(present[0])}, "
                                  f"{train.numel()} items); a classifier needs at least two, or every trial "
                                  "scores a perfect accuracy")


def check_datamodule_labels(datamodule: Any, configured: bool) -> None:
    """Hold every split of a built data module to its class count (:func:`check_labels`): the
    pre-flight's data check. A data module without ``split_labels`` (text) is not checked.

    Args:
        datamodule: an ``ArrayDataModule``, ``StreamingDataModule`` or ``LightningDataAdapter``.
        configured: its count is ``data.num_classes`` (the message says which to fix).

    Raises:
        DataSourceError: one line naming the split (a bad label, a lying ``__len__``, a
            single-class training split, or the exception reading the split raised).
    """
    reader = getattr(datamodule, "split_labels", None)
    if reader is None:
        return
    labels: dict[str, Tensor | None] = {}
    for split in ("train", "val", "test"):
        try:
            labels[split] = reader(split)
        except Exception as exc:
            raise reading_error(split, exc) from exc
    check_labels(labels, int(datamodule.num_classes), configured)
