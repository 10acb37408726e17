"""trial.gpus=auto: the packing choice from probed step times, and the CPU fallback."""

from __future__ import annotations

import pytest

from search.packing import CUDA_CONTEXT_BYTES, choose_gpu_fraction
from search.tuner import run_sweep
from tests.conftest import compose

GiB = 2**30


def test_launch_bound_model_packs_many_trials():
    # lenet5-like: 16x the batch costs barely more time than 1x.
    times = {1: 2.0e-3, 2: 2.0e-3, 4: 2.1e-3, 8: 2.3e-3, 16: 2.4e-3}
    assert choose_gpu_fraction(times, peak_bytes=200 * 2**20, total_bytes=80 * GiB) == 1 / 16


def test_compute_bound_model_gets_a_whole_gpu():
    # vgg_small-like at a big batch: doubling the batch nearly doubles the step.
    times = {1: 8e-3, 2: 15e-3, 4: 29e-3}
    assert choose_gpu_fraction(times, peak_bytes=2 * GiB, total_bytes=80 * GiB) == 1.0


def test_memory_caps_the_packing_before_time_does():
    times = {1: 1e-3, 2: 1e-3, 4: 1e-3, 8: 1e-3, 16: 1e-3}
    per_trial = 3 * GiB  # 3 GiB of tensors + the CUDA context: 4 fit in 0.9 x 16 GiB, 8 do not
    assert choose_gpu_fraction(times, peak_bytes=per_trial - CUDA_CONTEXT_BYTES + 2**20, total_bytes=16 * GiB) == 1 / 4


def test_needs_the_unit_batch_time():
    with pytest.raises(ValueError, match="multiplier 1"):
        choose_gpu_fraction({2: 1e-3}, peak_bytes=1, total_bytes=GiB)


def test_auto_without_a_gpu_runs_the_sweep_on_cpu(tmp_path, ray_local, capsys):
    cfg = compose(["+method=magnitude", "search.n_trials=2", "trial.epochs=1", "trial.finetune_epochs=0",
                   "data.limit_train=200", "trial.gpus=auto", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    result = run_sweep(cfg, tmp_path / "out")
    assert "trial.gpus=auto: no GPU in the Ray cluster; trials run on CPU" in capsys.readouterr().out
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
