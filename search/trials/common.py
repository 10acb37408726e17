"""What every trial kind shares: its errors, the method it builds, its device, its output folder,
latency, the objective check and the result record (:func:`record_trial`).

Imported by the workers (each trial kind's module) and by nothing on the driver's import path:
it needs torch, but no Lightning (the training stack is the training kind's).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.keep import prune_off_front
from search.settings import TrialSettings
from search.space import ConfigError
from search.storage import SweepStorage, atomic_write_text
from search.trials.context import TrialContext
from search.trials.metrics import LATENCY_MS

__all__ = ["ObjectiveNotLoggedError", "TrialFailed", "adopt_finished", "build_trial_method", "check_objectives",
           "collapse_metrics", "latency_probe", "measure_latency_ms", "record_trial",
           "trial_device", "trial_output_dir", "wants_latency"]

log = logging.getLogger("search")

# Trials this process recorded: 1 on a fresh worker, more where Ray reused it (actor reuse).
_PROCESS_TRIALS = 0


class TrialFailed(RuntimeError):
    """A trial could not produce a usable result (e.g. NaN loss); the message says why."""


class ObjectiveNotLoggedError(ConfigError):
    """An objective is a metric the trial never reported (a user's module did not log it):
    a configuration error, which stops the sweep instead of leaving its front empty."""


def build_trial_method(ctx: TrialContext, method_name: str, settings: Mapping[str, Any]) -> Any:
    """The trial's method instance: the class its config names (a user's ``_target_``) or the
    registered one, built with ``settings``. Every trial kind builds its method here."""
    return ctx.space.spaces[method_name].build(settings)


def trial_device(trial: TrialSettings) -> str:
    """``"cuda"`` when the trial asks for GPUs (``trial.gpus``) and one is visible, else ``"cpu"``."""
    gpus = trial.gpus
    return "cuda" if (gpus not in (0, None, "0") and torch.cuda.is_available()) else "cpu"


@torch.no_grad()
def measure_latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 256,
                       repeats: int = 20, device: str = "cpu") -> float:
    """Median wall milliseconds of one forward pass over ``batch_size`` samples (after warm-up)."""
    was_training = model.training
    model.eval()
    x = torch.randn((batch_size, *input_shape), device=device)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    model.train(was_training)
    times.sort()
    return times[len(times) // 2]


def wants_latency(ctx: TrialContext, trial: TrialSettings) -> bool:
    """Whether the trial measures forward latency (an objective needs it, or it was asked for)."""
    return any(m == LATENCY_MS for m, _ in ctx.objectives) or trial.measure_latency


def latency_probe(ctx: TrialContext, trial: TrialSettings, input_shape: tuple[int, ...],
                  device: str) -> Callable[[nn.Module], dict[str, float]]:
    """``probe(model) -> {"latency_ms": ...}`` when the trial measures latency, else ``{}``."""
    want = wants_latency(ctx, trial)
    batch = int(trial.latency_batch_size)

    def probe(net: nn.Module) -> dict[str, float]:
        return {LATENCY_MS: measure_latency_ms(net, input_shape, batch, device=device)} if want else {}

    return probe


def collapse_metrics(judged: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's collapse figures from :meth:`prunelib.training.CollapseCheck.judge`:
    ``top_class_share``, ``classes_predicted``, ``collapsed`` and, when it collapsed, ``collapse``
    (the reason in words; shown on the trial's line, in MLflow and in the front table)."""
    if not judged:
        return {}
    out = {k: judged[k] for k in ("top_class_share", "classes_predicted", "collapsed")}
    if judged.get("collapsed"):
        out["collapse"] = judged["collapse"]
    return out


def check_objectives(ctx: TrialContext, metrics: Mapping[str, Any], trial_id: str, module_label: str | None) -> None:
    """Every objective is among ``metrics`` and not NaN.

    Raises:
        ObjectiveNotLoggedError: an objective was never reported (a user's module did not log it).
        TrialFailed: an objective is NaN.
    """
    missing = [m for m, _ in ctx.objectives if m not in metrics]
    if missing:
        who = f"module._target_={module_label}" if module_label else "this trial"
        logged = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ObjectiveNotLoggedError(f"search.objectives: {missing} never reported by {who} (trial {trial_id}); it "
                                      f"reported {logged}")
    bad = [m for m, _ in ctx.objectives if isinstance(metrics[m], float) and math.isnan(metrics[m])]
    if bad:
        raise TrialFailed(f"trial {trial_id}: {bad} became NaN; the result is unusable")


def trial_output_dir(trial_dir: str | os.PathLike | None, trial_id: str) -> Path:
    """Where a trial writes its files: ``trial_dir`` or a temporary directory, created."""
    out_dir = Path(trial_dir) if trial_dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"prunesearch-{trial_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def record_trial(ctx: TrialContext, trial_id: str, method_name: str, settings: dict[str, Any],
                 overrides: dict[str, Any], metrics: dict[str, Any], out_dir: Path, *,
                 extra: dict[str, Any], artifacts: dict[str, str]) -> dict[str, Any]:
    """Build a finished trial's row, log it to MLflow and keep it beside its files; returns the row.

    ``extra`` holds non-metric results (``masks_path`` required, paths, timings); ``artifacts``
    maps MLflow artifact folders to local files or directories. A tracking outage does not
    lose the trial: the row records ``mlflow_unlogged`` and ``trial_result.json`` is written anyway.
    With a sweep storage the files are published there (``trials/<trial_id>/``, uploaded for a
    remote storage) and ``trial_result.json`` is written last, atomically. The row names the
    worker process (``worker_pid``) and the trials it has recorded so far (``worker_trials``: 1 on
    a fresh worker, more where Ray reused it).
    """
    storage = SweepStorage(ctx.sweep_root) if ctx.sweep_root else None
    if storage is not None and not storage.is_local:
        # Paths in the row name where the files will live, not the staging directory.
        dest, src = storage.trial_location(trial_id), str(out_dir)
        extra = {k: (dest + v[len(src):] if isinstance(v, str) and v.startswith(src) else v) for k, v in extra.items()}
    trial_params = {f"trial.{k}": v for k, v in overrides.items()}
    # Only the settings this trial used: a conditional key whose `when:` is false is left out.
    space = ctx.space.spaces.get(method_name)
    if space is not None:
        active = space.active_settings({**settings, **trial_params})
        settings = {k: v for k, v in settings.items() if k in active}
        trial_params = {k: v for k, v in trial_params.items() if k in active}
    global _PROCESS_TRIALS
    _PROCESS_TRIALS += 1
    row: dict[str, Any] = {
        **metrics, "method": method_name, "trial_id": trial_id, **extra,
        "worker_pid": os.getpid(), "worker_trials": _PROCESS_TRIALS,
        **{f"param.{k}": v for k, v in settings.items()}, **trial_params,
    }
    if ctx.tracking:
        from search.tracking import log_trial_run
        from search.trials.mlflow_run import TrialRun

        live = TrialRun.pop(trial_id)
        try:
            # The final results are the last epoch's entry of the per-epoch history.
            step = live.close(metrics) if live is not None else 0
            row["mlflow_run_id"] = log_trial_run(
                ctx.tracking["uri"], ctx.tracking["experiment_id"], ctx.tracking["parent_run_id"],
                trial_id, params={"method": method_name, **settings, **trial_params},
                metrics={**metrics, "method": method_name, "masks_path": extra["masks_path"],
                         **{k: extra[k] for k in ("keep_weights", "artifact_dir", "model_uri") if extra.get(k)}},
                artifacts=artifacts, step=step,
                # The run this trial started (None: it could not, or it is not ours to end).
                run_id=live.run_id if live is not None and live.failed is None else None)
        except Exception as exc:  # a tracking outage must not throw away a finished trial
            row["mlflow_unlogged"] = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("trial %s: could not log to MLflow (%s); its result stays in %s", trial_id,
                        row["mlflow_unlogged"], out_dir)
    # The result also stays beside the masks, whatever happens to the tracking store.
    if storage is None:
        atomic_write_text(out_dir / "trial_result.json", json.dumps(row, indent=1, default=str))
        return row
    row = storage.publish(out_dir, trial_id, row)
    if row.get("keep_weights") == "front":
        try:
            gone = prune_off_front(storage, ctx.objectives, ctx.tracking, trial_id)
            if gone:
                log.info("trial %s: weights of %s removed (off the front; trial.keep_weights=front)", trial_id, gone)
        except Exception as exc:  # disk housekeeping must not lose a finished trial
            log.warning("trial %s: could not remove the weights of trials off the front (%s: %s)", trial_id,
                        type(exc).__name__, str(exc)[:300])
    return row


def adopt_finished(ctx: TrialContext, trial_id: str) -> dict[str, Any] | None:
    """The row of a trial that already finished (its ``trial_result.json`` under the sweep's
    storage, or a FINISHED MLflow child run), or None: a resumed sweep never runs it again."""
    if ctx.sweep_root:
        row = SweepStorage(ctx.sweep_root).finished_row(trial_id)
        if row is not None:
            return row
    if ctx.resumed and ctx.tracking:
        from search.tracking import find_trial_runs

        try:
            runs = find_trial_runs(ctx.tracking["uri"], ctx.tracking["parent_run_id"])
        except Exception as exc:  # the store is unreachable: the file is the only record
            log.warning("trial %s: could not ask MLflow whether it finished (%s)", trial_id, exc)
            return None
        for run in runs:
            if str(run["trial_id"]) == str(trial_id) and run["status"] == "ok":
                return {k: v for k, v in run.items() if k not in ("status", "mlflow_status", "error")}
    return None


def note_kept_model(trial_id: str, model: nn.Module, input_shape: tuple[int, ...] | None, manifest: Path,
                    out_dir: Path, kept: dict[str, Any], artifacts: dict[str, str]) -> None:
    """Record a kept model in the trial's result (``kept``: its folder; ``artifacts``: its
    manifest) and log it as the trial's MLflow model when the trial's run is open."""
    from search.trials.mlflow_run import TrialRun  # Lightning: only in the worker

    kept["artifact_dir"] = str(out_dir)
    artifacts["pruned"] = str(manifest)
    live = TrialRun.current(trial_id)
    if live is not None:
        kept["model_uri"] = live.log_model(model, input_shape, json.loads(manifest.read_text()))
