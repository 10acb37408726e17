"""A sweep's storage: trials' files under <root>/trials/<id>/ (a path or a pyarrow URI), results
written last and atomically, finished trials found again for resume."""

from __future__ import annotations

import json

import pytest

from search.storage import RESULT_FILE, SweepStorage, copy_out


@pytest.mark.parametrize("uri", [False, True], ids=["path", "file-uri"])
def test_trial_files_land_under_the_storage_and_are_found_again(tmp_path, uri):
    root = (tmp_path / "store").as_uri() if uri else str(tmp_path / "store")
    storage = SweepStorage(root)
    storage.check()
    with storage.trial_dir("t1") as local:
        (local / "masks.safetensors").write_bytes(b"masks")
        (local / "sub").mkdir()
        (local / "sub" / "x.json").write_text("{}")
        row = storage.publish(local, "t1", {"trial_id": "t1", "val_acc": 0.5, "masks_path": str(local / "masks.safetensors")})
        staged = local
    final = tmp_path / "store" / "trials" / "t1"
    assert (final / "masks.safetensors").read_bytes() == b"masks" and (final / "sub" / "x.json").is_file()
    assert json.loads((final / RESULT_FILE).read_text())["val_acc"] == 0.5
    if uri:  # staged in the system's temporary folder, uploaded, then removed; paths name the storage
        assert not staged.exists() and row["masks_path"] == f"{root}/trials/t1/masks.safetensors"
    else:  # written in place
        assert staged == final and row["masks_path"] == str(final / "masks.safetensors")
    assert storage.finished_row("t1")["trial_id"] == "t1" and storage.finished_row("t2") is None
    assert [r["trial_id"] for r in storage.finished_rows()] == ["t1"]
    assert copy_out(row["masks_path"], tmp_path / "copy") and (tmp_path / "copy").read_bytes() == b"masks"
    assert not copy_out(f"{root}/trials/t9/masks.safetensors", tmp_path / "none")


def test_a_half_written_result_is_not_a_finished_trial(tmp_path):
    storage = SweepStorage(tmp_path)
    (tmp_path / "trials" / "t1").mkdir(parents=True)
    (tmp_path / "trials" / "t1" / RESULT_FILE).write_text('{"trial_id": "t1", "val_')
    assert storage.finished_row("t1") is None and storage.finished_rows() == []


def test_restored_limiter_counts_trials_known_only_by_their_files(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from search.config import build_search_space
    from search.tune_callbacks import make_budget_limiter_class as _make_budget_limiter_class
    from tests.conftest import compose

    space = build_search_space(compose(["+method=magnitude"]))
    make = _make_budget_limiter_class()
    limiter = make(OptunaSearch(space=space, metric=["val_acc", "flops_effective"], mode=["max", "min"]), 1, 3,
                   None, str(tmp_path))
    assert isinstance(limiter.suggest("a"), dict)
    limiter.on_trial_complete("a", {"val_acc": 0.5, "flops_effective": 1000.0})
    checkpoint = limiter.get_state()
    storage = SweepStorage(tmp_path)
    for trial_id in ("a", "b"):  # b finished after the checkpoint while MLflow was down
        with storage.trial_dir(trial_id) as local:
            storage.publish(local, trial_id, {"trial_id": trial_id})
    restored = make(OptunaSearch(space=space, metric=["val_acc", "flops_effective"], mode=["max", "min"]), 1, 3,
                    None, str(tmp_path))
    restored.set_state(checkpoint)
    assert isinstance(restored.suggest("c"), dict)
    assert restored.orphan_ids == ["b"]
    restored.on_trial_complete("c", {"val_acc": 0.5, "flops_effective": 1000.0})
    assert restored.suggest("d") == "FINISHED"
