"""Every check that can fail before Ray starts, in one place.

:func:`preflight` takes the resolved config and either returns what the sweep needs (the
search space, the objectives, the data's input shape and class count) or raises one
:class:`~search.space.ConfigError` whose message starts with the key at fault. It

1. checks every key of ``search``, ``trial``, ``data``, ``model``, ``module``, ``cluster``,
   ``tracking`` and each method (``settings``, ``space`` with ``when:``) against a schema;
   unknown keys are errors, numbers must be finite;
2. checks that every objective is a metric each chosen method reports with these settings
   (see *Reported metrics* below);
3. builds the data and the model once and runs the model on one real batch (and a user's
   LightningModule on one validation batch, to learn what it logs);
4. opens the tracking store, the Optuna store and ``search.storage``;
5. compares the trial's resources with what the cluster has (local clusters here; a remote
   Ray cluster right after connecting, :func:`check_cluster_resources`).

Reported metrics: a trial *kind* says which metrics its trials report. :data:`TRIAL_KINDS`
holds the kinds in order (the first whose ``applies(method_class)`` is true is the method's);
``reports(cfg, logged)`` gives its metrics. A new trial kind (an LLM one-shot trial, ...)
registers itself with :func:`register_trial_kind`; a method adds metrics of its own by
declaring ``reported_metrics: ClassVar[tuple[str, ...]]`` on its class. A user's
LightningModule reports what it logged in the pre-flight validation pass.

Schema: the ``SEARCH_KEYS``, ``TRIAL_KEYS``, ... tables below; a new setting is one entry there
(``TrainConfig`` fields are accepted as ``trial`` keys automatically, by their annotation).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.keep import KEEP_WEIGHTS
from search.space import ConfigError, SearchSpace, load_method_configs, method_class, method_space
from search.trials.kinds import TRIAL_KINDS, TrialKind, register_trial_kind, reported_metrics  # the trial kinds

__all__ = ["BuildProcess", "CheckFn", "PreflightResult", "SAMPLERS", "TRIAL_KINDS", "TrialKind", "apply_build",
           "build_check", "check_cluster_resources", "method_pool", "open_sweep_stores", "preflight",
           "register_trial_kind", "reported_metrics", "validate_schema"]

SAMPLERS = ("mo_tpe", "nsga2", "random")
#: A metric of the test split (test_acc, test_ppl, val_test_x...): never a search objective.
TEST_SPLIT_METRIC = re.compile(r"(^|_)test(_|$)")
CheckFn = Callable[[str, Any], None]

# ---------------------------------------------------------------------------------------------
# Value checks: each takes (key, value) and raises ConfigError naming the key.
# ---------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int | None = None) -> CheckFn:
    def check(where: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and math.isfinite(v) and v == int(v):
                v = int(v)
            else:
                raise ConfigError(f"{where}: {v!r} is not an integer")
        if low is not None and v < low:
            raise ConfigError(f"{where}: {v!r} must be >= {low}")
    return check


def number(low: float | None = None, strict: bool = False, high: float | None = None,
           strict_high: bool = False) -> CheckFn:
    def check(where: str, v: Any) -> None:
        if not _is_number(v):
            raise ConfigError(f"{where}: {v!r} is not a number")
        if not math.isfinite(v):
            raise ConfigError(f"{where}: {v!r} is not a finite number")
        if low is not None and (v <= low if strict else v < low):
            raise ConfigError(f"{where}: {v!r} must be {'>' if strict else '>='} {low}")
        if high is not None and (v >= high if strict_high else v > high):
            raise ConfigError(f"{where}: {v!r} must be {'<' if strict_high else '<='} {high}")
    return check


def boolean(where: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {v!r} must be true or false")


def text(where: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: {v!r} must be a non-empty string")


def one_of(*choices: Any) -> CheckFn:
    def check(where: str, v: Any) -> None:
        if v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {list(choices)}")
    return check


def optional(inner: CheckFn) -> CheckFn:
    def check(where: str, v: Any) -> None:
        if v is not None:
            inner(where, v)
    return check


def either(*checks: CheckFn) -> CheckFn:
    def check(where: str, v: Any) -> None:
        errors = []
        for c in checks:
            try:
                c(where, v)
                return
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{where}: {v!r}: " + " / ".join(errors))
    return check


def mapping(where: str, v: Any) -> None:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {v!r}")


def str_list(where: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: expected a list of names, got {v!r}")


def anything(where: str, v: Any) -> None:
    """Any value (checked where it is used)."""


def fraction_open(where: str, v: Any) -> None:
    number(0, strict=True, high=1, strict_high=True)(where, v)


def _image_size(where: str, v: Any) -> None:
    sizes = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(sizes) not in (1, 2):
        raise ConfigError(f"{where}: {v!r} must be an int or [height, width]")
    for s in sizes:
        integer(1)(where, s)


def _lightning_precisions() -> tuple[str, ...]:
    try:
        from lightning.fabric.plugins.precision.precision import (
            _PRECISION_INPUT_INT,
            _PRECISION_INPUT_STR,
            _PRECISION_INPUT_STR_ALIAS,
        )

        values = typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(_PRECISION_INPUT_STR_ALIAS) + \
            tuple(str(i) for i in typing.get_args(_PRECISION_INPUT_INT))
        return tuple(dict.fromkeys(str(v) for v in values))
    except ImportError:  # a Lightning without these names: its own check runs in the trial
        return ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine")


#: Precision strings every Lightning 2 takes: accepted without importing Lightning (5 s of the
#: driver's start); any other value is looked up in Lightning's own list.
_COMMON_PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def precision(where: str, v: Any) -> None:
    if str(v) in _COMMON_PRECISIONS:
        return
    allowed = _lightning_precisions()
    if str(v) not in allowed:
        raise ConfigError(f"{where}: {v!r} is not a Lightning precision; one of {list(allowed)}")


def _faults(where: str, v: Any) -> None:
    from search.faults import FaultPlan

    if v is not None:
        mapping(where, v)
        try:
            FaultPlan.from_config(v)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def _objectives(where: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where}: at least one objective is needed, as [{{metric: NAME, mode: max|min}}, ...]")
    seen = set()
    for i, obj in enumerate(v):
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{where}[{i}]: expected {{metric: NAME, mode: max|min}}, got {obj!r}")
        unknown = set(obj) - {"metric", "mode"}
        if unknown:
            raise ConfigError(f"{where}[{i}]: unknown field(s) {sorted(unknown)}")
        text(f"{where}[{i}].metric", obj.get("metric"))
        one_of("max", "min")(f"{where}[{i}].mode", obj.get("mode"))
        if obj["metric"] in seen:
            raise ConfigError(f"{where}[{i}].metric: {obj['metric']!r} is listed twice")
        if TEST_SPLIT_METRIC.search(str(obj["metric"])):
            # Selecting on the test split makes the reported test number a validation number.
            raise ConfigError(f"{where}[{i}].metric: {obj['metric']!r} is measured on the test split, which a "
                              "search must not select on; use the validation metric (e.g. val_acc, val_ppl) "
                              "and read the test metric of the chosen points afterwards")
        seen.add(obj["metric"])


#: The most trials one sweep may ask for (a typo such as 1e9 is refused, not run for months).
MAX_TRIALS = 100_000


def _n_trials(where: str, v: Any) -> None:
    # Strictly an int: 3.5 and 3.0 alike are refused (a float is a typo or a computed value).
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TRIALS:
        raise ConfigError(f"{where}: {v!r} must be an integer between 1 and {MAX_TRIALS}")


def _in_memory_sqlite(url: str) -> bool:
    rest = url.split("?", 1)[0]
    return rest in ("sqlite://", "sqlite:///", "sqlite:///:memory:") or rest.endswith("/:memory:")


def _tracking_uri(where: str, v: Any) -> None:
    """An in-memory store or MLflow's retired file store is refused before anything starts."""
    text(where, v)
    if _in_memory_sqlite(v):
        raise ConfigError(f"{where}: {v!r}: an in-memory store keeps nothing after the sweep; give a file, "
                          "e.g. sqlite:///mlflow.db")
    if v.startswith("file:") or "://" not in v and not v.startswith(("databricks", "uc:")):
        path = "/" + v[len("file:"):].lstrip("/") if v.startswith("file:") else v
        raise ConfigError(f"{where}: {v!r}: MLflow 3 no longer accepts the file store as a tracking backend; "
                          f"use sqlite:///{path.rstrip('/')}/mlflow.db")


def _optuna_storage(where: str, v: Any) -> None:
    text(where, v)
    if _in_memory_sqlite(v):
        raise ConfigError(f"{where}: {v!r}: an in-memory store keeps nothing after the sweep; give a file, "
                          "e.g. sqlite:///optuna.db")


# ---------------------------------------------------------------------------------------------
# The schema: one table per section. A key not in its table is an error.
# ---------------------------------------------------------------------------------------------
ASHA_KEYS: dict[str, CheckFn] = {
    "enabled": boolean,
    "grace_period": integer(1),
    "reduction_factor": number(1, strict=True),
    "tie_break": text,  # choices: search/schedulers.py
}

BUDGET_KEYS: dict[str, CheckFn] = {
    "amount": anything,  # checked by search.budget.Budget
    "unit": text,  # choices: search/budget.py
}

SEARCH_KEYS: dict[str, CheckFn] = {
    "sampler": one_of(*SAMPLERS),
    "n_trials": lambda where, v: _n_trials(where, v),
    "concurrency": integer(1),
    "seed": integer(0),
    "resume": boolean,
    "resume_dir": optional(text),
    "resume_accept": optional(str_list),
    "n_startup_trials": integer(0),
    "population_size": optional(integer(2)),
    "objectives": _objectives,
    "asha": mapping,
    "search_settings": boolean,
    "storage": optional(text),
    "optuna_storage": optional(lambda where, v: _optuna_storage(where, v)),
    "methods": optional(str_list),
    "scheduler": optional(text),  # choices: search/schedulers.py
    "budget": mapping,
    "seeds": integer(1),
}

TRIAL_KEYS: dict[str, CheckFn] = {
    "epochs": integer(1),
    "finetune_epochs": integer(0),
    "optimizer": one_of("sgd", "adam"),
    "lr": number(0, strict=True),
    "finetune_lr": optional(number(0, strict=True)),
    "momentum": number(0),
    "weight_decay": number(0),
    "cpus": number(0, strict=True),
    "gpus": either(one_of("auto"), number(0)),
    "precision": precision,
    "seed": integer(0),
    "max_retries": integer(0),
    "measure_latency": boolean,
    "latency_batch_size": integer(1),
    "evaluate_test": boolean,
    "fgsm_epsilon": optional(number(0)),
    "export_onnx": boolean,
    "verbose": boolean,
    "faults": _faults,
    "keep_weights": one_of(*KEEP_WEIGHTS),  # search/keep.py
}

DATA_KEYS: dict[str, CheckFn] = {
    "name": text,
    "_target_": optional(text),
    "root": optional(text),
    "download": boolean,
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "val_fraction": fraction_open,
    "test_fraction": fraction_open,
    "limit_train": optional(integer(1)),
    "num_workers": optional(integer(0)),
    "resident": either(boolean, one_of("auto")),
    "resident_max_mb": number(0, strict=True),
    "num_classes": optional(integer(2)),
    "normalize": boolean,
    "image_size": lambda where, v: _image_size(where, v),
    "channels": one_of(1, 3),
    "path": text,
    "label": text,
    "features": optional(str_list),
    "test_path": optional(text),
}

MODEL_KEYS: dict[str, CheckFn] = {"name": text, "_target_": optional(text), "width": number(0, strict=True)}
MODULE_KEYS: dict[str, CheckFn] = {"_target_": optional(text)}

CLUSTER_KEYS: dict[str, CheckFn] = {
    "kind": one_of("local", "ray"),
    "address": optional(text),
    "num_cpus": optional(number(0, strict=True)),
    "num_gpus": optional(number(0)),
    "runtime_env": optional(mapping),
    "log_to_driver": boolean,
}

TRACKING_KEYS: dict[str, CheckFn] = {
    "kind": one_of("sqlite", "server", "none"),
    "uri": optional(lambda where, v: _tracking_uri(where, v)),
    "experiment": text,
    "artifact_location": optional(text),
    "epoch_metrics": boolean,
    "log_model": boolean,
    "system_metrics_s": number(low=0),
}

EXPORT_KEYS: dict[str, CheckFn] = {"front_dir": text}

#: Top-level keys of the resolved config (``method_pool``: the method configs an unpinned sweep
#: found on Hydra's search path, added by ``python -m search`` and ``load_config``).
TOP_LEVEL_KEYS = ("data", "model", "module", "search", "trial", "tracking", "cluster", "method", "method_pool",
                  "sweep_name", "export", "pair")

#: KEN's (pretrained, fine-tuned) pair of checkpoints (``conf/method/ken.yaml`` reads them).
PAIR_KEYS: dict[str, CheckFn] = {"pretrained": optional(text), "finetuned": optional(text)}

METHOD_TOP_KEYS = ("name", "_target_", "settings", "space", "objectives")


def _train_config_keys() -> dict[str, CheckFn]:
    """``TrainConfig`` fields not in TRIAL_KEYS, checked by their annotation (bool/int/float/str)."""
    from prunelib.train_config import TrainConfig

    out: dict[str, CheckFn] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRIAL_KEYS:
            continue
        hint = hints.get(f.name)
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        check = boolean if kind is bool else integer() if kind is int else number() if kind is float else anything
        out[f.name] = optional(check) if type(None) in typing.get_args(hint) else check
    return out


def _check_section(where: str, section: Any, keys: Mapping[str, CheckFn], allowed: Iterable[str] | None = None) -> None:
    if section is None:
        return
    mapping(where, section)
    names = set(keys) if allowed is None else set(allowed)
    for key, value in section.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key; {where} takes {sorted(names)}")
        if key in keys:
            keys[key](f"{where}.{key}", value)


def _check_finite(where: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(f"{where}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(f"{where}[{i}]", v)


def validate_schema(cfg: Mapping[str, Any]) -> None:
    """Schema-check every section of a resolved config (no building, no I/O)."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{key}: unknown top-level key; the config takes {list(TOP_LEVEL_KEYS)}")
    for section in ("data", "model", "module", "search", "trial", "tracking", "cluster", "method"):
        _check_finite(section, cfg.get(section))
    search = cfg.get("search") or {}
    _check_section("search", search, SEARCH_KEYS)
    for required in ("sampler", "n_trials", "objectives"):
        if required not in search and not (required == "objectives" and (cfg.get("method") or {}).get("objectives")):
            raise ConfigError(f"search.{required}: required")
    _check_section("search.asha", search.get("asha") or {}, ASHA_KEYS)
    _check_section("search.budget", search.get("budget") or {}, BUDGET_KEYS)
    _check_early_stopping_and_budget(search, cfg.get("trial") or {})
    trial = cfg.get("trial") or {}
    _check_section("trial", trial, {**TRIAL_KEYS, **_train_config_keys()})
    if "epochs" not in trial:
        raise ConfigError("trial.epochs: required")
    _check_section("cluster", cfg.get("cluster"), CLUSTER_KEYS)
    _check_section("tracking", cfg.get("tracking"), TRACKING_KEYS)
    _check_section("export", cfg.get("export"), EXPORT_KEYS)
    _check_section("pair", cfg.get("pair"), PAIR_KEYS)
    if cfg.get("sweep_name") is not None:
        text("sweep_name", cfg["sweep_name"])
    from search.llm_trial import is_text_config

    if is_text_config(cfg.get("data") or {}, cfg.get("model") or {}):
        _check_text_schema(cfg)
    else:
        _check_data_schema(cfg.get("data") or {})
        _check_model_schema(cfg.get("model") or {})
    _check_speed_settings(trial)
    module = cfg.get("module") or {}
    # A user's module takes its own keys (checked against its signature when it is built).
    _check_section("module", module, MODULE_KEYS, allowed=set(module) if module.get("_target_") else None)
    if cfg.get("method") is not None:
        mapping("method", cfg["method"])


def _check_early_stopping_and_budget(search: Mapping[str, Any], trial: Mapping[str, Any]) -> None:
    """``search.scheduler`` with ``search.asha`` (rungs), ``search.budget`` against the trial's resources."""
    from search.budget import Budget
    from search.schedulers import rung_settings, scheduler_kind

    scheduler_kind(dict(search))
    rung_settings(dict(search))
    Budget.from_config(dict(search), dict(trial))


def _check_data_schema(data: Mapping[str, Any]) -> None:
    from prunelib.data import DATA_SOURCES, data_source_keys

    mapping("data", data)
    target = data.get("_target_")
    name = data.get("name")
    if target == "???":
        raise ConfigError("data._target_: required with data=custom (a dotted path to a function or class "
                          "returning a LightningDataModule or (train, val, test) Datasets)")
    if target is None and name not in DATA_SOURCES:
        raise ConfigError(f"data.name: unknown data set {name!r}; known: {sorted(DATA_SOURCES)}, or "
                          "data=custom data._target_=my_pkg.make_data")
    allowed = data_source_keys(name, target is not None)
    if allowed is not None:
        allowed = allowed | {"name", "_target_"}
    # A user's target takes its own keys (checked against its signature when it is called);
    # the door's keys and ours are checked here.
    ours = set(_door_keys()) | {"name", "_target_"} if allowed is None else allowed
    for key, value in data.items():
        if allowed is not None and key not in allowed:
            raise ConfigError(f"data.{key}: unknown key for data set {name!r}; it takes {sorted(allowed)}")
        if key in DATA_KEYS and key in ours:
            DATA_KEYS[key](f"data.{key}", value)
    if target is None:
        for key in ("path", "label") if name == "table" else ("root",) if name == "image_folder" else ():
            if data.get(key) in (None, "???"):
                raise ConfigError(f"data.{key}: required for data={name}")


def _check_text_schema(cfg: Mapping[str, Any]) -> None:
    """``data=text`` / ``model=hf``: their own keys (``conf/data/text.yaml``, ``conf/model/hf.yaml``)."""
    from search.llm_trial import HF_MODEL_KEYS, TEXT_DATA_KEYS, validate_text_config

    validate_text_config(cfg)  # first: a half-text config (model=hf with data=digits) is named as such
    _check_section("data", cfg.get("data"), {}, allowed=TEXT_DATA_KEYS)
    _check_section("model", cfg.get("model"), {}, allowed=HF_MODEL_KEYS)


def _check_speed_settings(trial: Mapping[str, Any]) -> None:
    """The speed settings' own checks (``TrainConfig``), named as trial keys."""
    from prunelib.train_config import SPEED_SETTINGS, TrainConfig

    try:
        TrainConfig(**{key: trial[key] for key in SPEED_SETTINGS if key in trial})
    except ValueError as exc:
        raise ConfigError(f"trial.{exc}") from exc


def _door_keys() -> set[str]:
    from prunelib.data import DOOR_KEYS

    return set(DOOR_KEYS)


def _check_model_schema(model: Mapping[str, Any]) -> None:
    from prunelib.models import MODELS
    from prunelib.targets import accepted_parameters

    mapping("model", model)
    target = model.get("_target_")
    name = model.get("name")
    if target is None or target == "???":
        if name == "custom" or target == "???":
            raise ConfigError("model._target_: required with model=custom (a dotted path, e.g. "
                              "model._target_=my_pkg.nets.Net)")
        if name not in MODELS:
            raise ConfigError(f"model.name: unknown model {name!r}; known: {sorted(MODELS)}, or model=custom "
                              "model._target_=my_pkg.Net")
        named, var_kw = accepted_parameters(MODELS[name])
        allowed = (named - {"input_shape", "num_classes"}) | {"name"}
        for key, value in model.items():
            if key not in allowed and not var_kw:
                raise ConfigError(f"model.{key}: unknown key for model {name!r}; it takes {sorted(allowed)}")
        if "width" in model:
            MODEL_KEYS["width"]("model.width", model["width"])
        return
    text("model._target_", target)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def method_pool(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs this sweep covers: the pinned one, or the unpinned pool (those found on
    Hydra's search path, ``method_pool``; else the package's ``conf/method``), narrowed to
    ``search.methods`` when given."""
    if cfg.get("method"):
        method = dict(cfg["method"])
        return {str(method.get("name")): method}
    from search.llm_trial import methods_for_model

    # model=hf: the LLM pruners only; other models: every method that is not one.
    pool = methods_for_model(dict(cfg.get("method_pool") or load_method_configs()), cfg.get("model") or {})
    wanted = (cfg.get("search") or {}).get("methods")
    if wanted:
        missing = [m for m in wanted if m not in pool]
        if missing:
            raise ConfigError(f"search.methods: {missing} not found; available: {sorted(pool)}")
        pool = {m: pool[m] for m in wanted}
    return pool


def _method_class(name: str, cfg: Mapping[str, Any] | None) -> type:
    return method_class(name, (cfg or {}).get("_target_"))


def _accepted_settings(cls: type) -> set[str]:
    from prunelib.targets import accepted_parameters

    named, _ = accepted_parameters(cls)
    if dataclasses.is_dataclass(cls):
        named |= {f.name for f in dataclasses.fields(cls)}
    return named


def _construct(cls: type, settings: Mapping[str, Any], where: str) -> None:
    try:
        cls(**settings)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def check_method(name: str, cfg: Mapping[str, Any], *, pinned: bool, search_settings: bool, n_trials: int) -> None:
    """Schema and semantic checks of one method config; errors name ``method[NAME]...``."""
    mapping(f"method[{name}]", cfg)
    cls = _method_class(name, cfg)
    accepted = _accepted_settings(cls)
    for key in cfg:
        if key not in METHOD_TOP_KEYS and key not in accepted:
            raise ConfigError(f"method[{name}].{key}: unknown key; a method config takes {list(METHOD_TOP_KEYS)}")
    if cfg.get("settings") is not None:
        mapping(f"method[{name}].settings", cfg["settings"])
    if cfg.get("objectives") is not None:
        _objectives(f"method[{name}].objectives", cfg["objectives"])
    space = method_space(cfg)  # fractions, space entries (types, bounds, step, log, choices, when)
    for key in space.settings:
        if key not in accepted:
            raise ConfigError(f"method[{name}].settings.{key}: not a setting of {name}; it takes {sorted(accepted)}")
    for dim in space.dims:
        where = f"method[{name}].space.{dim.key}"
        if dim.key.startswith("trial."):
            sub = dim.key[len("trial."):]
            if sub not in {**TRIAL_KEYS, **_train_config_keys()}:
                raise ConfigError(f"{where}: trial.{sub} is not a trial setting")
            continue
        if dim.key not in accepted:
            raise ConfigError(f"{where}: not a setting of {name}; it takes {sorted(accepted)}")
    _construct(cls, space.settings, f"method[{name}].settings")
    # Every value the space can give must be one the method accepts (with the conditions that
    # make the entry live): a typo in a choice fails here, not in a trial.
    for dim in space.dims:
        if dim.key.startswith("trial."):
            continue
        values = list(dim.choices) if dim.type == "categorical" else [dim.low, dim.high]
        for value in values:
            _construct(cls, {**space.settings, **dim.when, dim.key: value},
                       f"method[{name}].space.{dim.key}: value {value!r}")
    if pinned and search_settings and not space.dims and n_trials > 1:
        raise ConfigError(f"method[{name}].space: empty, so all {n_trials} trials would run the same settings; "
                          f"give the method a space: or set search.n_trials=1")


def _objectives_of(cfg: Mapping[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    pinned = (cfg.get("method") or {}).get("objectives")
    objectives = pinned or (cfg.get("search") or {}).get("objectives") or []
    return ("method.objectives" if pinned else "search.objectives"), [(o["metric"], o["mode"]) for o in objectives]


def _check_objectives(cfg: Mapping[str, Any], pool: Mapping[str, Any], logged: set[str] | None) -> None:
    where, objectives = _objectives_of(cfg)
    _objectives(where, [{"metric": m, "mode": d} for m, d in objectives])
    for i, (metric, _) in enumerate(objectives):
        for name, mcfg in pool.items():
            reports = reported_metrics(cfg, name, logged, mcfg)
            if metric in reports:
                continue
            hint = ""
            from search.trials.metrics import TEXT_OBJECTIVES
            from search.trials.text_config import is_text_config

            if metric in TEXT_OBJECTIVES and not is_text_config(cfg.get("data") or {}, cfg.get("model") or {}):
                hint = "; it is reported by text trials only (model=hf data=text)"
            elif metric == "val_fgsm_acc":
                hint = "; it is measured only with trial.fgsm_epsilon set (e.g. trial.fgsm_epsilon=0.1)"
            elif logged is not None:
                hint = (f"; module._target_={(cfg.get('module') or {}).get('_target_')} logged "
                        f"{sorted(logged)} in validation")
            raise ConfigError(f"{where}[{i}].metric: {metric!r} is not reported by {name} trials with these "
                              f"settings{hint}; they report {sorted(reports)}")


# ---------------------------------------------------------------------------------------------
# Building once: data, model, module
# ---------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def build_once(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Build data, model (and the user's module) on the CPU, run the model on one real training
    batch, and the module on one validation batch. Returns ``input_shape``, ``num_classes``,
    ``logged`` (the module's validation metrics, None for the built-in module) and ``notes``."""
    import torch
    from lightning import LightningModule

    from prunelib.data import DataSourceError, DatasetNotFoundError, datamodule_from_config
    from prunelib.data.labels import check_datamodule_labels
    from prunelib.models import model_from_config
    from prunelib.targets import TargetError

    data, model_cfg, trial = cfg["data"], cfg["model"], cfg["trial"]
    seed = int(trial.get("seed", 0))
    data_key = "data._target_" if data.get("_target_") else "data.root" if "root" in data else "data"
    try:
        dm = datamodule_from_config(data, seed=seed, device="cpu")
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    except DataSourceError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("data") else f"{data_key}: {msg}") from exc
    except (DatasetNotFoundError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"{data_key}: {_one_line(exc)}") from exc
    try:
        # Every split's labels within the class count the trials use, two classes or more, lengths
        # that match what the splits yield: a stray label never silently changes every trial's model.
        check_datamodule_labels(dm, configured=data.get("num_classes") is not None)
    except DataSourceError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        x, _ = dm.sample_batch("train", n=4, generator=torch.Generator().manual_seed(seed))
    except Exception as exc:
        raise ConfigError(f"{data_key}: could not read a training batch: {type(exc).__name__}: {_one_line(exc)}") from exc
    input_shape, num_classes = tuple(int(s) for s in dm.input_shape), int(dm.num_classes)
    model_key = "model._target_" if model_cfg.get("_target_") else "model.name"
    label = model_cfg.get("_target_") or model_cfg.get("name")
    try:
        torch.manual_seed(seed)
        model = model_from_config(model_cfg, input_shape, num_classes)
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        raise ConfigError(f"{model_key}={label}: {type(exc).__name__}: {_one_line(exc)}") from exc
    notes: list[str] = []
    logged: set[str] | None = None
    module_cfg = cfg.get("module") or {}
    network = model
    if module_cfg.get("_target_"):
        from search.trial import build_module

        try:
            module = build_module(module_cfg, model, input_shape, num_classes, trial)
        except TargetError as exc:
            raise ConfigError(str(exc)) from exc
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc
        from prunelib.training import network_of

        network = network_of(module)
        if network is not model:
            notes.append(f"module._target_={module_cfg['_target_']} builds its own network "
                         f"({type(network).__name__}); model.* is not used")
    was = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(x)
    except Exception as exc:
        raise ConfigError(f"{model_key}={label}: forward pass on a batch of shape {tuple(x.shape)} raised "
                          f"{type(exc).__name__}: {_one_line(exc)}") from exc
    network.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{model_key}={label}: output {shape} for a batch of shape {tuple(x.shape)}; expected "
                          f"({x.shape[0]}, {num_classes}) (one logit per class of the data)")
    if module_cfg.get("_target_"):
        assert isinstance(module, LightningModule)
        from prunelib.training import TrainConfig, validate_module

        try:
            logged = set(validate_module(module, dm, TrainConfig(accelerator="cpu", progress=False), limit_batches=1))
        except Exception as exc:
            raise ConfigError(f"module._target_={module_cfg['_target_']}: one validation batch raised "
                              f"{type(exc).__name__}: {_one_line(exc)}") from exc
    return {"input_shape": input_shape, "num_classes": num_classes, "logged": logged, "notes": notes,
            "data": repr(dm)}


# ---------------------------------------------------------------------------------------------
# Stores and resources
# ---------------------------------------------------------------------------------------------
def tracking_uri(tracking: Mapping[str, Any]) -> str | None:
    """The tracking URI a config uses (None when tracking is off)."""
    if tracking.get("kind", "sqlite") == "none":
        return None
    uri = tracking.get("uri")
    return str(uri) if uri else f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def optuna_storage_url(search: Mapping[str, Any], tracking_uri_: str | None, output_dir: Path) -> str:
    """Where the Optuna study lives: ``search.optuna_storage``, else ``optuna.db`` beside the
    MLflow SQLite store, else in the sweep's output directory."""
    if search.get("optuna_storage"):
        return str(search["optuna_storage"])
    from search.tracking import _local_path

    if tracking_uri_ and tracking_uri_.startswith("sqlite:///"):
        path = _local_path(tracking_uri_)
        if path is not None and str(path) not in ("", ":memory:"):
            return f"sqlite:///{path.expanduser().absolute().parent / 'optuna.db'}"
    return f"sqlite:///{output_dir / 'optuna.db'}"


def _check_optuna_storage(url: str) -> None:
    from search.tracking import TrackingUnavailableError, check_sqlite_file

    if not url.startswith("sqlite:///"):
        scheme = url.split("://", 1)[0]
        if scheme.split("+")[0] not in ("postgresql", "mysql", "sqlite"):
            raise ConfigError(f"search.optuna_storage: {url!r}: Optuna's RDB storage takes sqlite:///, "
                              "postgresql:// or mysql:// URLs")
        return
    try:
        check_sqlite_file(Path(url[len("sqlite:///"):]), url, mlflow_store=False)
    except TrackingUnavailableError as exc:
        raise ConfigError(f"search.optuna_storage: {exc}") from exc


def _state_copy_in_mlflow(cfg: Mapping[str, Any], resume_dir: Path) -> bool:
    """Whether the sweep's MLflow parent run holds a copy of the missing ``sweep.json`` (the
    sweep then restores it: search.tuner)."""
    if not resume_dir.expanduser().is_dir():
        return False
    from search.tracking import saved_sweep_state

    return saved_sweep_state(cfg, resume_dir.expanduser().resolve()) is not None


def local_resources(cluster: Mapping[str, Any]) -> dict[str, float]:
    """CPUs and GPUs a local cluster will have (``cluster.num_cpus``/``num_gpus`` or the machine's)."""
    cpus = cluster.get("num_cpus") or os.cpu_count() or 1
    gpus = cluster.get("num_gpus")
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:
            gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def check_cluster_resources(trial: Mapping[str, Any], resources: Mapping[str, float], where: str) -> None:
    """A trial must fit on the cluster, or it would wait forever for resources that never come.

    Raises:
        ConfigError: naming trial.cpus / trial.gpus and what ``where`` (the cluster) has.
    """
    cpus = float(trial.get("cpus", 1))
    if cpus > float(resources.get("CPU", 0)):
        raise ConfigError(f"trial.cpus: {trial.get('cpus')} CPUs per trial, but {where} has "
                          f"{resources.get('CPU', 0):g}; no trial could ever start")
    gpus = trial.get("gpus", 0)
    if gpus != "auto" and float(gpus or 0) > float(resources.get("GPU", 0)):
        raise ConfigError(f"trial.gpus: {gpus} GPUs per trial, but {where} has {resources.get('GPU', 0):g}; "
                          "no trial could ever start (trial.gpus=0 runs on CPU)")


# ---------------------------------------------------------------------------------------------
# The pre-flight
# ---------------------------------------------------------------------------------------------
@dataclass
class PreflightResult:
    """What the pre-flight learned, for the sweep.

    Attributes:
        cfg: the config with relative paths made absolute (launch directory) and the method
            pool resolved.
        space: the sweep's search space.
        objectives: ``[(metric, "max"|"min"), ...]``.
        input_shape / num_classes: of the data, read from a batch.
        logged: what the user's LightningModule logged in validation (None: built-in module).
        tracking_uri: the MLflow store (None: tracking off).
        optuna_storage: the Optuna RDB URL.
        notes: lines worth printing (e.g. a module that builds its own network).
        pool: the method configs the sweep covers, by name.
    """

    cfg: dict[str, Any]
    space: SearchSpace
    objectives: list[tuple[str, str]]
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    logged: set[str] | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    notes: list[str] = field(default_factory=list)
    pool: dict[str, dict[str, Any]] = field(default_factory=dict)


_PATH_KEYS = {"data": ("root", "path", "test_path"), "search": ("storage", "resume_dir")}


def _absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    from search.storage import is_uri

    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    for section, keys in _PATH_KEYS.items():
        sec = out.get(section)
        if not isinstance(sec, dict):
            continue
        for key in keys:
            value = sec.get(key)
            if isinstance(value, str) and value and not is_uri(value) and value != "???":
                sec[key] = str(Path(os.path.expanduser(value)).absolute())
    return out


def preflight(cfg: Mapping[str, Any], output_dir: str | os.PathLike | None = None, *, build: bool = True,
              open_stores: bool = True) -> PreflightResult:
    """Check a resolved config before anything starts; see the module docstring.

    Args:
        cfg: the resolved config (a plain dict).
        output_dir: the sweep's output directory (for the default Optuna store and resume checks).
        build: build data, model and module once and run them on a batch.
        open_stores: open the tracking store, the Optuna store and ``search.storage``.

    Raises:
        ConfigError: the first problem, naming its key.
    """
    validate_schema(cfg)
    cfg = _absolute_paths(dict(cfg))
    search = cfg["search"]
    pool = method_pool(cfg)
    pinned = bool(cfg.get("method"))
    notes: list[str] = []
    user_module = bool((cfg.get("module") or {}).get("_target_"))
    if user_module:
        pair_methods = [m for m, c in pool.items() if _method_class(m, c).needs_pair]
        if pair_methods and (pinned or search.get("methods")):
            raise ConfigError(f"module._target_: {pair_methods} trials evaluate a (pretrained, fine-tuned) pair "
                              "without a training step; leave module unset for them")
        if pair_methods:
            notes.append(f"{pair_methods} left out: they have no training step for module._target_")
            pool = {m: c for m, c in pool.items() if m not in pair_methods}
    if not pool:
        raise ConfigError("method: no method to search")
    for name, mcfg in pool.items():
        check_method(name, mcfg, pinned=pinned, search_settings=bool(search.get("search_settings", True)),
                     n_trials=int(search["n_trials"]))
    if not pinned:
        cfg["method_pool"] = pool
    space = SearchSpace(pool, pinned=pinned, search_settings=bool(search.get("search_settings", True)))
    _, objectives = _objectives_of(cfg)
    if not user_module:  # a user's module reports what it logs: checked once it is built (apply_build)
        _check_objectives(cfg, pool, None)
    result = PreflightResult(cfg=cfg, space=space, objectives=objectives, notes=notes, pool=pool)
    if search.get("resume") and search.get("resume_dir"):
        state = Path(search["resume_dir"]) / "sweep.json"
        if not state.is_file() and not _state_copy_in_mlflow(cfg, Path(search["resume_dir"])):
            raise ConfigError(f"search.resume_dir: {search['resume_dir']} holds no sweep (no sweep.json); "
                              "pass the output directory of the sweep to continue")
    if cfg.get("cluster", {}).get("kind", "local") == "local":
        check_cluster_resources(cfg["trial"], local_resources(cfg.get("cluster") or {}), "this machine")
    if build:
        apply_build(result, build_check(cfg))
    if open_stores:
        open_sweep_stores(result, output_dir)
    return result


def build_check(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The pre-flight's building step on a config that passed :func:`preflight` ``(build=False)``:
    a text config's file and tokenizer, else data, model and module built once on a batch
    (:func:`build_once`). Returns what :func:`apply_build` takes (plain JSON types).

    Raises:
        ConfigError: naming the key at fault.
    """
    from search.llm_trial import check_text_data, is_text_config

    if is_text_config(cfg["data"], cfg["model"]):
        check_text_data(cfg)  # the text file and the model's tokenizer
        return {"text": True}
    built = build_once(cfg)
    return {**built, "input_shape": list(built["input_shape"]),
            "logged": sorted(built["logged"]) if built["logged"] is not None else None}


#: What the build process runs: the config on stdin, one JSON line on stdout.
_BUILD_PROCESS = """
import json, sys
request = json.loads(sys.stdin.read())
sys.path[:0] = [p for p in request["sys_path"] if p not in sys.path]
try:
    from search.preflight import build_check
    from search.space import ConfigError
    try:
        reply = {"built": build_check(request["cfg"])}
    except ConfigError as exc:
        reply = {"config_error": str(exc)}
except Exception as exc:
    reply = {"error": f"{type(exc).__name__}: {exc}"}
print()  # after anything the build printed
print(json.dumps(reply, default=str), flush=True)
"""


class BuildProcess:
    """:func:`build_check` in a process of its own, started at once: a sweep's driver builds
    nothing itself (no Lightning, torchmetrics or transformers there), and the build, with its
    imports, runs while Ray starts. :meth:`result` waits for it; :meth:`stop` ends it early (the
    sweep was refused for another reason).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Start building what ``cfg`` (the resolved config: its relative paths are taken from
        the launch directory, as :func:`preflight` does) describes."""
        import json
        import subprocess
        import sys

        cfg = _absolute_paths(dict(cfg))

        self._proc = subprocess.Popen([sys.executable, "-c", _BUILD_PROCESS], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"cfg": cfg, "sys_path": [p for p in sys.path if p]}, default=str))
        self._proc.stdin.close()  # the build starts now
        self._proc.stdin = None  # (communicate() would flush the closed pipe)

    def result(self) -> dict[str, Any]:
        """What :func:`build_check` returned.

        Raises:
            ConfigError: what the build found, or that the build process failed (one line).
        """
        import json

        out, err = self._proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        try:
            reply = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            last = (err.strip().splitlines() or [f"exit status {self._proc.returncode}"])[-1]
            raise ConfigError(f"pre-flight: the process building the data and the model died ({last[:200]})") from None
        if "config_error" in reply:
            raise ConfigError(reply["config_error"])
        if "error" in reply:
            raise ConfigError(f"pre-flight: building the data and the model failed: {reply['error'][:300]}")
        return reply["built"]

    def stop(self) -> None:
        """End the build process if it still runs (after :meth:`result`, it has ended)."""
        if self._proc.returncode is not None:
            return
        self._proc.kill()
        self._proc.communicate()


def apply_build(result: PreflightResult, built: Mapping[str, Any]) -> None:
    """Record what :func:`build_check` learned; with a user's module, check the objectives
    against what it logged (the others were checked before anything was built).

    Raises:
        ConfigError: an objective the user's module does not log.
    """
    if not built.get("text"):
        result.input_shape, result.num_classes = tuple(built["input_shape"]), int(built["num_classes"])
        result.logged = set(built["logged"]) if built["logged"] is not None else None
        result.notes += list(built["notes"])
    if (result.cfg.get("module") or {}).get("_target_"):
        _check_objectives(result.cfg, result.pool, result.logged)


def open_sweep_stores(result: PreflightResult, output_dir: str | os.PathLike | None) -> None:
    """Open the tracking store, the Optuna store and ``search.storage`` (their URLs go into
    ``result``).

    Raises:
        ConfigError: naming ``tracking.uri``, ``search.optuna_storage`` or ``search.storage``.
    """
    from search.storage import SweepStorage
    from search.tracking import TrackingUnavailableError, check_tracking

    cfg, search = result.cfg, result.cfg["search"]
    result.tracking_uri = tracking_uri(cfg.get("tracking") or {})
    if result.tracking_uri is not None:
        try:
            check_tracking(result.tracking_uri)
        except TrackingUnavailableError as exc:
            raise ConfigError(f"tracking.uri: {_one_line(exc) if 'Start one' not in str(exc) else exc}") from exc
    out = Path(output_dir).absolute() if output_dir is not None else Path.cwd()
    result.optuna_storage = optuna_storage_url(search, result.tracking_uri, out)
    _check_optuna_storage(result.optuna_storage)
    if search.get("storage"):
        try:
            SweepStorage(search["storage"]).check()
        except Exception as exc:
            raise ConfigError(f"search.storage: {search['storage']!r} cannot be written: "
                              f"{type(exc).__name__}: {_one_line(exc)}") from exc

