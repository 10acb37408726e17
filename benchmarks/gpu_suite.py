"""GPU suite (issue 18): one run that measures every GPU claim of prunesearch on one GPU.

Needs PyTorch, Lightning, scikit-learn, safetensors and Torch-Pruning; no Ray, Optuna, MLflow or
Hydra (it drives ``prunelib`` directly, as a trial does: ``run_pruning``, the methods, surgery).
Each part writes one Markdown table into ``--out`` as soon as each row is measured, so a run cut
short keeps what it measured:

- ``a_throughput.md``: per-trial training throughput of our runner (``run_pruning``: Lightning,
  the pruning callback, a one-shot magnitude method) against a plain PyTorch loop over the same
  resident batches, same model, epochs and batch, lenet5 and vgg_small, fp32 and bf16. Target:
  ratio >= 0.9.
- ``c_first_step.md``: time from a trial's start to its first optimizer step, for the first
  trial of a fresh worker process (data load, CUDA context, cuDNN) and the ones after it.
- ``b_packing.md``: 16 lenet5 trials run by 1, 4, 8 and 16 worker processes on the one GPU (what
  Ray's fractional GPUs do), aggregate training samples/s against one at a time (target >= 5x),
  and the fraction ``trial.gpus=auto``'s probe (``search.packing``) picks on the same GPU.
- ``d_surgery_speedup.md``: measured forward speed-up (bf16, eager) of the surgered models of
  PAODING, RL-Pruner, polarization and BINGO (neuron) against Torch-Pruning's L1 at 25/50/75 %
  of the channels, vgg_small and resnet56, batch 1 and 1024, ``round_to`` 8 and none.
- ``e_ken_selection.md``: KEN's selection (``kde_select_rows``) on the 2-D matrices of a
  BERT-base-sized model on the GPU, k = 64 and 256 per row, float64 and float32 densities,
  checked row by row against the CPU on a sample of rows.
- ``f_speed_settings.md``: the optional trial speed settings (``TrainConfig.channels_last``,
  ``compile``, ``cuda_graphs``) against the plain runner, bf16.

Plus ``suite.json`` (environment and every raw figure). Parts run in the order a, c, b, d, e, f,
each under a cap (a fraction of ``--budget``); a part skips what would overrun it, with a note,
and f gets what is left, so the run stays inside ``--budget`` seconds (default 400: under 7
minutes with start-up). Progress lines go to stdout (run with ``PYTHONUNBUFFERED=1``).

Smoke mode (``--smoke``): the same code paths on the CPU with tiny sizes (synthetic 14x14 IDX
files, width-reduced models, 2 trials as 1 and 2 processes, ``compile_backend=aot_eager``),
well under a minute; ``tests/test_gpu_suite.py`` runs it in CI.

Prepared GPU run (one call of the workplace's device tool ``run``; one NVIDIA H200, PyTorch 2.11
with CUDA, no network, no Torch-Pruning). Preparation, once, in the repository root here::

    echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
    echo /.data/ >> "$(git rev-parse --git-path info/exclude)"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl torch-pruning==1.6.1
    mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/

(the wheel is 70 kB and the four IDX files 30 MB: with the tracked tree about 31 MB of the
64 MiB a call may carry). Then ``run`` with ``carry: [".whl", ".data"]``, ``timeout_s: 560``,
COMMIT replaced by ``git rev-parse --short HEAD`` of the checkout (the copy that travels may
have no ``.git``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; set -o pipefail; PYTHONUNBUFFERED=1 timeout 500 python3 benchmarks/gpu_suite.py --out $OUT --data-root .data/fashion-mnist --budget 400 --commit COMMIT 2>&1 | tee $OUT/log.txt

``$OUT`` gets 8 files (6 tables, suite.json, log.txt): the most that come back. The machine's
start takes a minute or two of the 15 device minutes, the run up to about 7.5: a second call,
only to redo what failed, takes ``--parts`` (e.g. ``--parts b,d``) and a smaller ``--budget``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ken_benchmark import bert_base_shapes  # noqa: E402
from paoding_benchmark import tp_l1_prune  # noqa: E402

from prunelib.data import ArrayDataModule, build_datamodule, write_idx  # noqa: E402
from prunelib.flops import count_flops  # noqa: E402
from prunelib.methods import build_method  # noqa: E402
from prunelib.methods.ken import kde_select_rows  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.surgery import surgery  # noqa: E402
from prunelib.training import TrainConfig, evaluate, run_pruning  # noqa: E402
from search.packing import choose_gpu_fraction, probe_step_seconds  # noqa: E402

PARTS = ("a", "c", "b", "d", "e", "f")

#: Columns of each part's table (tests/test_gpu_suite.py checks the written tables against these).
TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "a": ("a_throughput.md", "(a) Per-trial training throughput: our runner vs a plain resident-data loop",
          ("model", "precision", "epochs", "batch", "steps", "plain samples/s", "runner samples/s",
           "steady ratio", "plain trial s", "runner trial s", "trial ratio", "runner first step s")),
    "c": ("c_first_step.md", "(c) Trial start to first optimizer step, first trial of a worker vs the next",
          ("trial of the worker", "data load s", "start to first step s", "trial wall s", "samples/s")),
    "b": ("b_packing.md", "(b) Packing lenet5 trials on one GPU: concurrent processes vs one at a time",
          ("processes", "trials", "wall s", "aggregate samples/s", "speed-up vs 1", "mean trial s",
           "mean trial samples/s", "GPU memory in use GiB")),
    "d": ("d_surgery_speedup.md", "(d) Forward speed-up of surgered models vs Torch-Pruning L1",
          ("model", "method", "target", "round_to", "channels removed", "physical FLOPs", "batch",
           "latency ms", "speed-up", "TP L1 speed-up", "vs TP L1")),
    "e": ("e_ken_selection.md", "(e) KEN selection on BERT-base shapes",
          ("kde dtype", "k", "rows", "values", "seconds", "768-wide s", "3072-wide s", "kept",
           "rows equal to CPU")),
    "f": ("f_speed_settings.md", "(f) Optional trial speed settings vs the plain runner",
          ("model", "precision", "setting", "first step s", "steady samples/s", "vs runner",
           "trial s", "val acc", "val acc change", "note")),
}

#: Share of --budget each part may use at most (f gets whatever is left).
CAPS = {"a": 0.13, "c": 0.10, "b": 0.22, "d": 0.32, "e": 0.08, "f": 1.0}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    batch_size: int = 128
    limit_train: int | None = None          # training samples loaded (None: all 54,000)
    a_models: tuple[tuple[str, float, int], ...] = (("lenet5", 1.0, 2), ("vgg_small", 1.0, 1))  # name, width, epochs
    precisions: tuple[str, ...] = ("32-true", "bf16-mixed")
    a_repeats: int = 2
    warmup_samples: int = 2048
    b_trials: int = 16
    b_processes: tuple[int, ...] = (1, 4, 8, 16)
    b_epochs: int = 1
    b_train_samples: int | None = None      # per trial (None: the whole training split)
    probe_steps: int = 20
    c_trials: int = 3
    c_train_samples: int | None = 16384
    d_models: tuple[tuple[str, float], ...] = (("vgg_small", 1.0), ("resnet56", 1.0))
    d_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    d_methods: tuple[str, ...] = ("paoding", "rl_pruner", "polarization", "bingo")
    d_round_to: tuple[int | None, ...] = (8, None)
    d_batches: tuple[int, ...] = (1, 1024)
    d_train_samples: int = 5000
    d_epochs: int = 1
    d_repeats: int = 20
    d_dtype: str = "bfloat16"
    d_rl_search: tuple[tuple[str, int], ...] = ()  # RL-Pruner search settings other than its defaults
    e_ks: tuple[int, ...] = (64, 256)
    e_dtypes: tuple[str, ...] = ("float64", "float32")
    e_row_cap: int | None = None             # rows kept per matrix (None: all of BERT-base)
    e_check_rows: int = 32
    f_models: tuple[tuple[str, float, int], ...] = (("lenet5", 1.0, 2), ("vgg_small", 1.0, 1))
    f_precision: str = "bf16-mixed"
    compile_backend: str = "inductor"


FULL = Sizes()
SMOKE = Sizes(
    batch_size=32, limit_train=192, a_models=(("lenet5", 0.5, 1),), a_repeats=1, warmup_samples=64,
    b_trials=2, b_processes=(1, 2), b_train_samples=64, probe_steps=2, c_trials=2, c_train_samples=64,
    d_models=(("vgg_small", 0.125),), d_fractions=(0.5,), d_batches=(1, 4), d_train_samples=64, d_repeats=2,
    d_dtype="float32",  # CPU bf16 convolutions are slow; the GPU run times bf16
    d_rl_search=(("prune_steps", 1), ("rl_epochs", 1), ("sample_num", 2)),
    e_ks=(4, 8), e_dtypes=("float64",), e_row_cap=4, e_check_rows=4, f_models=(("lenet5", 0.5, 1),),
    f_precision="32-true", compile_backend="aot_eager")


def say(text: str) -> None:
    """One progress line (flushed: the device run streams its output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def fmt(value: Any) -> str:
    """A table cell: floats to 3 significant figures (thousands with separators), None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


# --------------------------------------------------------------------------------------------
# Tables, time budget
# --------------------------------------------------------------------------------------------
@dataclass
class Table:
    """One part's Markdown table, rewritten to disk after every row."""

    part: str
    path: Path
    setup: str = ""
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    @property
    def columns(self) -> tuple[str, ...]:
        return TABLES[self.part][2]

    def add(self, cells: dict[str, Any], raw: dict[str, Any] | None = None) -> None:
        """Add a row (``cells`` keyed by column name) and rewrite the file."""
        missing = set(self.columns) - set(cells)
        if missing:
            raise KeyError(f"table {self.part}: row lacks {sorted(missing)}")
        self.rows.append([fmt(cells[c]) for c in self.columns])
        self.raw.append(raw if raw is not None else cells)
        self.write()

    def note(self, text: str) -> None:
        """Add a note under the table (skips, failures, how to read it) and rewrite the file."""
        self.notes.append(text)
        say(f"({self.part}) {text}")
        self.write()

    def write(self) -> None:
        lines = [f"### {TABLES[self.part][1]}", ""]
        if self.setup:
            lines += [self.setup, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        self.path.write_text("\n".join(lines) + "\n")


class Budget:
    """The run's deadline and each part's share of it (seconds, monotonic clock)."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + float(total_s)
        self.part_end = self.end

    def open_part(self, cap_s: float) -> None:
        """Start a part that may use at most ``cap_s`` seconds (never past the run's deadline)."""
        self.part_end = min(time.monotonic() + cap_s, self.end)

    def left(self) -> float:
        """Seconds left to the current part."""
        return self.part_end - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        """Whether work estimated at ``estimate_s`` seconds ends inside the current part's share."""
        return self.left() >= estimate_s


@contextlib.contextmanager
def unit(table: Table, label: str) -> Iterator[None]:
    """One measurement of a part: if it fails, note it (one line; the traceback goes to the log)
    and let the part go on with the next one."""
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        table.note(f"failed: {label}: {type(exc).__name__}: {first}"[:400])


# --------------------------------------------------------------------------------------------
# Data, timing helpers
# --------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for the device's queued work (so host clocks measure it)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def accelerator(device: str) -> str:
    """Lightning's accelerator name for a torch device string."""
    return "gpu" if device.startswith("cuda") else "cpu"


def write_synthetic_fashion(directory: Path, n_train: int = 600, n_test: int = 100, size: int = 14,
                            seed: int = 0) -> Path:
    """Tiny Fashion-MNIST-format IDX files (``size`` x ``size`` pixels; learnable: each class
    brightens its own row)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 120, (n, size, size)).astype(np.uint8)
        for c in range(10):
            images[labels == c, c * size // 10, :] += 120
        write_idx(directory / f"{split}-images-idx3-ubyte", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels)
    return directory


def load_data(root: str | None, device: str, sizes: Sizes, cache: dict[Any, ArrayDataModule]) -> ArrayDataModule:
    """Fashion-MNIST resident on ``device``, loaded once per process (as a trial worker caches it)."""
    key = (root, device, sizes.limit_train, sizes.batch_size)
    if key not in cache:
        cache[key] = build_datamodule("fashion_mnist", root=root, batch_size=sizes.batch_size,
                                      limit_train=sizes.limit_train, seed=0, device=device)
    return cache[key]


def subset(dm: ArrayDataModule, n: int | None) -> ArrayDataModule:
    """The same data module with only the first ``n`` training samples (views, no copy)."""
    if n is None or n >= dm.sizes["train"]:
        return dm
    x, y = dm.split("train")
    small = ArrayDataModule(dm.name, (x[:n], y[:n]), dm.split("val"), dm.split("test"), dm.num_classes,
                            dm.batch_size, dm.eval_batch_size, dm.seed, device=dm.device)
    small.mean, small.std, small.input_range = dm.mean, dm.std, dm.input_range
    return small


class StepClock(L.Callback):
    """Monotonic-clock marks of a fit: after the first optimizer step and at the end (synchronised)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0
        self.samples = 0
        self.samples_at_first = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.steps += 1
        self.samples += int(batch[1].shape[0])
        if self.first is None:
            sync(self.device)
            self.first = time.monotonic()
            self.samples_at_first = self.samples

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self.last = time.monotonic()

    def steady(self) -> float:
        """Training samples per second after the first step (compile and warm-up excluded)."""
        if self.first is None or self.last is None or self.last <= self.first:
            return float("nan")
        return (self.samples - self.samples_at_first) / (self.last - self.first)


def run_timed_trial(spec: dict[str, Any], cache: dict[Any, ArrayDataModule]) -> dict[str, Any]:
    """One trial as ``search.trial.run_trial`` runs it (cached data, model, method, ``run_pruning``),
    with clock marks: start, data ready, first optimizer step, end of training, end."""
    device = spec["device"]
    t_start = time.monotonic()
    dm = subset(load_data(spec["root"], device, spec["sizes"], cache), spec.get("train_samples"))
    sync(device)
    t_data = time.monotonic()
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"], tuple(dm.input_shape), dm.num_classes, width=spec["width"]).to(device)
    method = build_method(spec.get("method", "magnitude"), **spec.get("settings", {"sparsity": 0.5}))
    config = TrainConfig(epochs=spec["epochs"], finetune_epochs=0, accelerator=accelerator(device),
                         precision=spec["precision"], **spec.get("speed", {}))
    clock = StepClock(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = run_pruning(model, dm, method, config, seed=spec["seed"], callbacks=[clock])
    sync(device)
    t_end = time.monotonic()
    return {"t_start": t_start, "t_data": t_data, "t_first": clock.first, "t_train_end": clock.last,
            "t_end": t_end, "steps": clock.steps, "samples": clock.samples, "steady": clock.steady(),
            "val_acc": result.val_acc, "data_s": t_data - t_start,
            "first_step_s": (clock.first - t_start) if clock.first else float("nan"),
            "wall_s": t_end - t_start,
            "peak_bytes": int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else 0}


def plain_loop(model: nn.Module, dm: ArrayDataModule, epochs: int, precision: str, device: str) -> dict[str, Any]:
    """The reference: a hand-written loop over the same resident batches (SGD, Nesterov momentum,
    weight decay as the runner's defaults; bf16 autocast like Lightning's ``bf16-mixed``), then
    one validation pass as a trial ends with."""
    t_start = time.monotonic()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
            if precision.startswith("bf16") else contextlib.nullcontext())
    loader = dm.train_dataloader()
    steps = samples = samples_at_first = 0
    first = None
    for _ in range(epochs):
        for x, y in loader:
            with cast:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            samples += int(y.shape[0])
            if first is None:
                sync(device)
                first, samples_at_first = time.monotonic(), samples
    sync(device)
    t_train_end = time.monotonic()
    val = evaluate(model, dm.val_dataloader())
    t_end = time.monotonic()
    return {"steps": steps, "samples": samples, "wall_s": t_end - t_start, "val_acc": val["acc"],
            "steady": (samples - samples_at_first) / (t_train_end - first) if first and t_train_end > first else float("nan"),
            "first_step_s": (first - t_start) if first else float("nan")}


@torch.no_grad()
def forward_ms(model: nn.Module, input_shape: Sequence[int], batch: int, device: str, repeats: int,
               dtype: torch.dtype = torch.bfloat16) -> float:
    """Median milliseconds of one eager forward pass of ``batch`` random samples in ``dtype``."""
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = torch.randn((batch, *input_shape), device=device, dtype=dtype)
    for _ in range(3):
        net(x)
    times = []
    for _ in range(5):  # 5 groups of `repeats` passes; the median group mean
        sync(device)
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                net(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / repeats)
        else:
            t0 = time.perf_counter()
            for _ in range(repeats):
                net(x)
            times.append((time.perf_counter() - t0) * 1000 / repeats)
    return statistics.median(times)


def hidden_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d and every Linear but the last (the output layer)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear) and name != linears[-1]:
            out[name] = m.out_features
    return out


# --------------------------------------------------------------------------------------------
# Worker processes (parts b and c)
# --------------------------------------------------------------------------------------------
def _worker(index: int, spawned_at: float, tasks: Any, results: Any) -> None:
    """A trial worker: like a Ray actor, it keeps its process, data cache and CUDA context."""
    results.put({"kind": "ready", "worker": index, "import_s": time.monotonic() - spawned_at})
    torch.set_num_threads(1)  # one CPU per trial, as the sweep's default trial.cpus=1
    cache: dict[Any, ArrayDataModule] = {}
    while True:
        task = tasks.get()
        if task is None:
            return
        try:
            for number, spec in enumerate(task["trials"]):
                rec = run_timed_trial(spec, cache)
                results.put({"kind": "trial", "worker": index, "round": task["round"], "number": number, **rec})
            used = 0
            if spec["device"].startswith("cuda"):
                free, total = torch.cuda.mem_get_info()
                used = total - free
            results.put({"kind": "done", "worker": index, "round": task["round"], "device_used_bytes": used})
        except Exception:  # reported to the parent, which notes it in the table
            results.put({"kind": "error", "worker": index, "round": task["round"], "error": traceback.format_exc()})


class WorkerPool:
    """``n`` spawned trial workers (spawn: CUDA cannot be forked)."""

    def __init__(self, n: int, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.trials: list[dict[str, Any]] = []  # trial records of the round in flight
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(n)]
        spawned = time.monotonic()
        self.procs = [ctx.Process(target=_worker, args=(i, spawned, self.tasks[i], self.results), daemon=True)
                      for i in range(n)]
        for p in self.procs:
            p.start()
        self.import_s = [m["import_s"] for m in self.collect("ready", n, timeout_s)]

    def collect(self, kind: str, count: int, timeout_s: float, round_id: int | None = None) -> list[dict[str, Any]]:
        """``count`` messages of ``kind`` (trial records arrive before their worker's "done");
        messages of other rounds (left by a round that failed) are dropped."""
        deadline = time.monotonic() + timeout_s
        got: list[dict[str, Any]] = []
        while len(got) < count:
            try:
                msg = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"workers: {len(got)} of {count} '{kind}' messages after {timeout_s:.0f}s") from None
            if round_id is not None and msg.get("round") != round_id:
                continue
            if msg["kind"] == "error":
                raise RuntimeError(f"worker {msg['worker']} failed:\n{msg['error']}")
            if msg["kind"] == "trial":
                self.trials.append(msg)
            elif msg["kind"] == kind:
                got.append(msg)
        return got

    def run_round(self, round_id: int, per_worker: list[list[dict[str, Any]]], timeout_s: float) -> tuple[list[dict], list[dict]]:
        """Send each worker its trials at once; wait for all. Returns (trial records, done messages)."""
        self.trials = []
        busy = [i for i, trials in enumerate(per_worker) if trials]
        for i in busy:
            self.tasks[i].put({"round": round_id, "trials": per_worker[i]})
        done = self.collect("done", len(busy), timeout_s, round_id)
        return sorted(self.trials, key=lambda r: (r["worker"], r["number"])), done

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# --------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------
@dataclass
class Suite:
    """What every part needs: sizes, device, data location, output folder, budget."""

    sizes: Sizes
    device: str
    root: str | None
    out: Path
    budget: Budget
    smoke: bool
    parts: tuple[str, ...] = PARTS
    cache: dict[Any, ArrayDataModule] = field(default_factory=dict)
    pool: WorkerPool | None = None

    def workers(self) -> WorkerPool:
        """The trial workers of parts c and b, started once: as many as b's largest process count."""
        if self.pool is None:
            n = max(self.sizes.b_processes) if "b" in self.parts else 1
            self.pool = WorkerPool(n, timeout_s=max(90.0, self.budget.left()))
        return self.pool

    def data(self) -> ArrayDataModule:
        return load_data(self.root, self.device, self.sizes, self.cache)

    def spec(self, model: str, width: float, epochs: int, precision: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
        return {"model": model, "width": width, "epochs": epochs, "precision": precision, "seed": seed,
                "device": self.device, "root": self.root, "sizes": self.sizes, **extra}


def _throughput_row(s: Suite, table: Table, dm: ArrayDataModule, warm: ArrayDataModule, name: str,
                    width: float, epochs: int, precision: str) -> None:
    """One row of (a): warm up, then alternate plain loop and runner ``a_repeats`` times."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    plain_loop(build_model(name, dm.input_shape, dm.num_classes, width=width).to(s.device), warm, 1,
               precision, s.device)
    run_timed_trial(s.spec(name, width, 1, precision, train_samples=s.sizes.warmup_samples), s.cache)
    plains, runners = [], []
    for _ in range(s.sizes.a_repeats):
        torch.manual_seed(0)
        model = build_model(name, dm.input_shape, dm.num_classes, width=width).to(s.device)
        plains.append(plain_loop(model, dm, epochs, precision, s.device))
        runners.append(run_timed_trial(s.spec(name, width, epochs, precision), s.cache))
    plain = max(plains, key=lambda r: r["steady"])
    runner = max(runners, key=lambda r: r["steady"])
    plain_trial = min(r["wall_s"] for r in plains)
    runner_trial = min(r["wall_s"] for r in runners)
    cells = {"model": f"{name} (width {width:g})", "precision": precision, "epochs": epochs,
             "batch": s.sizes.batch_size, "steps": runner["steps"], "plain samples/s": plain["steady"],
             "runner samples/s": runner["steady"], "steady ratio": runner["steady"] / plain["steady"],
             "plain trial s": plain_trial, "runner trial s": runner_trial,
             "trial ratio": (runner["samples"] / runner_trial) / (plain["samples"] / plain_trial),
             "runner first step s": runner["first_step_s"]}
    table.add(cells, {**cells, "plain_runs": plains, "runner_runs": runners, "_seconds": time.monotonic() - t0})
    say(f"(a) {name} {precision}: steady ratio {cells['steady ratio']:.3f}, trial ratio {cells['trial ratio']:.3f}")


def part_a(s: Suite, table: Table) -> None:
    dm = s.data()
    table.setup = (f"Fashion-MNIST ({dm.sizes['train']:,} training samples resident on {s.device}), batch "
                   f"{s.sizes.batch_size}, SGD. Runner: `run_pruning` with one-shot magnitude pruning (cut at the "
                   f"end). Steady samples/s: after the first step to the end of training; trial s: the whole call "
                   f"(setup, training, cut, validation, FLOPs) vs the plain loop plus one validation pass. Best of "
                   f"{s.sizes.a_repeats} alternated runs each, after a warm-up.")
    warm = subset(dm, s.sizes.warmup_samples)
    for name, width, epochs in s.sizes.a_models:
        for precision in s.sizes.precisions:
            est = 3 * (table.raw[-1]["_seconds"] if table.raw else 5.0)
            if not s.budget.fits(est):
                table.note(f"skipped (time budget): {name} {precision} and after")
                return
            with unit(table, f"{name} {precision}"):
                _throughput_row(s, table, dm, warm, name, width, epochs, precision)
    table.note("target: steady ratio >= 0.9 (the runner's per-step overhead is small next to the step)")


def part_c(s: Suite, table: Table) -> None:
    n = s.sizes.c_trials
    pool = s.workers()
    table.setup = (f"A fresh worker process (spawned, as a Ray worker starts; the first of the {len(pool.procs)} "
                   f"that part b then uses, the others idle and without a CUDA context) runs {n} lenet5 trials "
                   f"in a row (1 epoch of {s.sizes.c_train_samples or 'all'} samples, batch {s.sizes.batch_size}, "
                   f"fp32). The first trial loads the data (IDX files -> {s.device}) and initialises CUDA, "
                   f"cuDNN and Lightning; later ones reuse the worker's data cache.")
    table.notes.append(f"worker process start to ready (imports, {len(pool.procs)} started together): "
                       f"{pool.import_s[0]:.2f} s")
    specs = [s.spec("lenet5", 1.0, 1, "32-true", seed=i, train_samples=s.sizes.c_train_samples) for i in range(n)]
    per_worker: list[list[dict[str, Any]]] = [specs] + [[] for _ in pool.procs[1:]]
    trials, _ = pool.run_round(0, per_worker, timeout_s=max(60.0, s.budget.left()))
    for rec in trials:
        table.add({"trial of the worker": rec["number"] + 1, "data load s": rec["data_s"],
                   "start to first step s": rec["first_step_s"], "trial wall s": rec["wall_s"],
                   "samples/s": rec["steady"]}, rec)


def part_b(s: Suite, table: Table) -> None:
    sz = s.sizes
    dm = s.data()
    n_train = sz.b_train_samples or dm.sizes["train"]
    table.setup = (f"{sz.b_trials} lenet5 trials (1 epoch of {n_train:,} samples, batch {sz.batch_size}, fp32, "
                   f"one-shot magnitude) spread over P worker processes on one {s.device} (each process: its "
                   f"own CUDA context and resident data, 1 CPU thread; what Ray does with trial.gpus=1/P). Wall: "
                   f"first trial start to last trial end; the workers were started and warmed up (one short "
                   f"trial each) before the first round. GPU memory: the device's used memory after the round "
                   f"(all processes' contexts and caches).")
    # trial.gpus=auto's probe on the same GPU, in this process.
    torch.manual_seed(0)
    model = build_model("lenet5", dm.input_shape, dm.num_classes).to(s.device)
    steps, peak = probe_step_seconds(model, tuple(dm.input_shape), dm.num_classes, sz.batch_size,
                                     steps=sz.probe_steps, device=s.device)
    if s.device.startswith("cuda"):
        total = int(torch.cuda.get_device_properties(0).total_memory)
    else:  # smoke: the machine's memory stands in for a GPU's
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fraction = choose_gpu_fraction(steps, peak, total)
    probe = {"fraction": fraction, "trials_per_gpu": round(1 / fraction), "step_seconds": steps,
             "peak_bytes": peak, "total_bytes": total}
    step_text = ", ".join(f"{m}x: {1000 * t:.2f} ms" for m, t in steps.items())
    table.notes.append(f"trial.gpus=auto probe (search.packing, lenet5, batch {sz.batch_size}): fraction "
                       f"{fraction:.4g} = {probe['trials_per_gpu']} trials per GPU; step time at m x batch: "
                       f"{step_text}; one trial's peak {peak / 2**20:.0f} MiB")
    table.raw.append({"probe": probe})
    pool = s.workers()
    if len(pool.procs) < max(sz.b_processes):
        raise RuntimeError(f"the worker pool has {len(pool.procs)} processes, part b needs {max(sz.b_processes)}")
    try:
        table.notes.append(f"{len(pool.procs)} workers started in {max(pool.import_s):.1f} s (imports, in parallel)")
        warm = [[s.spec("lenet5", 1.0, 1, "32-true", seed=100 + i, train_samples=sz.warmup_samples)]
                for i in range(len(pool.procs))]
        pool.run_round(-1, warm, timeout_s=max(60.0, s.budget.left()))
        base = None
        for round_id, procs in enumerate(sz.b_processes, start=1):
            est = (table.raw[1]["wall_s"] if len(table.raw) > 1 else 0.0) * 1.2
            if not s.budget.fits(est):
                table.note(f"skipped (time budget): {procs} processes and after")
                break
            per_worker: list[list[dict[str, Any]]] = [[] for _ in pool.procs]
            for t in range(sz.b_trials):
                per_worker[t % procs].append(s.spec("lenet5", 1.0, sz.b_epochs, "32-true", seed=t,
                                                    train_samples=sz.b_train_samples))
            trials, done = pool.run_round(round_id, per_worker, timeout_s=max(60.0, s.budget.left()))
            wall = max(r["t_end"] for r in trials) - min(r["t_start"] for r in trials)
            samples = sum(r["samples"] for r in trials)
            aggregate = samples / wall
            base = base or aggregate
            cells = {"processes": procs, "trials": len(trials), "wall s": wall, "aggregate samples/s": aggregate,
                     "speed-up vs 1": aggregate / base, "mean trial s": statistics.mean(r["wall_s"] for r in trials),
                     "mean trial samples/s": statistics.mean(r["steady"] for r in trials),
                     "GPU memory in use GiB": max(d["device_used_bytes"] for d in done) / 2**30}
            table.add(cells, {**cells, "wall_s": wall, "trials_raw": trials})
            say(f"(b) {procs} processes: {aggregate:,.0f} samples/s, {aggregate / base:.2f}x")
    finally:
        pool.close()  # the GPU contexts go before parts d-f
        s.pool = None
    table.note("target: >= 5x at the best process count")


def _method_settings(method: str, fraction: float, sizes: Sizes) -> dict[str, Any]:
    """Settings that make ``method`` remove about ``fraction`` of the channels."""
    if method == "paoding":
        return {"conv_ratio": fraction, "pretrain": False}  # data-free: prunes the trained dense model
    if method == "rl_pruner":
        return {"sparsity": fraction, "pretrain": False, **dict(sizes.d_rl_search)}  # its search, no fine-tune
    if method == "polarization":
        # Its sparsity counts weights, inputs of removed channels too: f of the channels ~ 1-(1-f)^2.
        return {"sparsity": 1 - (1 - fraction) ** 2}
    if method == "bingo":
        return {"unit": "neuron", "sparsity": fraction}       # weight share of the rows it cuts
    raise ValueError(f"unknown method {method!r}")


def _pruned(s: Suite, dense: nn.Module, dm: ArrayDataModule, method: str, fraction: float) -> dict[int | None, nn.Module]:
    """The physically smaller models of ``method`` at ``fraction``, one per ``round_to`` of the sizes."""
    sz, shape = s.sizes, tuple(dm.input_shape)
    if method == "tp_l1":
        return {r: tp_l1_prune(dense, shape, fraction, round_to=r) for r in sz.d_round_to}
    work = copy.deepcopy(dense).train()
    epochs = sz.d_epochs if method in ("polarization", "bingo") else 0
    config = TrainConfig(epochs=epochs, finetune_epochs=0, accelerator=accelerator(s.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. BINGO's "beyond what neuron pruning can reach"
        result = run_pruning(work, dm, build_method(method, **_method_settings(method, fraction, sz)), config, seed=0)
    return {r: surgery(work, result.masks, shape, round_to=r).model for r in sz.d_round_to}


def _speed_rows(s: Suite, table: Table, net: nn.Module, shape: tuple[int, ...], dense_ms: dict[int, float], dense_flops: int,
                dense_ch: int, tp_speedup: dict[tuple[int | None, int], float], model_label: str, method: str,
                fraction: float, round_to: int | None) -> None:
    """Rows of (d) for one pruned model: its latency at each batch size against dense and TP L1."""
    sz = s.sizes
    removed = 1 - sum(hidden_channels(net).values()) / dense_ch
    flops = count_flops(net, shape) / dense_flops
    for b in sz.d_batches:
        ms = forward_ms(net, shape, b, s.device, sz.d_repeats, getattr(torch, sz.d_dtype))
        speedup = dense_ms[b] / ms
        if method == "tp_l1":
            tp_speedup[(round_to, b)] = speedup
        ref = tp_speedup.get((round_to, b))
        table.add({"model": model_label, "method": method, "target": f"{fraction:.0%}",
                   "round_to": round_to if round_to else "none", "channels removed": removed,
                   "physical FLOPs": flops, "batch": b, "latency ms": ms, "speed-up": speedup,
                   "TP L1 speed-up": ref, "vs TP L1": speedup / ref if ref else None})


def _model_rows(s: Suite, table: Table, dm: ArrayDataModule, name: str, width: float) -> None:
    """Rows of (d) for one architecture: train the dense model, then every method at every fraction."""
    sz, shape = s.sizes, tuple(dm.input_shape)
    torch.manual_seed(0)
    dense = build_model(name, shape, dm.num_classes, width=width).to(s.device)
    plain_loop(dense, dm, sz.d_epochs, "bf16-mixed", s.device)
    dense.eval()
    dense_flops = count_flops(dense, shape)
    dense_ch = sum(hidden_channels(dense).values())
    dtype = getattr(torch, sz.d_dtype)
    dense_ms = {b: forward_ms(dense, shape, b, s.device, sz.d_repeats, dtype) for b in sz.d_batches}
    table.notes.append(f"{name} dense: " + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in dense_ms.items()))
    unit_s: list[float] = []
    for fraction in sz.d_fractions:
        tp_speedup: dict[tuple[int | None, int], float] = {}
        for method in ("tp_l1", *sz.d_methods):
            est = 1.5 * max(unit_s) if unit_s else 10.0
            if not s.budget.fits(est):
                table.note(f"skipped (time budget): {name} at {fraction:.0%} from {method} on")
                break
            t0 = time.monotonic()
            with unit(table, f"{name} {method} {fraction:.0%}"):
                for r, net in _pruned(s, dense, dm, method, fraction).items():
                    _speed_rows(s, table, net, shape, dense_ms, dense_flops, dense_ch, tp_speedup,
                                f"{name} (width {width:g})", method, fraction, r)
            unit_s.append(time.monotonic() - t0)
            say(f"(d) {name} {method} {fraction:.0%}: {unit_s[-1]:.1f}s")


def part_d(s: Suite, table: Table) -> None:
    sz = s.sizes
    dm = subset(s.data(), sz.d_train_samples)
    table.setup = (f"Dense models trained {sz.d_epochs} epoch(s) on {dm.sizes['train']:,} Fashion-MNIST samples; "
                   f"each method prunes a copy (PAODING data-free, RL-Pruner's search "
                   f"({', '.join(f'{k}={v}' for k, v in sz.d_rl_search) or 'default settings'}) without its fine-tune, "
                   f"polarization and BINGO neuron train {sz.d_epochs} epoch(s) from the dense weights), then "
                   f"`prunelib.surgery` removes the channels (round_to 8 or none); TP L1: Torch-Pruning's "
                   f"MagnitudePruner (L1, the same fraction of every group, its own round_to). Latency: eager "
                   f"forward in {sz.d_dtype} on {s.device}, median of 5 groups of {sz.d_repeats} passes. Speed-up: dense "
                   f"latency / pruned latency; vs TP L1: the method's speed-up / TP L1's at the same target, "
                   f"round_to and batch. Channels removed: the share of Conv/hidden Linear output channels gone.")
    for name, width in sz.d_models:
        if not s.budget.fits(20.0):
            table.note(f"skipped (time budget): {name} and after")
            return
        with unit(table, f"{name}"):
            _model_rows(s, table, dm, name, width)
    table.note("physical FLOPs: of the dense model's, per sample (prunelib.flops)")


def part_e(s: Suite, table: Table) -> None:
    sz = s.sizes
    shapes = bert_base_shapes()
    cap = sz.e_row_cap
    widths: dict[int, int] = {}
    for _, (rows, width) in shapes:
        widths[width] = widths.get(width, 0) + (min(rows, cap) if cap else rows)
    gen = torch.Generator(device=s.device).manual_seed(0)
    data = {w: torch.randn((n, w), generator=gen, device=s.device) * 0.04 for w, n in widths.items()}
    values = sum(t.numel() for t in data.values())
    table.setup = (f"The 2-D matrices of a BERT-base-sized model ({len(shapes)} matrices"
                   f"{f', first {cap} rows of each' if cap else ''}: {values / 1e6:.1f}M N(0, 0.04^2) values, "
                   f"rows of equal width selected together as `ken_masks` does) on {s.device}; "
                   f"`prunelib.methods.ken.kde_select_rows`, timed with the device synchronised. Rows equal to CPU: "
                   f"{sz.e_check_rows} random rows of each width selected again on the CPU, same dtype.")
    check_gen = torch.Generator().manual_seed(1)
    for dtype_name in sz.e_dtypes:
        for k in sz.e_ks:
            last = table.raw[-1] if table.raw else None
            est = last["seconds"] * k / last["k"] if last else 2.0  # KDE and matching both grow with k
            if not s.budget.fits(est):
                table.note(f"skipped (time budget, needs about {est:.0f} s): {dtype_name} k={k}")
                continue
            with unit(table, f"{dtype_name} k={k}"):
                dtype = getattr(torch, dtype_name)
                per_width, kept, equal, checked = {}, 0, 0, 0
                for w, rows in data.items():
                    sync(s.device)
                    t0 = time.monotonic()
                    mask = kde_select_rows(rows, k, kde_dtype=dtype)
                    sync(s.device)
                    per_width[w] = time.monotonic() - t0
                    if not bool((mask.sum(dim=1) == k).all()):
                        raise AssertionError(f"kde_select_rows kept other than {k} per row (width {w})")
                    kept += int(mask.sum())
                    pick = torch.randperm(rows.shape[0], generator=check_gen)[: sz.e_check_rows].to(rows.device)
                    cpu = kde_select_rows(rows[pick].cpu(), k, kde_dtype=dtype)
                    equal += int((cpu == mask[pick].cpu()).all(dim=1).sum())
                    checked += int(pick.numel())
                total_s = sum(per_width.values())
                cells = {"kde dtype": dtype_name, "k": k, "rows": sum(t.shape[0] for t in data.values()),
                         "values": values, "seconds": total_s, "768-wide s": per_width.get(768),
                         "3072-wide s": per_width.get(3072), "kept": kept / values, "rows equal to CPU": f"{equal}/{checked}"}
                table.add(cells, {**cells, "per_width": per_width})
                say(f"(e) {dtype_name} k={k}: {total_s:.2f}s")


def part_f(s: Suite, table: Table) -> None:
    sz = s.sizes
    table.setup = (f"`TrainConfig` speed settings on the runner of (a) (same data, batch {sz.batch_size}, "
                   f"seed 0), {sz.f_precision}; compile backend {sz.compile_backend}. First step s includes the "
                   f"compile time; steady samples/s is after the first step. `cuda_graphs` alone: torch.compile's "
                   f"'cudagraphs' backend; with `compile`: inductor's 'reduce-overhead' mode. val acc change: "
                   f"against the plain runner with the same seed (GPU kernels are not bitwise deterministic).")
    variants: list[tuple[str, dict[str, Any]]] = [
        ("runner (none)", {}), ("channels_last", {"channels_last": True}), ("cuda_graphs", {"cuda_graphs": True}),
        ("compile", {"compile": True, "compile_backend": sz.compile_backend}),
        ("compile + cuda_graphs", {"compile": True, "cuda_graphs": True, "compile_backend": sz.compile_backend}),
        ("channels_last + compile", {"channels_last": True, "compile": True, "compile_backend": sz.compile_backend}),
    ]
    if sz.compile_backend != "inductor":  # reduce-overhead is inductor's mode
        variants = [v for v in variants if v[0] != "compile + cuda_graphs"]
    compile_walls: list[float] = []
    base: dict[str, dict[str, Any]] = {}  # model -> its plain-runner record
    # Variant by variant over the models: the cheap settings run for every model before any compile.
    for label, speed in variants:
        for name, width, epochs in sz.f_models:
            if label != variants[0][0] and name not in base:
                continue  # no plain-runner row to compare with
            inductor = bool(speed.get("compile")) and sz.compile_backend == "inductor"
            plain_s = base[name]["wall_s"] if name in base else 10.0
            est = (1.5 * max(compile_walls) if compile_walls else 60.0) if inductor else 3.0 * plain_s
            if not s.budget.fits(est):
                table.note(f"skipped (time budget, needs about {est:.0f} s): {name} {label}")
                continue
            with unit(table, f"{name} {label}"):
                skips_before = _cudagraph_skips()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rec = run_timed_trial(s.spec(name, width, epochs, sz.f_precision, speed=speed), s.cache)
                torch._dynamo.reset()  # each variant compiles afresh (no graph reuse across settings)
                notes = sorted({str(w.message).split(" (")[0] for w in caught if "cuda_graphs" in str(w.message)})
                skips = _cudagraph_skips() - skips_before
                if skips:
                    notes.append(f"{skips} cudagraph skip(s)")
                ref = base.setdefault(name, rec)
                if inductor:
                    compile_walls.append(rec["wall_s"])
                table.add({"model": f"{name} (width {width:g})", "precision": sz.f_precision, "setting": label,
                           "first step s": rec["first_step_s"], "steady samples/s": rec["steady"],
                           "vs runner": rec["steady"] / ref["steady"], "trial s": rec["wall_s"],
                           "val acc": rec["val_acc"], "val acc change": rec["val_acc"] - ref["val_acc"],
                           "note": "; ".join(notes) or "-"}, {**rec, "setting": label, "model": name})
                say(f"(f) {name} {label}: {rec['steady']:,.0f} samples/s, first step {rec['first_step_s']:.1f}s")


def _cudagraph_skips() -> int:
    """Inductor's count of graphs it ran without CUDA graphs (a private counter; 0 if absent)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:
        return 0


PART_FUNCS: dict[str, Callable[[Suite, Table], None]] = {
    "a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def environment(device: str, commit: str | None) -> dict[str, Any]:
    """Machine, versions and commit, written into suite.json and the tables' notes."""
    env: dict[str, Any] = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "host": platform.node(),
                           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "lightning": L.__version__, "device": device}
    try:
        import torch_pruning

        env["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
    except ImportError:
        env["torch_pruning"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), sms=props.multi_processor_count)
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    env["commit"] = commit or "unknown"
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder the tables, suite.json go into (created)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, synthetic data (the CI check)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 400; smoke 600)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,e,f")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files (default: "
                   "prunelib's search: /usr/share/datasets/fashion-mnist, ~/.cache/prunesearch)")
    p.add_argument("--device", default=None, help="torch device (default: cuda; smoke: cpu)")
    p.add_argument("--commit", default=None, help="commit label for the tables (default: git rev-parse)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: --device cuda but no CUDA device is visible; use --smoke on a CPU machine", file=sys.stderr)
        return 2
    budget = Budget(args.budget if args.budget is not None else (600.0 if args.smoke else 400.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = args.data_root
    if args.smoke and root is None:
        root = str(write_synthetic_fashion(Path(tempfile.mkdtemp(prefix="gpu_suite_data_"))))
    env = environment(device, args.commit)
    say(f"gpu_suite on {env.get('gpu', env['cpu'])} ({device}), torch {env['torch']}, commit {env['commit']}, "
        f"budget {budget.end - budget.start:.0f}s{' (smoke)' if args.smoke else ''}")
    wanted = tuple(args.parts.split(","))
    suite = Suite(sizes=sizes, device=device, root=root, out=out, budget=budget, smoke=args.smoke, parts=wanted)
    t0 = time.monotonic()
    suite.data()
    say(f"data: {suite.data()!r} in {time.monotonic() - t0:.1f}s")
    report: dict[str, Any] = {"environment": env, "sizes": asdict(sizes), "parts": {}}
    try:
        run_parts(suite, report, env)
    finally:
        if suite.pool is not None:
            suite.pool.close()
    # The GPU machine has none of these: the suite must not need them.
    report["absent_on_gpu_machine_but_loaded"] = sorted(
        m for m in ("ray", "optuna", "mlflow", "hydra", "omegaconf") if m in sys.modules)
    (out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
    say(f"gpu_suite finished in {time.monotonic() - budget.start:.0f}s")
    for part in PARTS:
        path = out / TABLES[part][0]
        if part in wanted and path.is_file():
            print("\n" + path.read_text(), flush=True)
    return 0


def run_parts(suite: Suite, report: dict[str, Any], env: dict[str, Any]) -> None:
    """Run the wanted parts in order, each under its cap; a failing part is noted, the rest go on."""
    budget, out = suite.budget, suite.out
    for part in PARTS:
        if part not in suite.parts:
            continue
        table = Table(part, out / TABLES[part][0])
        budget.open_part(CAPS[part] * (budget.end - budget.start))
        started, cpu_started = time.monotonic(), time.process_time()
        say(f"part {part}: {TABLES[part][1]} (up to {budget.left():.0f}s)")
        try:
            PART_FUNCS[part](suite, table)
        except Exception as exc:
            traceback.print_exc()
            table.note(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400])
        table.notes.append(f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, commit {env['commit']}, "
                           f"{env['date']}; part took {time.monotonic() - started:.1f} s "
                           f"({time.process_time() - cpu_started:.1f} CPU s in the main process)"
                           f"{'; smoke run (CPU, tiny sizes): not a measurement' if suite.smoke else ''}")
        table.write()
        report["parts"][part] = {"seconds": time.monotonic() - started, "rows": table.raw, "notes": table.notes}
        (out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
        say(f"part {part} done in {time.monotonic() - started:.1f}s -> {table.path}")


if __name__ == "__main__":
    raise SystemExit(main())
