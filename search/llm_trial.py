"""Trials of Hugging Face text models: one-shot LLM pruning, and KEN on a local (pretrained, fine-tuned) pair.

``model=hf model.path=DIR data=text data.path=FILE`` runs these trials instead of the training
trials of :mod:`search.trial` (which hands over in its first lines):

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

The shared files only dispatch here: :func:`is_text_config` (config checks, trial routing),
:func:`methods_for_model` (which method configs an unpinned sweep covers).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunelib.artifact import HF_DIR, ModelSpec, save_pruned
from prunelib.data.text import TextDataError, TextDataModule, build_text_datamodule, read_text_records
from prunelib.llm import evaluate_text, sparse_storage_bytes, text_model_cost
from prunelib.llm.sparsity import parse_pattern
from prunelib.masks import sparsity_report
from prunelib.methods import METHODS, build_method
from prunelib.models.hf import HFModelError, hf_task_of, is_hf_dir, load_hf_model, load_tokenizer
from search.space import ConfigError, settings_from_params

__all__ = ["HF_MODEL_KEYS", "TEXT_DATA_KEYS", "TEXT_OBJECTIVES", "check_text_data", "is_text_config", "methods_for_model",
           "run_hf_ken_trial",
           "run_llm_trial", "text_reports", "validate_text_config"]

log = logging.getLogger("search")

#: Objectives only text trials report (``val_acc``/``val_loss`` and the FLOPs are shared).
TEXT_OBJECTIVES = ("val_ppl", "test_ppl", "sparse_bytes", "block_sparsity")
_DATA_KEYS = ("path", "test_path", "task", "text_column", "label_column", "max_length", "val_fraction",
              "test_fraction", "batch_size", "eval_batch_size", "limit_train", "limit_eval")
#: Keys of ``data=text`` and ``model=hf`` (conf/data/text.yaml, conf/model/hf.yaml).
TEXT_DATA_KEYS = frozenset(_DATA_KEYS + ("name",))
HF_MODEL_KEYS = frozenset(("name", "path", "task", "dtype"))
# Per-process caches (Ray reuses worker processes across trials).
_TEXT_CACHE: dict[str, TextDataModule] = {}
_DENSE_CACHE: dict[str, dict[str, float]] = {}


def is_text_config(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> bool:
    """Whether a sweep runs Hugging Face text trials (``model=hf`` or ``data=text``)."""
    return (model_cfg or {}).get("name") == "hf" or (data_cfg or {}).get("name") == "text"


def _model_kinds(name: str) -> tuple[str, ...]:
    cls = METHODS.get(name)
    return tuple(getattr(cls, "model_kinds", ()) or ())


def methods_for_model(configs: dict[str, dict[str, Any]], model_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs an unpinned sweep covers for this model.

    ``model=hf``: the methods that declare ``model_kinds`` with ``"hf"`` (the LLM pruners; KEN
    needs a pair and is run pinned: ``+method=ken``). Other models: every method that does not
    declare model kinds (the LLM pruners need transformer blocks and text).
    """
    if (model_cfg or {}).get("name") == "hf":
        return {n: c for n, c in configs.items() if "hf" in _model_kinds(n)}
    return {n: c for n, c in configs.items() if not _model_kinds(n)}


def text_reports(cfg: Mapping[str, Any], method_class: type) -> set[str]:
    """The metrics a text trial of ``method_class`` reports (the pre-flight checks objectives
    against them; FLOPs and parameter counts are added by the caller)."""
    trial = cfg.get("trial") or {}
    splits = ("val", "test") if trial.get("evaluate_test", True) else ("val",)
    scores = {f"{split}_{k}" for split in splits for k in ("loss", "acc", "ppl")}
    common = {"sparsity", "epochs", "wall_s", "trial_wall_s", "data_load_s", "extra_forward_passes",
              "extra_backward_passes", "extra_params"}
    if getattr(method_class, "needs_pair", False):  # KEN on a Hugging Face pair
        return scores | common | {"finetuned_val_acc", "pretrained_val_acc", "reverted_fraction",
                                  "reverted_fraction_selected", "kept_finetuned_params", "select_s",
                                  "ken_file_bytes", "finetuned_bytes", "ken_file_ratio", "ken_kept_values",
                                  "ken_whole_tensors", "pair_epochs"}
    return scores | common | {"dense_val_loss", "dense_val_acc", "dense_val_ppl", "block_sparsity",
                              "sparse_bytes", "dense_bytes", "prune_s", "calibration_tokens"}


def _missing(value: Any) -> bool:
    return value is None or value == "???" or value == ""


def validate_text_config(cfg: Mapping[str, Any]) -> None:
    """Check the data/model sections of a text sweep; raise ConfigError naming the first bad key."""
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    method = cfg.get("method") or {}
    if model.get("name") != "hf":
        raise ConfigError(f"model.name: data=text needs model=hf (a local Hugging Face checkpoint), got "
                          f"{model.get('name')!r}")
    if data.get("name") != "text":
        raise ConfigError(f"data.name: model=hf needs data=text (a local text file), got {data.get('name')!r}")
    if _missing(data.get("path")):
        raise ConfigError("data.path: set it to a local CSV/JSONL/Parquet of text,label or a .txt file/directory")
    for key in ("max_length", "batch_size", "eval_batch_size"):
        value = data.get(key, 2)
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "max_length" else 1):
            raise ConfigError(f"data.{key}: {value!r} must be an integer >= {2 if key == 'max_length' else 1}")
    for key in ("val_fraction", "test_fraction"):
        value = data.get(key, 0.1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"data.{key}: {value!r} must be a fraction in (0, 1)")
    pinned_ken = method.get("name") == "ken"
    if pinned_ken:
        settings = method.get("settings") or {}
        if _missing(settings.get("pretrained")) or _missing(settings.get("finetuned")):
            raise ConfigError("pair.pretrained: KEN on a Hugging Face model needs pair.pretrained=DIR "
                              "pair.finetuned=DIR (two checkpoint directories)")
    elif _missing(model.get("path")):
        raise ConfigError("model.path: set it to a local Hugging Face model directory (config.json, weights, tokenizer)")
    if method and not pinned_ken and "hf" not in _model_kinds(str(method.get("name"))):
        raise ConfigError(f"method: {method.get('name')!r} does not prune Hugging Face text models; use "
                          f"llm_magnitude, wanda, sparsegpt or ken")


def _launch_path(path: str) -> Path:
    from search.pair import _resolve

    return _resolve(path)


def _model_dir(model_cfg: Mapping[str, Any], key: str = "model.path") -> Path:
    p = _launch_path(str(model_cfg["path"]))
    if not is_hf_dir(p):
        raise ConfigError(f"{key}: {p} is not a Hugging Face model directory (no config.json)")
    return p


def check_text_data(cfg: Mapping[str, Any]) -> None:
    """Read the text file and load the tokenizer once on the driver, before any trial starts."""
    data, model = cfg["data"], cfg["model"]
    method = cfg.get("method") or {}
    objectives = (method.get("objectives") or (cfg.get("search") or {}).get("objectives") or [])
    try:
        records = read_text_records(_launch_path(str(data["path"])), data.get("text_column", "text"),
                                    data.get("label_column", "label"))
        classification = data.get("task", "auto") == "classification" or (
            data.get("task", "auto") == "auto" and records.labels is not None)
        for i, obj in enumerate(objectives):
            if classification and obj.get("metric") in ("val_ppl", "test_ppl"):
                raise ConfigError(f"search.objectives[{i}].metric: {obj['metric']} needs language-modelling "
                                  f"text; {data['path']} is a classification table (use val_acc)")
        if data.get("test_path"):
            read_text_records(_launch_path(str(data["test_path"])), data.get("text_column", "text"),
                              data.get("label_column", "label"))
        if method.get("name") == "ken":
            settings = method.get("settings") or {}
            for key in ("pretrained", "finetuned"):
                if not is_hf_dir(_launch_path(str(settings[key]))):
                    raise ConfigError(f"pair.{key}: {settings[key]} is not a Hugging Face model directory")
            load_tokenizer(_launch_path(str(settings["finetuned"])), key="pair.finetuned")
        else:
            load_tokenizer(_model_dir(model), key="model.path")
    except (TextDataError, HFModelError) as exc:
        raise ConfigError(str(exc)) from exc


def text_datamodule(data_cfg: Mapping[str, Any], tokenizer_dir: Path, tokenizer: Any, seed: int,
                    device: str = "cpu") -> TextDataModule:
    """The tokenised data module of ``data_cfg`` with the tokenizer in ``tokenizer_dir`` (cached per process)."""
    key = json.dumps({"data": dict(data_cfg), "tokenizer": str(tokenizer_dir), "seed": seed, "device": device},
                     sort_keys=True, default=str)
    if key not in _TEXT_CACHE:
        args = {k: data_cfg[k] for k in _DATA_KEYS if k in data_cfg}
        args["path"] = _launch_path(str(args["path"]))
        if args.get("test_path"):
            args["test_path"] = _launch_path(str(args["test_path"]))
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


def run_llm_trial(params: dict[str, Any], ctx: Any, *, trial_id: str = "local", trial_dir: Any = None,
                  report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One text trial (see the module docstring); returns the trial's row.

    Raises:
        search.trial.TrialFailed: the pruned model's loss is not finite, or the model and data
            do not fit together.
    """
    from search.keep import keep_policy
    from search.mlflow_trial import TrialRun
    from search.trial import TrialFailed, _device, record_trial, trial_output_dir

    start = time.perf_counter()
    method_name, settings, overrides = settings_from_params(ctx.space, params)
    trial_cfg = {**ctx.trial, **overrides}
    seed = int(trial_cfg.get("seed", 0))
    device = _device(trial_cfg)
    method = build_method(method_name, **settings)
    if getattr(method, "needs_pair", False):
        return run_hf_ken_trial(method, settings, overrides, ctx, trial_cfg, device, trial_id=trial_id,
                                trial_dir=trial_dir, start=start)
    if "hf" not in tuple(getattr(method, "model_kinds", ()) or ()):
        raise TrialFailed(f"trial {trial_id}: method {method_name!r} does not prune Hugging Face text models")
    model_dir = _model_dir(ctx.model)
    tokenizer = load_tokenizer(model_dir)
    t_data = time.perf_counter()
    dm = text_datamodule(ctx.data, model_dir, tokenizer, seed)
    data_s = time.perf_counter() - t_data
    try:
        model = _load_model(model_dir, ctx.model, dm)
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
    if bool(trial_cfg.get("evaluate_test", True)):
        metrics.update({f"test_{k}": v for k, v in _scores(model, dm, "test").items()})
    out_dir = trial_output_dir(trial_dir, trial_id)
    masks_path = masks.save(out_dir / "masks.safetensors", model, method=method_name, config=settings,
                            trial_id=trial_id, data=ctx.data["name"], model_name="hf", model_path=str(model_dir),
                            flops=cost.as_dict())
    layers_path = out_dir / "layer_sparsity.json"
    from search.storage import atomic_write_text

    atomic_write_text(layers_path, json.dumps({"layers": result.layers if result is not None else {},
                                               "block_sparsity": result.block_sparsity if result is not None else [],
                                               "outlier_ratios": result.outlier_ratios if result is not None else []},
                                              indent=1, default=str))
    keep = keep_policy(trial_cfg)
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


def run_hf_ken_trial(method: Any, settings: dict[str, Any], overrides: dict[str, Any], ctx: Any,
                     trial_cfg: dict[str, Any], device: str, *, trial_id: str, trial_dir: Any,
                     start: float) -> dict[str, Any]:
    """KEN on a Hugging Face pair (``pair.pretrained``, ``pair.finetuned``) scored on ``data=text``."""
    from search.pair import finish_ken_trial
    from search.trial import TrialFailed

    plan = method.pair_plan()
    if plan.pretrained is None or plan.finetuned is None:
        raise TrialFailed(f"trial {trial_id}: KEN on model=hf needs pair.pretrained=DIR pair.finetuned=DIR")
    ft_dir = _launch_path(plan.finetuned)
    tokenizer = load_tokenizer(ft_dir, key="pair.finetuned")
    t_data = time.perf_counter()
    dm = text_datamodule(ctx.data, ft_dir, tokenizer, int(trial_cfg.get("seed", 0)))
    data_s = time.perf_counter() - t_data
    try:
        ft = load_hf_model(ft_dir, key="pair.finetuned")
        # The fine-tuned class and labels decide; a base checkpoint gets a new head (and, after
        # masked-LM pretraining, a new pooler): those have no pretrained value to revert to.
        pre, untrained = load_hf_model(_launch_path(plan.pretrained), hf_class=type(ft).__name__,
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
                            lambda net: text_model_cost(net, example, None), trial_cfg, trial_id=trial_id,
                            trial_dir=trial_dir, start=start, data_s=data_s, model_args={},
                            delta_metadata={"hf_class": type(ft).__name__,
                                            "num_labels": getattr(ft.config, "num_labels", None),
                                            "pretrained_dir": str(plan.pretrained)},
                            spec=ModelSpec("hf", {"path": HF_DIR, "hf_class": type(ft).__name__}),
                            tokenizer=tokenizer)
