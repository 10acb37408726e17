"""The configs of Hugging Face text sweeps (``model=hf``, ``data=text``): recognised, checked and
read once on the driver, before any trial starts. The trials themselves are :mod:`search.trials.text`.

Imported by the pre-flight and the trial-kind registry: no transformers at import (the tokenizer
is loaded only by :func:`check_text_data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunelib.data.text import TextDataError, read_text_records
from prunelib.models.hf import HFModelError, is_hf_dir, load_tokenizer
from search.settings import check_fraction
from search.space import ConfigError, load_method_configs, method_class
from search.trials.context import resolve_launch_path
from search.trials.metrics import TEST_PPL, VAL_PPL
from search.trials.text_task import default_text_objectives, is_missing, is_text_config, text_task

__all__ = ["HF_MODEL_KEYS", "TEXT_DATA_ARGS", "TEXT_DATA_KEYS", "check_text_data", "default_text_objectives",
           "check_text_methods", "is_text_config", "method_pool", "model_dir", "methods_for_model", "text_task",
           "validate_text_config"]

#: Keys of ``data=text`` passed to :func:`prunelib.data.text.build_text_datamodule`.
TEXT_DATA_ARGS = ("path", "test_path", "task", "text_column", "label_column", "max_length", "val_fraction",
                  "test_fraction", "batch_size", "eval_batch_size", "limit_train", "limit_eval")
#: Keys of ``data=text`` and ``model=hf`` (conf/data/text.yaml, conf/model/hf.yaml).
TEXT_DATA_KEYS = frozenset(TEXT_DATA_ARGS + ("name",))
HF_MODEL_KEYS = frozenset(("name", "path", "task", "dtype"))


def _model_kinds(name: str, cfg: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The model kinds method ``name`` declares (its config's ``_target_`` class, else the
    registered one); () for a method that cannot be resolved (the method checks name it)."""
    try:
        return method_class(name, (cfg or {}).get("_target_")).model_kinds
    except ConfigError:
        return ()


def methods_for_model(configs: dict[str, dict[str, Any]], model_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs an unpinned sweep covers for this model.

    ``model=hf``: the methods that declare ``model_kinds`` with ``"hf"`` (the LLM pruners; KEN
    needs a pair and is run pinned: ``+method=ken``). Other models: every method that does not
    declare model kinds (the LLM pruners need transformer blocks and text).
    """
    if (model_cfg or {}).get("name") == "hf":
        return {n: c for n, c in configs.items() if "hf" in _model_kinds(n, c)}
    return {n: c for n, c in configs.items() if not _model_kinds(n, c)}


def validate_text_config(cfg: Mapping[str, Any]) -> None:
    """Check the data/model sections of a text sweep; raise ConfigError naming the first bad key."""
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    method = cfg.get("method") or {}
    if model.get("name") != "hf":
        raise ConfigError(f"model.name: data=text needs model=hf (a local Hugging Face checkpoint), got "
                          f"{model.get('name')!r}")
    if data.get("name") != "text":
        raise ConfigError(f"data.name: model=hf needs data=text (a local text file), got {data.get('name')!r}")
    if is_missing(data.get("path")):
        raise ConfigError("data.path: set it to a local CSV/JSONL/Parquet of text,label or a .txt file/directory")
    for key in ("max_length", "batch_size", "eval_batch_size"):
        value = data.get(key, 2)
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "max_length" else 1):
            raise ConfigError(f"data.{key}: {value!r} must be an integer >= {2 if key == 'max_length' else 1}")
    for key in ("val_fraction", "test_fraction"):
        if key in data:  # absent: the text door's own default
            check_fraction(f"data.{key}", data[key])
    pinned_ken = method.get("name") == "ken"
    if pinned_ken:
        settings = method.get("settings") or {}
        if is_missing(settings.get("pretrained")) or is_missing(settings.get("finetuned")):
            raise ConfigError("pair.pretrained: KEN on a Hugging Face model needs pair.pretrained=DIR "
                              "pair.finetuned=DIR (two checkpoint directories)")
    elif is_missing(model.get("path")):
        raise ConfigError("model.path: set it to a local Hugging Face model directory (config.json, weights, tokenizer)")
    if method and not pinned_ken and "hf" not in _model_kinds(str(method.get("name")), method):
        raise ConfigError(f"method: {method.get('name')!r} does not prune Hugging Face text models; use "
                          f"llm_magnitude, wanda, sparsegpt, llm_structured or ken")


def model_dir(model_cfg: Mapping[str, Any], key: str = "model.path") -> Path:
    """The Hugging Face model directory ``model.path`` names, resolved from the launch directory.

    Raises:
        ConfigError: it holds no ``config.json``.
    """
    p = resolve_launch_path(str(model_cfg["path"]))
    if not is_hf_dir(p):
        raise ConfigError(f"{key}: {p} is not a Hugging Face model directory (no config.json)")
    return p


def check_text_data(cfg: Mapping[str, Any]) -> None:
    """Read the text file and load the tokenizer once on the driver, before any trial starts."""
    data, model = cfg["data"], cfg["model"]
    method = cfg.get("method") or {}
    objectives = (method.get("objectives") or (cfg.get("search") or {}).get("objectives") or [])
    try:
        records = read_text_records(resolve_launch_path(str(data["path"])), data.get("text_column", "text"),
                                    data.get("label_column", "label"))
        classification = data.get("task", "auto") == "classification" or (
            data.get("task", "auto") == "auto" and records.labels is not None)
        for i, obj in enumerate(objectives):
            if classification and obj.get("metric") in (VAL_PPL, TEST_PPL):
                raise ConfigError(f"search.objectives[{i}].metric: {obj['metric']} needs language-modelling "
                                  f"text; {data['path']} is a classification table (use val_acc)")
        if data.get("test_path"):
            read_text_records(resolve_launch_path(str(data["test_path"])), data.get("text_column", "text"),
                              data.get("label_column", "label"))
        if method.get("name") == "ken":
            settings = method.get("settings") or {}
            for key in ("pretrained", "finetuned"):
                if not is_hf_dir(resolve_launch_path(str(settings[key]))):
                    raise ConfigError(f"pair.{key}: {settings[key]} is not a Hugging Face model directory")
            load_tokenizer(resolve_launch_path(str(settings["finetuned"])), key="pair.finetuned")
        else:
            load_tokenizer(model_dir(model), key="model.path")
    except (TextDataError, HFModelError) as exc:
        raise ConfigError(str(exc)) from exc


def check_text_methods(cfg: Mapping[str, Any]) -> None:
    """Build each method of the sweep that checks itself against a model (``check_model``, e.g.
    ``llm_structured``) and run that check once on ``model.path``'s architecture, built on the
    meta device from its ``config.json`` (no weights read): a model whose blocks cannot be found
    or that is not a transformer, a ``keep_heads`` that breaks a GQA group, a depth that removes
    every block, per-block fractions of the wrong length. The method's fixed settings are
    checked, and each searched setting at the ends of its range (and each choice).

    Raises:
        ConfigError: one line naming ``method[NAME].settings`` or ``method[NAME].space.KEY``.
    """
    from search.space import method_space

    pool = {n: c for n, c in method_pool(cfg).items()
            if callable(getattr(method_class(n, c.get("_target_")), "check_model", None))}
    if not pool or (cfg.get("method") or {}).get("name") == "ken":
        return
    model = _meta_model(cfg)
    for name, mcfg in pool.items():
        cls = method_class(name, mcfg.get("_target_"))
        space = method_space(mcfg)
        # A vector entry (``size:``) is built at its length, so a size that is not the model's
        # block count fails here naming the entry.
        for where, settings in space.probes():
            try:
                cls(**settings).check_model(model)
            except (ValueError, TypeError) as exc:
                line = str(exc).strip().splitlines()[-1]
                if line.startswith("model: "):  # the model is at fault, whatever the settings
                    raise ConfigError(f"model.path: {line[len('model: '):]} ({name} needs one)") from exc
                raise ConfigError(f"{where}: {line}") from exc


def _meta_model(cfg: Mapping[str, Any]) -> Any:
    """``model.path``'s architecture with no weights (meta device), as the trials load it."""
    import torch

    from prunelib.models.hf import _transformers

    tf = _transformers()
    path = model_dir(cfg["model"])
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: {path}: {str(exc).strip().splitlines()[-1][:300]}") from exc
    task = text_task(cfg["data"], cfg["model"])
    auto = tf.AutoModelForSequenceClassification if task == "classification" else tf.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"model.path: {path} does not build as {auto.__name__}: "
                          f"{str(exc).strip().splitlines()[-1][:300]}") from exc


def method_pool(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs this sweep covers: the pinned one, or the unpinned pool (those found on
    Hydra's search path, ``method_pool``; else the package's ``conf/method``), narrowed to
    ``search.methods`` when given."""
    if cfg.get("method"):
        method = dict(cfg["method"])
        return {str(method.get("name")): method}
    # model=hf: the LLM pruners only; other models: every method that is not one.
    pool = methods_for_model(dict(cfg.get("method_pool") or load_method_configs()), cfg.get("model") or {})
    wanted = (cfg.get("search") or {}).get("methods")
    if wanted:
        missing = [m for m in wanted if m not in pool]
        if missing:
            raise ConfigError(f"search.methods: {missing} not found; available: {sorted(pool)}")
        pool = {m: pool[m] for m in wanted}
    return pool
