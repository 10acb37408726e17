"""Every check that can fail before Ray starts, in one place.

:func:`preflight` takes the resolved config and either returns what the sweep needs (the
search space, the objectives, the data's input shape and class count) or raises one
:class:`~search.errors.ConfigError` whose message starts with the key at fault. It

1. parses every group once (:meth:`search.settings.SweepSettings.from_dict`: keys, types,
   ranges, unknown keys), then checks what needs a registry: the data set's door and the
   model's signature (or the text data and Hugging Face model), and each method (``settings``,
   ``space`` with ``when:``);
2. checks that every objective is a metric each chosen method reports with these settings
   (see *Reported metrics* below);
3. builds the data and the model once and runs the model on one real batch (and a user's
   LightningModule on one validation batch, to learn what it logs): :mod:`search.preflight_build`,
   in a process of its own;
4. opens the tracking store, the Optuna store and ``search.storage``: :mod:`search.sweep_stores`;
5. compares the trial's resources with what the cluster has (local clusters here; a remote
   Ray cluster right after connecting, :func:`check_cluster_resources`).

Reported metrics: a trial *kind* says which metrics its trials report. :data:`TRIAL_KINDS`
holds the kinds in order (the first whose ``applies(method_class)`` is true is the method's);
``reports(cfg, logged)`` gives its metrics. A new trial kind (an LLM one-shot trial, ...)
registers itself with :func:`register_trial_kind`; a method adds metrics of its own by
declaring ``reported_metrics: ClassVar[tuple[str, ...]]`` on its class. A user's
LightningModule reports what it logged in the pre-flight validation pass.

Schema: the settings dataclasses of :mod:`search.settings`; a new setting is one field there
(``TrainConfig`` fields are accepted as ``trial`` keys automatically, by their annotation).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.errors import ConfigError
from search.preflight_build import BuildProcess, absolute_paths, build_check
from search.settings import (DATA_KEYS, MODEL_KEYS, SAMPLERS, ClusterSettings, SweepSettings, TrialSettings, check_objectives,
                             dense_metric, mapping, objectives_and_key, text)
from search.space import MethodSpace, SearchSpace, load_method_configs, method_class, method_space
from search.sweep_stores import open_sweep_stores, optuna_storage_url, state_copy_in_mlflow, tracking_uri
from search.trials.kinds import TRIAL_KINDS, TrialKind, register_trial_kind, reported_metrics  # the trial kinds
from search.trials.text_config import method_pool

__all__ = ["BuildProcess", "PreflightResult", "SAMPLERS", "TRIAL_KINDS", "TrialKind", "apply_build",
           "build_check", "check_cluster_resources", "check_method", "method_pool", "open_sweep_stores",
           "optuna_storage_url", "preflight", "register_trial_kind", "reported_metrics", "tracking_uri",
           "validate_schema"]

METHOD_TOP_KEYS = ("name", "_target_", "settings", "space", "objectives")


def validate_schema(cfg: Mapping[str, Any]) -> SweepSettings:
    """Check every group of a resolved config (no building, no I/O) and return it typed: the
    groups by :meth:`SweepSettings.from_dict`, then ``data`` and ``model`` against their
    registries (a data set's door, a model's signature, text data)."""
    settings = SweepSettings.from_dict(cfg)
    from search.trials.text_config import is_text_config

    if is_text_config(cfg.get("data") or {}, cfg.get("model") or {}):
        _check_text_schema(cfg)
    else:
        _check_data_schema(cfg.get("data") or {})
        _check_model_schema(cfg.get("model") or {})
    return settings


def _check_section(where: str, section: Any, allowed: set[str]) -> None:
    if section is None:
        return
    mapping(where, section)
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; {where} takes {sorted(allowed)}")


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
    from search.trials.text_config import HF_MODEL_KEYS, TEXT_DATA_KEYS, validate_text_config

    validate_text_config(cfg)  # first: a half-text config (model=hf with data=digits) is named as such
    _check_section("data", cfg.get("data"), set(TEXT_DATA_KEYS))
    _check_section("model", cfg.get("model"), set(HF_MODEL_KEYS))



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


def check_method(name: str, cfg: Mapping[str, Any], *, pinned: bool, search_settings: bool,
                 n_trials: int) -> MethodSpace:
    """Schema and semantic checks of one method config; errors name ``method[NAME]...``.

    Returns the method's parsed :class:`search.space.MethodSpace` (its ``space:`` parsed once, here;
    :class:`search.space.SearchSpace` takes it as it is).
    """
    mapping(f"method[{name}]", cfg)
    cls = _method_class(name, cfg)
    accepted = _accepted_settings(cls)
    for key in cfg:
        if key not in METHOD_TOP_KEYS and key not in accepted:
            raise ConfigError(f"method[{name}].{key}: unknown key; a method config takes {list(METHOD_TOP_KEYS)}")
    if cfg.get("settings") is not None:
        mapping(f"method[{name}].settings", cfg["settings"])
    if cfg.get("objectives") is not None:
        check_objectives(f"method[{name}].objectives", cfg["objectives"])
    space = method_space(cfg)  # fractions, space entries (types, bounds, step, log, choices, when)
    for key in space.settings:
        if key not in accepted:
            raise ConfigError(f"method[{name}].settings.{key}: not a setting of {name}; it takes {sorted(accepted)}")
    for dim in space.dims:
        where = f"method[{name}].space.{dim.key}"
        if dim.key.startswith("trial."):
            sub = dim.key[len("trial."):]
            if sub not in TrialSettings.keys():
                raise ConfigError(f"{where}: trial.{sub} is not a trial setting")
            continue
        if dim.key not in accepted:
            raise ConfigError(f"{where}: not a setting of {name}; it takes {sorted(accepted)}")
    # The fixed settings, then every value the space can give (with the conditions that make the
    # entry live, and the entries it switches on) must be ones the method accepts: a typo in a
    # choice fails here, not in a trial.
    for where, settings in space.probes():
        _construct(cls, settings, where)
    if pinned and search_settings and not space.dims and n_trials > 1:
        raise ConfigError(f"method[{name}].space: empty, so all {n_trials} trials would run the same settings; "
                          f"give the method a space: or set search.n_trials=1")
    return space




def _check_objectives(cfg: Mapping[str, Any], settings: SweepSettings, pool: Mapping[str, Any],
                      logged: set[str] | None) -> None:
    """Every objective, and every constraint's metric (and the dense figure a relative bound
    reads), is reported by each chosen method's trials."""
    where, objectives = objectives_and_key(cfg)
    check_objectives(where, [{"metric": m, "mode": d} for m, d in objectives])
    _check_reported(cfg, settings, pool, logged,
                    [(f"{where}[{i}].metric", m) for i, (m, _) in enumerate(objectives)])
    for i, c in enumerate(settings.search.constraint_list):
        needed = [(f"search.constraints[{i}]", c.metric)]
        if c.relative:
            needed.append((f"search.constraints[{i}] ({c.text!r}: 'dense' reads)", dense_metric(c.metric) or ""))
        _check_reported(cfg, settings, pool, logged, needed)


def _check_reported(cfg: Mapping[str, Any], settings: SweepSettings, pool: Mapping[str, Any],
                    logged: set[str] | None, needed: list[tuple[str, str]]) -> None:
    """Each ``(key, metric)`` of ``needed`` is reported by every method of ``pool``; else a
    ConfigError naming the key."""
    for where_metric, metric in needed:
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
                hint = (f"; module._target_={settings.module.target} logged "
                        f"{sorted(logged)} in validation")
            raise ConfigError(f"{where_metric}: {metric!r} is not reported by {name} trials with these "
                              f"settings{hint}; they report {sorted(reports)}")


# ---------------------------------------------------------------------------------------------
# Resources and the pre-flight
# ---------------------------------------------------------------------------------------------
def local_resources(cluster: ClusterSettings) -> dict[str, float]:
    """CPUs and GPUs a local cluster will have (``cluster.num_cpus``/``num_gpus`` or the machine's)."""
    cpus = cluster.num_cpus or os.cpu_count() or 1
    gpus = cluster.num_gpus
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:
            gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def check_cluster_resources(trial: TrialSettings, resources: Mapping[str, float], where: str) -> None:
    """A trial must fit on the cluster, or it would wait forever for resources that never come.

    Raises:
        ConfigError: naming trial.cpus / trial.gpus and what ``where`` (the cluster) has.
    """
    if float(trial.cpus) > float(resources.get("CPU", 0)):
        raise ConfigError(f"trial.cpus: {trial.cpus} CPUs per trial, but {where} has "
                          f"{resources.get('CPU', 0):g}; no trial could ever start")
    gpus = trial.gpus
    if gpus != "auto" and float(gpus or 0) > float(resources.get("GPU", 0)):
        raise ConfigError(f"trial.gpus: {gpus} GPUs per trial, but {where} has {resources.get('GPU', 0):g}; "
                          "no trial could ever start (trial.gpus=0 runs on CPU)")


@dataclass
class PreflightResult:
    """What the pre-flight learned, for the sweep.

    Attributes:
        cfg: the config with relative paths made absolute (launch directory) and the method
            pool resolved: the composed dict, kept for what needs it whole (the sweep's
            identity, the parent run's params, each trial's config through Ray).
        settings: ``cfg`` parsed once (:class:`~search.settings.SweepSettings`), with the
            same absolute paths, method pool and latency measurement; what the sweep reads.
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
    settings: SweepSettings
    space: SearchSpace
    objectives: list[tuple[str, str]]
    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    logged: set[str] | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    notes: list[str] = field(default_factory=list)
    pool: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    mapping("config", cfg)
    # Paths are made absolute before the one parse, so the typed settings hold the paths the
    # sweep uses; what the pre-flight adds below (the method pool, a latency measurement) goes
    # into both the dict and the settings, which are never parsed again.
    cfg = absolute_paths(dict(cfg))
    settings = validate_schema(cfg)
    search = settings.search
    pool = method_pool(cfg)
    pinned = bool(cfg.get("method"))
    notes: list[str] = []
    user_module = bool(settings.module.target)
    if user_module:
        pair_methods = [m for m, c in pool.items() if _method_class(m, c).needs_pair]
        if pair_methods and (pinned or search.methods):
            raise ConfigError(f"module._target_: {pair_methods} trials evaluate a (pretrained, fine-tuned) pair "
                              "without a training step; leave module unset for them")
        if pair_methods:
            notes.append(f"{pair_methods} left out: they have no training step for module._target_")
            pool = {m: c for m, c in pool.items() if m not in pair_methods}
    if not pool:
        raise ConfigError("method: no method to search")
    spaces = {name: check_method(name, mcfg, pinned=pinned, search_settings=search.search_settings,
                                 n_trials=search.n_trials) for name, mcfg in pool.items()}
    if not pinned:
        cfg["method_pool"] = pool
        settings = dataclasses.replace(settings, method_pool=dict(pool))
    space = SearchSpace(spaces, pinned=pinned, search_settings=search.search_settings)
    objectives = list(settings.objectives)
    if any(c.metric == "latency_ms" for c in search.constraint_list):
        # A latency budget needs every trial to measure it, as a latency objective does.
        cfg["trial"] = {**(cfg.get("trial") or {}), "measure_latency": True}
        settings = dataclasses.replace(settings, trial=settings.trial.replace(measure_latency=True))
    if not user_module:  # a user's module reports what it logs: checked once it is built (apply_build)
        _check_objectives(cfg, settings, pool, None)
    result = PreflightResult(cfg=cfg, settings=settings, space=space, objectives=objectives, notes=notes, pool=pool)
    resume_dir = search.resume_dir  # made absolute above
    if search.resume and resume_dir:
        state = Path(resume_dir) / "sweep.json"
        if not state.is_file() and not state_copy_in_mlflow(settings.tracking, Path(resume_dir)):
            raise ConfigError(f"search.resume_dir: {resume_dir} holds no sweep (no sweep.json); "
                              "pass the output directory of the sweep to continue")
    if settings.cluster.kind == "local":
        check_cluster_resources(settings.trial, local_resources(settings.cluster), "this machine")
    if build:
        apply_build(result, build_check(cfg))
    if open_stores:
        open_sweep_stores(result, output_dir)
    return result


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
    if result.settings.module.target:
        _check_objectives(result.cfg, result.settings, result.pool, result.logged)

