"""What a sweep writes, on a full disk: atomic and checked writes (nothing truncated left
behind, the previous file intact), a trial that fills the disk stops the sweep with exit 3 and a
clean resume, front points recovered from MLflow, and prunesearch-export's refusals."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from prunelib.artifact import ModelSpec, load_pruned, save_pruned
from prunelib.masks import MaskSet
from prunelib.models import build_model
from search.storage import StorageError, atomic_write, atomic_write_text, storage_errors
from tests.conftest import REPO


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync fails as on a full disk (the write helpers' flush, before the rename)."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".part")))


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "sweep.json"
    target.write_text('{"finished": false}')
    _full_disk(monkeypatch)
    with pytest.raises(StorageError) as info:
        atomic_write_text(target, '{"finished": true}')
    assert str(info.value) == f"{target}: No space left on device (ENOSPC)"
    assert target.read_text() == '{"finished": false}'
    assert _leftovers(tmp_path) == []


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    model = build_model("mlp", (1, 8, 8), 10)
    written = [atomic_write_text(tmp_path / "a.json", "{}"),
               MaskSet.ones_like(model).save(tmp_path / "masks.safetensors", model)]
    assert [p.stat().st_mode & 0o777 for p in written] == [0o666 & ~umask] * 2  # readable by others, as before


def test_atomic_write_checks_before_the_rename(tmp_path):
    target = tmp_path / "masks.safetensors"
    target.write_bytes(b"previous")

    def refuse(tmp: Path) -> None:
        raise ValueError("does not load")

    with pytest.raises(ValueError, match="does not load"):  # not a storage error: said as it is
        atomic_write(target, lambda tmp: tmp.write_bytes(b"half"), refuse)
    assert target.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_storage_error_crosses_processes_and_names_the_path():
    error = pickle.loads(pickle.dumps(StorageError("/x/trials/a/masks.safetensors", "No space left on device")))
    assert isinstance(error, StorageError) and error.path == "/x/trials/a/masks.safetensors"
    with pytest.raises(StorageError, match=r"^/x: Read-only file system \(EROFS\)$"):
        with storage_errors("/x"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(StorageError, match=r"^/x: No space left on device \(ENOSPC\)$"):
        with storage_errors("/x"):  # safetensors' Rust writer says it in words
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(KeyError):  # anything else passes unchanged
        with storage_errors("/x"):
            raise KeyError("a bug")


def test_prunelib_writers_leave_no_half_file_on_a_full_disk(tmp_path, monkeypatch):
    model = build_model("mlp", (1, 8, 8), 10)
    masks = MaskSet.ones_like(model)
    spec = ModelSpec("model", {"name": "mlp"}, (1, 8, 8), 10)
    masks.save(tmp_path / "masks.safetensors", model, method="magnitude")
    save_pruned(tmp_path, model, spec, "masked")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        masks.save(tmp_path / "masks.safetensors", model, method="changed")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        save_pruned(tmp_path, model, spec, "masked", extra={"changed": True})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced, nothing left over
    assert MaskSet.load(tmp_path / "masks.safetensors").metadata["method"] == "magnitude"
    load_pruned(tmp_path)


def _store_with_trials(root: Path, trials: dict[str, Path | None]) -> tuple[str, str, dict[str, str]]:
    """An MLflow store with one sweep whose trials log the given masks files (None: no artifact)."""
    from search.tracking import SweepTracker, log_trial_run

    uri = f"sqlite:///{root}/mlflow.db"
    tracker = SweepTracker(uri, "storage-test")
    parent = tracker.start_parent("sweep", params={}, tags={
        "prunesearch.objectives": json.dumps([["val_acc", "max"], ["flops_effective", "min"]])})
    runs = {}
    for i, (trial_id, masks) in enumerate(trials.items()):
        runs[trial_id] = log_trial_run(uri, tracker.experiment_id, parent, trial_id, params={"method": "magnitude"},
                                       metrics={"val_acc": 0.9 - 0.1 * i, "flops_effective": 100.0 - 10 * i},
                                       artifacts={"masks": str(masks)} if masks is not None else {})
    return uri, parent, runs


def _masks_file(folder: Path) -> Path:
    model = build_model("mlp", (1, 8, 8), 10)
    return MaskSet.ones_like(model).save(folder / "masks.safetensors", model, method="magnitude")


def test_front_points_whose_folder_is_gone_come_back_from_mlflow(tmp_path, capsys):
    from search.front_report import export_front as _export_front

    kept, gone = _masks_file(tmp_path / "trials" / "a"), _masks_file(tmp_path / "logged" / "b")
    uri, _, runs = _store_with_trials(tmp_path, {"a": kept, "b": gone, "c": None})
    rows = [{"trial_id": t, "method": "magnitude", "val_acc": 0.9 - 0.1 * i, "flops_effective": 100.0 - 10 * i,
             "masks_path": str(tmp_path / "trials" / t / "masks.safetensors"), "mlflow_run_id": runs[t]}
            for i, t in enumerate(("a", "b", "c"))]
    front_dir = tmp_path / "front"
    written = _export_front(pd.DataFrame(rows), rows, front_dir, {"uri": uri})
    out = capsys.readouterr().out
    assert [p.name for p in written] == ["00_magnitude_a.safetensors", "01_magnitude_b.safetensors"]
    for path in written:
        MaskSet.load(path)
    assert f"front: trial b: its folder is gone" in out and f"masks recovered from MLflow run {runs['b']}" in out
    lines = [line for line in out.splitlines() if line.startswith("front: trial c:")]
    assert len(lines) == 1 and "left out of" in lines[0]  # said once, never dropped silently
    assert "Traceback" not in out and _leftovers(front_dir) == []


def test_front_export_on_a_full_disk_leaves_no_truncated_file(tmp_path, monkeypatch):
    from search.front_report import export_front as _export_front

    masks = _masks_file(tmp_path / "trials" / "a")
    rows = [{"trial_id": "a", "method": "magnitude", "val_acc": 0.9, "flops_effective": 10.0,
             "masks_path": str(masks)}]
    front_dir = tmp_path / "front"
    front_dir.mkdir()
    _full_disk(monkeypatch)
    with pytest.raises(StorageError, match=r"00_magnitude_a\.safetensors: No space left on device"):
        _export_front(pd.DataFrame(rows), rows, front_dir, None)
    assert list(front_dir.iterdir()) == []


def _export(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.export", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_export_long_names_and_a_missing_masks_artifact(tmp_path):
    uri, parent, _ = _store_with_trials(tmp_path, {"t0": _masks_file(tmp_path / "art")})
    fine = tmp_path / ("p" * 245)  # a name the file system takes: our temporary names must fit too
    proc = _export(f"run_id={parent}", "select=max_acc", f"out={fine}", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr
    MaskSet.load(fine / "masks.safetensors")
    too_long = tmp_path / ("q" * 300)
    proc = _export(f"run_id={parent}", "select=max_acc", f"out={too_long}", f"tracking.uri={uri}")
    assert proc.returncode == 2 and proc.stderr.startswith("export: out: the name qqq"), proc.stderr
    assert "File name too long" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr

    bare = tmp_path / "bare"
    bare.mkdir()
    uri2, parent2, _ = _store_with_trials(bare, {"t1": None})  # the run holds no masks
    for out in (tmp_path / "keep" / "masks.safetensors", tmp_path / "keep_dir"):
        out.parent.mkdir(exist_ok=True)
        if out.suffix:
            out.write_bytes(b"earlier")
        proc = _export(f"run_id={parent2}", f"out={out}", f"tracking.uri={uri2}")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("export: run_id: run ") and "has no artifact 'masks/masks.safetensors'" \
            in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (out.read_bytes() == b"earlier") if out.suffix else not out.exists()
        assert _leftovers(out.parent) == []


def load_safetensors_file(path: Path) -> None:
    """Load one masks file (a trial's or the front's) or weights file whole; a truncated one raises.
    (benchmarks/reliability_drill.py checks a sweep's files with it too.)"""
    from safetensors import safe_open

    if path.name == "masks.safetensors" or path.parent.name == "front":
        MaskSet.load(path)
    else:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def _loads_everywhere(root: Path) -> int:
    """Load every masks and weights file under ``root``; returns how many."""
    count = 0
    for path in root.rglob("*.safetensors"):
        load_safetensors_file(path)
        count += 1
    for manifest in root.rglob("pruned_model.json"):
        load_pruned(manifest.parent)
    return count


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_with_exit_3_and_resumes_cleanly(tmp_path):
    """The second trial's writes fail with ENOSPC (injected: CI cannot mount a small disk): the
    sweep stops (exit 3, one line), nothing truncated anywhere, the parent run KILLED; the resume
    runs what is left and every trial's result exists exactly once."""
    from mlflow import MlflowClient

    from search.tracking import find_trial_runs

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "search", "+method=magnitude", "search.n_trials=3", "search.concurrency=1",
           "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=200", "cluster.num_cpus=2",
           "+trial.faults.plan='2:enospc'", f"+trial.faults.state_dir={tmp_path}/faults",
           f"hydra.run.dir={run}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("storage error: ")]
    assert len(lines) == 1 and "No space left on device" in lines[0], out[-3000:]
    assert f"search.resume=true search.resume_dir={run}" in lines[0] and "nothing was left half-written" in lines[0]
    assert "Traceback" not in out
    state = json.loads((run / "sweep.json").read_text())
    assert state["finished"] is False and "No space left" in state["storage_error"]
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(state["parent_run_id"])
    assert parent.info.status == "KILLED"
    assert _leftovers(run) == []
    _loads_everywhere(run)
    done_before = {p.parent.name for p in (run / "trials").glob("*/trial_result.json")}
    assert len(done_before) < 3  # it stopped: the third trial never started after the failure

    proc = subprocess.run(cmd + ["search.resume=true", f"search.resume_dir={run}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    state = json.loads((run / "sweep.json").read_text())
    assert state["finished"] is True and "storage_error" not in state
    runs = find_trial_runs(f"sqlite:///{tmp_path}/mlflow.db", state["parent_run_id"])
    ok = [r["trial_id"] for r in runs if r["status"] == "ok"]
    assert len(ok) == 3 and len(set(ok)) == 3, runs
    assert {p.parent.name for p in (run / "trials").glob("*/trial_result.json")} == set(ok)
    completions = {p.name: len(p.read_text()) for p in (tmp_path / "faults").glob("completions-*")}
    assert sorted(completions.values()) == [1, 1, 1], completions  # each trial ran to the end once
    assert _leftovers(run) == []
    assert _loads_everywhere(run) >= 6  # masks and weights of 3 trials, and the front's masks


def test_a_hugging_face_model_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from prunelib.models.hf import save_hf_model

    def tiny(seed: int):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40,
                                                                    n_positions=16))

    out = save_hf_model(tiny(0), None, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors" in before and "config.json" in before
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        save_hf_model(tiny(1), None, tmp_path / "hf")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left
    save_hf_model(tiny(1), None, tmp_path / "hf")  # with space, the new model takes the name
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True)
    assert torch.equal(loaded.transformer.wte.weight, tiny(1).transformer.wte.weight)
