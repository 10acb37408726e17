"""One trial: build data, model and method from a sampled config, train, measure, log.

:func:`run_trial` is plain Python (no Ray needed), so a trial can be run and debugged on its
own; :func:`ray_trainable` wraps it for Ray Tune. Data sets are loaded once per worker
process and reused by later trials on the same worker (Ray's actor reuse keeps the process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from prunelib.data import build_datamodule
from prunelib.flops import model_cost
from prunelib.methods import build_method
from prunelib.models import build_model
from prunelib.robustness import fgsm_accuracy
from prunelib.surgery import export_onnx, has_structured_masks, surgery
from prunelib.training import TrainConfig, evaluate_masked, run_pruning
from search.faults import FaultPlan
from search.space import SearchSpace, settings_from_params

__all__ = ["TrialContext", "TrialFailed", "run_trial", "ray_trainable"]

log = logging.getLogger("search")

# Per-process cache: (data config, device) -> datamodule. Kept across trials on one worker.
_DATA_CACHE: dict[str, Any] = {}


class TrialFailed(RuntimeError):
    """A trial could not produce a usable result (e.g. NaN loss); the message says why."""


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled parameters (picklable, sent once).

    Attributes:
        data: the ``data`` config section (arguments of ``build_datamodule``).
        model: the ``model`` config section (``name``, ``width``, ...).
        trial: the ``trial`` config section (epochs, optimizer, resources...).
        space: the search space, to turn sampled params into method settings.
        objectives: ``[(metric, "max"|"min"), ...]`` reported with every intermediate result.
        tracking: ``{"uri", "experiment_id", "parent_run_id"}`` or None to skip MLflow.
        report_every_epoch: send per-epoch validation results (for ASHA early stopping).
    """

    data: dict[str, Any]
    model: dict[str, Any]
    trial: dict[str, Any]
    space: SearchSpace
    objectives: list[tuple[str, str]]
    tracking: dict[str, str] | None = None
    report_every_epoch: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _device(trial_cfg: dict[str, Any]) -> str:
    gpus = trial_cfg.get("gpus", 0)
    return "cuda" if (gpus not in (0, None, "0") and torch.cuda.is_available()) else "cpu"


def get_datamodule(data_cfg: dict[str, Any], device: str, seed: int) -> Any:
    """The data module for ``data_cfg`` on ``device``, loaded once per process."""
    args = {k: v for k, v in data_cfg.items() if k != "name"}
    key = json.dumps({"data": data_cfg, "device": device, "seed": seed}, sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = build_datamodule(data_cfg["name"], seed=seed, device=device, **args)
    return _DATA_CACHE[key]


class _EpochReporter(L.Callback):
    """Reports validation accuracy and current costs after every validation (for ASHA), and
    the figures of the masks the method is heading for (``projected_*``, for mo_asha)."""

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
        val_acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
        cost = model_cost(pl_module.model, self.input_shape, self.method.masks).as_dict()
        extra = self.extra(pl_module.model) if self.extra else {}
        # Tune checks every result for all objectives, so intermediate ones carry them too.
        self.report({"val_acc": val_acc, "epoch": self.epochs, **cost, **extra,
                     **self.projected(pl_module.model, cost), "final_result": False})

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


def run_trial(params: dict[str, Any], ctx: TrialContext, *, trial_id: str = "local",
              trial_dir: str | os.PathLike | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one trial and return its flat result (metrics, settings, masks path).

    Args:
        params: the sampled parameters (``{"method": ..., "METHOD.KEY": value}``).
        ctx: the sweep's fixed context.
        trial_id: a unique name (Ray's trial id in a sweep).
        trial_dir: where the masks file goes (default: a temporary directory).
        report: where intermediate results go (Ray's ``tune.report`` in a sweep).

    Raises:
        TrialFailed: the run produced NaN loss or accuracy.
    """
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
    model_args = {k: v for k, v in ctx.model.items() if k not in ("name", "_target_")}
    if "_target_" in ctx.model:
        model_args["target"] = ctx.model["_target_"]
    model = build_model(ctx.model["name"], tuple(datamodule.input_shape), datamodule.num_classes,
                        **model_args).to(device)
    method = build_method(method_name, **settings)
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
        val_every_n_epochs=1 if (report is not None and ctx.report_every_epoch) else 0)
    want_latency = wants_latency(ctx, trial_cfg)
    input_shape = tuple(datamodule.input_shape)
    latency_batch = int(trial_cfg.get("latency_batch_size", 256))

    def latency(net: torch.nn.Module) -> dict[str, float]:
        return {"latency_ms": measure_latency_ms(net, input_shape, latency_batch, device=device)} \
            if want_latency else {}

    callbacks = []
    if report is not None and ctx.report_every_epoch:
        callbacks.append(_EpochReporter(report, input_shape, method, latency, datamodule.val_dataloader))
    try:
        result = run_pruning(model, datamodule, method, config, seed=seed, callbacks=callbacks,
                             evaluate_test=bool(trial_cfg.get("evaluate_test", True)))
    except torch.OutOfMemoryError as exc:
        raise TrialFailed(f"trial {trial_id}: out of memory ({str(exc)[:300]}); use a smaller batch or "
                          "model, or give each trial more of a GPU (trial.gpus)") from exc
    metrics = result.metrics()
    if not math.isfinite(metrics["val_loss"]) or math.isnan(metrics["val_acc"]):
        raise TrialFailed(f"trial {trial_id}: loss became NaN (lr={config.lr}); the result is unusable")

    out_dir = trial_output_dir(trial_dir, trial_id)
    # Structured masks: the physically smaller model is the one to keep, time and export.
    deployed, artifacts = model, {}
    if has_structured_masks(result.masks):
        smaller = surgery(model, result.masks, input_shape)
        smaller.save(out_dir / "surgered", model_spec={
            "name": ctx.model["name"], "input_shape": list(input_shape), "num_classes": datamodule.num_classes,
            "width": model_args.get("width", 1.0), "kwargs": {k: v for k, v in model_args.items() if k != "width"}}
            if ctx.model["name"] != "custom" else None)
        if trial_cfg.get("export_onnx"):
            export_onnx(smaller.model, out_dir / "surgered" / "model.onnx", input_shape)
        deployed, artifacts["surgered"] = smaller.model, str(out_dir / "surgered")
    if method.write_artifacts(out_dir / method_name):  # e.g. RL-Pruner's learned layer distribution
        artifacts[method_name] = str(out_dir / method_name)
    metrics.update(latency(deployed))
    if trial_cfg.get("fgsm_epsilon") is not None:
        robust = fgsm_accuracy(deployed, datamodule.val_dataloader(), epsilon=float(trial_cfg["fgsm_epsilon"]))
        metrics["val_fgsm_acc"] = robust.attacked_accuracy
    masks_path = result.masks.save(out_dir / "masks.safetensors", model, method=method_name,
                                   config=settings, trial_id=trial_id, data=ctx.data["name"],
                                   model_name=ctx.model["name"], flops=result.cost.as_dict(),
                                   model_args=model_args)
    layer_sparsity = result.masks.layer_sparsity(model)
    (out_dir / "layer_sparsity.json").write_text(json.dumps(layer_sparsity, indent=1))
    return record_trial(ctx, trial_id, method_name, settings, overrides, metrics, out_dir,
                        extra={"masks_path": str(masks_path), "data_load_s": data_s,
                               "trial_wall_s": time.perf_counter() - start},
                        artifacts={"masks": str(masks_path), "layers": str(out_dir / "layer_sparsity.json"),
                                   **artifacts})


def trial_output_dir(trial_dir: str | os.PathLike | None, trial_id: str) -> Path:
    """Where a trial writes its files: ``trial_dir`` (Ray's) or a temporary directory, created."""
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
    """
    trial_params = {f"trial.{k}": v for k, v in overrides.items()}
    row: dict[str, Any] = {
        **metrics, "method": method_name, "trial_id": trial_id, **extra,
        **{f"param.{k}": v for k, v in settings.items()}, **trial_params,
    }
    if ctx.tracking:
        from search.tracking import log_trial_run

        try:
            row["mlflow_run_id"] = log_trial_run(
                ctx.tracking["uri"], ctx.tracking["experiment_id"], ctx.tracking["parent_run_id"],
                trial_id, params={"method": method_name, **settings, **trial_params},
                metrics={**metrics, "method": method_name, "masks_path": extra["masks_path"]},
                artifacts=artifacts)
        except Exception as exc:  # a tracking outage must not throw away a finished trial
            row["mlflow_unlogged"] = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("trial %s: could not log to MLflow (%s); its result stays in %s", trial_id,
                        row["mlflow_unlogged"], out_dir)
    # The result also stays beside the masks, whatever happens to the tracking store.
    (out_dir / "trial_result.json").write_text(json.dumps(row, indent=1, default=str))
    return row


def ray_trainable(params: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: runs :func:`run_trial` and reports its final result.

    A failing trial logs a FAILED child run with its reason before re-raising, so MLflow
    and Optuna both record the failure while the sweep goes on.
    """
    from ray import tune

    context = tune.get_context()
    trial_id = context.get_trial_id() or "trial"
    cpus = int(max(1, ctx.trial.get("cpus", 1)))
    torch.set_num_threads(cpus)  # several trials share the machine's cores
    try:
        row = run_trial(params, ctx, trial_id=trial_id, trial_dir=context.get_trial_dir(),
                        report=tune.report)
    except Exception as exc:
        if ctx.tracking:
            try:
                from search.tracking import log_trial_run

                log_trial_run(ctx.tracking["uri"], ctx.tracking["experiment_id"],
                              ctx.tracking["parent_run_id"], trial_id, params=dict(params),
                              metrics={}, status="FAILED",
                              error="".join(traceback.format_exception(exc))[-5000:])
            except Exception:  # tracking trouble must not hide the trial's own error
                log.exception("could not log the failed trial %s to MLflow", trial_id)
        raise
    import ray

    node = ray.get_runtime_context().get_node_id()
    tune.report({**row, "node_id": node, "final_result": True})
