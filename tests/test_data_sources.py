"""Every data door: a user's Datasets (resident or streamed with workers), a user's LightningDataModule,
a folder of images and a CSV/Parquet table, each as a sweep trial gets it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prunelib.data import (
    ArrayDataModule,
    DataSourceError,
    LightningDataAdapter,
    StreamingDataModule,
    datamodule_from_config,
)
from prunelib.methods import build_method
from prunelib.models import build_model
from prunelib.training import TrainConfig, run_pruning

DATASETS = {"name": "custom", "_target_": "tests.user_code.digits_datasets", "batch_size": 64, "val_fraction": 0.1}


def _train_one_epoch(dm, epochs: int = 1) -> float:
    model = build_model("mlp", dm.input_shape, dm.num_classes, width=0.25)
    result = run_pruning(model, dm, build_method("snip", sparsity=0.5), TrainConfig(epochs=epochs, finetune_epochs=0,
                                                                                   accelerator="cpu"))
    return result.val_acc


def test_user_datasets_small_enough_stay_resident():
    dm = datamodule_from_config({**DATASETS, "resident": "auto"}, seed=3)
    assert isinstance(dm, ArrayDataModule)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert dm.sizes == {"train": 1347, "val": 150, "test": 300}  # val split off train by val_fraction
    assert 0.0 < _train_one_epoch(dm) <= 1.0


def test_user_datasets_too_big_stream_through_workers():
    dm = datamodule_from_config({**DATASETS, "resident": "auto", "resident_max_mb": 0.01, "num_workers": 2}, seed=3)
    assert isinstance(dm, StreamingDataModule)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    xs, ys = dm.sample_batch("val", n=16)
    assert xs.shape == (16, 1, 8, 8)
    assert dm.sizes == {"train": 1347, "val": 150, "test": 300}  # the same split as the resident path
    assert 0.0 < _train_one_epoch(dm) <= 1.0


def test_a_streamed_data_set_reused_by_the_next_trial_shuffles_as_a_fresh_one():
    from search.trial import get_datamodule

    cfg = {**DATASETS, "resident": False, "num_workers": 0}
    dm = get_datamodule(cfg, "cpu", 3)
    assert isinstance(dm, StreamingDataModule)
    first = next(iter(dm.train_dataloader()))[1]
    assert not torch.equal(next(iter(dm.train_dataloader()))[1], first)  # the next epoch differs
    assert get_datamodule(cfg, "cpu", 3) is dm  # the worker's cached data: the next trial restarts it
    assert torch.equal(next(iter(dm.train_dataloader()))[1], first)


def test_user_lightning_datamodule_keeps_its_loaders():
    dm = datamodule_from_config({"name": "mine", "_target_": "tests.user_code.DigitsDataModule", "batch_size": 32})
    assert isinstance(dm, LightningDataAdapter)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 32  # its own batch size reached it
    x, y = dm.sample_batch("val", n=40)
    assert x.shape == (40, 1, 8, 8) and y.shape == (40,)
    assert 0.0 < _train_one_epoch(dm) <= 1.0


def _write_images(root: Path, per_class: int = 10, size: tuple[int, int] = (12, 10)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 40, 230)]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_one_folder_per_class(tmp_path):
    _write_images(tmp_path / "images")
    cfg = {"name": "image_folder", "root": str(tmp_path / "images"), "image_size": 8, "channels": 3,
           "test_fraction": 0.2, "batch_size": 8, "val_fraction": 0.2, "num_workers": 0}
    dm = datamodule_from_config(cfg)
    assert isinstance(dm, ArrayDataModule)
    assert dm.input_shape == (3, 8, 8) and dm.num_classes == 3
    assert sum(dm.sizes.values()) == 30 and dm.sizes["test"] == 6
    x, _ = dm.split("train")
    assert abs(float(x.mean())) < 0.2  # standardised with training statistics
    # Streamed, the same folder reads through DataLoader workers.
    streamed = datamodule_from_config({**cfg, "resident": False, "num_workers": 2})
    assert isinstance(streamed, StreamingDataModule) and streamed.train_dataloader().num_workers == 2
    assert next(iter(streamed.train_dataloader()))[0].shape == (8, 3, 8, 8)
    assert _train_one_epoch(dm) > 0.5  # three colours: easy
    # train/ and test/ sub-folders are used as the splits.
    _write_images(tmp_path / "split" / "train")
    _write_images(tmp_path / "split" / "test", per_class=2)
    split = datamodule_from_config({**cfg, "root": str(tmp_path / "split")})
    assert split.sizes["test"] == 6 and split.sizes["train"] + split.sizes["val"] == 30
    with pytest.raises(DataSourceError, match="data.root: .* holds no class folders"):
        (tmp_path / "empty").mkdir()
        datamodule_from_config({**cfg, "root": str(tmp_path / "empty")})


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_table_of_features_and_a_label(tmp_path, suffix):
    rng = np.random.default_rng(0)
    n = 240
    labels = rng.choice(["cat", "dog", "eel"], size=n)
    centre = {"cat": 0.0, "dog": 3.0, "eel": -3.0}
    frame = pd.DataFrame({f"f{i}": rng.normal([centre[v] for v in labels], 1.0) * (i + 1) for i in range(5)})
    frame["kind"] = labels
    frame["note"] = "text column, left out"
    path = tmp_path / f"animals.{suffix}"
    frame.to_parquet(path) if suffix == "parquet" else frame.to_csv(path, index=False)
    cfg = {"name": "table", "path": str(path), "label": "kind", "features": [f"f{i}" for i in range(5)],
           "batch_size": 32}
    dm = datamodule_from_config(cfg)
    assert dm.input_shape == (5,) and dm.num_classes == 3
    assert dm.sizes["test"] == 48
    x, _ = dm.split("train")
    assert torch.allclose(x.mean(0), torch.zeros(5), atol=1e-4)  # standardised per feature
    assert _train_one_epoch(dm, epochs=8) > 0.8
    with pytest.raises(DataSourceError, match="data.features: column 'note' is not numeric"):
        datamodule_from_config({**cfg, "features": None})
    with pytest.raises(DataSourceError, match="data.label: column 'species' not in"):
        datamodule_from_config({**cfg, "label": "species"})


def test_image_folder_and_table_run_as_trials_without_code(tmp_path):
    from search.config import build_search_space
    from search.trial import TrialContext, run_trial
    from tests.conftest import compose

    _write_images(tmp_path / "images")
    cfg = compose(["+method=magnitude", "data=image_folder", f"data.root={tmp_path}/images", "data.image_size=8",
                   "model=lenet5", "trial.epochs=1", "trial.finetune_epochs=0"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")])
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="img", trial_dir=tmp_path / "t1")
    assert 0 <= row["val_acc"] <= 1 and row["flops_effective"] < row["flops_dense"]
    frame = pd.DataFrame({"a": np.arange(60.0), "b": np.arange(60.0) % 7, "y": np.arange(60) % 2})
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = compose(["+method=magnitude", "data=table", f"data.path={tmp_path}/t.csv", "data.label=y",
                   "trial.epochs=1", "trial.finetune_epochs=0"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")])
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="tab", trial_dir=tmp_path / "t2")
    assert (tmp_path / "t2" / "trial_result.json").is_file() and 0 <= row["val_acc"] <= 1
