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

* ``llm_structured`` (any method whose class has ``export``: the model becomes physically
  smaller, :mod:`prunelib.llm.structured_method`): the same scores, but the cost figures are
  the dense model's counted before pruning and the smaller model's physical ones
  (``params_deployed``/``flops_deployed`` = physical), the kept artifact is the method's own
  export (``hf/``: a checkpoint ``transformers`` loads, with ``trust_remote_code=True`` for
  per-layer shapes; the manifest says which), ``latency_ms`` (when an objective or
  ``trial.measure_latency`` asks) is measured on that exported checkpoint loaded back (CPU,
  batch 1, one sequence of ``data.max_length`` tokens), and distillation is in the cost
  (``extra_forward_passes``/``extra_backward_passes``, ``distill_steps``, ``distill_s``).

``layer_sparsity.json`` holds the per-layer figure every trial kind writes (layer name ->
fraction removed; the plots and the dashboard read it); the one-shot details (targets, errors,
outlier ratios) or the structured shapes go in ``llm_layers.json``.

Their configs are recognised and checked on the driver by :mod:`search.trials.text_config`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelib.artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, HF_DIR, ModelSpec, save_pruned, write_manifest
from prunelib.data.text import TextDataModule, build_text_datamodule
from prunelib.llm import evaluate_text, sparse_storage_bytes, text_model_cost
from prunelib.llm.sparsity import parse_pattern
from prunelib.masks import sparsity_report
from prunelib.models.hf import HFModelError, hf_task_of, load_hf_model, load_tokenizer
from search.storage import atomic_write_text
from search.trials.common import (TrialFailed, build_trial_method, note_kept_model, record_trial, trial_device,
                                  trial_output_dir, wants_latency)
from search.trials.context import resolve_launch_path
from search.trials.kinds import TrialRequest, makes_smaller_model
from search.trials.metrics import LATENCY_MS
from search.trials.text_config import TEXT_DATA_ARGS, model_dir

__all__ = ["run_hf_ken_trial", "run_text_trial", "text_datamodule", "text_latency_ms"]

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
    smaller = makes_smaller_model(type(method))
    # A structured method cuts the model in place: the dense figures are counted before it does.
    dense_cost = text_model_cost(model, dm.example_input()) if smaller else None
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
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
    result = method.result
    out_dir = trial_output_dir(trial_dir, trial_id)
    if smaller:
        metrics, layers = _smaller_model_figures(method, model, dm, dense_cost, dense_bytes)
    else:
        cost = text_model_cost(model, dm.example_input(), masks)
        metrics = {
            "sparsity": sparsity_report(model, masks)["global"]["sparsity"],
            "block_sparsity": result.pruned_sparsity if result is not None else 0.0,
            "sparse_bytes": sparse_storage_bytes(model, masks, parse_pattern(method.pattern)),
            "dense_bytes": dense_bytes, "extra_backward_passes": 0,
            **cost.as_dict(), "artifact": "masked"}  # masks only: flops_deployed = effective
        layers = ({name: float(info["sparsity"]) for name, info in result.layers.items()}
                  if result is not None else {},
                  {"layers": result.layers if result is not None else {},
                   "block_sparsity": result.block_sparsity if result is not None else [],
                   "outlier_ratios": result.outlier_ratios if result is not None else []})
    metrics = {
        **{f"val_{k}": v for k, v in val.items()}, **{f"dense_val_{k}": v for k, v in dense.items()},
        "prune_s": prune_s, "calibration_tokens": result.calibration_tokens if result is not None else 0,
        "epochs": 0, "extra_forward_passes": method.cost.extra_forward_passes, "extra_params": 0, **metrics}
    metrics.update(method.method_metrics())  # the figures the method declares (reported_metrics)
    if trial.evaluate_test:
        metrics.update({f"test_{k}": v for k, v in _scores(model, dm, "test").items()})
    masks_path = masks.save(out_dir / "masks.safetensors", model, method=method_name, config=settings,
                            trial_id=trial_id, data=ctx.data["name"], model_name="hf", model_path=str(hf_dir),
                            flops={k: metrics[k] for k in ("params_dense", "params_effective", "params_physical",
                                                           "flops_dense", "flops_effective", "flops_physical",
                                                           "params_deployed", "flops_deployed")})
    # layer_sparsity.json: {layer: fraction removed}, as every trial kind writes it (the plots and
    # the dashboard read it); the method's own per-layer details beside it.
    layers_path = out_dir / "layer_sparsity.json"
    atomic_write_text(layers_path, json.dumps(layers[0], indent=1))
    details_path = out_dir / "llm_layers.json"
    atomic_write_text(details_path, json.dumps(layers[1], indent=1, default=str))
    keep = trial.keep_weights
    kept: dict[str, Any] = {"keep_weights": keep}
    artifacts = {"masks": str(masks_path), "layers": str(layers_path), "llm_layers": str(details_path)}
    if smaller:
        export_dir = out_dir if keep != "none" else Path(tempfile.mkdtemp(prefix=f"prunesearch-{trial_id}-"))
        try:
            manifest, export = _export_smaller_model(method, model, export_dir, tokenizer)
            if wants_latency(ctx, trial):
                metrics[LATENCY_MS] = text_latency_ms(export_dir, dm.example_input())
        finally:
            if keep == "none":
                shutil.rmtree(export_dir, ignore_errors=True)
        metrics["export_format"] = export.format
        if keep != "none":
            note_kept_model(trial_id, model, None, manifest, out_dir, kept, artifacts)
    elif keep != "none":  # the pruned model as measured, zeros in place, loadable by transformers too
        manifest = save_pruned(out_dir, model, ModelSpec("hf", {"path": HF_DIR, "hf_class": type(model).__name__}),
                               "masked", tokenizer=tokenizer)
        note_kept_model(trial_id, model, None, manifest, out_dir, kept, artifacts)
    metrics["wall_s"] = time.perf_counter() - start
    return record_trial(ctx, trial_id, method_name, settings, overrides, metrics, out_dir,
                        extra={"masks_path": str(masks_path), "data_load_s": data_s,
                               "trial_wall_s": time.perf_counter() - start, **kept},
                        artifacts=artifacts)


def _smaller_model_figures(method: Any, model: nn.Module, dm: TextDataModule, dense_cost: Any,
                           dense_bytes: int) -> tuple[dict[str, Any], tuple[dict[str, float], dict[str, Any]]]:
    """The cost figures of a physically smaller model (structured pruning) and its per-layer files.

    Dense figures: the model before pruning (``dense_cost``, ``dense_bytes``); effective,
    physical and deployed: the smaller model itself (the method's ``result.cost``, counted
    on one sequence of ``data.max_length`` tokens). Distillation, when configured, is in the
    passes (the method's ``cost``) and in ``distill_steps``/``distill_s`` (seconds).
    """
    result = method.result
    small = result.cost if result.cost is not None else method.cost_of(model, dm.example_input())
    cost = {**small.as_dict(), "params_dense": dense_cost.params_dense, "flops_dense": dense_cost.flops_dense}
    distill = result.distill
    removed = result.pruned_sparsity  # fraction of the parameters physically removed
    figures = {
        **cost, "artifact": "surgered",
        "sparsity": removed, "block_sparsity": removed,
        # Nothing is stored sparse: the bytes of the smaller model, dense.
        "sparse_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "dense_bytes": dense_bytes,
        "extra_backward_passes": method.cost.extra_backward_passes,
        "distill_steps": distill.steps if distill is not None else 0,
        "distill_s": distill.seconds if distill is not None else 0.0,
    }
    # Per dense block: the fraction of its FFN channels and heads removed (1.0: the block is gone).
    removed_blocks = set(result.removed_blocks)
    kept = iter(zip(result.ffn_fractions, result.head_fractions))
    layers: dict[str, float] = {}
    for i in range(len(result.ffn_fractions) + len(removed_blocks)):
        ffn, heads = (1.0, 1.0) if i in removed_blocks else next(kept)
        layers[f"block{i}.ffn"], layers[f"block{i}.heads"] = float(ffn), float(heads)
    return figures, (layers, result.summary())


def _export_smaller_model(method: Any, model: nn.Module, out_dir: Path, tokenizer: Any) -> tuple[Path, Any]:
    """The method's export of the smaller model in ``out_dir/hf`` and the artifact manifest that
    names it (:mod:`prunelib.artifact`: ``load_pruned(out_dir)`` loads it back; the manifest's
    spec carries ``trust_remote_code`` when the checkpoint needs its loader file)."""
    export = method.export(model.to("cpu"), out_dir / HF_DIR, tokenizer)
    remote = export.format == "remote_code"
    spec = ModelSpec("hf", {"path": HF_DIR, "hf_class": export.auto_class if remote else type(model).__name__,
                            "trust_remote_code": remote, "format": export.format})
    weights = sorted(str(p.relative_to(out_dir)) for p in (out_dir / HF_DIR).iterdir()
                     if p.is_file() and p.suffix in (".safetensors", ".bin"))
    files = sorted(str(p.relative_to(out_dir)) for p in (out_dir / HF_DIR).rglob("*") if p.is_file())
    manifest = write_manifest(out_dir, {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "artifact": "surgered",
                                        "spec": spec.as_dict(), "weights": weights, "files": files})
    return manifest, export


@torch.no_grad()
def text_latency_ms(checkpoint_root: Path, example_input: Mapping[str, torch.Tensor], repeats: int = 20) -> float:
    """Median wall milliseconds of one forward pass of the exported model, loaded back from
    ``checkpoint_root`` (:func:`prunelib.artifact.load_pruned`) on the CPU, batch 1 (one
    sequence of ``example_input``), after 3 warm-up passes."""
    from prunelib.artifact import load_pruned

    net = load_pruned(checkpoint_root, device="cpu")
    batch = {k: v[:1].to("cpu") for k, v in example_input.items()}
    for _ in range(3):
        net(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(**batch)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return times[len(times) // 2]


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
