"""KEN's outer loop: the (pretrained, fine-tuned) pair, made once per config and cached, and a KEN trial.

KEN needs two checkpoints of one architecture. Either

* the user points at them (``method.pretrained=PATH method.finetuned=PATH``): state-dict files
  of the configured model (``.safetensors``, ``.pt``/``.pth``/``.bin``), or Hugging Face model
  directories (``config.json`` inside; needs the ``hf`` extra, ``pip install prunesearch[hf]``),
  loaded with :func:`load_checkpoint_pair`; or
* the sweep makes them (:func:`get_pair`): *pretrain* a fresh model on the first
  ``ceil(pair_pretrain_classes * classes)`` labels of the training split (the model keeps all
  its outputs, so the architecture does not change), then *fine-tune* a copy on all classes.
  The pair is cached under ``pair_cache_dir`` (default ``$PRUNESEARCH_CACHE/ken_pairs`` or
  ``~/.cache/prunesearch/ken_pairs``) keyed by a hash of data, model, seed, training and pair
  settings, behind a file lock: concurrent trials make it once and every later trial (and
  sweep) with the same config loads it, so trials only search ``k`` and the layer choice.

:func:`run_ken_trial` runs the ``ken_pair`` trial kind (:mod:`search.trials.kinds`): no training,
the pair in, KEN applied, the KEN model measured, its compact delta file and pictures written and
logged to the trial's MLflow child run. :func:`finish_ken_trial` is shared with KEN on Hugging
Face pairs (:func:`search.trials.text.run_hf_ken_trial`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelib.artifact import save_pruned
from prunelib.data import ArrayDataModule
from prunelib.flops import model_cost
from prunelib.ken_storage import save_ken_delta
from prunelib.ken_viz import ken_pictures
from prunelib.masks import MaskSet, sparsity_report
from prunelib.methods.base import Phase, PruningMethod
from prunelib.methods.ken import KEN, KENError, PairPlan
from prunelib.models.hf import is_hf_dir
from prunelib.training import CollapseCheck, TrainConfig, evaluate, run_pruning
from search.keep import model_spec
from search.settings import TrialSettings
from search.storage import atomic_write_text
from search.trials.common import (TrialFailed, build_trial_method, collapse_metrics, latency_probe,
                                  note_kept_model, record_trial, trial_output_dir)
from search.trials.context import resolve_launch_path
from search.trials.kinds import TrialRequest
from search.trials.training import prepare_torch_trial

__all__ = ["PAIR_FORMAT_VERSION", "PairError", "class_subset", "default_cache_dir", "finish_ken_trial", "get_pair",
           "load_checkpoint", "load_checkpoint_pair", "pair_key", "run_ken_trial"]

log = logging.getLogger("search")

PAIR_FORMAT_VERSION = 1
_STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class PairError(ValueError):
    """The pair cannot be made or loaded; the message says which file or setting."""


class _DenseTraining(PruningMethod):
    """Plain training, no pruning: the pretrain and fine-tune runs of the pair."""

    name = "dense_training"
    needs_data = True

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        return [Phase("train", epochs, prunes=False)]

    def finalize(self, model: nn.Module) -> MaskSet:
        return MaskSet.ones_like(model)


# ----------------------------------------------------------------------------------------------
# Paths and checkpoints
# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where made pairs are cached: ``$PRUNESEARCH_CACHE/ken_pairs`` or ``~/.cache/prunesearch/ken_pairs``."""
    root = os.environ.get("PRUNESEARCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "prunesearch") / "ken_pairs"


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning checkpoints
    if not isinstance(state, dict):
        raise PairError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    hf_class: str | None = None, num_labels: int | None = None) -> nn.Module:
    """Load one checkpoint: a Hugging Face directory, or a state-dict file into ``model``.

    Args:
        path: a Hugging Face model directory (``config.json`` inside) or a state-dict file.
        model: the module a state-dict file is loaded into (strictly); modified and returned.
        hf_class: transformers class name for a Hugging Face directory (default: the first of
            its ``config.architectures``, else ``AutoModel``).
        num_labels: classes of the task head when loading a base checkpoint into a task class.

    Raises:
        PairError: missing file, unknown format, or a state dict that does not fit ``model``.
        ImportError: a Hugging Face directory without transformers installed.
    """
    p = resolve_launch_path(path)
    if not p.exists():
        raise PairError(f"checkpoint {str(path)!r} does not exist (resolved to {p})")
    if is_hf_dir(p):
        from prunelib.models.hf import HFModelError, load_hf_model

        try:
            return load_hf_model(p, num_labels=num_labels, hf_class=hf_class, key="checkpoint")
        except HFModelError as exc:
            raise PairError(str(exc)) from exc
    if not p.is_file() or p.suffix not in _STATE_SUFFIXES:
        raise PairError(f"checkpoint {p}: expected a Hugging Face directory (with config.json) or a "
                        f"state-dict file ending in one of {list(_STATE_SUFFIXES)}")
    if model is None:
        raise PairError(f"checkpoint {p} is a state dict: a model to load it into is needed")
    state = _read_state_file(p)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PairError(f"checkpoint {p} does not fit {type(model).__name__}: {str(exc)[:600]}") from exc
    return model


def load_checkpoint_pair(pretrained: str | os.PathLike, finetuned: str | os.PathLike,
                         model: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    """``(pretrained, fine-tuned)`` modules from two local checkpoints of one architecture.

    Hugging Face directories: the fine-tuned one decides the class (e.g.
    ``BertForSequenceClassification``) and the number of labels, and the pretrained one is
    loaded into that class, like ``AutoModelForSequenceClassification.from_pretrained(base)``
    in the KEN reference: a base checkpoint gets a *randomly initialised* head, which is why
    KEN's default ``layers="no_head"`` keeps the fine-tuned head whole. State-dict files are
    loaded into two copies of ``model``.
    """
    p_pre, p_ft = resolve_launch_path(pretrained), resolve_launch_path(finetuned)
    if is_hf_dir(p_ft) or is_hf_dir(p_pre):
        if not (is_hf_dir(p_ft) and is_hf_dir(p_pre)):
            raise PairError(f"one checkpoint is a Hugging Face directory and the other is not: {p_pre}, {p_ft}")
        ft = load_checkpoint(p_ft)
        arch = type(ft).__name__
        labels = getattr(ft.config, "num_labels", None)
        pre = load_checkpoint(p_pre, hf_class=arch, num_labels=labels)
        return pre, ft
    if model is None:
        raise PairError("state-dict checkpoints need the model they belong to")
    ft = load_checkpoint(p_ft, copy.deepcopy(model))
    pre = load_checkpoint(p_pre, copy.deepcopy(model))
    return pre, ft


# ----------------------------------------------------------------------------------------------
# Making the pair
# ----------------------------------------------------------------------------------------------
def class_subset(datamodule: ArrayDataModule, classes: list[int]) -> ArrayDataModule:
    """The same data module restricted to samples whose label is in ``classes`` (all splits)."""
    keep = torch.tensor(sorted(classes))
    parts = []
    for split in ("train", "val", "test"):
        x, y = datamodule.split(split)
        sel = torch.isin(y, keep.to(y.device))
        parts.append((x[sel], y[sel]))
    dm = ArrayDataModule(f"{datamodule.name}[classes {min(classes)}-{max(classes)}]", *parts,
                         num_classes=datamodule.num_classes, batch_size=datamodule.batch_size,
                         eval_batch_size=datamodule.eval_batch_size, seed=datamodule.seed,
                         device=datamodule.device)
    return dm


#: The ``trial`` settings that decide a made pair's weights (in its cache key, and used to train it).
_PAIR_TRAIN_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "precision", "epochs", "seed")


def _train_settings(trial: TrialSettings) -> dict[str, Any]:
    return {k: getattr(trial, k) for k in _PAIR_TRAIN_KEYS}


def pair_key(data_cfg: dict[str, Any], model_cfg: dict[str, Any], trial: TrialSettings, plan: PairPlan) -> str:
    """Hex SHA-256 of everything that decides a made pair's weights (not the cache dir or device)."""
    doc = {"version": PAIR_FORMAT_VERSION, "data": data_cfg, "model": model_cfg, "train": _train_settings(trial),
           "pretrain_classes": plan.pretrain_classes, "pretrain_epochs": plan.pretrain_epochs,
           "finetune_epochs": plan.finetune_epochs, "finetune_lr": plan.finetune_lr}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; no lock where unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}, str(path))


def get_pair(model: nn.Module, datamodule: ArrayDataModule, plan: PairPlan, data_cfg: dict[str, Any],
             model_cfg: dict[str, Any], trial: TrialSettings,
             device: str = "cpu") -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The made ``(pretrained, fine-tuned)`` pair for this config, from the cache or trained now.

    Args:
        model: a freshly initialised model of the trial's architecture (the pretraining start;
            left untouched).
        datamodule: the target task (all classes).
        plan: the KEN pair plan (fractions, epochs, cache dir).
        data_cfg / model_cfg: the config sections, for the cache key.
        trial: the trial's settings (:class:`search.settings.TrialSettings`): the cache key and training.

    Returns:
        ``(pretrained, finetuned, info)``; ``info`` holds the cache path, whether it was cached,
        the classes pretrained on, epochs and seconds spent, and both models' val accuracy.
    """
    key = pair_key(data_cfg, model_cfg, trial, plan)
    root = resolve_launch_path(plan.cache_dir) if plan.cache_dir else default_cache_dir()
    folder = root / key[:20]
    with _file_lock(root / f"{key[:20]}.lock"):
        if (folder / "pair.json").is_file():
            info = json.loads((folder / "pair.json").read_text())
            pre, ft = copy.deepcopy(model), copy.deepcopy(model)
            load_checkpoint(folder / "pretrained.safetensors", pre)
            load_checkpoint(folder / "finetuned.safetensors", ft)
            return pre.to(device), ft.to(device), {**info, "cached": True, "path": str(folder)}
        start = time.perf_counter()
        train = _train_settings(trial)
        classes = list(range(max(1, math.ceil(plan.pretrain_classes * datamodule.num_classes))))
        if len(classes) >= datamodule.num_classes:
            raise PairError(f"pair_pretrain_classes={plan.pretrain_classes} leaves no class for fine-tuning "
                            f"({datamodule.num_classes} classes)")
        pre_epochs = int(plan.pretrain_epochs if plan.pretrain_epochs is not None else train["epochs"])
        ft_epochs = int(plan.finetune_epochs if plan.finetune_epochs is not None else train["epochs"])
        common = dict(optimizer=train["optimizer"], momentum=float(train["momentum"]),
                      weight_decay=float(train["weight_decay"]), precision=str(train["precision"]),
                      accelerator="gpu" if device == "cuda" else "cpu", progress=False, finetune_epochs=0)
        pre = copy.deepcopy(model).to(device)
        log.info("KEN pair: pretraining on classes %s for %d epochs", classes, pre_epochs)
        pre_result = run_pruning(pre, class_subset(datamodule, classes), _DenseTraining(),
                                 TrainConfig(epochs=pre_epochs, lr=float(train["lr"]), **common), seed=int(train["seed"]))
        ft = copy.deepcopy(pre)
        lr = float(plan.finetune_lr if plan.finetune_lr is not None else train["lr"])
        log.info("KEN pair: fine-tuning on all %d classes for %d epochs", datamodule.num_classes, ft_epochs)
        ft_result = run_pruning(ft, datamodule, _DenseTraining(), TrainConfig(epochs=ft_epochs, lr=lr, **common),
                                seed=int(train["seed"]) + 1)
        info = {"key": key, "pretrain_classes": classes, "pretrain_epochs": pre_epochs, "finetune_epochs": ft_epochs,
                "finetune_lr": lr, "seconds": time.perf_counter() - start,
                "pretrained_val_acc_on_its_classes": pre_result.val_acc, "finetuned_val_acc": ft_result.val_acc,
                "data": data_cfg, "model": model_cfg}
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_state(pre, tmp / "pretrained.safetensors")
        _save_state(ft, tmp / "finetuned.safetensors")
        (tmp / "pair.json").write_text(json.dumps(info, indent=1, default=str))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return pre, ft, {**info, "cached": False, "path": str(folder)}


# ----------------------------------------------------------------------------------------------
# The KEN trial
# ----------------------------------------------------------------------------------------------
def run_ken_trial(req: TrialRequest) -> dict[str, Any]:
    """One KEN trial on the configured (PyTorch) model (the ``ken_pair`` kind): get the pair, then
    :func:`finish_ken_trial`. Hugging Face pairs of text models go through
    :func:`search.trials.text.run_hf_ken_trial`."""
    inputs = prepare_torch_trial(req)
    ctx, trial, device, datamodule, model = (req.ctx, inputs.trial, inputs.device, inputs.datamodule,
                                                 inputs.model)
    method = build_trial_method(ctx, req.method_name, req.settings)
    plan = method.pair_plan()
    if plan.pretrained is not None and plan.finetuned is not None:
        pre, ft = load_checkpoint_pair(plan.pretrained, plan.finetuned, model)
        if not isinstance(pre, type(model)):
            raise PairError(f"the checkpoints are {type(pre).__name__} models; a trial evaluates "
                            f"{type(model).__name__} on {ctx.data['name']}. For Hugging Face text models use "
                            f"model=hf data=text pair.pretrained=DIR pair.finetuned=DIR")
        pre, ft = pre.to(device), ft.to(device)
        pair_info: dict[str, Any] = {"cached": True, "pretrain_epochs": 0, "finetune_epochs": 0,
                                     "path": f"{plan.pretrained} + {plan.finetuned}"}
    else:
        pre, ft, pair_info = get_pair(model, datamodule, plan, ctx.data, ctx.model, trial, device)
    input_shape = inputs.input_shape

    def score(net: nn.Module, split: str) -> dict[str, float]:
        batches = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
        return evaluate(net, batches)

    return finish_ken_trial(method, req.settings, req.overrides, ctx, pre, ft, pair_info, score,
                            lambda net: model_cost(net, input_shape, None), trial, trial_id=req.trial_id,
                            trial_dir=req.trial_dir, start=req.start, data_s=inputs.data_s,
                            model_args=inputs.model_args, extra=latency_probe(ctx, trial, input_shape, device),
                            spec=model_spec(ctx.model, input_shape, datamodule.num_classes), input_shape=input_shape,
                            judge=lambda net: CollapseCheck().judge(net, datamodule.val_dataloader()))


def finish_ken_trial(method: KEN, settings: dict[str, Any], overrides: dict[str, Any], ctx: Any,
                     pre: nn.Module, ft: nn.Module, pair_info: dict[str, Any],
                     score: Any, cost: Any, trial: TrialSettings, *, trial_id: str,
                     trial_dir: str | os.PathLike | None, start: float, data_s: float,
                     model_args: dict[str, Any], extra: Any = None,
                     delta_metadata: dict[str, Any] | None = None, spec: Any = None, tokenizer: Any = None,
                     input_shape: tuple[int, ...] | None = None, judge: Any = None) -> dict[str, Any]:
    """Apply KEN to a loaded pair, measure, write and log; returns the trial's row.

    About 90 lines: the end of both KEN kinds (``ken_pair``, ``text_ken_pair``) in the order it runs;
    the measured model and its files pass from step to step.

    Args:
        pre / ft: the pair (``ft`` becomes the KEN model).
        score: ``score(model, "val"|"test") -> {"acc", "loss", ...}``; every key is reported
            with the split's prefix (``val_acc``, ``val_ppl``...).
        cost: ``cost(model) -> ModelCost`` (dense: KEN zeroes nothing).
        trial: the trial's settings (``evaluate_test``, ``keep_weights``).
        extra: ``extra(model) -> dict`` of more metrics (latency), or None.
        delta_metadata: more facts for the delta file's header (a Hugging Face class name).
        spec: the :class:`prunelib.artifact.ModelSpec` that rebuilds the model (kept with the
            KEN model's weights unless ``trial.keep_weights=none``); ``tokenizer`` is saved
            beside a Hugging Face model; ``input_shape`` gives its MLflow model a signature.
        judge: ``judge(model) -> dict`` (:meth:`prunelib.training.CollapseCheck.judge`), or None.

    Metrics (besides the score's, FLOPs and params, all dense): ``reverted_fraction`` (entries
    reset to pretrained / all parameters), ``reverted_fraction_selected`` (/ entries of the
    processed tensors), ``kept_finetuned_params``, ``finetuned_val_*`` and ``pretrained_val_*``
    (the two baselines), ``ken_file_bytes``, ``finetuned_bytes`` and ``ken_file_ratio`` (the
    compact delta against the full fine-tuned state dict), ``select_s`` (selection seconds),
    ``pair_epochs`` and ``pair_cached`` (the shared pair's cost, paid once per config).
    ``sparsity`` is the fraction of weights that are actually zero (about 0).
    """
    pre_val = score(pre, "val")
    ft_val = score(ft, "val")
    finetuned_state = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    method.set_pretrained(pre)
    t0 = time.perf_counter()
    try:
        masks = method.finalize(ft)  # ft becomes the KEN model
    except KENError as exc:
        raise TrialFailed(f"trial {trial_id}: KEN: {exc}") from exc
    select_s = time.perf_counter() - t0
    val = score(ft, "val")
    if math.isnan(val["loss"]) or math.isnan(val["acc"]):
        raise TrialFailed(f"trial {trial_id}: the KEN model's loss is NaN; the result is unusable")
    report = method.report
    dense_cost = cost(ft)  # dense: reverted entries hold pretrained values, not zeros
    metrics: dict[str, Any] = {
        **{f"val_{k}": v for k, v in val.items()},
        **{f"finetuned_val_{k}": v for k, v in ft_val.items() if k in ("acc", "ppl")},
        **{f"pretrained_val_{k}": v for k, v in pre_val.items() if k in ("acc", "ppl")},
        "reverted_fraction": report["reverted_fraction"],
        "reverted_fraction_selected": report["reverted_fraction_selected"],
        "kept_finetuned_params": report["kept_finetuned_params"],
        "sparsity": sparsity_report(ft)["global"]["sparsity"], "epochs": 0,
        "pair_epochs": int(pair_info.get("pretrain_epochs", 0)) + int(pair_info.get("finetune_epochs", 0)),
        "pair_cached": bool(pair_info.get("cached")), "select_s": select_s,
        "extra_forward_passes": 0, "extra_backward_passes": 0, "extra_params": 0, **dense_cost.as_dict(),
        "artifact": "masked"}  # flops_deployed = effective: the KEN model keeps its shapes
    if trial.evaluate_test:
        metrics.update({f"test_{k}": v for k, v in score(ft, "test").items() if k in ("acc", "loss", "ppl")})
    metrics.update(method.method_metrics())  # the figures the method declares (reported_metrics)
    if extra is not None:
        metrics.update(extra(ft))
    if judge is not None:
        metrics.update(collapse_metrics(judge(ft)))

    out_dir = trial_output_dir(trial_dir, trial_id)
    delta = save_ken_delta(out_dir / "ken_delta.safetensors", pre, ft, masks.masks, finetuned=finetuned_state,
                           method="ken", config=settings, trial_id=trial_id, data=ctx.data["name"],
                           model_name=ctx.model["name"], model_args=model_args, **(delta_metadata or {}))
    metrics.update(delta.as_dict())
    masks_path = masks.save(out_dir / "masks.safetensors", None, method="ken", config=settings, trial_id=trial_id,
                            data=ctx.data["name"], model_name=ctx.model["name"], flops=dense_cost.as_dict(),
                            model_args=model_args, ken_delta=str(delta.path), pair=pair_info.get("path"))
    atomic_write_text(out_dir / "layer_kept_fraction.json", json.dumps(report["layers"], indent=1))
    pictures = out_dir / "ken_viz"
    ken_pictures(masks.masks, finetuned_state, pictures)
    keep = trial.keep_weights
    kept: dict[str, Any] = {"keep_weights": keep}
    artifacts = {"masks": str(masks_path), "ken": str(delta.path), "ken_viz": str(pictures),
                 "layers": str(out_dir / "layer_kept_fraction.json")}
    if keep != "none":  # the KEN model as measured (reverted entries hold pretrained values)
        manifest = save_pruned(out_dir, ft, spec, "masked", tokenizer=tokenizer)
        note_kept_model(trial_id, ft, input_shape, manifest, out_dir, kept, artifacts)
    metrics["wall_s"] = time.perf_counter() - start
    return record_trial(ctx, trial_id, "ken", settings, overrides, metrics, out_dir,
                        extra={"masks_path": str(masks_path), "ken_delta_path": str(delta.path),
                               "data_load_s": data_s, "trial_wall_s": time.perf_counter() - start, **kept},
                        artifacts=artifacts)
