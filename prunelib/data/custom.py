"""Any data: a user's LightningDataModule or Datasets, a folder of images, a CSV/Parquet table.

Every source ends as a Lightning data module (built here; this module itself imports no
Lightning, so configs are checked without it) with what the pruning methods use besides the
loaders: ``input_shape`` and ``num_classes`` (read from the data), and
``sample_batch(split, n, generator)`` (SNIP, BINGO, polarization probes).

* Small data sets are held **resident** (:class:`~prunelib.data.ArrayDataModule`: whole splits
  as tensors, batches sliced without worker processes, the fast path of the reference sets);
* larger ones **stream** through ``torch.utils.data.DataLoader`` with worker processes
  (:class:`StreamingDataModule`). ``resident="auto"`` picks by size (``resident_max_mb``).
* A user's own ``LightningDataModule`` keeps its own loaders (:class:`LightningDataAdapter`).

Batches are ``(inputs, labels)`` pairs; labels are integer class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from prunelib.data.labels import (
    DataSourceError,
    check_labels,
    check_length,
    class_count,
    dataset_labels,
    declared_classes,
    reading_error,
)

if TYPE_CHECKING:
    import lightning

__all__ = ["DOCUMENTED_DATA_KEYS", "IMAGE_SUFFIXES", "DataSourceError", "ImageFileDataset",
           "datamodule_from_datasets", "datamodule_from_target", "image_folder_datamodule", "table_datamodule"]

#: Keys the project offers a user's data target (each passed only when its signature names it).
DOCUMENTED_DATA_KEYS = ("seed", "batch_size", "eval_batch_size", "val_fraction", "num_workers")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_SPLITS = ("train", "val", "test")


def _item(sample: Any, where: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one dataset item or batch, as tensors."""
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise DataSourceError(f"{where}: items must be (input, label) pairs, got {type(sample).__name__}")
    x, y = sample[0], sample[1]
    return (x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))), torch.as_tensor(y)


def _collate(items: Sequence[Any], where: str) -> tuple[Tensor, Tensor]:
    pairs = [_item(s, where) for s in items]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1].reshape(()) for p in pairs]).long()


def _pair_collate(items: Sequence[Any]) -> tuple[Tensor, Tensor]:
    return _collate(items, "dataset")


def _split_off(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    n = len(train)  # type: ignore[arg-type]
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise DataSourceError(f"data.val_fraction: {fraction} of {n} training samples leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, order[n_val:]), Subset(train, order[:n_val])


def _materialise(dataset: Dataset, num_workers: int, where: str, split: str | None = None) -> tuple[Tensor, Tensor]:
    """The whole split as ``(x, y)`` tensors; ``split`` names it in a reading error (one line)."""
    xs, ys = [], []
    try:
        for x, y in DataLoader(dataset, batch_size=256, num_workers=num_workers, collate_fn=_pair_collate):
            xs.append(x.float())
            ys.append(y)
    except Exception as exc:
        if split is None:
            raise
        # The lengths were checked at both ends (check_length); what is left is the split's own error.
        raise reading_error(split, exc) from exc
    if not xs:
        raise DataSourceError(f"{where}: empty split")
    return torch.cat(xs), torch.cat(ys)


def _channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over a batch ``(N, C, ...)`` (or per feature of ``(N, F)``)."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.double().mean(dim=dims)
    std = x.double().std(dim=dims, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [float(m) for m in mean], [float(s) for s in std]


class _Normalised(Dataset):
    """``(x - mean) / std`` per channel, applied as items are read (the streaming path)."""

    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = _item(self.dataset[i], "dataset")
        view = (-1,) + (1,) * (x.dim() - 1)
        return (x.float() - self.mean.view(view)) / self.std.view(view), y


def datamodule_from_datasets(name: str, train: Dataset, val: Dataset | None, test: Dataset | None, *,
                             batch_size: int = 128, eval_batch_size: int = 1024, val_fraction: float = 0.1,
                             seed: int = 0, device: str = "cpu", num_workers: int = 0,
                             resident: bool | str = "auto", resident_max_mb: float = 1024.0,
                             num_classes: int | None = None, normalize: bool = False,
                             limit_train: int | None = None) -> lightning.LightningDataModule:
    """A data module over ``(train, val, test)`` Datasets of ``(input, label)`` items.

    Args:
        val: None = split ``val_fraction`` of ``train`` off (seeded by ``seed``).
        test: None = the validation split is reported as test too (say so in your results).
        resident: True = hold every split as tensors (:class:`ArrayDataModule`, on ``device``);
            False = stream (:class:`StreamingDataModule`); ``"auto"`` = resident when the
            float32 inputs fit in ``resident_max_mb`` MiB.
        num_classes: None = from the datasets (``num_classes``/``classes``/``targets``) or labels.
        normalize: standardise inputs per channel (per feature for tables) with training statistics.
        limit_train: keep the first N training samples (fast runs).
    """
    where = f"data[{name}]"
    for split, ds in zip(_SPLITS, (train, val, test)):
        if ds is not None:  # a __len__ that lies is refused before anything is split off or read
            check_length(ds, split)
    if val is None:
        train, val = _split_off(train, val_fraction, seed)
    if limit_train is not None:
        train = Subset(train, list(range(min(int(limit_train), len(train)))))  # type: ignore[arg-type]
    test = test if test is not None else val
    for split, ds in zip(_SPLITS, (train, val, test)):
        if len(ds) == 0:  # type: ignore[arg-type]
            raise DataSourceError(f"{where}: the {split} split is empty")
    x0, _ = _item(train[0], f"{where} train[0]")
    shape = tuple(int(s) for s in x0.shape)
    total = sum(len(d) for d in (train, val, test)) * max(1, math.prod(shape)) * 4  # type: ignore[arg-type]
    keep = bool(resident) if resident != "auto" else total <= resident_max_mb * 2**20
    if keep:
        arrays = [_materialise(ds, num_workers, f"{where} {split}", split)
                  for split, ds in zip(_SPLITS, (train, val, test))]
        classes = class_count(arrays[0][1], num_classes, declared_classes(train))
        # The labels are in hand: every split is held to the count here, for trials and pre-flight alike.
        check_labels({split: y for split, (_, y) in zip(_SPLITS, arrays)}, classes, num_classes is not None)
        mean = std = None
        if normalize:
            mean, std = _channel_stats(arrays[0][0])
            view = (1, -1) + (1,) * (arrays[0][0].dim() - 2)
            m, s = torch.tensor(mean).view(view).float(), torch.tensor(std).view(view).float()
            arrays = [((x - m) / s, y) for x, y in arrays]
        from prunelib.data.datamodule import ArrayDataModule

        dm = ArrayDataModule(name, *arrays, num_classes=classes, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, seed=seed, device=device)
        dm.mean, dm.std = mean, std
        return dm
    declared = declared_classes(train)
    classes = class_count(None if num_classes or declared else dataset_labels(train, "train"), num_classes, declared)
    mean = std = None
    if normalize:
        probe = Subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:1024].tolist())  # type: ignore[arg-type]
        mean, std = _channel_stats(_materialise(probe, num_workers, where)[0])
        train, val, test = (_Normalised(d, mean, std) for d in (train, val, test))
    from prunelib.data.streaming import StreamingDataModule

    dm = StreamingDataModule(name, train, val, test, num_classes=classes, input_shape=shape, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                             pin_memory=device.startswith("cuda"))
    dm.mean, dm.std = mean, std
    return dm


def datamodule_from_target(target: str | Callable[..., Any], own: Mapping[str, Any], *, name: str = "custom",
                           seed: int = 0, device: str = "cpu", **door: Any) -> lightning.LightningDataModule:
    """A user's data: ``target`` returns a LightningDataModule or a ``(train, val, test)`` triple.

    ``target`` is called with the documented keys its signature names (:data:`DOCUMENTED_DATA_KEYS`:
    ``seed``, ``batch_size``, ...) and all of ``own`` (the config's own keys). ``door`` holds the
    keys of :func:`datamodule_from_datasets` (batch sizes, ``val_fraction``, ``resident``...).

    Raises:
        TargetError: the target does not import, rejects a key, or raises.
        DataSourceError: it returned something else, or the data are malformed.
    """
    from prunelib.targets import call_target

    documented = {"seed": seed, **{k: door[k] for k in DOCUMENTED_DATA_KEYS if k in door}}
    out = call_target(target, documented, own, "data._target_")
    label = target if isinstance(target, str) else getattr(target, "__qualname__", "target")
    import lightning  # noqa: F811  (at run time: only when a user's data is built)

    from prunelib.data.streaming import LightningDataAdapter

    if isinstance(out, lightning.LightningDataModule):
        return LightningDataAdapter(out, name, num_classes=door.get("num_classes"))
    if isinstance(out, (tuple, list)) and len(out) == 3 and all(d is None or hasattr(d, "__getitem__") for d in out) \
            and out[0] is not None:
        return datamodule_from_datasets(name, out[0], out[1], out[2], seed=seed, device=device, **door)
    raise DataSourceError(f"data._target_={label}: returned {type(out).__name__}; expected a "
                          "LightningDataModule or a (train, val, test) tuple of Datasets (val/test may be None)")


class ImageFileDataset(Dataset):
    """Image files with integer labels, read with Pillow, resized, as float tensors in [0, 1].

    Args:
        files: image paths.
        labels: class index of each file.
        image_size: ``(height, width)`` every image is resized to.
        channels: 1 (grey) or 3 (RGB).
        classes: class names, index = label.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: tuple[int, int], channels: int,
                 classes: Sequence[str]) -> None:
        self.files = [Path(f) for f in files]
        self.targets = list(int(y) for y in labels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            img = img.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        return x, self.targets[i]


def _class_folders(root: Path, where: str) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataSourceError(f"{where}: {root} holds no class folders (expected root/<class>/<image files>)")
    return folders


def _image_files(root: Path, classes: list[str], where: str) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataSourceError(f"{where}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files, labels


def image_folder_datamodule(root: str, *, image_size: int | Sequence[int] = 32, channels: int = 3,
                            test_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
                            **door: Any) -> lightning.LightningDataModule:
    """A folder of images, one sub-folder per class (``root/<class>/*.png``).

    With ``root/train/`` (and optionally ``root/val/``, ``root/test/``), each holding the class
    folders, those splits are used; otherwise ``test_fraction`` of the images is held out as a
    fixed test split (seed 0, stratified) and validation is split off the rest.
    Images are resized to ``image_size`` (an int or ``[height, width]``), read as ``channels``
    (1 grey, 3 RGB) and standardised per channel with training statistics.
    """
    base = Path(root).expanduser()
    where = "data.root"
    if not base.is_dir():
        raise DataSourceError(f"{where}: {base} is not a directory")
    size = (int(image_size), int(image_size)) if isinstance(image_size, (int, float)) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataSourceError(f"data.image_size: {image_size!r} must be an int or [height, width]")
    if channels not in (1, 3):
        raise DataSourceError(f"data.channels: {channels!r} must be 1 (grey) or 3 (RGB)")
    if (base / "train").is_dir():
        classes = [p.name for p in _class_folders(base / "train", where)]
        splits = {s: _image_files(base / s, classes, where) for s in _SPLITS if (base / s).is_dir()}
        train = ImageFileDataset(*splits["train"], size, channels, classes)
        val = ImageFileDataset(*splits["val"], size, channels, classes) if "val" in splits else None
        test = ImageFileDataset(*splits["test"], size, channels, classes) if "test" in splits else None
    else:
        classes = [p.name for p in _class_folders(base, where)]
        files, labels = _image_files(base, classes, where)
        from prunelib.data import DIGITS_TEST_SEED, _split

        keep, held = _split(np.asarray(labels), test_fraction, DIGITS_TEST_SEED)
        train = ImageFileDataset([files[i] for i in keep], [labels[i] for i in keep], size, channels, classes)
        test = ImageFileDataset([files[i] for i in held], [labels[i] for i in held], size, channels, classes)
        val = None
    door.setdefault("normalize", True)
    door.setdefault("num_classes", len(classes))
    return datamodule_from_datasets(f"image_folder:{base.name}", train, val, test, seed=seed, device=device, **door)


def table_datamodule(path: str, label: str, *, features: Sequence[str] | None = None, test_path: str | None = None,
                     test_fraction: float = 0.2, seed: int = 0, device: str = "cpu",
                     **door: Any) -> lightning.LightningDataModule:
    """A CSV or Parquet table: numeric feature columns and a label column.

    Args:
        path: ``.csv`` (or ``.tsv``) or ``.parquet`` file.
        label: the label column; its distinct values (sorted) become classes ``0 .. K-1``.
        features: feature columns (default: every other column); each must be numeric.
        test_path: a second file with the test rows; otherwise ``test_fraction`` of the rows is
            held out (seed 0, stratified).
    Inputs are ``(features,)`` float32 rows standardised with training statistics.
    """
    import pandas as pd

    def read(p: str, key: str) -> Any:
        file = Path(p).expanduser()
        if not file.is_file():
            raise DataSourceError(f"data.{key}: no file {file}")
        suffix = file.suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                return pd.read_parquet(file)
            if suffix in (".csv", ".tsv", ".txt"):
                return pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",")
        except Exception as exc:  # a broken file: one line naming it
            raise DataSourceError(f"data.{key}: cannot read {file}: {type(exc).__name__}: {exc}") from exc
        raise DataSourceError(f"data.{key}: {file} is not .csv/.tsv/.parquet")

    frame = read(path, "path")
    if label not in frame.columns:
        raise DataSourceError(f"data.label: column {label!r} not in {path} (columns: {list(frame.columns)})")
    cols = list(features) if features else [c for c in frame.columns if c != label]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise DataSourceError(f"data.features: {missing} not in {path} (columns: {list(frame.columns)})")
    for c in cols:
        if not pd.api.types.is_numeric_dtype(frame[c]):
            raise DataSourceError(f"data.features: column {c!r} is not numeric ({frame[c].dtype}); encode it or "
                                  "leave it out with data.features=[...]")
    test_frame = read(test_path, "test_path") if test_path else None
    classes = sorted(pd.concat([frame[label], test_frame[label]]).unique().tolist() if test_frame is not None
                     else frame[label].unique().tolist())
    index = {c: i for i, c in enumerate(classes)}

    def tensors(f: Any, key: str) -> tuple[Tensor, Tensor]:
        x = f[cols].to_numpy(dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataSourceError(f"data.{key}: missing or infinite feature values in {int((~np.isfinite(x)).sum())} cells")
        return torch.from_numpy(x), torch.tensor([index[v] for v in f[label]], dtype=torch.long)

    x, y = tensors(frame, "path")
    if test_frame is not None:
        train, test = TensorDataset(x, y), TensorDataset(*tensors(test_frame, "test_path"))
    else:
        from prunelib.data import DIGITS_TEST_SEED, _split

        keep, held = _split(y.numpy(), test_fraction, DIGITS_TEST_SEED)
        train, test = TensorDataset(x[keep], y[keep]), TensorDataset(x[held], y[held])
    door.setdefault("normalize", True)
    door.setdefault("num_classes", len(classes))
    door["resident"] = True  # a table in pandas is in memory already
    return datamodule_from_datasets(f"table:{Path(path).stem}", train, None, test, seed=seed, device=device, **door)
