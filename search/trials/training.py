"""The ``train`` trial kind: build data, model and method from a sampled config, train with the
method's hooks, measure the artifact it keeps, log (:func:`run_training_trial`).

Data sets are loaded once per worker process and reused by later trials on the same worker
(Ray's actor reuse keeps the process). A trial's files go to ``<sweep root>/trials/<trial_id>/``
(:mod:`search.storage`), never to Ray's temporary folders.

The training step is the built-in classifier (:class:`prunelib.training.ClassifierModule`) or
the user's LightningModule (``module._target_``, :func:`build_module`): the pruning callback is
attached to it and its logged metrics are the trial's. :func:`prepare_torch_trial` (data, model,
module) is shared with the ``ken_pair`` kind (:mod:`search.trials.ken`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
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
from search.faults import DISK_FULL_KEY, FaultPlan, disk_full
from search.keep import model_spec
from search.settings import ModelSettings, ModuleSettings, TrialSettings
from search.storage import atomic_write_text, storage_errors
from search.trials.common import (TrialFailed, build_trial_method, check_objectives, collapse_metrics, latency_probe,
                                  record_trial, trial_device, trial_output_dir)
from search.trials.kinds import TrialRequest
from search.trials.metrics import VAL_FGSM_ACC
from search.trials.progress import trial_progress

__all__ = ["DOCUMENTED_MODULE_KEYS", "TorchTrialInputs", "build_module", "get_datamodule", "module_args",
           "prepare_torch_trial", "run_training_trial"]

log = logging.getLogger("search")

# Per-process cache: (data config, device) -> datamodule. Kept across trials on one worker.
_DATA_CACHE: dict[str, Any] = {}

#: Keys offered to a user's LightningModule (``module._target_``), each passed only when its
#: signature names it: the network to train, the data's shape and classes, and the trial's
#: (possibly searched) optimiser settings.
DOCUMENTED_MODULE_KEYS = ("model", "input_shape", "in_channels", "num_classes", "lr", "weight_decay",
                          "momentum", "optimizer")


def get_datamodule(data_cfg: dict[str, Any], device: str, seed: int) -> Any:
    """The data module for ``data_cfg`` on ``device``, loaded once per process."""
    key = json.dumps({"data": data_cfg, "device": device, "seed": seed}, sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = datamodule_from_config(data_cfg, seed=seed, device=device)
    elif isinstance(_DATA_CACHE[key], StreamingDataModule):
        _DATA_CACHE[key].restart()  # a reused worker shuffles as a fresh one would
    return _DATA_CACHE[key]


def module_args(model: torch.nn.Module | None, input_shape: tuple[int, ...], num_classes: int,
                trial: TrialSettings) -> dict[str, Any]:
    """The documented keys offered to a user's LightningModule (:data:`DOCUMENTED_MODULE_KEYS`):
    the network to train, the data's shape and classes, the trial's optimiser settings."""
    shape = tuple(int(s) for s in input_shape)
    return {"model": model, "input_shape": shape, "in_channels": shape[0] if shape else None,
            "num_classes": int(num_classes), "lr": float(trial.lr), "weight_decay": float(trial.weight_decay),
            "momentum": float(trial.momentum), "optimizer": trial.optimizer}


def build_module(module: ModuleSettings, model: torch.nn.Module, input_shape: tuple[int, ...],
                 num_classes: int, trial: TrialSettings) -> L.LightningModule:
    """The user's LightningModule (``module._target_``), called with the documented keys its
    signature names (:func:`module_args`) and the section's own keys.

    A module that does not take ``model`` builds its own network; the trial prunes
    :func:`prunelib.training.network_of` of it (its ``model`` attribute, else the module).

    Raises:
        TargetError: the target does not import, rejects a key, or raises.
        TypeError: it is not a LightningModule.
    """
    target = module.target
    built = call_target(target, module_args(model, input_shape, num_classes, trial), dict(module.options),
                        "module._target_")
    if not isinstance(built, L.LightningModule):
        raise TypeError(f"module._target_={target}: returned {type(built).__name__}, not a "
                        "lightning.LightningModule")
    return built


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


@dataclass
class TorchTrialInputs:
    """What a trial on a PyTorch model starts from (:func:`prepare_torch_trial`).

    Attributes:
        trial: the trial's settings (with a reliability drill's faults injected).
        disk_fault: a reliability drill's ``enospc`` fault for this trial (see
            :func:`search.faults.disk_full`), else ``{}``.
        seed / device: the trial's seed and device (``"cpu"``/``"cuda"``).
        datamodule: the data (cached per worker process); ``data_s``: seconds it took to get.
        model: the network the method prunes (the user's module's network, when it has one).
        built: the model as :func:`prunelib.models.model_from_config` built it.
        module: the user's LightningModule (``module._target_``) or None.
        module_label: its ``_target_`` or None.
        model_args: the model's own keys (and ``target``), kept in the masks file.
    """

    trial: TrialSettings
    disk_fault: dict[str, Any]
    seed: int
    device: str
    datamodule: Any
    data_s: float
    model: torch.nn.Module
    built: torch.nn.Module
    module: L.LightningModule | None
    module_label: str | None
    model_args: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (channels first)."""
        return tuple(self.datamodule.input_shape)


def prepare_torch_trial(req: TrialRequest) -> TorchTrialInputs:
    """Data, model and (the user's) module of a trial on a PyTorch model, on the trial's device."""
    ctx, trial = req.ctx, req.trial
    fault_plan = FaultPlan.from_config(trial.faults)
    disk_fault: dict[str, Any] = {}
    if fault_plan is not None:  # reliability drills only (off by default)
        injected = fault_plan.inject(req.trial_id, {})
        disk_fault = {k: v for k, v in injected.items() if k == DISK_FULL_KEY}
        trial = trial.replace(**{k: v for k, v in injected.items() if k != DISK_FULL_KEY})
    seed = int(trial.seed)
    device = trial_device(trial)
    t_data = time.perf_counter()
    datamodule = get_datamodule(ctx.data, device, seed)
    data_s = time.perf_counter() - t_data
    torch.manual_seed(seed)
    input_shape = tuple(datamodule.input_shape)
    model_cfg = ModelSettings.from_dict(ctx.model)
    model_args = dict(model_cfg.options)
    if model_cfg.target:
        model_args["target"] = model_cfg.target
    model = built = model_from_config(ctx.model, input_shape, datamodule.num_classes)
    module_cfg = ModuleSettings.from_dict(ctx.module)
    module_label = module_cfg.target
    module = build_module(module_cfg, model, input_shape, datamodule.num_classes, trial) if module_label else None
    if module is not None:
        model = network_of(module)
        module.to(device)
    return TorchTrialInputs(trial, disk_fault, seed, device, datamodule, data_s, model.to(device), built, module,
                            module_label, model_args)


def run_training_trial(req: TrialRequest) -> dict[str, Any]:
    """One training trial (the ``train`` kind); returns the trial's row.

    About 90 lines: the trial's steps in the order they run (build, train, measure, write, record),
    kept in one place because each step hands a handful of locals to the next.

    Raises:
        TrialFailed: the run produced NaN loss or accuracy, ran out of memory, or its exported
            model cannot be measured.
        ObjectiveNotLoggedError: an objective was never reported (a user's module did not log it).
    """
    ctx, trial_id, trial_dir, report, start = req.ctx, req.trial_id, req.trial_dir, req.report, req.start
    method_name, settings, overrides, mlflow_run = req.method_name, req.settings, req.overrides, req.mlflow_run
    inputs = prepare_torch_trial(req)
    trial, seed, device, datamodule, data_s = (inputs.trial, inputs.seed, inputs.device, inputs.datamodule,
                                                   inputs.data_s)
    model, built, module, module_label, model_args = (inputs.model, inputs.built, inputs.module, inputs.module_label,
                                                      inputs.model_args)
    input_shape = inputs.input_shape
    method = build_trial_method(ctx, method_name, settings)
    # The TrainConfig fields the trial sets itself, unless the config gives them (trial.accelerator,
    # trial.val_every_n_epochs, trial.progress: TrialSettings.train_options); per-epoch validation
    # stays on whenever ASHA's rungs need the intermediate results.
    derived = {"accelerator": "gpu" if device == "cuda" else "cpu", "progress": False, "val_every_n_epochs": 0,
               **trial.train_options}
    if report is not None and ctx.report_every_epoch:
        derived["val_every_n_epochs"] = 1
    config = TrainConfig(
        epochs=int(trial.epochs), finetune_epochs=int(trial.finetune_epochs), optimizer=trial.optimizer,
        lr=float(trial.lr), finetune_lr=float(trial.finetune_lr) if trial.finetune_lr is not None else None,
        momentum=float(trial.momentum), weight_decay=float(trial.weight_decay), precision=str(trial.precision),
        **derived, **{key: getattr(trial, key) for key in SPEED_SETTINGS})
    latency = latency_probe(ctx, trial, input_shape, device)

    callbacks = []
    progress = trial_progress(trial_id, method_name, method.plan(config.epochs, config.finetune_epochs),
                              ctx.objectives, trial, ctx.sweep_root, start)
    if progress is not None:  # live lines on the driver; epoch lines under trial.verbose
        callbacks.append(progress)
    if report is not None and ctx.report_every_epoch:
        callbacks.append(_EpochReporter(report, input_shape, method, latency, datamodule.val_dataloader))
    epoch_logger = mlflow_run.epoch_logger(method, datamodule.val_dataloader, module is None) if mlflow_run else None
    if epoch_logger is not None:
        callbacks.append(epoch_logger)
    try:
        result = run_pruning(model, datamodule, method, config, seed=seed, callbacks=callbacks,
                             evaluate_test=trial.evaluate_test, module=module)
    except torch.OutOfMemoryError as exc:
        raise TrialFailed(f"trial {trial_id}: out of memory ({str(exc)[:300]}); use a smaller batch or "
                          "model, or give each trial more of a GPU (trial.gpus)") from exc
    except SurgeryError as exc:  # never a silent dense cost: the trial fails with the reason
        raise TrialFailed(f"trial {trial_id}: the cost of the exported model cannot be measured: {exc}") from exc
    metrics = result.metrics()
    if module is None and (not math.isfinite(metrics["val_loss"]) or math.isnan(metrics["val_acc"])):
        raise TrialFailed(f"trial {trial_id}: loss became NaN (lr={config.lr}); the result is unusable")

    out_dir = trial_output_dir(trial_dir, trial_id)
    keep = trial.keep_weights
    # The artifact run_pruning measured (surgered for structured masks) is the one kept, timed, exported.
    deployed, artifacts = result.deployed.model, {}
    if method.write_artifacts(out_dir / method_name):  # e.g. RL-Pruner's learned layer distribution
        artifacts[method_name] = str(out_dir / method_name)
    metrics["artifact"] = result.deployed.kind  # what flops_deployed / params_deployed were counted on
    metrics.update(method.method_metrics())  # the figures the method declares (reported_metrics)
    metrics.update(latency(deployed))
    if trial.fgsm_epsilon is not None:
        robust = fgsm_accuracy(deployed, datamodule.val_dataloader(), epsilon=float(trial.fgsm_epsilon))
        metrics[VAL_FGSM_ACC] = robust.attacked_accuracy
    check_objectives(ctx, metrics, trial_id, module_label)
    try:
        metrics.update(collapse_metrics(CollapseCheck().judge(deployed, datamodule.val_dataloader())))
    except Exception as exc:  # a model or data the check does not understand: no flag, no failure
        log.warning("trial %s: could not check the model for collapse (%s: %s)", trial_id, type(exc).__name__,
                    str(exc)[:200])
    # Every file below is written atomically and checked; a write the storage refuses (full
    # disk, quota, read-only) is a StorageError, which stops the sweep (search.tuner).
    with storage_errors(out_dir), disk_full(inputs.disk_fault):
        masks_path = result.masks.save(out_dir / "masks.safetensors", model, method=method_name,
                                       config=settings, trial_id=trial_id, data=ctx.data["name"],
                                       model_name=ctx.model["name"], flops=result.cost.as_dict(),
                                       model_args=model_args)
        layer_sparsity = result.masks.layer_sparsity(model)
        atomic_write_text(out_dir / "layer_sparsity.json", json.dumps(layer_sparsity, indent=1))
        kept: dict[str, Any] = {"keep_weights": keep}
        if keep != "none":  # the weights the metrics were measured on, with the spec that rebuilds the model
            spec = model_spec(ctx.model, input_shape, datamodule.num_classes, ctx.module,
                              module_args(None, input_shape, datamodule.num_classes, trial),
                              network_is_model=model is built)
            if result.deployed.kind == "surgered" and trial.export_onnx:
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
