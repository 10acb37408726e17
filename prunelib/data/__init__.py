"""Data: the reference data sets as in-memory Lightning data modules, and the door for any other.

:func:`datamodule_from_config` builds what a ``data`` config section describes: a reference
set by ``name`` (:data:`DATA_SOURCES`: digits, fashion_mnist, cifar10, cifar100, an
``image_folder``, a ``table``), or a user's own data by ``_target_`` (a LightningDataModule or
``(train, val, test)`` Datasets; see :mod:`prunelib.data.custom`).

``build_datamodule("digits")`` is instant (bundled with scikit-learn); Fashion-MNIST and CIFAR
are read from local files (see :mod:`prunelib.data.sources` for where they are looked for) and
downloaded only when ``download=True``.

Conventions: inputs are float32 ``(N, C, H, W)`` normalised per channel with the mean/std of the
training split; labels are int64. The validation split is carved from the training set,
stratified, by ``seed``; the test split is the data set's own (digits: a fixed 20 % hold-out).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prunelib.data.custom import (
    DataSourceError,
    datamodule_from_datasets,
    datamodule_from_target,
    image_folder_datamodule,
    table_datamodule,
)
from prunelib.data.idx import IDXFormatError, read_idx, write_idx
from prunelib.data.sources import DATASETS, DatasetNotFoundError, RawDataset

if TYPE_CHECKING:
    import lightning

    from prunelib.data.datamodule import ArrayDataModule, ResidentBatches
    from prunelib.data.streaming import LightningDataAdapter, StreamingDataModule

# The Lightning data modules are imported on first use (PEP 562): a sweep's driver checks data
# configs against the builders' signatures below without importing Lightning.
_LIGHTNING_CLASSES = {"ArrayDataModule": "prunelib.data.datamodule", "ResidentBatches": "prunelib.data.datamodule",
                      "LightningDataAdapter": "prunelib.data.streaming",
                      "StreamingDataModule": "prunelib.data.streaming"}


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module 'prunelib.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__all__ = [
    "DATASETS",
    "DATA_SOURCES",
    "DOOR_KEYS",
    "ArrayDataModule",
    "DataSourceError",
    "DatasetNotFoundError",
    "LightningDataAdapter",
    "StreamingDataModule",
    "datamodule_from_config",
    "datamodule_from_datasets",
    "datamodule_from_target",
    "data_source_keys",
    "image_folder_datamodule",
    "table_datamodule",
    "IDXFormatError",
    "RawDataset",
    "ResidentBatches",
    "build_datamodule",
    "normalized_interval",
    "read_idx",
    "write_idx",
]

#: digits has no official test split: this fraction is held out with a fixed seed (0), so the
#: test set never changes with the run's seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)``; stratified by label when every class can be (else plain random)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(y.shape[0])
    try:
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        # Stratification needs >= 2 samples per class and room for every class (tiny sets).
        keep, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.asarray(keep), np.asarray(held)


def normalized_interval(mean: Sequence[float], std: Sequence[float],
                        raw_range: tuple[float, float] = (0.0, 255.0)) -> tuple[float, float]:
    """The input box, in normalised units, of data normalised as ``(raw - mean) / std``.

    Args:
        mean, std: per-channel statistics in raw units (e.g. a data module's ``mean``/``std``).
        raw_range: the raw value range (0..255 for 8-bit images, 0..16 for scikit-learn digits).
    """
    lows = [(raw_range[0] - m) / s for m, s in zip(mean, std)]
    highs = [(raw_range[1] - m) / s for m, s in zip(mean, std)]
    return float(min(lows)), float(max(highs))


def build_datamodule(
    name: str,
    *,
    root: str | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    download: bool = False,
    limit_train: int | None = None,
) -> ArrayDataModule:
    """Load a reference data set into an :class:`ArrayDataModule`.

    Args:
        name: one of :data:`DATASETS` (``"digits"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``).
        root: directory holding the files (see each loader); None = the default locations.
        batch_size: training batch size (samples).
        eval_batch_size: validation/test batch size (samples).
        val_fraction: fraction of the training set held out for validation, in (0, 1).
        seed: picks the validation samples and the training shuffle order.
        device: where the tensors live (``"cpu"``, ``"cuda"``...).
        download: fetch a missing data set (needs internet).
        limit_train: keep only the first N samples of the (already shuffled, stratified)
            training split, for fast runs; validation and test are unchanged, so scores stay
            comparable across values of ``limit_train``.

    Raises:
        ValueError: unknown ``name`` or bad fractions/limits.
        DatasetNotFoundError: the files are absent (the message says how to get them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {sorted(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if limit_train is not None and limit_train < 1:
        raise ValueError(f"limit_train must be >= 1 or None, got {limit_train}")

    raw = DATASETS[name](root=root, download=download)
    x_all, y_all = raw.x_train, raw.y_train
    if raw.x_test is None or raw.y_test is None:
        rest, test_idx = _split(y_all, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
        x_test, y_test = x_all[test_idx], y_all[test_idx]
        x_all, y_all = x_all[rest], y_all[rest]
    else:
        x_test, y_test = raw.x_test, raw.y_test
    train_idx, val_idx = _split(y_all, val_fraction, seed)
    if limit_train is not None:
        train_idx = train_idx[:limit_train]

    x_train = x_all[train_idx]
    # Statistics in float64 over (N, H, W) per channel, from the training split only.
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant channel would divide by zero

    mean32 = mean.astype(np.float32)[None, :, None, None]
    std32 = std.astype(np.float32)[None, :, None, None]

    def prep(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # In place after one float32 copy: CIFAR as float32 is 600 MB, avoid temporaries.
        xf = np.array(x, dtype=np.float32, order="C", copy=True)
        xf -= mean32
        xf /= std32
        return torch.from_numpy(xf), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    from prunelib.data.datamodule import ArrayDataModule

    dm = ArrayDataModule(
        name,
        train=prep(x_train, y_all[train_idx]),
        val=prep(x_all[val_idx], y_all[val_idx]),
        test=prep(x_test, y_test),
        num_classes=raw.num_classes,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        device=device,
    )
    dm.mean, dm.std = [float(m) for m in mean], [float(s) for s in std]
    dm.input_range = normalized_interval(dm.mean, dm.std, (float(x_train.min()), float(x_train.max())))
    return dm


#: ``data.name`` -> builder called with the section's keys (its signature is that section's schema).
DATA_SOURCES: dict[str, Callable[..., lightning.LightningDataModule]] = {
    **{name: functools.partial(build_datamodule, name) for name in DATASETS},
    "image_folder": image_folder_datamodule,
    "table": table_datamodule,
}

#: Keys of the shared door (:func:`prunelib.data.custom.datamodule_from_datasets`): batch sizes,
#: ``val_fraction``, ``num_workers``, ``resident``..., accepted by every Dataset-based source.
DOOR_KEYS: tuple[str, ...] = tuple(
    n for n in inspect.signature(datamodule_from_datasets).parameters
    if n not in ("name", "train", "val", "test", "seed", "device"))


def data_source_keys(name: str | None, has_target: bool) -> set[str] | None:
    """The keys a ``data`` section may hold besides ``name``/``_target_`` (None = any: a user's
    target takes its own keys, checked against its signature when it is called)."""
    if has_target:
        return None
    builder = DATA_SOURCES[str(name)]
    params = inspect.signature(builder).parameters
    keys = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"seed", "device"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        keys |= set(DOOR_KEYS)
    return keys


def datamodule_from_config(cfg: Mapping[str, Any], seed: int = 0, device: str = "cpu") -> lightning.LightningDataModule:
    """Build the data module a ``data`` config section describes.

    ``_target_`` (``data=custom``): the user's callable, called with its own keys (the section's
    keys that are not :data:`DOOR_KEYS`); the door keys shape the data module around what it
    returns. Otherwise ``name`` picks a builder of :data:`DATA_SOURCES`. Keys set to None
    take the builder's default.

    Raises:
        ValueError: unknown name (``DataSourceError``/``TargetError`` for the user's data).
    """
    keys = dict(cfg)
    name = keys.pop("name", None)
    target = keys.pop("_target_", None)
    if target is not None:
        door = {k: keys.pop(k) for k in DOOR_KEYS if k in keys}
        door = {k: v for k, v in door.items() if v is not None}
        return datamodule_from_target(target, keys, name=str(name or "custom"), seed=seed, device=device, **door)
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATA_SOURCES)} or data._target_")
    builder = DATA_SOURCES[str(name)]
    door_keys = set(DOOR_KEYS)
    args = {k: v for k, v in keys.items() if not (v is None and k in door_keys)}
    return builder(seed=seed, device=device, **args)
