"""One trial: build data, model and method from a sampled config, train, measure, log.

:func:`run_trial` is plain Python (no Ray needed), so a trial can be run and debugged on its
own; :func:`run_tune_trial` runs it for Ray Tune. Data sets are loaded once per worker
process and reused by later trials on the same worker (Ray's actor reuse keeps the process).

A trial's files go to ``<sweep root>/trials/<trial_id>/`` (:mod:`search.storage`), never to
Ray's temporary folders; ``trial_result.json`` is written last, so a resumed sweep adopts a
trial that has one (or a FINISHED MLflow run) instead of running it again.

The training step is the built-in classifier (:class:`prunelib.training.ClassifierModule`) or
the user's LightningModule (``module._target_``, :func:`build_module`): the pruning callback is
attached to it and its logged metrics are the trial's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from prunelib.artifact import ONNX_FILE, SURGERED_DIR, save_pruned
from prunelib.data import StreamingDataModule, datamodule_from_config
from prunelib.flops import model_cost
from prunelib.models import model_from_config
from prunelib.robustness import fgsm_accuracy
from prunelib.surgery import SurgeryError, export_onnx
from prunelib.targets import call_target
from prunelib.training import SPEED_SETTINGS, CollapseCheck, TrainConfig, evaluate_masked, network_of, run_pruning
from search.faults import FaultPlan, disk_full
from search.keep import keep_policy, model_spec, prune_off_front
from search.formatting import exception_line
from search.trial_context import TrialContext, record_failure
from search.trial_progress import trial_progress
from search.space import ConfigError, SearchSpace, settings_from_params
from search.storage import SweepStorage, as_storage_error, atomic_write_text, storage_errors

__all__ = ["DOCUMENTED_MODULE_KEYS", "ObjectiveNotLoggedError", "TrialContext", "TrialFailed", "adopt_finished",
           "build_module", "collapse_metrics", "get_datamodule", "module_args", "record_trial", "run_trial",
           "run_tune_trial"]

log = logging.getLogger("search")

# Per-process cache: (data config, device) -> datamodule. Kept across trials on one worker.
_DATA_CACHE: dict[str, Any] = {}
# Trials this process recorded: 1 on a fresh worker, more where Ray reused it (actor reuse).
_PROCESS_TRIALS = 0

#: Keys offered to a user's LightningModule (``module._target_``), each passed only when its
#: signature names it: the network to train, the data's shape and classes, and the trial's
#: (possibly searched) optimiser settings.
DOCUMENTED_MODULE_KEYS = ("model", "input_shape", "in_channels", "num_classes", "lr", "weight_decay",
                          "momentum", "optimizer")


class TrialFailed(RuntimeError):
    """A trial could not produce a usable result (e.g. NaN loss); the message says why."""


class ObjectiveNotLoggedError(ConfigError):
    """An objective is a metric the trial never reported (a user's module did not log it):
    a configuration error, which stops the sweep instead of leaving its front empty."""


def _device(trial_cfg: dict[str, Any]) -> str:
    gpus = trial_cfg.get("gpus", 0)
    return "cuda" if (gpus not in (0, None, "0") and torch.cuda.is_available()) else "cpu"


def get_datamodule(data_cfg: dict[str, Any], device: str, seed: int) -> Any:
    """The data module for ``data_cfg`` on ``device``, loaded once per process."""
    key = json.dumps({"data": data_cfg, "device": device, "seed": seed}, sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = datamodule_from_config(data_cfg, seed=seed, device=device)
    elif isinstance(_DATA_CACHE[key], StreamingDataModule):
        _DATA_CACHE[key].restart()  # a reused worker shuffles as a fresh one would
    return _DATA_CACHE[key]


def module_args(model: torch.nn.Module | None, input_shape: tuple[int, ...], num_classes: int,
                trial_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The documented keys offered to a user's LightningModule (:data:`DOCUMENTED_MODULE_KEYS`):
    the network to train, the data's shape and classes, the trial's optimiser settings."""
    shape = tuple(int(s) for s in input_shape)
    return {"model": model, "input_shape": shape, "in_channels": shape[0] if shape else None,
            "num_classes": int(num_classes), "lr": float(trial_cfg.get("lr", 0.05)),
            "weight_decay": float(trial_cfg.get("weight_decay", 5e-4)),
            "momentum": float(trial_cfg.get("momentum", 0.9)), "optimizer": trial_cfg.get("optimizer", "sgd")}


def build_module(module_cfg: Mapping[str, Any], model: torch.nn.Module, input_shape: tuple[int, ...],
                 num_classes: int, trial_cfg: Mapping[str, Any]) -> L.LightningModule:
    """The user's LightningModule (``module._target_``), called with the documented keys its
    signature names (:func:`module_args`) and the section's own keys.

    A module that does not take ``model`` builds its own network; the trial prunes
    :func:`prunelib.training.network_of` of it (its ``model`` attribute, else the module).

    Raises:
        TargetError: the target does not import, rejects a key, or raises.
        TypeError: it is not a LightningModule.
    """
    target = module_cfg["_target_"]
    own = {k: v for k, v in module_cfg.items() if k != "_target_"}
    module = call_target(target, module_args(model, input_shape, num_classes, trial_cfg), own, "module._target_")
    if not isinstance(module, L.LightningModule):
        raise TypeError(f"module._target_={target}: returned {type(module).__name__}, not a "
                        "lightning.LightningModule")
    return module


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


class _EpochReporter(L.Callback):
    """Reports the logged validation metrics and current costs after every validation (for ASHA),
    and the figures of the masks the method is heading for (``projected_*``, for mo_asha)."""

    def __init__(self, report: Callable[[dict[str, Any]], None], input_shape: tuple[int, ...],
                 method: Any, extra: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 val_batches: Callable[[], Any] | None = None) -> None:
        self.report = report
        self.input_shape = input_shape
        self.method = method
        self.extra = extra  # objectives measured on the model itself (latency)
        self.val_batches = val_batches  # validation data, to score the projected masks
        self.epochs = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.epochs += 1
        logged = {}
        for key, value in trainer.callback_metrics.items():
            try:
                logged[str(key)] = float(value)
            except (TypeError, ValueError):
                continue
        logged.setdefault("val_acc", float("nan"))
        network = network_of(pl_module)
        cost = model_cost(network, self.input_shape, self.method.masks).as_dict()
        extra = self.extra(network) if self.extra else {}
        # Tune checks every result for all objectives, so intermediate ones carry them too.
        self.report({**logged, "epoch": self.epochs, **cost, **extra,
                     **self.projected(network, cost), "final_result": False})

    def projected(self, model: torch.nn.Module, cost: dict[str, int]) -> dict[str, float]:
        """``projected_<cost>``, ``projected_sparsity`` and, when they differ from the current
        masks, ``projected_val_acc``: the model the method is heading for, cut now (mo_asha
        compares trials by one consistent model, not a dense model's accuracy at a sparse one's
        FLOPs). The accuracy is before any recovery, so pessimistic for methods that recover."""
        target = self.method.projected_masks(model)
        out: dict[str, float] = {}
        if target is not self.method.masks:
            cost = model_cost(model, self.input_shape, target).as_dict()
            if target is not None and self.val_batches is not None:
                out["projected_val_acc"] = evaluate_masked(model, target, self.val_batches())["acc"]
        out["projected_sparsity"] = target.sparsity(model) if target is not None else 0.0
        return {**{f"projected_{k}": v for k, v in cost.items()}, **out}


@torch.no_grad()
def measure_latency_ms(model: torch.nn.Module, input_shape: tuple[int, ...], batch_size: int = 256,
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


def _check_objectives(ctx: TrialContext, metrics: Mapping[str, Any], trial_id: str, module_label: str | None) -> None:
    missing = [m for m, _ in ctx.objectives if m not in metrics]
    if missing:
        who = f"module._target_={module_label}" if module_label else "this trial"
        logged = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ObjectiveNotLoggedError(f"search.objectives: {missing} never reported by {who} (trial {trial_id}); it "
                                      f"reported {logged}")
    bad = [m for m, _ in ctx.objectives if isinstance(metrics[m], float) and math.isnan(metrics[m])]
    if bad:
        raise TrialFailed(f"trial {trial_id}: {bad} became NaN; the result is unusable")


def run_trial(params: dict[str, Any], ctx: TrialContext, *, trial_id: str = "local",
              trial_dir: str | os.PathLike | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one trial and return its flat result (metrics, settings, masks path).

    Args:
        params: the sampled parameters (``{"method": ..., "METHOD.KEY": value}``).
        ctx: the sweep's fixed context.
        trial_id: a unique name (Ray's trial id in a sweep).
        trial_dir: where the trial's files go (default: a temporary directory).
        report: where intermediate results go (Ray's ``tune.report`` in a sweep).

    Raises:
        TrialFailed: the run produced NaN loss or accuracy.
        ObjectiveNotLoggedError: an objective was never reported (a user's module did not log it).
    """
    from search.llm_trial import is_text_config, run_llm_trial  # Hugging Face text models
    from search.mlflow_trial import TrialRun

    mlflow_run = TrialRun.start(ctx, trial_id, params)  # the child run exists (RUNNING) from the start
    if is_text_config(ctx.data, ctx.model):
        return run_llm_trial(params, ctx, trial_id=trial_id, trial_dir=trial_dir, report=report)
    start = time.perf_counter()
    method_name, settings, overrides = settings_from_params(ctx.space, params)
    trial_cfg = {**ctx.trial, **overrides}
    fault_plan = FaultPlan.from_config(trial_cfg.get("faults"))
    if fault_plan is not None:  # reliability drills only (off by default)
        trial_cfg = fault_plan.inject(trial_id, trial_cfg)
    seed = int(trial_cfg.get("seed", 0))
    device = _device(trial_cfg)
    t_data = time.perf_counter()
    datamodule = get_datamodule(ctx.data, device, seed)
    data_s = time.perf_counter() - t_data
    torch.manual_seed(seed)
    input_shape = tuple(datamodule.input_shape)
    model_args = {k: v for k, v in ctx.model.items() if k not in ("name", "_target_")}
    if ctx.model.get("_target_"):
        model_args["target"] = ctx.model["_target_"]
    model = built = model_from_config(ctx.model, input_shape, datamodule.num_classes)
    module_label = (ctx.module or {}).get("_target_")
    module = build_module(ctx.module, model, input_shape, datamodule.num_classes, trial_cfg) if module_label else None
    if module is not None:
        model = network_of(module)
        module.to(device)
    model = model.to(device)
    method = ctx.space.spaces[method_name].build(settings)
    if getattr(method, "needs_pair", False):
        # KEN: no training here; a (pretrained, fine-tuned) pair made once per config (or given).
        from search.pair import run_ken_trial

        return run_ken_trial(method, settings, overrides, ctx, datamodule, model, model_args, trial_cfg, device,
                             trial_id=trial_id, trial_dir=trial_dir, start=start, data_s=data_s)
    config = TrainConfig(
        epochs=int(trial_cfg["epochs"]), finetune_epochs=int(trial_cfg.get("finetune_epochs", 0)),
        optimizer=trial_cfg.get("optimizer", "sgd"), lr=float(trial_cfg.get("lr", 0.05)),
        finetune_lr=(float(trial_cfg["finetune_lr"]) if trial_cfg.get("finetune_lr") is not None else None),
        momentum=float(trial_cfg.get("momentum", 0.9)),
        weight_decay=float(trial_cfg.get("weight_decay", 5e-4)),
        accelerator="gpu" if device == "cuda" else "cpu",
        precision=str(trial_cfg.get("precision", "32-true")), progress=False,
        # Per-epoch validation only when ASHA needs the intermediate results.
        val_every_n_epochs=1 if (report is not None and ctx.report_every_epoch) else 0,
        **{key: trial_cfg[key] for key in SPEED_SETTINGS if key in trial_cfg})
    want_latency = wants_latency(ctx, trial_cfg)
    latency_batch = int(trial_cfg.get("latency_batch_size", 256))

    def latency(net: torch.nn.Module) -> dict[str, float]:
        return {"latency_ms": measure_latency_ms(net, input_shape, latency_batch, device=device)} \
            if want_latency else {}

    callbacks = []
    progress = trial_progress(trial_id, method_name, method.plan(config.epochs, config.finetune_epochs),
                              ctx.objectives, trial_cfg, ctx.sweep_root, start)
    if progress is not None:  # live lines on the driver; epoch lines under trial.verbose
        callbacks.append(progress)
    if report is not None and ctx.report_every_epoch:
        callbacks.append(_EpochReporter(report, input_shape, method, latency, datamodule.val_dataloader))
    epoch_logger = mlflow_run.epoch_logger(method, datamodule.val_dataloader, module is None) if mlflow_run else None
    if epoch_logger is not None:
        callbacks.append(epoch_logger)
    try:
        result = run_pruning(model, datamodule, method, config, seed=seed, callbacks=callbacks,
                             evaluate_test=bool(trial_cfg.get("evaluate_test", True)), module=module)
    except torch.OutOfMemoryError as exc:
        raise TrialFailed(f"trial {trial_id}: out of memory ({str(exc)[:300]}); use a smaller batch or "
                          "model, or give each trial more of a GPU (trial.gpus)") from exc
    except SurgeryError as exc:  # never a silent dense cost: the trial fails with the reason
        raise TrialFailed(f"trial {trial_id}: the cost of the exported model cannot be measured: {exc}") from exc
    metrics = result.metrics()
    if module is None and (not math.isfinite(metrics["val_loss"]) or math.isnan(metrics["val_acc"])):
        raise TrialFailed(f"trial {trial_id}: loss became NaN (lr={config.lr}); the result is unusable")

    out_dir = trial_output_dir(trial_dir, trial_id)
    keep = keep_policy(trial_cfg)
    # The artifact run_pruning measured (surgered for structured masks) is the one kept, timed, exported.
    deployed, artifacts = result.deployed.model, {}
    if method.write_artifacts(out_dir / method_name):  # e.g. RL-Pruner's learned layer distribution
        artifacts[method_name] = str(out_dir / method_name)
    metrics["artifact"] = result.deployed.kind  # what flops_deployed / params_deployed were counted on
    metrics.update(latency(deployed))
    if trial_cfg.get("fgsm_epsilon") is not None:
        robust = fgsm_accuracy(deployed, datamodule.val_dataloader(), epsilon=float(trial_cfg["fgsm_epsilon"]))
        metrics["val_fgsm_acc"] = robust.attacked_accuracy
    _check_objectives(ctx, metrics, trial_id, module_label)
    try:
        metrics.update(collapse_metrics(CollapseCheck().judge(deployed, datamodule.val_dataloader())))
    except Exception as exc:  # a model or data the check does not understand: no flag, no failure
        log.warning("trial %s: could not check the model for collapse (%s: %s)", trial_id, type(exc).__name__,
                    str(exc)[:200])
    # Every file below is written atomically and checked; a write the storage refuses (full
    # disk, quota, read-only) is a StorageError, which stops the sweep (search.tuner).
    with storage_errors(out_dir), disk_full(trial_cfg):
        masks_path = result.masks.save(out_dir / "masks.safetensors", model, method=method_name,
                                       config=settings, trial_id=trial_id, data=ctx.data["name"],
                                       model_name=ctx.model["name"], flops=result.cost.as_dict(),
                                       model_args=model_args)
        layer_sparsity = result.masks.layer_sparsity(model)
        atomic_write_text(out_dir / "layer_sparsity.json", json.dumps(layer_sparsity, indent=1))
        kept: dict[str, Any] = {"keep_weights": keep}
        if keep != "none":  # the weights the metrics were measured on, with the spec that rebuilds the model
            spec = model_spec(ctx.model, input_shape, datamodule.num_classes, ctx.module,
                              module_args(None, input_shape, datamodule.num_classes, trial_cfg),
                              network_is_model=model is built)
            if result.deployed.kind == "surgered" and trial_cfg.get("export_onnx"):
                export_onnx(deployed, out_dir / SURGERED_DIR / ONNX_FILE, input_shape)
            manifest = save_pruned(out_dir, deployed, spec, result.deployed.kind, surgery=result.deployed.surgery)
            kept["artifact_dir"] = str(out_dir)
            artifacts["pruned"] = str(manifest)
            if result.deployed.kind == "surgered":
                artifacts["surgered"] = str(out_dir / SURGERED_DIR)
            if mlflow_run is not None:
                kept["model_uri"] = mlflow_run.log_model(deployed, input_shape, json.loads(manifest.read_text()))
        return record_trial(ctx, trial_id, method_name, settings, overrides, metrics, out_dir,
                            extra={"masks_path": str(masks_path), "data_load_s": data_s,
                                   "trial_wall_s": time.perf_counter() - start, **kept},
                            artifacts={"masks": str(masks_path), "layers": str(out_dir / "layer_sparsity.json"),
                                       **artifacts})


def trial_output_dir(trial_dir: str | os.PathLike | None, trial_id: str) -> Path:
    """Where a trial writes its files: ``trial_dir`` or a temporary directory, created."""
    out_dir = Path(trial_dir) if trial_dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"prunesearch-{trial_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def wants_latency(ctx: TrialContext, trial_cfg: dict[str, Any]) -> bool:
    """Whether the trial measures forward latency (an objective needs it, or it was asked for)."""
    return any(m == "latency_ms" for m, _ in ctx.objectives) or bool(trial_cfg.get("measure_latency"))


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
        from search.mlflow_trial import TrialRun
        from search.tracking import log_trial_run

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


_WATCHING: set[int] = set()


def _watch_driver(driver: Mapping[str, Any] | None, interval_s: float = 2.0) -> None:
    """Stop this worker process when the sweep's driver (on this host) is gone.

    Ray stops a dead driver's workers on its own when it notices; this covers the time until it
    does and local clusters whose head outlives a killed driver: no orphan keeps training.
    """
    if not driver or driver.get("host") != socket.gethostname() or int(driver["pid"]) in _WATCHING:
        return
    import psutil

    pid, created = int(driver["pid"]), driver.get("create_time")
    _WATCHING.add(pid)

    def alive() -> bool:
        try:
            proc = psutil.Process(pid)
            return (created is None or abs(proc.create_time() - float(created)) < 1.0) and \
                proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def loop() -> None:
        while alive():
            time.sleep(interval_s)
        log.warning("the sweep's driver (pid %d) is gone; stopping this worker", pid)
        os._exit(1)

    threading.Thread(target=loop, name="prunesearch-driver-watch", daemon=True).start()


def run_tune_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The body of the Ray Tune trainable (:func:`search.trial_context.ray_trainable`): runs
    :func:`run_trial` and reports its final result.

    A trial that already finished (resume) is adopted, not run again. A failing trial logs a
    FAILED child run with its reason before re-raising, so MLflow and Optuna both record the
    failure while the sweep goes on, and leaves its exception line in its folder
    (:func:`search.trial_context.record_failure`): the failure is deterministic, so Tune's retry
    (meant for dead workers) raises it again at once instead of running the trial a second time.
    """
    from ray import tune

    context = tune.get_context()
    trial_id = context.get_trial_id() or "trial"
    _watch_driver(ctx.driver)
    adopted = adopt_finished(ctx, trial_id)
    if adopted is not None:
        print(f"trial {trial_id} had finished before the sweep was interrupted; adopting its result", flush=True)
        tune.report({**adopted, "final_result": True, "adopted": True})
        return
    cpus = int(max(1, ctx.trial.get("cpus", 1)))
    torch.set_num_threads(cpus)  # several trials share the machine's cores
    try:
        if ctx.sweep_root:
            with SweepStorage(ctx.sweep_root).trial_dir(trial_id) as trial_dir:
                row = run_trial(params, ctx, trial_id=trial_id, trial_dir=trial_dir, report=tune.report)
        else:
            row = run_trial(params, ctx, trial_id=trial_id, trial_dir=context.get_trial_dir(), report=tune.report)
    except Exception as exc:
        # A write the storage refused (any trial kind, any writer) reaches the driver as a
        # StorageError, which stops the sweep instead of letting the next trial fill the disk; a
        # resume runs that trial again, so it is not recorded as a deterministic failure.
        failure = as_storage_error(exc)
        if failure is not None and failure is not exc:
            exc = failure
        if failure is None:
            # Any other exception came from the trial's own code (a stopped trial exits with
            # SystemExit, a dead worker raises nothing): record it before anything else can fail.
            record_failure(ctx, trial_id, exception_line(exc))
        if ctx.tracking:
            try:
                from search.mlflow_trial import TrialRun
                from search.tracking import log_trial_run

                live = TrialRun.pop(trial_id)
                if live is not None:
                    live.close({})
                log_trial_run(ctx.tracking["uri"], ctx.tracking["experiment_id"],
                              ctx.tracking["parent_run_id"], trial_id,
                              params=dict(params) if live is None else {},  # a started run has them
                              metrics={}, status="FAILED",
                              error="".join(traceback.format_exception(exc))[-5000:])
            except Exception:  # tracking trouble must not hide the trial's own error
                log.exception("could not log the failed trial %s to MLflow", trial_id)
        if failure is not None:
            raise failure from None
        raise
    plan = FaultPlan.from_config(ctx.trial.get("faults"))
    if plan is not None:
        plan.record_completion(trial_id)
    import ray

    node = ray.get_runtime_context().get_node_id()
    tune.report({**row, "node_id": node, "final_result": True})
