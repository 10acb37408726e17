"""Tests for prunelib.data: splits, file formats, errors and batch iteration (no network)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelib.data import (
    DATASETS,
    ArrayDataModule,
    DatasetNotFoundError,
    IDXFormatError,
    ResidentBatches,
    build_datamodule,
    read_idx,
    write_idx,
)
from prunelib.data.sources import FASHION_MNIST_SYSTEM_DIR


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------
def test_known_names() -> None:
    assert set(DATASETS) == {"digits", "fashion_mnist", "cifar10", "cifar100"}


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="nope.*digits"):
        build_datamodule("nope")


def test_digits_shapes_splits_and_normalisation() -> None:
    dm = build_datamodule("digits", batch_size=64)
    assert dm.name == "digits" and dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    sizes = dm.sizes
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360  # fixed stratified 20 %
    assert sizes["val"] == round(0.1 * (1797 - 360))
    x, y = dm.split("train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    assert dm.mean is not None and 0 < dm.mean[0] < 16
    # Every class is present in every split (stratified).
    for split in ("train", "val", "test"):
        assert set(dm.split(split)[1].tolist()) == set(range(10))


def _test_set_key(dm: ArrayDataModule) -> set[tuple[float, ...]]:
    # Un-normalise so the comparison does not depend on the train statistics.
    assert dm.mean is not None and dm.std is not None
    x = dm.split("test")[0] * dm.std[0] + dm.mean[0]
    return {tuple(np.round(r, 3)) for r in x.reshape(x.shape[0], -1).tolist()}


def test_digits_determinism_and_fixed_test_split() -> None:
    a = build_datamodule("digits", seed=1)
    b = build_datamodule("digits", seed=1)
    c = build_datamodule("digits", seed=2)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split)[0], b.split(split)[0])
        assert torch.equal(a.split(split)[1], b.split(split)[1])
    assert not torch.equal(a.split("val")[1], c.split("val")[1])
    # The test split is the same samples whatever the seed.
    assert _test_set_key(a) == _test_set_key(c)
    # Train, val and test are disjoint and cover the data set.
    assert sum(a.sizes.values()) == 1797


def test_limit_train_and_val_fraction() -> None:
    full = build_datamodule("digits", seed=3)
    small = build_datamodule("digits", seed=3, limit_train=100, val_fraction=0.1)
    assert small.sizes["train"] == 100
    assert small.sizes["val"] == full.sizes["val"] and small.sizes["test"] == full.sizes["test"]
    with pytest.raises(ValueError):
        build_datamodule("digits", val_fraction=0.0)
    with pytest.raises(ValueError):
        build_datamodule("digits", limit_train=0)


def test_sample_batch_shapes_and_generator() -> None:
    dm = build_datamodule("digits", batch_size=32)
    x, y = dm.sample_batch()
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    x2, _ = dm.sample_batch()
    assert torch.equal(x, x2)  # default generator is seeded: reproducible
    xv, yv = dm.sample_batch("val", n=10_000)
    assert xv.shape[0] == dm.sizes["val"] and yv.shape[0] == dm.sizes["val"]
    g = torch.Generator().manual_seed(123)
    a, _ = dm.sample_batch("test", n=5, generator=g)
    b, _ = dm.sample_batch("test", n=5, generator=g)
    assert a.shape == (5, 1, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ValueError):
        dm.sample_batch("nope")


def test_dataloaders_and_to() -> None:
    dm = build_datamodule("digits", batch_size=100, eval_batch_size=1000)
    assert isinstance(dm.train_dataloader(), ResidentBatches)
    assert len(dm.train_dataloader()) == -(-dm.sizes["train"] // 100)
    assert len(dm.val_dataloader()) == 1
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape[0] == dm.sizes["test"] and yb.dtype == torch.int64
    assert dm.to("cpu") is dm and dm.device.type == "cpu"
    assert "digits" in str(dm) and "digits" in repr(dm)


# --------------------------------------------------------------------------------------------
# ResidentBatches
# --------------------------------------------------------------------------------------------
def _ids(batches: ResidentBatches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


def test_resident_batches_cover_every_sample_once() -> None:
    n = 103
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    y = torch.arange(n)
    rb = ResidentBatches(x, y, batch_size=10, shuffle=True, seed=7)
    assert len(rb) == 11
    for _ in range(3):
        batches = list(rb)
        assert len(batches) == 11 and batches[-1][0].shape[0] == 3
        ids = [int(v) for _, yb in batches for v in yb]
        assert sorted(ids) == list(range(n))
        for xb, yb in batches:  # inputs and labels stay paired
            assert torch.equal(xb.flatten().long(), yb)
    dl = ResidentBatches(x, y, batch_size=10, shuffle=True, seed=7, drop_last=True)
    assert len(dl) == 10 and len(list(dl)) == 10 and len(set(_ids(dl))) == 100


def test_resident_batches_order_is_seeded() -> None:
    x = torch.randn(50, 1, 2, 2)
    y = torch.arange(50)
    a = ResidentBatches(x, y, 8, shuffle=True, seed=0)
    b = ResidentBatches(x, y, 8, shuffle=True, seed=0)
    c = ResidentBatches(x, y, 8, shuffle=True, seed=1)
    a0, a1 = _ids(a), _ids(a)
    assert a0 == _ids(b) and a1 == _ids(b)  # same seed: same epochs, in order
    assert a0 != a1  # successive epochs differ
    assert a0 != _ids(c)
    # Bit-identical batches, not just labels.
    a.set_epoch(0)
    b.set_epoch(0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    # An iterator that is never advanced does not consume an epoch.
    a.set_epoch(0)
    iter(a)
    assert _ids(a) == a0


def test_resident_batches_unshuffled_is_stored_order() -> None:
    x = torch.randn(25, 3, 2, 2)
    y = torch.arange(25)
    rb = ResidentBatches(x, y, 10, shuffle=False, seed=0)
    assert _ids(rb) == list(range(25)) and len(rb) == 3
    with pytest.raises(ValueError):
        ResidentBatches(x, y[:3], 10, shuffle=False, seed=0)


def test_trains_with_lightning() -> None:
    """The data module plugs into a real Trainer, and epoch e uses order seed + e."""
    import lightning as L

    dm = build_datamodule("digits", batch_size=256, limit_train=512)
    first_labels: list[list[int]] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            if i == 0:
                first_labels.append(batch[1][:16].tolist())
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> None:
            self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(Tiny(), dm)
    assert "val_acc" in trainer.callback_metrics
    ref = dm.train_dataloader()
    assert first_labels == [next(iter(ref))[1][:16].tolist() for _ in range(2)]


# --------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------
def _write_fashion(directory: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


def test_idx_roundtrip(tmp_path: Path) -> None:
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        arr = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
        for name in ("a.idx", "a.idx.gz"):
            write_idx(tmp_path / name, arr)
            out = read_idx(tmp_path / name, ndim=3)
            assert out.dtype == arr.dtype and np.array_equal(out, arr)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path: Path, gz: bool) -> None:
    _write_fashion(tmp_path, gz=gz)
    dm = build_datamodule("fashion_mnist", root=str(tmp_path), val_fraction=0.25)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert dm.sizes == {"train": 30, "val": 10, "test": 20}
    assert dm.split("train")[0].dtype == torch.float32


def test_fashion_mnist_from_torchvision_root(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False, n_train=50)
    dm = build_datamodule("fashion_mnist", root=str(tmp_path), limit_train=12)
    assert dm.sizes == {"train": 12, "val": 5, "test": 20}


def test_idx_truncated_and_corrupt(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    data = img.read_bytes()
    img.write_bytes(data[:-100])
    with pytest.raises(IDXFormatError, match="truncated"):
        build_datamodule("fashion_mnist", root=str(tmp_path))
    img.write_bytes(b"\x12\x34" + data[2:])
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(img)
    img.write_bytes(data)
    with pytest.raises(IDXFormatError, match="dimensions"):
        read_idx(img, ndim=1)
    # A truncated gzip stream.
    gz = tmp_path / "x.idx.gz"
    gz.write_bytes(gzip.compress(data)[:200])
    with pytest.raises(IDXFormatError, match="corrupt or truncated"):
        read_idx(gz)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(IDXFormatError, match="too short"):
        read_idx(tmp_path / "tiny")


def test_fashion_mnist_mismatched_counts(tmp_path: Path) -> None:
    _write_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        build_datamodule("fashion_mnist", root=str(tmp_path))


def test_fashion_mnist_missing_is_helpful(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DatasetNotFoundError) as info:
        build_datamodule("fashion_mnist", root=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "FashionMNIST" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "download=True" in msg and "root=" in msg
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_system_package() -> None:
    dm = build_datamodule("fashion_mnist", limit_train=2000)
    assert dm.sizes == {"train": 2000, "val": 6000, "test": 10000}
    assert dm.input_shape == (1, 28, 28)
    assert set(dm.split("test")[1].tolist()) == set(range(10))
    assert dm.mean is not None and 60 < dm.mean[0] < 85  # Fashion-MNIST pixel mean is about 72.9


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------
def _cifar_batch(
    path: Path, n: int, label_key: bytes, num_classes: int, rng: np.random.Generator, protocol: int = 2
) -> None:
    d = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in np.arange(n) % num_classes],
        b"batch_label": b"synthetic",
    }
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)


def test_cifar10_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        # Both old (2) and newest pickle protocols get past the restricted unpickler.
        _cifar_batch(d / f"data_batch_{i}", 20, b"labels", 10, rng, protocol=2 if i % 2 else pickle.HIGHEST_PROTOCOL)
    _cifar_batch(d / "test_batch", 30, b"labels", 10, rng)
    dm = build_datamodule("cifar10", root=str(tmp_path))
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert dm.sizes == {"train": 90, "val": 10, "test": 30}
    assert dm.mean is not None and len(dm.mean) == 3
    x = dm.split("train")[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_cifar100_pickles_and_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _cifar_batch(d / "train", 200, b"fine_labels", 100, rng)
    _cifar_batch(d / "test", 100, b"fine_labels", 100, rng)
    dm = build_datamodule("cifar100", root=str(tmp_path), val_fraction=0.5)
    assert dm.num_classes == 100 and dm.sizes == {"train": 100, "val": 100, "test": 100}
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        build_datamodule("cifar10", root=str(tmp_path))


def test_cifar_pickle_refuses_code(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    for name in ("train", "test"):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"fine_labels": [0]}, f)
    with pytest.raises(ValueError, match="refusing"):
        build_datamodule("cifar100", root=str(tmp_path))
