"""Raw loaders for the reference data sets: local files first, a download only when asked.

Each loader returns a :class:`RawDataset` of uint8/float arrays shaped ``(N, C, H, W)``; splitting,
normalisation and tensors are :func:`prunelib.data.build_datamodule`'s job.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from prunelib.data.idx import read_idx

__all__ = [
    "CACHE_DIR",
    "DATASETS",
    "DatasetNotFoundError",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MIRROR",
    "FASHION_MNIST_SYSTEM_DIR",
    "RawDataset",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_fashion_mnist",
]

#: Where downloads go when no ``root`` is given.
CACHE_DIR = Path(os.path.expanduser("~")) / ".cache" / "prunesearch"
#: Installed by the Debian package ``dataset-fashion-mnist`` (the four ``*.gz`` IDX files).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The public mirror of Zalando's files (the one torchvision uses).
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: split -> (images file, labels file), without the optional ``.gz``.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message says where we looked and how to get it."""


class RawDataset(NamedTuple):
    """One data set as numpy arrays, before splitting and normalisation.

    ``x_*`` are ``(N, C, H, W)`` (uint8 pixels or float features), ``y_*`` are integer labels.
    ``x_test`` is None when the data set has no official test split (digits).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
def load_digits(root: str | None = None, download: bool = False) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1797 samples, pixel values 0..16, 10 classes).

    ``root`` and ``download`` are ignored: the data ships inside scikit-learn.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    x = np.asarray(d.images, dtype=np.float32)[:, None, :, :]
    y = np.asarray(d.target, dtype=np.int64)
    return RawDataset(x, y, None, None, 10)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------
def _find_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``directory`` (raw preferred: no decompression)."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fashion_dir_complete(directory: Path) -> bool:
    return all(_find_file(directory, stem) is not None for pair in FASHION_MNIST_FILES.values() for stem in pair)


def _fashion_candidates(root: str | None) -> list[Path]:
    """Directories to search, in order: ``root`` (plain or torchvision-style) or the system/cache dirs."""
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / "FashionMNIST" / "raw"]
    return [FASHION_MNIST_SYSTEM_DIR, CACHE_DIR / "fashion_mnist"]


def _download_fashion_mnist(target: Path) -> None:
    """Fetch the four ``.gz`` files from :data:`FASHION_MNIST_MIRROR` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for stem in (s for pair in FASHION_MNIST_FILES.values() for s in pair):
        dest = target / f"{stem}.gz"
        if dest.is_file():
            continue
        url = FASHION_MNIST_MIRROR + dest.name
        # Write to a temporary name first so an interrupted download never looks complete.
        fd, tmp = tempfile.mkstemp(dir=target, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            os.replace(tmp, dest)
        except (urllib.error.URLError, OSError) as e:
            raise DatasetNotFoundError(f"fashion_mnist: downloading {url} failed ({e}); {_FASHION_HOWTO}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


_FASHION_HOWTO = (
    "to get Fashion-MNIST: `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, installs "
    f"{FASHION_MNIST_SYSTEM_DIR}), or pass root=DIR holding train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] "
    "(a torchvision root with FashionMNIST/raw/ works too), or pass download=True on a machine with internet"
)


def _read_fashion_dir(directory: Path) -> RawDataset:
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (img_stem, lbl_stem) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = _find_file(directory, img_stem), _find_file(directory, lbl_stem)
        assert img_path is not None and lbl_path is not None  # checked by _fashion_dir_complete
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lbl_path, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{lbl_path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
        arrays[split] = (images[:, None, :, :], labels.astype(np.int64))
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    return RawDataset(xtr, ytr, xte, yte, 10)


def load_fashion_mnist(root: str | None = None, download: bool = False) -> RawDataset:
    """Fashion-MNIST from local IDX files (28x28 grey, 60k train + 10k test, 10 classes).

    Looks in ``root`` and ``root/FashionMNIST/raw`` when ``root`` is given, otherwise in
    ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``) and then
    ``~/.cache/prunesearch/fashion_mnist``. With ``download=True`` a missing set is fetched
    into ``root`` (or the cache directory).

    Raises:
        DatasetNotFoundError: not found and ``download`` is False (or the download failed).
        IDXFormatError: a file is corrupt or truncated.
    """
    candidates = _fashion_candidates(root)
    for d in candidates:
        if _fashion_dir_complete(d):
            return _read_fashion_dir(d)
    if download:
        target = Path(root).expanduser() if root is not None else CACHE_DIR / "fashion_mnist"
        _download_fashion_mnist(target)
        return _read_fashion_dir(target)
    looked = ", ".join(str(d) for d in candidates)
    raise DatasetNotFoundError(f"fashion_mnist: the four IDX files were not found in {looked}; {_FASHION_HOWTO}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (the python pickles of the official archives, torchvision's layout)
# ---------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Refuses anything but the numpy array machinery: a data file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Pickles re-written by Python 3: bytes (protocol 2) and arrays (protocol 5).
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _load_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> ``(N, 3, 32, 32)`` uint8, ``(N,)`` int64."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, found {type(d).__name__}")
    # The official files (pickled by Python 2) have bytes keys; accept str keys too.
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: missing 'data' or {label_key!r} (keys: {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: data of shape {data.shape} with {labels.shape[0]} labels, expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_root(root: str | None) -> Path:
    return Path(root).expanduser() if root is not None else CACHE_DIR


def _load_cifar(
    root: str | None, download: bool, *, dirname: str, train_files: list[str], test_file: str, label_key: str,
    num_classes: int, tv_class: str, name: str,
) -> RawDataset:
    base = _cifar_root(root)
    # Accept both the parent (torchvision's root) and the extracted directory itself.
    candidates = [base / dirname, base]
    directory = next((d for d in candidates if all((d / f).is_file() for f in [*train_files, test_file])), None)
    if directory is None and download:
        try:
            import torchvision.datasets as tvd  # optional: only the download path needs it
        except ImportError as e:
            raise DatasetNotFoundError(
                f"{name}: not found under {base} and download=True needs torchvision "
                f"(`pip install prunesearch[vision]`), or download the python version of the archive "
                f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {base}"
            ) from e
        for train in (True, False):
            getattr(tvd, tv_class)(root=str(base), train=train, download=True)
        directory = base / dirname
    if directory is None:
        raise DatasetNotFoundError(
            f"{name}: {dirname}/ ({', '.join([*train_files, test_file])}) not found in "
            f"{', '.join(str(c) for c in candidates)}; extract the python version of the archive from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html into a directory and pass root=that directory, "
            "or pass download=True (needs internet and torchvision)"
        )
    parts = [_load_batch(directory / f, label_key) for f in train_files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _load_batch(directory / test_file, label_key)
    for path, y in (("train", y_train), ("test", y_test)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} {path}: labels outside 0..{num_classes - 1}")
    return RawDataset(x_train, y_train, x_test, y_test, num_classes)


def load_cifar10(root: str | None = None, download: bool = False) -> RawDataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (32x32 RGB, 50k train + 10k test, 10 classes).

    ``root`` defaults to ``~/.cache/prunesearch``. With ``download=True`` a missing set is
    fetched with torchvision (if installed).
    """
    return _load_cifar(
        root, download, dirname="cifar-10-batches-py", train_files=[f"data_batch_{i}" for i in range(1, 6)],
        test_file="test_batch", label_key="labels", num_classes=10, tv_class="CIFAR10", name="cifar10",
    )


def load_cifar100(root: str | None = None, download: bool = False) -> RawDataset:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python`` (32x32 RGB, 50k + 10k, 100 classes).

    ``root`` defaults to ``~/.cache/prunesearch``. With ``download=True`` a missing set is
    fetched with torchvision (if installed).
    """
    return _load_cifar(
        root, download, dirname="cifar-100-python", train_files=["train"], test_file="test",
        label_key="fine_labels", num_classes=100, tv_class="CIFAR100", name="cifar100",
    )


#: name -> loader ``(root, download) -> RawDataset``.
DATASETS: dict[str, Callable[..., RawDataset]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
