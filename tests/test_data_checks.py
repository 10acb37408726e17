"""The pre-flight's data checks: every split's labels within the class count the trials use (the
training split's, or data.num_classes), two classes at least, lengths that match what a split
yields; each failure one line naming the split, before anything runs."""

from __future__ import annotations

import time

import pytest
import torch

from prunelib.data import datamodule_from_config
from prunelib.data.labels import DataSourceError, check_labels, class_count, dataset_labels
from search.preflight import preflight
from search.space import ConfigError
from tests.bad_data import LyingLength, fine
from tests.conftest import compose

TARGET = "tests.bad_data"


def _cfg(target: str, *extra: str) -> dict:
    return compose(["+method=magnitude", "data=custom", f"data._target_={TARGET}.{target}", "data.num_workers=0",
                    "model=mlp", *extra])


def _refusal(target: str, *extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(_cfg(target, *extra), open_stores=False)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("resident", ["true", "false"])
def test_a_stray_test_label_is_refused_naming_the_split(resident):
    message = _refusal("bad_test_label", f"data.resident={resident}")
    assert message == ("data: the test split has label 42 at index 7, outside the 4 classes of the training split "
                       "(labels 0..3); fix the labels or set data.num_classes")


def test_a_label_beyond_data_num_classes_names_the_setting():
    message = _refusal("bad_test_label", "data.num_classes=10", "+data.label=12")
    assert message == ("data: the test split has label 12 at index 7, outside the 10 classes of data.num_classes "
                       "(labels 0..9); fix the labels or data.num_classes")


def test_data_num_classes_covers_a_label_the_training_split_lacks():
    result = preflight(_cfg("bad_test_label", "data.num_classes=43"), open_stores=False)
    assert result.num_classes == 43


@pytest.mark.parametrize("resident", ["true", "false"])
def test_negative_labels_are_refused(resident):
    message = _refusal("negative_labels", f"data.resident={resident}")
    assert message == "data: the val split has label -1 at index 5; labels must be class indices 0..3 (none negative)"


def test_a_single_class_training_split_is_refused():
    message = _refusal("single_class")
    assert message.startswith("data: the training split holds a single class (label 0, ")
    assert "at least two" in message


@pytest.mark.parametrize("split,claimed,says", [
    ("test", 100, "the test split's __len__ says 100 items but iterating it yields 60 items"),
    ("train", 300, "the train split's __len__ says 300 items but iterating it yields 240 items"),
    ("val", 61, "the val split's __len__ says 61 items but iterating it yields 60 items"),
])
def test_a_length_that_lies_is_refused_with_both_numbers(split, claimed, says):
    message = _refusal("lying_length", f"+data.split={split}", f"+data.claimed={claimed}")
    assert message.startswith(f"data: {says}"), message


def test_an_exception_reading_a_split_is_one_line_naming_it():
    message = _refusal("unreadable_val")
    assert message.startswith("data: reading the val split raised KeyError"), message
    assert "record" in message and "missing" in message


@pytest.mark.parametrize("resident", [True, False])
def test_the_trial_and_the_preflight_use_the_training_splits_class_count(resident):
    """Validation and test hold only classes 0 and 1; the count is the training split's (4), in the
    pre-flight and in the data module (and so the model) a trial builds."""
    from prunelib.models import model_from_config
    from search.trial import get_datamodule

    cfg = _cfg("fewer_classes_in_eval", f"data.resident={str(resident).lower()}")
    assert preflight(cfg, open_stores=False).num_classes == 4
    dm = get_datamodule(cfg["data"], "cpu", 0)
    assert dm.num_classes == 4
    model = model_from_config(cfg["model"], tuple(dm.input_shape), dm.num_classes)
    assert model(torch.zeros(2, *dm.input_shape)).shape == (2, 4)


def test_a_trial_trains_and_exports_a_model_of_the_training_splits_classes(tmp_path):
    import json

    from search.config import build_search_space
    from search.trial import TrialContext, run_trial

    cfg = _cfg("fewer_classes_in_eval", "trial.epochs=1", "trial.finetune_epochs=0")
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")])
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="t4", trial_dir=tmp_path)
    assert 0.0 <= row["val_acc"] <= 1.0
    spec = json.loads((tmp_path / "pruned_model.json").read_text())["spec"]
    assert spec["num_classes"] == 4  # the training split's 4 classes, not the 2 of validation and test


def test_class_count_reads_the_training_split_only():
    train = torch.tensor([0, 1, 2, 1])
    assert class_count(train) == 3
    assert class_count(train, num_classes=7) == 7
    assert class_count(train, declared=5) == 5
    with pytest.raises(DataSourceError, match="the train split is empty"):
        class_count(torch.zeros(0, dtype=torch.long))
    check_labels({"train": train, "val": torch.tensor([2, 0]), "test": torch.tensor([1])}, 3, False)
    with pytest.raises(DataSourceError, match="the val split has label 3 at index 1"):
        check_labels({"train": train, "val": torch.tensor([2, 3]), "test": torch.tensor([1])}, 3, False)


def test_a_dataset_without_targets_is_read_once_in_batches():
    """The label pass reads items through a DataLoader (no targets tensor), and finds a hole
    inside the claimed length with the count iteration yields."""
    class Holey(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3000

        def __getitem__(self, i: int):
            if i >= 2500 and i != 2999:  # the ends exist, items from 2500 do not
                raise IndexError(i)
            return torch.zeros(2), i % 3

    assert torch.equal(dataset_labels(fine()[0], "train"), torch.arange(240) % 4)
    with pytest.raises(DataSourceError, match="the train split's __len__ says 3000 items but iterating it yields "
                                              "2500 items"):
        dataset_labels(Holey(), "train")
    # Fewer items claimed than held (a generated data set may answer any index): the claimed ones are read.
    assert dataset_labels(LyingLength(fine()[0], 239), "train").shape == (239,)


def test_fashion_mnist_label_scan_is_cheap():
    """The pre-flight's label scan of a 70k-item data set with a targets tensor adds well under 2 s."""
    class TargetsOnly(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            self.targets = torch.arange(n) % 10

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int):
            return torch.zeros(1, 28, 28), int(self.targets[i])

    sets = {"train": TargetsOnly(54000), "val": TargetsOnly(6000), "test": TargetsOnly(10000)}
    start = time.perf_counter()
    labels = {split: dataset_labels(ds, split) for split, ds in sets.items()}
    check_labels(labels, class_count(labels["train"]), False)
    assert time.perf_counter() - start < 0.5


def test_fashion_mnist_preflight_check_is_cheap_when_present():
    """The built-in Fashion-MNIST (resident tensors): the label checks add well under 2 s."""
    from prunelib.data import DatasetNotFoundError
    from prunelib.data.labels import check_datamodule_labels

    try:
        dm = datamodule_from_config({"name": "fashion_mnist"})
    except (DatasetNotFoundError, FileNotFoundError, OSError):
        pytest.skip("Fashion-MNIST is not installed here")
    start = time.perf_counter()
    check_datamodule_labels(dm, configured=False)
    assert time.perf_counter() - start < 0.5 and dm.num_classes == 10
