"""``trial.gpus=auto``: how many trials to pack onto one GPU, from a short throughput probe.

Small pruning trials leave a big GPU idle: their steps are bound by kernel launches, not
arithmetic, so several trials in parallel on one GPU each run at nearly full speed. The probe
measures that directly: it times training steps of the sweep's model at the data's batch size
``B`` and at ``m x B`` (m = 2, 4, ... 16). While a step at ``m x B`` costs about the same time as
one at ``B`` (within ``slowdown``), the GPU has room for ``m`` trials. Memory caps the count:
``m`` trials need ``m x`` (one trial's peak memory + a CUDA context). The fraction is ``1/m``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["CUDA_CONTEXT_BYTES", "choose_gpu_fraction", "probe_gpu_fraction", "probe_step_seconds"]

#: Memory a CUDA context takes per process beyond tensors (about 300-600 MiB on recent GPUs).
CUDA_CONTEXT_BYTES = 512 * 2**20
MULTIPLIERS = (1, 2, 4, 8, 16)


def choose_gpu_fraction(step_seconds: Mapping[int, float], peak_bytes: int, total_bytes: int,
                        slowdown: float = 1.25, memory_fraction: float = 0.9) -> float:
    """The GPU fraction per trial (``1/m``) from probed step times.

    Args:
        step_seconds: seconds per training step at ``m`` times the batch size, keyed by ``m``
            (must hold ``m = 1``).
        peak_bytes: peak GPU memory of one trial (tensors), bytes.
        total_bytes: the GPU's memory, bytes.
        slowdown: how much slower than the ``m = 1`` step a packed step may be and still count
            as free parallel room (1.25 = 25 %).
        memory_fraction: share of the GPU's memory the packed trials may use together.

    Returns:
        ``1/m`` for the largest ``m`` (a power of two) that fits both the time and memory limits.
    """
    if 1 not in step_seconds or step_seconds[1] <= 0:
        raise ValueError("step_seconds needs a positive time at multiplier 1")
    per_trial = peak_bytes + CUDA_CONTEXT_BYTES
    best = 1
    for m in sorted(step_seconds):
        if m <= best:
            continue
        fits_time = step_seconds[m] <= slowdown * step_seconds[1]
        fits_memory = m * per_trial <= memory_fraction * total_bytes
        if not (fits_time and fits_memory):
            break  # larger batches only get slower and bigger
        best = m
    return 1.0 / best


def probe_step_seconds(model: Any, input_shape: tuple[int, ...], num_classes: int, batch_size: int,
                       steps: int = 20, device: str = "cuda") -> tuple[dict[int, float], int]:
    """Seconds per training step (plain SGD, random data) at ``m x batch_size`` for each multiplier.

    Needs only torch (no Ray, no Optuna), so benchmarks can run the probe on their own.
    Multipliers stop at the first that runs out of memory.

    Returns:
        ``(step_seconds, peak_bytes)``: seconds per step keyed by ``m``, and the peak GPU memory
        (bytes) of the ``m = 1`` steps (0 on a CPU ``device``).
    """
    import torch

    on_cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_seconds: dict[int, float] = {}
    peak = 0
    for m in MULTIPLIERS:
        x = torch.randn((batch_size * m, *input_shape), device=device)
        y = torch.randint(0, num_classes, (batch_size * m,), device=device)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        try:
            for _ in range(3):  # warm-up: cuDNN autotuning, allocator
                step()
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if on_cuda:
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            break
        step_seconds[m] = (time.perf_counter() - start) / steps
        if m == 1 and on_cuda:
            peak = int(torch.cuda.max_memory_allocated())
    return step_seconds, peak


def probe_gpu_fraction(data_cfg: dict[str, Any], model_cfg: dict[str, Any], trial_cfg: dict[str, Any],
                       steps: int = 20) -> dict[str, Any]:
    """Time training steps of the sweep's model on this process's GPU; returns the choice.

    Run it where a whole GPU is visible (a Ray task with ``num_gpus=1``). Returns
    ``{"fraction", "trials_per_gpu", "step_seconds", "peak_bytes", "total_bytes", "gpu"}``.
    """
    import torch

    from prunelib.models import model_from_config
    from search.trials.training import get_datamodule

    if not torch.cuda.is_available():
        raise RuntimeError("probe_gpu_fraction needs a CUDA device")
    from search.settings import TrialSettings

    data = get_datamodule(data_cfg, "cuda", TrialSettings.from_dict(trial_cfg).seed)
    model = model_from_config(model_cfg, tuple(data.input_shape), data.num_classes).cuda()
    # The batch the trials train with: the data module's own (its door's default unless data.batch_size).
    step_seconds, peak = probe_step_seconds(model, tuple(data.input_shape), data.num_classes,
                                            int(getattr(data, "batch_size", 128)), steps)
    total = int(torch.cuda.get_device_properties(0).total_memory)
    fraction = choose_gpu_fraction(step_seconds, peak, total)
    return {"fraction": fraction, "trials_per_gpu": int(round(1 / fraction)), "step_seconds": step_seconds,
            "peak_bytes": peak, "total_bytes": total, "gpu": torch.cuda.get_device_name(0)}
