"""Trials of Hugging Face text models: one-shot LLM pruning, and KEN on a local (pretrained, fine-tuned) pair.

``model=hf model.path=DIR data=text data.path=FILE`` runs these trials instead of the training
trials of :mod:`search.trials.training` (trial kinds ``text`` and ``text_ken_pair``,
:mod:`search.trials.kinds`):

* ``llm_magnitude``, ``wanda``, ``sparsegpt``: the model is loaded from ``model.path``, pruned
  block by block on calibration samples of the training split
  (:mod:`prunelib.llm`), and measured on the validation split: ``val_ppl`` (perplexity),
  ``val_loss`` (nats per token) and ``val_acc`` (next-token accuracy) for a causal LM;
  ``val_acc`` and ``val_loss`` for a sequence classifier; ``dense_val_*`` is the unpruned
  model's; FLOPs per sequence of ``data.max_length`` tokens (dense and effective), ``sparse_bytes``
  (the weights stored sparse), ``sparsity`` (the project's convention: all Linear weights,
  heads included) and ``block_sparsity`` (the pruned block layers only: what the papers report).
* ``ken``: ``pair.pretrained=DIR pair.finetuned=DIR`` (two checkpoint directories of one
  architecture); the tokenizer is the fine-tuned model's; objectives as for any KEN trial
  (accuracy or perplexity of the KEN model, ``reverted_fraction``, ``ken_file_bytes``); the
  compact delta file and the KEN_viz pictures are the trial's artifacts, and
  :func:`prunelib.models.hf.rebuild_ken_model` turns the delta back into a ``transformers`` model.

Their configs are recognised and checked on the driver by :mod:`search.trials.text_config`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelib.artifact import HF_DIR, ModelSpec, save_pruned
from prunelib.data.text import TextDataModule, build_text_datamodule
from prunelib.llm import evaluate_text, sparse_storage_bytes, text_model_cost
from prunelib.llm.sparsity import parse_pattern
from prunelib.masks import sparsity_report
from prunelib.models.hf import HFModelError, hf_task_of, load_hf_model, load_tokenizer
from search.storage import atomic_write_text
from search.trials.common import (TrialFailed, build_trial_method, record_trial, trial_device,
                                  trial_output_dir)
from search.trials.context import resolve_launch_path
from search.trials.kinds import TrialRequest
from search.trials.mlflow_run import TrialRun
from search.trials.text_config import TEXT_DATA_ARGS, model_dir

__all__ = ["run_hf_ken_trial", "run_text_trial", "text_datamodule"]

log = logging.getLogger("search")

# Per-process caches (Ray reuses worker processes across trials).
_TEXT_CACHE: dict[str, TextDataModule] = {}
_DENSE_CACHE: dict[str, dict[str, float]] = {}


def text_datamodule(data_cfg: Mapping[str, Any], tokenizer_dir: Path, tokenizer: Any, seed: int,
                    device: str = "cpu") -> TextDataModule:
    """The tokenised data module of ``data_cfg`` with the tokenizer in ``tokenizer_dir`` (cached per process)."""
    key = json.dumps({"data": dict(data_cfg), "tokenizer": str(tokenizer_dir), "seed": seed, "device": device},
                     sort_keys=True, default=str)
    if key not in _TEXT_CACHE:
        args = {k: data_cfg[k] for k in TEXT_DATA_ARGS if k in data_cfg}
        args["path"] = resolve_launch_path(str(args["path"]))
        if args.get("test_path"):
            args["test_path"] = resolve_launch_path(str(args["test_path"]))
        _TEXT_CACHE[key] = build_text_datamodule(tokenizer=tokenizer, seed=seed, device=device, **args)
    return _TEXT_CACHE[key]


def _load_model(model_dir: Path, model_cfg: Mapping[str, Any], dm: TextDataModule) -> nn.Module:
    task = str(model_cfg.get("task", "auto"))
    if task == "auto":
        task = "causal_lm" if dm.task == "lm" else "classification"
    model = load_hf_model(model_dir, task=task, num_labels=dm.num_classes if task == "classification" else None,
                          dtype=model_cfg.get("dtype"))
    kind = hf_task_of(model)
    if (dm.task == "lm") != (kind == "causal_lm"):
        raise HFModelError(f"model.path: {model_dir} loads as {type(model).__name__} ({kind}), but data.path holds "
                           f"{'language-modelling text' if dm.task == 'lm' else 'a classification table'}")
    return model


def _scores(model: nn.Module, dm: TextDataModule, split: str) -> dict[str, float]:
    result = evaluate_text(model, dm, split)
    keys = ("loss", "ppl", "acc") if dm.task == "lm" else ("loss", "acc")
    return {k: float(result[k]) for k in keys}


def run_text_trial(req: TrialRequest) -> dict[str, Any]:
    """One one-shot pruning trial of a Hugging Face text model (see the module docstring);
    returns the trial's row.

    Raises:
        TrialFailed: the pruned model's loss is not finite, or the model and data do not fit
            together.
    """
    ctx, trial_id, trial_dir, trial = req.ctx, req.trial_id, req.trial_dir, req.trial
    method_name, settings, overrides, start = req.method_name, req.settings, req.overrides, req.start
    seed = int(trial.seed)
    device = trial_device(trial)
    method = build_trial_method(ctx, method_name, settings)
    hf_dir = model_dir(ctx.model)
    tokenizer = load_tokenizer(hf_dir)
    t_data = time.perf_counter()
    dm = text_datamodule(ctx.data, hf_dir, tokenizer, seed)
    data_s = time.perf_counter() - t_data
    try:
        model = _load_model(hf_dir, ctx.model, dm)
    except HFModelError as exc:
        raise TrialFailed(f"trial {trial_id}: {exc}") from exc
    dense_key = json.dumps({"model": dict(ctx.model), "data": dict(ctx.data), "seed": seed}, sort_keys=True, default=str)
    if dense_key not in _DENSE_CACHE:
        _DENSE_CACHE[dense_key] = _scores(model.to(device), dm, "val")
        model.to("cpu")
    dense = _DENSE_CACHE[dense_key]
    # The model stays on the CPU while it is pruned; each block visits the trial's device in turn.
    method.device = device
    method.progress = lambda line: log.info("trial %s: %s", trial_id, line)
    method.setup(model, dm)
    t0 = time.perf_counter()
    try:
        masks = method.finalize(model)
    except (ValueError, torch.OutOfMemoryError) as exc:
        raise TrialFailed(f"trial {trial_id}: {method_name}: {str(exc)[:400]}") from exc
    prune_s = time.perf_counter() - t0
    model.to(device)
    val = _scores(model, dm, "val")
    if not math.isfinite(val["loss"]):
        raise TrialFailed(f"trial {trial_id}: the pruned model's validation loss is not finite")
    cost = text_model_cost(model, dm.example_input(), masks)
    result = method.result
    metrics: dict[str, Any] = {
        **{f"val_{k}": v for k, v in val.items()}, **{f"dense_val_{k}": v for k, v in dense.items()},
        "sparsity": sparsity_report(model, masks)["global"]["sparsity"],
        "block_sparsity": result.pruned_sparsity if result is not None else 0.0,
        "sparse_bytes": sparse_storage_bytes(model, masks, parse_pattern(method.pattern)),
        "dense_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "prune_s": prune_s, "calibration_tokens": result.calibration_tokens if result is not None else 0,
        "epochs": 0, "extra_forward_passes": method.cost.extra_forward_passes, "extra_backward_passes": 0,
        "extra_params": 0, **cost.as_dict(), "artifact": "masked"}  # masks only: flops_deployed = effective
    metrics.update(method.method_metrics())  # the figures the method declares (reported_metrics)
    if trial.evaluate_test:
        metrics.update({f"test_{k}": v for k, v in _scores(model, dm, "test").items()})
    out_dir = trial_output_dir(trial_dir, trial_id)
    masks_path = masks.save(out_dir / "masks.safetensors", model, method=method_name, config=settings,
                            trial_id=trial_id, data=ctx.data["name"], model_name="hf", model_path=str(hf_dir),
                            flops=cost.as_dict())
    layers_path = out_dir / "layer_sparsity.json"
    atomic_write_text(layers_path, json.dumps({"layers": result.layers if result is not None else {},
                                               "block_sparsity": result.block_sparsity if result is not None else [],
                                               "outlier_ratios": result.outlier_ratios if result is not None else []},
                                              indent=1, default=str))
    keep = trial.keep_weights
    kept: dict[str, Any] = {"keep_weights": keep}
    artifacts = {"masks": str(masks_path), "layers": str(layers_path)}
    if keep != "none":  # the pruned model as measured, zeros in place, loadable by transformers too
        manifest = save_pruned(out_dir, model, ModelSpec("hf", {"path": HF_DIR, "hf_class": type(model).__name__}),
                               "masked", tokenizer=tokenizer)
        kept["artifact_dir"] = str(out_dir)
        artifacts["pruned"] = str(manifest)
        live = TrialRun.current(trial_id)
        if live is not None:
            kept["model_uri"] = live.log_model(model, None, json.loads(manifest.read_text()))
    metrics["wall_s"] = time.perf_counter() - start
    return record_trial(ctx, trial_id, method_name, settings, overrides, metrics, out_dir,
                        extra={"masks_path": str(masks_path), "data_load_s": data_s,
                               "trial_wall_s": time.perf_counter() - start, **kept},
                        artifacts=artifacts)


def run_hf_ken_trial(req: TrialRequest) -> dict[str, Any]:
    """KEN on a Hugging Face pair (``pair.pretrained``, ``pair.finetuned``) scored on ``data=text``."""
    from search.trials.ken import finish_ken_trial  # the KEN trial's common end (imports the training stack)

    ctx, trial_id, trial_dir, trial = req.ctx, req.trial_id, req.trial_dir, req.trial
    settings, overrides, start = req.settings, req.overrides, req.start
    device = trial_device(trial)
    method = build_trial_method(ctx, req.method_name, settings)
    plan = method.pair_plan()
    if plan.pretrained is None or plan.finetuned is None:
        raise TrialFailed(f"trial {trial_id}: KEN on model=hf needs pair.pretrained=DIR pair.finetuned=DIR")
    ft_dir = resolve_launch_path(plan.finetuned)
    tokenizer = load_tokenizer(ft_dir, key="pair.finetuned")
    t_data = time.perf_counter()
    dm = text_datamodule(ctx.data, ft_dir, tokenizer, int(trial.seed))
    data_s = time.perf_counter() - t_data
    try:
        ft = load_hf_model(ft_dir, key="pair.finetuned")
        # The fine-tuned class and labels decide; a base checkpoint gets a new head (and, after
        # masked-LM pretraining, a new pooler): those have no pretrained value to revert to.
        pre, untrained = load_hf_model(resolve_launch_path(plan.pretrained), hf_class=type(ft).__name__,
                                       num_labels=getattr(ft.config, "num_labels", None), key="pair.pretrained",
                                       loading_info=True)
    except HFModelError as exc:
        raise TrialFailed(f"trial {trial_id}: {exc}") from exc
    method.set_untrained(untrained)
    kind = hf_task_of(ft)
    if (dm.task == "lm") != (kind == "causal_lm"):
        raise TrialFailed(f"trial {trial_id}: pair.finetuned is a {type(ft).__name__}, but data.path holds "
                          f"{'language-modelling text' if dm.task == 'lm' else 'a classification table'}")
    if dm.task == "classification" and getattr(ft.config, "num_labels", dm.num_classes) != dm.num_classes:
        raise TrialFailed(f"trial {trial_id}: pair.finetuned has {ft.config.num_labels} labels, data.path "
                          f"{dm.num_classes} classes")
    pre, ft = pre.to(device), ft.to(device)
    pair_info = {"cached": True, "pretrain_epochs": 0, "finetune_epochs": 0,
                 "path": f"{plan.pretrained} + {plan.finetuned}", "untrained": untrained}
    example = dm.example_input()
    return finish_ken_trial(method, settings, overrides, ctx, pre, ft, pair_info,
                            lambda net, split: _scores(net, dm, split),
                            lambda net: text_model_cost(net, example, None), trial, trial_id=trial_id,
                            trial_dir=trial_dir, start=start, data_s=data_s, model_args={},
                            delta_metadata={"hf_class": type(ft).__name__,
                                            "num_labels": getattr(ft.config, "num_labels", None),
                                            "pretrained_dir": str(plan.pretrained)},
                            spec=ModelSpec("hf", {"path": HF_DIR, "hf_class": type(ft).__name__}),
                            tokenizer=tokenizer)
