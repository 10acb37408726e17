"""The trial kinds: what each applies to, what it reports, and which function runs it.

One registry, read by both sides of a sweep: the pre-flight (on the driver) asks which metrics a
method's trials report, to check the objectives before Ray starts; the worker asks which
function runs the trial. Both choose the kind the same way (:func:`kind_for`): the first kind in
:data:`TRIAL_KINDS` whose ``model_kind`` is the config's (:func:`config_model_kind`) and whose
``applies(method_class)`` is true, reading the capabilities a method declares on its class
(:class:`prunelib.methods.base.PruningMethod`: ``needs_pair``, ``model_kinds``).

The built-in kinds, most specific first:

========================  ==========  =====================================  ========================================
kind                      model kind  applies to                             run by
========================  ==========  =====================================  ========================================
``text_ken_pair``         ``hf``      ``needs_pair`` (KEN)                   :func:`search.trials.text.run_hf_ken_trial`
``text_structured``       ``hf``      LLM pruners with ``export``            :func:`search.trials.text.run_text_trial`
                                      (a physically smaller model)
``text``                  ``hf``      ``"hf" in model_kinds`` (LLM pruners)  :func:`search.trials.text.run_text_trial`
``ken_pair``              ``torch``   ``needs_pair`` (KEN)                   :func:`search.trials.ken.run_ken_trial`
``train``                 ``torch``   every method                           :func:`search.trials.training.run_training_trial`
========================  ==========  =====================================  ========================================

This module imports no trial runner (they need Lightning, transformers...): a kind names its run
function as ``"module:function"``, imported by :meth:`TrialKind.runner` in the worker only, so the
driver stays free of the training stack.

A run function is called as ``run(trial: TrialRequest) -> row`` (:class:`TrialRequest`).
A method adds metrics of its own with ``reported_metrics`` on its class; a new trial kind
registers itself with :func:`register_trial_kind`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from search.settings import TrialSettings
from search.trials.metrics import (
    KEN_METRICS,
    LATENCY_MS,
    LLM_METRICS,
    STRUCTURED_METRICS,
    TEST_ACC,
    TIMING_METRICS,
    VAL_ACC,
    VAL_FGSM_ACC,
    VAL_LOSS,
    WORK_METRICS,
    cost_metrics,
    split_scores,
)
from search.trials.text_task import is_text_config

__all__ = ["MODEL_KINDS", "TRIAL_KINDS", "TrialKind", "TrialRequest", "config_model_kind", "kind_for",
           "makes_smaller_model", "register_trial_kind", "reported_metrics"]

#: The kinds of model a config can hold: PyTorch models a trial trains (built-in or the user's),
#: or Hugging Face text models (``model=hf``/``data=text``).
MODEL_KINDS = ("torch", "hf")
#: The training trial's run function (the default of a kind that only adds metrics).
_TRAIN_RUN = "search.trials.training:run_training_trial"

Reports = Callable[[Mapping[str, Any], "set[str] | None"], "set[str]"]


@dataclass(frozen=True)
class TrialKind:
    """A kind of trial: which methods it applies to, the metrics its trials report, how to run one.

    Attributes:
        name: a label (``"train"``, ``"ken_pair"``).
        applies: ``applies(method_class)``: whether a method's trials are of this kind (read the
            method's declared capabilities, e.g. ``cls.needs_pair``).
        reports: ``reports(cfg, logged)``: the metric names a trial reports, given the resolved
            config and, with a user's LightningModule, the names it logged (else None).
        run: ``"module:function"`` of the function that runs one trial (see the module
            docstring); the default is the training trial, so a kind that only declares more
            metrics for some methods' training trials names no function.
        model_kind: the configs it serves (one of :data:`MODEL_KINDS`).
    """

    name: str
    applies: Callable[[type], bool]
    reports: Reports
    run: str = _TRAIN_RUN
    model_kind: str = "torch"

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"TrialKind {self.name}: model_kind {self.model_kind!r} is not one of {MODEL_KINDS}")
        if ":" not in self.run:
            raise ValueError(f"TrialKind {self.name}: run {self.run!r} must be 'module:function'")

    def runner(self) -> Callable[[TrialRequest], dict[str, Any]]:
        """The run function (imported now: call it in the worker, not on the driver)."""
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TrialRequest:
    """What a run function receives: one trial's sampled parameters, resolved.

    Attributes:
        params: the sampled parameters (``{"method": ..., "METHOD.KEY": value}``).
        ctx: the sweep's :class:`search.trials.context.TrialContext`.
        method_name / settings / overrides: the method, its settings and the ``trial.*`` values
            sampled for this trial (:func:`search.space.settings_from_params`).
        trial: ``ctx.trial`` with the overrides applied, parsed once
            (:class:`search.settings.TrialSettings`; :meth:`TrialContext.settings_for`).
        trial_id / trial_dir: the trial's name and where its files go (None: a temporary folder).
        report: where intermediate results go (Ray's ``tune.report``), or None.
        start: ``time.perf_counter()`` when the trial started (seconds).
        mlflow_run: the trial's live MLflow run (:class:`search.trials.mlflow_run.TrialRun`) or None.
    """

    params: dict[str, Any]
    ctx: Any
    method_name: str
    settings: dict[str, Any]
    overrides: dict[str, Any]
    trial: TrialSettings
    trial_id: str
    trial_dir: Any
    report: Callable[[dict[str, Any]], None] | None
    start: float
    mlflow_run: Any = None


def config_model_kind(data_cfg: Mapping[str, Any] | None, model_cfg: Mapping[str, Any] | None) -> str:
    """``"hf"`` for a Hugging Face text sweep (``model=hf`` or ``data=text``), else ``"torch"``."""
    return "hf" if is_text_config(data_cfg or {}, model_cfg or {}) else "torch"


# ---------------------------------------------------------------------------------------------
# What each built-in kind reports
# ---------------------------------------------------------------------------------------------
def _trial_value(cfg: Mapping[str, Any], key: str) -> Any:
    """``trial.<key>`` of a resolved config, else its default (a field of :class:`TrialSettings`;
    the config was checked by ``SweepSettings.from_dict`` before a kind is asked)."""
    trial = cfg.get("trial") or {}
    return trial[key] if key in trial else TrialSettings.__dataclass_fields__[key].default


def _evaluates_test(cfg: Mapping[str, Any]) -> bool:
    return bool(_trial_value(cfg, "evaluate_test"))


def _train_reports(cfg: Mapping[str, Any], logged: set[str] | None) -> set[str]:
    out = set(WORK_METRICS) | set(TIMING_METRICS) | {LATENCY_MS} | cost_metrics()
    out |= set(logged) if logged is not None else {VAL_ACC, VAL_LOSS}
    if _evaluates_test(cfg) and logged is None:
        out.add(TEST_ACC)
    if _trial_value(cfg, "fgsm_epsilon") is not None:
        out.add(VAL_FGSM_ACC)
    return out


def _ken_reports(cfg: Mapping[str, Any], logged: set[str] | None) -> set[str]:
    out = {VAL_ACC, VAL_LOSS, LATENCY_MS} | set(WORK_METRICS) | set(KEN_METRICS) | cost_metrics()
    if _evaluates_test(cfg):
        out.add(TEST_ACC)
    return out


def _text_scores(cfg: Mapping[str, Any]) -> set[str]:
    splits = ("val", "test") if _evaluates_test(cfg) else ("val",)
    return split_scores(splits, ("loss", "acc", "ppl")) | set(WORK_METRICS) | set(TIMING_METRICS) | cost_metrics()


def _text_ken_reports(cfg: Mapping[str, Any], logged: set[str] | None) -> set[str]:
    return _text_scores(cfg) | set(KEN_METRICS)


def _text_reports(cfg: Mapping[str, Any], logged: set[str] | None) -> set[str]:
    return _text_scores(cfg) | set(LLM_METRICS)


def _text_structured_reports(cfg: Mapping[str, Any], logged: set[str] | None) -> set[str]:
    # latency_ms: measured on the exported checkpoint (when an objective or trial.measure_latency asks).
    return _text_reports(cfg, logged) | set(STRUCTURED_METRICS) | {LATENCY_MS}


def makes_smaller_model(method_class: type) -> bool:
    """Whether a text method's trials keep a physically smaller model: the method prunes
    Hugging Face models (``"hf"`` in ``model_kinds``) and exports its result itself
    (``export(model, dir, tokenizer)``, e.g. ``llm_structured``)."""
    return "hf" in method_class.model_kinds and callable(getattr(method_class, "export", None))


#: Trial kinds, most specific first; ``train`` applies to every method on a PyTorch model.
TRIAL_KINDS: list[TrialKind] = [
    TrialKind("text_ken_pair", lambda cls: cls.needs_pair, _text_ken_reports,
              run="search.trials.text:run_hf_ken_trial", model_kind="hf"),
    TrialKind("text_structured", makes_smaller_model, _text_structured_reports,
              run="search.trials.text:run_text_trial", model_kind="hf"),
    TrialKind("text", lambda cls: "hf" in cls.model_kinds, _text_reports,
              run="search.trials.text:run_text_trial", model_kind="hf"),
    TrialKind("ken_pair", lambda cls: cls.needs_pair, _ken_reports, run="search.trials.ken:run_ken_trial"),
    TrialKind("train", lambda cls: True, _train_reports, run=_TRAIN_RUN),
]


def register_trial_kind(kind: TrialKind) -> None:
    """Add a trial kind, checked before the existing ones (replaces one of the same name)."""
    TRIAL_KINDS[:] = [kind] + [k for k in TRIAL_KINDS if k.name != kind.name]


def kind_for(method_class: type, data_cfg: Mapping[str, Any] | None,
             model_cfg: Mapping[str, Any] | None) -> TrialKind | None:
    """The kind of a trial of ``method_class`` under this data and model config, or None when
    no kind applies (a method for Hugging Face models on an image model, or the reverse)."""
    model_kind = config_model_kind(data_cfg, model_cfg)
    return next((k for k in TRIAL_KINDS if k.model_kind == model_kind and k.applies(method_class)), None)


def reported_metrics(cfg: Mapping[str, Any], method: str, logged: set[str] | None = None,
                     method_cfg: Mapping[str, Any] | None = None) -> set[str]:
    """The metrics a trial of ``method`` reports under this config: its kind's and those its
    class declares (``reported_metrics``). ``method_cfg`` may name a user's class (``_target_``);
    ``logged``: what a user's LightningModule logged in validation (None: the built-in module)."""
    from search.space import method_class

    cls = method_class(method, (method_cfg or {}).get("_target_"))
    kind = kind_for(cls, cfg.get("data"), cfg.get("model"))
    return (kind.reports(cfg, logged) if kind is not None else set()) | set(cls.reported_metrics)
