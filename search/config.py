"""Validation of the composed Hydra config, before Ray starts or any trial runs.

Every error is a :class:`~search.space.ConfigError` whose message starts with the key at
fault (``trial.epochs: -1 must be >= 1``), so a typo costs seconds, not a sweep.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from prunelib.data import DATASETS
from prunelib.methods import METHODS
from prunelib.models import MODELS
from search.faults import FaultPlan
from search.space import ConfigError, SearchSpace, load_method_configs, method_space

__all__ = ["ConfigError", "SAMPLERS", "KNOWN_OBJECTIVES", "validate_config", "build_search_space"]

SAMPLERS = ("mo_tpe", "nsga2", "random")
KNOWN_OBJECTIVES = ("val_acc", "val_loss", "flops_effective", "flops_physical", "flops_dense",
                    "params_effective", "params_physical", "params_dense", "sparsity", "wall_s",
                    "epochs", "latency_ms", "val_fgsm_acc",
                    # KEN only (other methods do not report them): fraction reset to pretrained, delta file size
                    "reverted_fraction", "kept_finetuned_params", "ken_file_bytes")


def _number(where: str, value: Any, low: float | None = None, integer: bool = False,
            strict_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number")
    if integer and int(value) != value:
        raise ConfigError(f"{where}: {value!r} must be an integer")
    if low is not None and (value <= low if strict_low else value < low):
        raise ConfigError(f"{where}: {value!r} must be {'>' if strict_low else '>='} {low}")


def _check_method_settings(name: str, cfg: Mapping[str, Any]) -> None:
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r}; registered: {sorted(METHODS)}")
    accepted = set(inspect.signature(METHODS[name].__init__).parameters) - {"self"}
    space = method_space(cfg)  # checks fractions and the space's entries
    for key in list(space.settings) + [d.key for d in space.dims if not d.key.startswith("trial.")]:
        if key not in accepted:
            raise ConfigError(f"method[{name}].{key}: not a setting of {name}; it takes {sorted(accepted)}")
    try:
        METHODS[name](**space.settings)  # the method's own checks (e.g. scope names)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method[{name}].settings: {exc}") from exc


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config (plain dict) and raise ConfigError naming the first bad key."""
    data, model, trial, search = (cfg.get(k) or {} for k in ("data", "model", "trial", "search"))
    if data.get("name") not in DATASETS:
        raise ConfigError(f"data.name: unknown data set {data.get('name')!r}; known: {sorted(DATASETS)}")
    if data.get("limit_train") is not None:
        _number("data.limit_train", data["limit_train"], 1, integer=True)
    _number("data.batch_size", data.get("batch_size", 128), 1, integer=True)
    _number("data.val_fraction", data.get("val_fraction", 0.1), 0, strict_low=True)
    if data.get("val_fraction", 0.1) >= 1:
        raise ConfigError(f"data.val_fraction: {data['val_fraction']!r} must be below 1")
    if model.get("name") not in MODELS and model.get("name") != "custom":
        raise ConfigError(f"model.name: unknown model {model.get('name')!r}; known: {sorted(MODELS)} or custom")
    _number("model.width", model.get("width", 1.0), 0, strict_low=True)

    _number("trial.epochs", trial.get("epochs"), 1, integer=True)
    _number("trial.finetune_epochs", trial.get("finetune_epochs", 0), 0, integer=True)
    _number("trial.lr", trial.get("lr", 0.05), 0, strict_low=True)
    _number("trial.cpus", trial.get("cpus", 1), 0, strict_low=True)
    if trial.get("gpus", 0) != "auto":
        _number("trial.gpus", trial.get("gpus", 0), 0)
    if trial.get("optimizer", "sgd") not in ("sgd", "adam"):
        raise ConfigError(f"trial.optimizer: {trial.get('optimizer')!r} is not one of ['sgd', 'adam']")
    _number("trial.max_retries", trial.get("max_retries", 0), 0, integer=True)
    if trial.get("fgsm_epsilon") is not None:
        _number("trial.fgsm_epsilon", trial["fgsm_epsilon"], 0)
    try:
        FaultPlan.from_config(trial.get("faults"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    _number("search.n_trials", search.get("n_trials"), 1, integer=True)
    _number("search.concurrency", search.get("concurrency", 1), 1, integer=True)
    if search.get("sampler") not in SAMPLERS:
        raise ConfigError(f"search.sampler: {search.get('sampler')!r} is not one of {list(SAMPLERS)}")
    pinned_objectives = (cfg.get("method") or {}).get("objectives")
    where = "method.objectives" if pinned_objectives else "search.objectives"
    objectives = pinned_objectives or search.get("objectives") or []
    if not objectives:
        raise ConfigError(f"{where}: at least one objective is needed")
    for i, obj in enumerate(objectives):
        if obj.get("metric") not in KNOWN_OBJECTIVES:
            raise ConfigError(f"{where}[{i}].metric: {obj.get('metric')!r} is not one of {list(KNOWN_OBJECTIVES)}")
        if obj.get("mode") not in ("max", "min"):
            raise ConfigError(f"{where}[{i}].mode: {obj.get('mode')!r} must be 'max' or 'min'")
    if search.get("population_size") is not None:
        _number("search.population_size", search["population_size"], 2, integer=True)
    check_early_stopping_and_budget(search, trial)

    for name, mcfg in method_configs(cfg).items():
        _check_method_settings(name, mcfg)


def check_early_stopping_and_budget(search: Mapping[str, Any], trial: Mapping[str, Any]) -> None:
    """``search.scheduler``, ``search.asha``, ``search.budget`` and ``search.seeds``."""
    from search.budget import Budget
    from search.schedulers import rung_settings, scheduler_kind

    scheduler_kind(dict(search))
    rung_settings(dict(search))
    Budget.from_config(dict(search), dict(trial))
    _number("search.seeds", search.get("seeds", 1), 1, integer=True)


def method_configs(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs this sweep covers: the pinned one, or every ``conf/method`` file
    (only those named in ``search.methods`` when it is set)."""
    if cfg.get("method"):
        method = dict(cfg["method"])
        return {str(method.get("name")): method}
    configs = load_method_configs()
    wanted = (cfg.get("search") or {}).get("methods")
    if wanted is None:
        return configs
    if isinstance(wanted, str) or not wanted:
        raise ConfigError(f"search.methods: {wanted!r} must be a non-empty list of method names")
    unknown = [m for m in wanted if m not in configs]
    if unknown:
        raise ConfigError(f"search.methods: unknown method(s) {unknown}; known: {sorted(configs)}")
    return {m: configs[m] for m in wanted}


def build_search_space(cfg: Mapping[str, Any]) -> SearchSpace:
    """The sweep's :class:`~search.space.SearchSpace` (validated)."""
    search = cfg.get("search") or {}
    return SearchSpace(method_configs(cfg), pinned=bool(cfg.get("method")),
                       search_settings=bool(search.get("search_settings", True)))


def check_data_available(data: Mapping[str, Any]) -> None:
    """Find and read the configured data set once on the driver, before any trial starts.

    Raises:
        ConfigError: the files are missing or unreadable (the message says how to get them).
    """
    from prunelib.data import DATASETS, DatasetNotFoundError

    try:
        DATASETS[data["name"]](root=data.get("root"), download=bool(data.get("download", False)))
    except (DatasetNotFoundError, OSError, ValueError) as exc:
        raise ConfigError(f"data.root: {exc}") from exc


def load_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config ``python -m search <overrides>`` would run, as a plain dict.

    For notebooks and scripts: ``run_sweep(load_config(["+method=magnitude"]), "out")``.
    Raises ConfigError naming the first bad key (after Hydra's own composition errors).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from search.space import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    validate_config(resolved)
    return resolved
