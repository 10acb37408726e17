"""Typed settings of every config group, parsed and checked once.

The composed Hydra config (``conf/``) holds values and comments; this module holds what a
value may be: one frozen dataclass per group (:class:`SearchSettings`, :class:`TrialSettings`,
:class:`TrackingSettings`, :class:`ClusterSettings`, :class:`DataSettings`,
:class:`ModelSettings`, :class:`ModuleSettings`, :class:`PairSettings`,
:class:`ExportSettings`) and :class:`SweepSettings` for the whole sweep. Each field declares
its type, its default and its check (``setting(default, check)``); a key that is no field is
refused, naming it. :meth:`SweepSettings.from_dict` is the one entry: every message is one line
that starts with the key at fault (``trial.epochs: -1 must be >= 1``).

Where each fact lives:

- keys, defaults and value checks of ``search``, ``trial``, ``tracking``, ``cluster``,
  ``export``, ``pair`` and the top level: here, once. The defaults agree with ``conf/``;
  ``tests/test_settings.py`` holds them to it (a default changed in one place fails there).
- ``search.scheduler`` with ``search.asha``: :func:`search.schedulers.scheduler_kind` and
  :func:`~search.schedulers.rung_settings`, called once, here; ``search.budget``:
  :meth:`search.budget.Budget.from_config`, called once, here (it needs ``trial.gpus``).
- ``data``/``model``/``module`` take open-ended keys (a user's ``_target_`` and its own
  keyword arguments): their named keys are checked here, what depends on a registry (the data
  set's door, the model's signature, text data) by :mod:`search.preflight`, which needs the
  registries.
- the methods' settings and spaces: :mod:`search.space` and :func:`search.preflight.check_method`.

Ray workers get the trial's config as a plain dict (Tune's wire format); a worker parses it once
with ``SweepSettings.from_dict(cfg)`` (or one group: ``TrialSettings.from_dict(cfg["trial"])``)
and reads typed fields from there on.

Hydra's ConfigStore: :func:`register_schemas` stores each group's dataclass as ``base_<group>``
(``cs.store(group="search", name="base_search", node=...)``) for applications that compose
with it; the sweep's own ``conf/`` does not name them in its defaults lists, because Hydra
would then check types itself with its own messages (``trial.seed=abc`` must stay
``trial.seed: 'abc' is not an integer``) and refuse a user's ``+trial.<key>`` before this
module could name it.

This module imports neither Ray, Lightning nor Optuna. Over 500 lines because it is the one
schema of every group (each setting once, with its check); splitting it by group would scatter
the checks the groups share.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from search.errors import ConfigError

__all__ = ["CONSTRAINT_OPERATORS", "CheckFn", "ClusterSettings", "ConfigError", "Constraint", "DEFAULT_OBJECTIVES",
           "DataSettings", "ExportSettings", "MAX_TRIALS", "ModelSettings", "ModuleSettings", "Objective",
           "PairSettings", "SAMPLERS", "SearchSettings", "SweepSettings", "TOP_LEVEL_KEYS", "TrackingSettings",
           "TrialSettings", "check_fraction", "check_objectives", "constraint_values", "default_objectives",
           "dense_metric", "objectives_of", "parse_constraints", "register_schemas", "setting", "tracking_uri"]

CheckFn = Callable[[str, Any], None]
SAMPLERS = ("mo_tpe", "nsga2", "random")
#: The most trials one sweep may ask for (a typo such as 1e9 is refused, not run for months).
MAX_TRIALS = 100_000
#: A metric of the test split (test_acc, test_ppl, val_test_x...): never a search objective.
TEST_SPLIT_METRIC = re.compile(r"(^|_)test(_|$)")


# ---------------------------------------------------------------------------------------------
# Value checks: each takes (key, value) and raises ConfigError naming the key.
# ---------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int | None = None) -> CheckFn:
    """An integer (a float with an integral value counts), ``>= low`` when given."""
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
    """A finite number within the given bounds."""
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


def dotted_keys(where: str, v: Any) -> None:
    """A list of dotted config keys (``search.resume_accept``), none empty."""
    str_list(where, v)
    if not all(v):
        raise ConfigError(f"{where}: expected a list of dotted keys, got {v!r}")


def anything(where: str, v: Any) -> None:
    """Any value (checked where it is used)."""


def check_fraction(where: str, v: Any, *, low_inclusive: bool = False) -> None:
    """The one fraction check of ``search``: in (0, 1) (a data split), or in [0, 1) with
    ``low_inclusive`` (a sparsity-like method setting, where 0 means "none")."""
    if low_inclusive:
        if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= float(v) < 1.0:
            raise ConfigError(f"{where}: {v!r} is not a fraction in [0, 1)")
        return
    number(0, strict=True, high=1, strict_high=True)(where, v)


def check_finite(where: str, value: Any) -> None:
    """No NaN or infinity anywhere in ``value`` (nested mappings and lists included)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_finite(f"{where}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(f"{where}[{i}]", v)


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


def check_objectives(where: str, v: Any) -> None:
    """``[{metric: NAME, mode: max|min}, ...]``: at least one, no metric twice, none of the test split."""
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


def _keep_weights(where: str, v: Any) -> None:
    from search.keep import KEEP_WEIGHTS  # search/keep.py owns the choices

    one_of(*KEEP_WEIGHTS)(where, v)


# ---------------------------------------------------------------------------------------------
# Constraints: "METRIC OP BOUND", BOUND a number, "dense" or "FACTOR * dense"
# ---------------------------------------------------------------------------------------------
CONSTRAINT_OPERATORS = ("<=", ">=", "<", ">")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|<|>|==|=<|=>|!=|=)\s*(.+?)\s*$")
_DENSE_BOUND = re.compile(r"^(?:(?P<a>[^*]+?)\s*\*\s*dense|dense\s*\*\s*(?P<b>[^*]+?)|(?P<c>dense))$")


def dense_metric(metric: str) -> str | None:
    """The name under which a trial reports the dense model's value of ``metric`` (what ``dense``
    means in a constraint): ``flops_*`` -> ``flops_dense``, ``params_*`` -> ``params_dense``,
    ``val_X`` -> ``dense_val_X`` (text trials); None when there is no such figure."""
    if metric.startswith("flops_"):
        return "flops_dense"
    if metric.startswith("params_"):
        return "params_dense"
    if metric.startswith("val_"):
        return f"dense_{metric}"
    return None


@dataclass(frozen=True)
class Constraint:
    """One ``search.constraints`` entry: ``metric op bound`` where bound is ``factor`` (an
    absolute number, ``relative`` false) or ``factor * dense`` (the dense model's value of the
    metric, as the trial reports it: :func:`dense_metric`). ``<`` and ``<=`` (``>``, ``>=``)
    mean the same: a trial on the bound meets it.

    Attributes:
        text: the entry as written.
        metric / op / factor / relative: the parsed parts.
    """

    text: str
    metric: str
    op: str
    factor: float
    relative: bool

    def bound(self, row: Mapping[str, Any]) -> float | None:
        """The bound for this trial's row (None: a relative bound whose dense value is missing)."""
        if not self.relative:
            return self.factor
        dense = row.get(dense_metric(self.metric) or "")
        return self.factor * float(dense) if _is_number(dense) and math.isfinite(dense) else None

    def violation(self, row: Mapping[str, Any]) -> float | None:
        """How far the row is from meeting the constraint, relative to the bound: <= 0 met,
        > 0 missed (Optuna's ``constraints_func`` convention); None when the row lacks the metric."""
        value, bound = row.get(self.metric), self.bound(row)
        if not _is_number(value) or bound is None or not math.isfinite(value):
            return None
        gap = value - bound if self.op in ("<=", "<") else bound - value
        return float(gap / abs(bound)) if bound else float(gap)

    def met(self, row: Mapping[str, Any]) -> bool:
        """Whether the row meets it (a row without the metric does not)."""
        v = self.violation(row)
        return v is not None and v <= 0


def parse_constraints(where: str, raw: Any) -> list[Constraint]:
    """``search.constraints`` parsed: a list of ``"METRIC OP BOUND"`` strings, OP one of
    ``<= < >= >``, BOUND a finite number, ``dense`` or ``FACTOR * dense``.

    Raises:
        ConfigError: one line naming ``search.constraints[i]`` and what is wrong.
    """
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}: expected a list like [\"params_deployed <= 0.5 * dense\", \"latency_ms <= 20\"], "
                          f"got {raw!r}")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, str):
            raise ConfigError(f"{at}: {entry!r} must be a string \"METRIC <= BOUND\" (quote it on the command line)")
        m = _CONSTRAINT.match(entry)
        if m is None:
            raise ConfigError(f"{at}: {entry!r} is not \"METRIC OP BOUND\" (OP one of {list(CONSTRAINT_OPERATORS)})")
        metric, op, rhs = m.groups()
        if op not in CONSTRAINT_OPERATORS:
            raise ConfigError(f"{at}: operator {op!r} in {entry!r} is not one of {list(CONSTRAINT_OPERATORS)}")
        if TEST_SPLIT_METRIC.search(metric):
            raise ConfigError(f"{at}: {metric!r} is measured on the test split, which a search must not select on")
        dense = _DENSE_BOUND.match(rhs)
        text_factor = (dense.group("a") or dense.group("b") or "1") if dense else rhs
        try:
            factor = float(text_factor)
        except ValueError:
            raise ConfigError(f"{at}: bound {rhs!r} in {entry!r} is not a number, 'dense' or 'FACTOR * dense'") from None
        if not math.isfinite(factor):
            raise ConfigError(f"{at}: bound {rhs!r} in {entry!r} is not a finite number")
        if dense and dense_metric(metric) is None:
            raise ConfigError(f"{at}: {entry!r}: no dense value of {metric!r} is reported; give an absolute bound")
        out.append(Constraint(entry, metric, op, factor, bool(dense)))
    return out


def constraint_values(constraints: Iterable[Constraint], row: Mapping[str, Any]) -> list[float]:
    """Each constraint's :meth:`Constraint.violation` for a trial's row, as Optuna's
    ``constraints_func`` takes them (<= 0 met); a metric the row lacks counts as missed (1.0)."""
    return [v if v is not None else 1.0 for v in (c.violation(row) for c in constraints)]


# ---------------------------------------------------------------------------------------------
# Sections: a frozen dataclass per config group, its fields declared with setting().
# ---------------------------------------------------------------------------------------------
def setting(default: Any, check: CheckFn = anything, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field of a settings dataclass: its default (or ``factory``) and the check its raw
    value passes (before the dataclass is built)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


class _Section:
    """A config group's settings: :meth:`from_dict` checks each key of the raw mapping with its
    field's check and refuses keys that are no field (``<where>.<key>: unknown key; <where>
    takes [...]``); missing keys take the field's default."""

    WHERE: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> dict[str, CheckFn]:
        """Every key the section takes, with its check."""
        return {f.name: f.metadata.get("check", anything) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.init and "check" in f.metadata}

    @classmethod
    def check_raw(cls, raw: Any, where: str | None = None, allowed: Iterable[str] | None = None) -> None:
        """Check a raw mapping against the section's keys (``allowed``: accept these names too,
        unchecked unless they are fields)."""
        where = where or cls.WHERE
        if raw is None:
            return
        mapping(where, raw)
        keys = cls.keys()
        names = set(keys) if allowed is None else set(allowed)
        for key, value in raw.items():
            if key not in names:
                raise ConfigError(f"{where}.{key}: unknown key; {where} takes {sorted(names)}")
            if key in keys:
                keys[key](f"{where}.{key}", value)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str | None = None) -> Any:
        """The section from its raw mapping (None = every default); ConfigError naming a bad key."""
        cls.check_raw(raw, where)
        keys = cls.keys()
        return cls(**{k: v for k, v in (raw or {}).items() if k in keys})

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (frozen dataclasses are never edited in place)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """The section as a plain mapping (the wire format of a trial's config)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


Objective = tuple[str, str]


@dataclass(frozen=True)
class AshaSettings(_Section):
    """``search.asha``: the rungs of both early-stopping schedulers (search/schedulers.py)."""

    WHERE: ClassVar[str] = "search.asha"
    enabled: bool = setting(False, boolean)  # older spelling of search.scheduler=asha
    grace_period: int = setting(2, integer(1))  # epochs before a trial can be stopped
    reduction_factor: float = setting(3, number(1, strict=True))  # ~1/reduction_factor pass each rung
    tie_break: str = setting("hypervolume", text)  # choices: search.schedulers.TIE_BREAKS


@dataclass(frozen=True)
class BudgetSettings(_Section):
    """``search.budget``: no new trial once the sweep has spent ``amount`` ``unit`` (search/budget.py)."""

    WHERE: ClassVar[str] = "search.budget"
    amount: float | None = setting(None, anything)  # checked by search.budget.Budget
    unit: str = setting("trial_epochs", text)  # choices: search.budget.UNITS


@dataclass(frozen=True)
class SearchSettings(_Section):
    """``search``: the sampler, the trials, the objectives, early stopping, the budget, resume
    and the stores (``conf/search/*.yaml`` comments each key)."""

    WHERE: ClassVar[str] = "search"
    sampler: str = setting("mo_tpe", one_of(*SAMPLERS))
    n_trials: int = setting(10, _n_trials)
    concurrency: int = setting(2, integer(1))
    seed: int = setting(0, integer(0))
    resume: bool = setting(False, boolean)
    resume_dir: str | None = setting(None, optional(text))
    resume_accept: list[str] | None = setting(None, optional(dotted_keys), factory=list)
    n_startup_trials: int = setting(4, integer(0))
    population_size: int | None = setting(None, optional(integer(2)))
    #: None: the model's default (:func:`default_objectives`): val_acc (max) and flops_deployed
    #: (min); a causal-LM text sweep: val_ppl (min) and flops_deployed (min).
    objectives: list[dict[str, str]] | None = setting(None, optional(check_objectives))
    #: ``["params_deployed <= 0.5 * dense", "latency_ms <= 20"]``: parsed into :class:`Constraint`
    #: (in :attr:`constraint_list`); the metrics are checked against what the trials report by
    #: the pre-flight, as the objectives are.
    constraints: list[str] | None = setting(None, optional(lambda where, v: parse_constraints(where, v)), factory=list)
    methods: list[str] | None = setting(None, optional(str_list))
    scheduler: str | None = setting(None, optional(text))  # choices: search.schedulers.SCHEDULERS
    asha: AshaSettings = setting(None, mapping, factory=lambda: AshaSettings())
    budget: BudgetSettings = setting(None, mapping, factory=lambda: BudgetSettings())
    seeds: int = setting(1, integer(1))
    search_settings: bool = setting(True, boolean)
    storage: str | None = setting(None, optional(text))
    optuna_storage: str | None = setting(None, optional(_optuna_storage))
    #: The constraints, parsed (derived from ``constraints``).
    constraint_list: tuple[Constraint, ...] = field(init=False, default=())
    #: ``none``, ``asha`` or ``mo_asha``: ``scheduler``, or the older ``asha.enabled`` (derived).
    scheduler_kind: str = field(init=False, default="none")
    #: The rungs (:class:`search.schedulers.RungSettings`, derived from ``asha``).
    rungs: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        # The nested groups, typed once (a raw mapping from from_dict, or already typed).
        if not isinstance(self.asha, AshaSettings):
            object.__setattr__(self, "asha", AshaSettings.from_dict(self.asha))
        if not isinstance(self.budget, BudgetSettings):
            object.__setattr__(self, "budget", BudgetSettings.from_dict(self.budget))
        # Checked here, once, by the functions that live beside the schedulers.
        from search.rungs import rung_settings, scheduler_kind

        object.__setattr__(self, "scheduler_kind", scheduler_kind(self.raw_early_stopping()))
        object.__setattr__(self, "constraint_list", tuple(parse_constraints("search.constraints", self.constraints)))
        object.__setattr__(self, "rungs", rung_settings(self.raw_early_stopping()))

    def raw_early_stopping(self) -> dict[str, Any]:
        """``scheduler``, ``asha`` and ``budget`` as the dict-level checks take them."""
        return {"scheduler": self.scheduler, "asha": self.asha.to_dict(), "budget": self.budget.to_dict()}


def _train_config_keys(known: Iterable[str]) -> dict[str, CheckFn]:
    """``TrainConfig`` fields not declared on :class:`TrialSettings`, checked by their
    annotation (bool/int/float/str): a setting added to the library is a trial key at once."""
    from prunelib.train_config import TrainConfig

    out: dict[str, CheckFn] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in known:
            continue
        hint = hints.get(f.name)
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        check = boolean if kind is bool else integer() if kind is int else number() if kind is float else anything
        out[f.name] = optional(check) if type(None) in typing.get_args(hint) else check
    return out


@dataclass(frozen=True)
class TrialSettings(_Section):
    """``trial``: one trial's training, resources, measurements and what it keeps
    (``conf/config.yaml`` comments each key). Fields of ``prunelib.train_config.TrainConfig``
    not declared here (``accelerator``, ``val_every_n_epochs``, ...) are trial keys too, checked
    by their annotation, and kept in ``train_options``.

    ``finetune_epochs`` is 3 here (the sweep's default: a one-shot cut recovers in 3 epochs);
    ``TrainConfig.finetune_epochs`` is 2, deliberately: the library's default for a direct
    ``train_with_method`` call, where there is no sweep config at all.
    """

    WHERE: ClassVar[str] = "trial"
    epochs: int = setting(10, integer(1))
    finetune_epochs: int = setting(3, integer(0))
    optimizer: str = setting("sgd", one_of("sgd", "adam"))
    lr: float = setting(0.05, number(0, strict=True))
    finetune_lr: float | None = setting(None, optional(number(0, strict=True)))
    momentum: float = setting(0.9, number(0))
    weight_decay: float = setting(5.0e-4, number(0))
    cpus: float = setting(1, number(0, strict=True))
    gpus: float | str = setting(0, either(one_of("auto"), number(0)))
    precision: str = setting("32-true", precision)
    seed: int = setting(0, integer(0))
    max_retries: int = setting(1, integer(0))
    measure_latency: bool = setting(False, boolean)
    latency_batch_size: int = setting(256, integer(1))
    evaluate_test: bool = setting(True, boolean)
    fgsm_epsilon: float | None = setting(None, optional(number(0)))
    export_onnx: bool = setting(False, boolean)
    keep_weights: str = setting("all", _keep_weights)
    verbose: bool = setting(False, boolean)
    faults: Any = setting(None, _faults)  # a test's fault plan (search/faults.py)
    channels_last: bool = setting(False, boolean)
    compile: bool = setting(False, boolean)
    compile_backend: str = setting("inductor", text)
    cuda_graphs: bool = setting(False, boolean)
    train_options: dict[str, Any] = field(default_factory=dict)  # the other TrainConfig fields given

    @classmethod
    def keys(cls) -> dict[str, CheckFn]:
        own = super().keys()
        return {**own, **_train_config_keys(own)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str | None = None) -> TrialSettings:
        cls.check_raw(raw, where)
        own = super().keys()
        raw = dict(raw or {})
        settings = cls(**{k: v for k, v in raw.items() if k in own},
                       train_options={k: v for k, v in raw.items() if k not in own})
        settings.check_speed()
        return settings

    def check_speed(self) -> None:
        """The speed settings' own checks (``TrainConfig``), named as trial keys."""
        from prunelib.train_config import SPEED_SETTINGS, TrainConfig

        try:
            TrainConfig(**{key: getattr(self, key) for key in SPEED_SETTINGS})
        except ValueError as exc:
            raise ConfigError(f"trial.{exc}") from exc


@dataclass(frozen=True)
class TrackingSettings(_Section):
    """``tracking``: the MLflow store and what a trial logs while it runs
    (``conf/tracking/*.yaml``)."""

    WHERE: ClassVar[str] = "tracking"
    kind: str = setting("sqlite", one_of("sqlite", "server", "none"))
    uri: str | None = setting(None, optional(_tracking_uri))
    experiment: str = setting("prunesearch", text)
    artifact_location: str | None = setting(None, optional(text))
    epoch_metrics: bool = setting(True, boolean)
    log_model: bool = setting(True, boolean)
    system_metrics_s: float = setting(1.0, number(low=0))
    front_plots_s: float = setting(30.0, number(low=0))

    #: What a trial logs while it runs (search/trials/mlflow_run.py reads them from its tracking dict).
    TRIAL_LOGGING: ClassVar[tuple[str, ...]] = ("epoch_metrics", "log_model", "system_metrics_s")

    def trial_logging(self) -> dict[str, Any]:
        """The settings a trial's MLflow logging reads."""
        return {key: getattr(self, key) for key in self.TRIAL_LOGGING}


@dataclass(frozen=True)
class ClusterSettings(_Section):
    """``cluster``: this machine's own Ray (``local``) or an existing cluster (``ray``)."""

    WHERE: ClassVar[str] = "cluster"
    kind: str = setting("local", one_of("local", "ray"))
    address: str | None = setting(None, optional(text))
    num_cpus: float | None = setting(None, optional(number(0, strict=True)))
    num_gpus: float | None = setting(None, optional(number(0)))
    runtime_env: dict[str, Any] | None = setting(None, optional(mapping))
    log_to_driver: bool = setting(False, boolean)


@dataclass(frozen=True)
class ExportSettings(_Section):
    """``export``: where the front's masks and configs go, under the output directory."""

    WHERE: ClassVar[str] = "export"
    front_dir: str = setting("front", text)


@dataclass(frozen=True)
class PairSettings(_Section):
    """``pair``: KEN's (pretrained, fine-tuned) checkpoints; None = made by the sweep."""

    WHERE: ClassVar[str] = "pair"
    pretrained: str | None = setting(None, optional(text))
    finetuned: str | None = setting(None, optional(text))


#: The named keys of ``data`` and their checks; which of them a data set takes is its door's
#: (prunelib.data.data_source_keys, checked by search.preflight), a user's ``_target_`` takes
#: its own keys as well.
DATA_KEYS: dict[str, CheckFn] = {
    "name": text,
    "_target_": optional(text),
    "root": optional(text),
    "download": boolean,
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "val_fraction": check_fraction,
    "test_fraction": check_fraction,
    "limit_train": optional(integer(1)),
    "num_workers": optional(integer(0)),
    "resident": either(boolean, one_of("auto")),
    "resident_max_mb": number(0, strict=True),
    "num_classes": optional(integer(2)),
    "normalize": boolean,
    "image_size": _image_size,
    "channels": one_of(1, 3),
    "path": text,
    "label": text,
    "features": optional(str_list),
    "test_path": optional(text),
}


@dataclass(frozen=True)
class DataSettings:
    """``data``: a built-in data set (``name``) or a user's ``_target_``, with the keyword
    arguments of either in ``options`` (open-ended: a door or a user's function takes its own)."""

    name: str | None = None
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> DataSettings:
        """The typed view of ``data`` (its named keys checked by :func:`search.preflight` with the
        data set's door; here only that it is a mapping)."""
        raw = dict(raw or {})
        mapping("data", raw)
        return cls(raw.pop("name", None), raw.pop("_target_", None), raw)


#: The named keys of ``model`` (a model's own keyword arguments are checked against its signature).
MODEL_KEYS: dict[str, CheckFn] = {"name": text, "_target_": optional(text), "width": number(0, strict=True)}


@dataclass(frozen=True)
class ModelSettings:
    """``model``: a built-in model (``name``) or a user's ``_target_``, with its keyword
    arguments in ``options``."""

    name: str | None = None
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ModelSettings:
        raw = dict(raw or {})
        mapping("model", raw)
        return cls(raw.pop("name", None), raw.pop("_target_", None), raw)


@dataclass(frozen=True)
class ModuleSettings:
    """``module``: a user's LightningModule (``_target_``; None = the built-in classifier) and
    the keyword arguments of its own (``options``, checked against its signature when built)."""

    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ModuleSettings:
        raw = dict(raw or {})
        mapping("module", raw)
        target = raw.pop("_target_", None)
        if target is None and raw:  # only a user's module takes keys of its own
            key = sorted(raw)[0]
            raise ConfigError(f"module.{key}: unknown key; module takes ['_target_']")
        optional(text)("module._target_", target)
        return cls(target, raw)


#: Top-level keys of the resolved config (``method_pool``: the method configs an unpinned sweep
#: found on Hydra's search path, added by ``python -m search`` and ``load_config``).
TOP_LEVEL_KEYS = ("data", "model", "module", "search", "trial", "tracking", "cluster", "method", "method_pool",
                  "sweep_name", "export", "pair")


def objectives_of(cfg: Mapping[str, Any]) -> list[Objective]:
    """``[(metric, mode), ...]``: a pinned method's own ``objectives`` (KEN: FLOPs do not move,
    so it trades accuracy against the reverted fraction), else ``search.objectives``."""
    return objectives_and_key(cfg)[1]


def objectives_and_key(cfg: Mapping[str, Any]) -> tuple[str, list[Objective]]:
    """``(key, objectives)``: the key they came from (``method.objectives`` or
    ``search.objectives``, for messages) and ``[(metric, mode), ...]``; ``search.objectives:
    null`` gives :func:`default_objectives`."""
    pinned = (cfg.get("method") or {}).get("objectives")
    objectives = pinned or (cfg.get("search") or {}).get("objectives") or default_objectives(cfg)
    return ("method.objectives" if pinned else "search.objectives"), [(o["metric"], o["mode"]) for o in objectives]


#: The objectives of a sweep that names none: accuracy up, the deployed model's FLOPs down.
DEFAULT_OBJECTIVES = ({"metric": "val_acc", "mode": "max"}, {"metric": "flops_deployed", "mode": "min"})


def default_objectives(cfg: Mapping[str, Any]) -> list[dict[str, str]]:
    """``search.objectives: null``: :data:`DEFAULT_OBJECTIVES`, except for a text sweep
    (``model=hf data=text``), where a causal LM is judged by perplexity (``val_ppl``, min)
    and a classifier by ``val_acc`` (:func:`search.trials.text_task.default_text_objectives`)."""
    from search.trials.text_task import default_text_objectives, is_text_config

    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    if isinstance(data, Mapping) and isinstance(model, Mapping) and is_text_config(data, model):
        return default_text_objectives(data, model)
    return [dict(o) for o in DEFAULT_OBJECTIVES]


@dataclass(frozen=True)
class SweepSettings:
    """The whole sweep's settings, typed (see the module docstring).

    Attributes:
        search / trial / tracking / cluster / export / pair: the groups, typed.
        data / model / module: the open-ended groups (named keys typed, the rest in ``options``).
        sweep_name: the sweep's chosen name (None: ``<method or all>-<data>-<timestamp>``).
        method: the pinned method's config (None: the method is searched too).
        method_pool: an unpinned sweep's method configs by name (None: found later).
        budget: ``search.budget`` as a :class:`search.budget.Budget` (None: no budget).
        objectives: ``[(metric, mode), ...]`` (a pinned method's own, else ``search.objectives``).
    """

    search: SearchSettings
    trial: TrialSettings
    tracking: TrackingSettings
    cluster: ClusterSettings
    export: ExportSettings
    pair: PairSettings
    data: DataSettings
    model: ModelSettings
    module: ModuleSettings
    sweep_name: str | None = None
    method: dict[str, Any] | None = None
    method_pool: dict[str, Any] | None = None
    budget: Any = None
    objectives: tuple[Objective, ...] = ()

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> SweepSettings:
        """Parse and check a resolved config (a plain dict, as ``OmegaConf.to_container`` gives it
        or as a Ray worker receives it), once. Groups left out take their defaults.

        Raises:
            ConfigError: the first bad key, named (``search.n_trials: 0 must be ...``).
        """
        mapping("config", cfg)
        for key in cfg:
            if key not in TOP_LEVEL_KEYS:
                raise ConfigError(f"{key}: unknown top-level key; the config takes {list(TOP_LEVEL_KEYS)}")
        for section in ("data", "model", "module", "search", "trial", "tracking", "cluster", "method"):
            check_finite(section, cfg.get(section))
        raw_search = cfg.get("search") or {}
        mapping("search", raw_search)
        for required in ("sampler", "n_trials"):
            if required not in raw_search:
                raise ConfigError(f"search.{required}: required")
        search = SearchSettings.from_dict(raw_search)
        budget = _budget(search, cfg.get("trial") or {})
        trial = TrialSettings.from_dict(cfg.get("trial") or {})
        if "epochs" not in (cfg.get("trial") or {}):
            raise ConfigError("trial.epochs: required")
        cluster = ClusterSettings.from_dict(cfg.get("cluster"))
        tracking = TrackingSettings.from_dict(cfg.get("tracking"))
        export = ExportSettings.from_dict(cfg.get("export"))
        pair = PairSettings.from_dict(cfg.get("pair"))
        if cfg.get("sweep_name") is not None:
            text("sweep_name", cfg["sweep_name"])
        module = ModuleSettings.from_dict(cfg.get("module"))
        if cfg.get("method") is not None:
            mapping("method", cfg["method"])
        return cls(search=search, trial=trial, tracking=tracking, cluster=cluster, export=export, pair=pair,
                   data=DataSettings.from_dict(cfg.get("data")), model=ModelSettings.from_dict(cfg.get("model")),
                   module=module, sweep_name=cfg.get("sweep_name"),
                   method=dict(cfg["method"]) if cfg.get("method") else None,
                   method_pool=dict(cfg["method_pool"]) if cfg.get("method_pool") else None,
                   budget=budget, objectives=tuple(objectives_of(cfg)))


def _budget(search: SearchSettings, trial: Mapping[str, Any]) -> Any:
    """``search.budget`` against the trial's GPUs, checked once (by search.budget, beside what
    it configures); ``search.scheduler`` and ``search.asha`` were checked with the search group."""
    from search.budget import Budget

    return Budget.from_config(search.raw_early_stopping(), dict(trial))


_GROUP_SCHEMAS: dict[str, type] = {"search": SearchSettings, "tracking": TrackingSettings,
                                   "cluster": ClusterSettings}


def register_schemas() -> None:
    """Store each group's dataclass in Hydra's ConfigStore as ``base_<group>`` (group
    ``search``, ``tracking``, ``cluster``; ``trial``, ``export`` and ``pair`` as
    ``base_<name>`` at the top). For applications composing their own config with these
    schemas; see the module docstring for why ``conf/`` itself does not."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schema in _GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=_hydra_node(schema))
    for name, schema in (("trial", TrialSettings), ("export", ExportSettings), ("pair", PairSettings)):
        cs.store(name=f"base_{name}", node={name: _hydra_node(schema)})


def _hydra_node(schema: type) -> dict[str, Any]:
    """A section's defaults as a plain mapping (OmegaConf takes nested groups as mappings)."""
    out = {}
    for f in dataclasses.fields(schema):
        if not f.init or "check" not in f.metadata:
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        out[f.name] = _hydra_node(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def tracking_uri(tracking: TrackingSettings) -> str | None:
    """The tracking URI the ``tracking`` settings name (None when tracking is off;
    ``mlflow.db`` in the working directory when they name none)."""
    if tracking.kind == "none":
        return None
    return str(tracking.uri) if tracking.uri else f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
