"""``conf/method/*.yaml`` ``space:`` entries -> Optuna distributions: the one translation.

A method config looks like::

    name: imp
    settings: {sparsity: 0.8, rewind: weights, ...}     # fixed settings of the method
    space:                                              # what the search varies
      sparsity: {type: float, low: 0.3, high: 0.97}
      rewind: {type: categorical, choices: [weights, lr]}
      rewind_epoch: {type: int, low: 0, high: 2, when: {rewind: weights}}

Entry types: ``float`` and ``int`` (``low``, ``high``, optional ``log``, ``step`` and ``size``)
and ``categorical`` (``choices``). ``size: N`` makes a numeric entry a vector: N Optuna
parameters ``METHOD.KEY.0`` .. ``METHOD.KEY.<N-1>`` (each modelled on its own by the sampler, as
RL-Pruner's per-layer distributions are), handed to the method as one list of N values, e.g.
``llm_structured``'s per-block ``ffn_fractions``. ``when`` makes an entry conditional on values sampled earlier
for the same method. A key ``trial.NAME`` varies a trial setting (``trial.finetune_epochs``).

Optuna parameter names are ``METHOD.KEY`` so two methods never share a distribution; when the
method is not pinned, a categorical ``method`` parameter comes first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from search.errors import ConfigError
from search.settings import check_fraction

__all__ = ["CONF_DIR", "ConfigError", "Dimension", "MethodSpace", "SearchSpace", "conf_dir", "method_class",
           "discover_method_configs", "load_method_configs", "parse_space", "settings_from_params"]


def conf_dir() -> Path:
    """The Hydra config tree: the package's own (``search/conf`` in an installed wheel, mapped
    to the checkout's ``conf/`` in an editable install), else the checkout's ``conf/``."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("search.conf")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "config.yaml").is_file():
                return Path(location).resolve()
    return Path(__file__).resolve().parent.parent / "conf"


CONF_DIR = conf_dir()
_TYPES = ("float", "int", "categorical")
# Settings that are fractions wherever they appear: checked in fixed settings and bounds.
_FRACTION_KEYS = ("sparsity", "min_density", "probe_frac", "start_fraction", "end_fraction",
                  "end_protection", "depth_slope")


@dataclass(frozen=True)
class Dimension:
    """One searched setting.

    Attributes:
        key: the setting's name (``"sparsity"``, or ``"trial.finetune_epochs"``).
        type: ``"float"``, ``"int"`` or ``"categorical"``.
        low / high: bounds (inclusive) for numeric types.
        log: sample on a log scale.
        step: grid step for numeric types (None = continuous / 1 for int).
        choices: the options of a categorical.
        when: conditions ``{key: value}`` on earlier entries of the same method.
        size: None = a scalar; N = a vector of N values, each its own Optuna parameter
            ``NAME.i`` with this dimension's distribution (numeric types only).
    """

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: Mapping[str, Any] = field(default_factory=dict)
    size: int | None = None

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution of this dimension (of each entry, for a vector: see
        :meth:`distributions` for the parameters it is sampled as)."""
        if self.type == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def param_names(self, name: str) -> list[str]:
        """The Optuna parameter names this dimension is sampled as, when it is called ``name``:
        ``[name]`` for a scalar, ``[name.0, ..., name.<size-1>]`` for a vector."""
        return [name] if self.size is None else [f"{name}.{i}" for i in range(self.size)]

    def distributions(self, name: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distributions of this dimension by parameter name (one per vector entry)."""
        dist = self.distribution()
        return {param: dist for param in self.param_names(name)}

    def value(self, params: Mapping[str, Any], name: str) -> Any:
        """This dimension's setting from sampled ``params``: the scalar under ``name``, or the
        vector's entries ``name.i`` gathered into a list (None when a parameter is missing)."""
        if self.size is None:
            return params.get(name)
        if name in params:  # already a list (a configuration given whole, e.g. to enqueue)
            return list(params[name])
        if not all(param in params for param in self.param_names(name)):
            return None
        return [params[param] for param in self.param_names(name)]

    def probe_values(self) -> list[Any]:
        """The values a pre-flight builds the method with: each choice, or both ends of the range
        (for a vector: every entry at the low end, then every entry at the high end)."""
        if self.type == "categorical":
            return list(self.choices)
        ends = [self.low, self.high]
        return ends if self.size is None else [[end] * self.size for end in ends]

    def suggest(self, trial: Any, name: str) -> Any:
        """Sample this dimension from an Optuna trial (or Ray's wrapper of one) as ``name``; a
        vector as its ``size`` parameters ``name.i``, returned as a list."""
        if self.size is not None:
            scalar = Dimension(self.key, self.type, self.low, self.high, self.log, self.step, self.choices)
            return [scalar.suggest(trial, param) for param in self.param_names(name)]
        if self.type == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(name, list(self.choices))


def _check_fraction(where: str, key: str, value: Any) -> None:
    if key.split(".")[-1] in _FRACTION_KEYS:
        check_fraction(f"{where}.{key}", value, low_inclusive=True)


def _finite(where: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")


def parse_space(method: str, space: Mapping[str, Any] | None) -> list[Dimension]:
    """Validate and parse one method's ``space:`` mapping; errors name ``method.space.KEY``."""
    dims: list[Dimension] = []
    seen: set[str] = set()
    if space is not None and not isinstance(space, Mapping):
        raise ConfigError(f"method[{method}].space: expected a mapping of setting -> {{type: ...}}, "
                          f"got {type(space).__name__} {space!r}")
    for key, spec in (space or {}).items():
        where = f"method[{method}].space.{key}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with a 'type', got {spec!r}")
        kind = spec.get("type")
        if kind not in _TYPES:
            raise ConfigError(f"{where}.type: {kind!r} is not one of {list(_TYPES)}")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when", "size"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        raw_when = spec.get("when")
        if raw_when is not None and not isinstance(raw_when, Mapping):
            raise ConfigError(f"{where}.when: expected a mapping {{earlier_key: value}}, got {raw_when!r}")
        when = dict(raw_when or {})
        for cond in when:
            if cond not in seen:
                raise ConfigError(f"{where}.when: {cond!r} must be an earlier entry of this space")
        size = spec.get("size")
        if size is not None:
            if kind == "categorical":
                raise ConfigError(f"{where}.size: only a float or int entry can be a vector (size), not a categorical")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"{where}.size: {size!r} must be an integer >= 1 (the vector's length, e.g. the "
                                  "model's number of blocks)")
            if key.startswith("trial."):
                raise ConfigError(f"{where}.size: trial settings are scalars; only a method setting can be a vector")
        if kind == "categorical":
            raw = spec.get("choices")
            if raw is not None and (isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple))):
                raise ConfigError(f"{where}.choices: expected a list, got {raw!r} (write choices: [{raw}])")
            choices = tuple(raw or ())
            if not choices:
                raise ConfigError(f"{where}.choices: a categorical needs at least one choice")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"{where}.choices: {list(choices)} repeats a choice")
            for c in choices:
                if isinstance(c, (Mapping, list, tuple)):
                    raise ConfigError(f"{where}.choices: {c!r} is not a plain value (number, string, bool, null)")
                _finite(f"{where}.choices", c)
                if isinstance(c, (int, float)):
                    _check_fraction(f"method[{method}].space", key, c)
            dims.append(Dimension(key, kind, choices=choices, when=when))
        else:
            low, high = spec.get("low"), spec.get("high")
            if isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, (int, float)) \
                    or not isinstance(high, (int, float)):
                raise ConfigError(f"{where}: low and high must be numbers, got {low!r}, {high!r}")
            _finite(f"{where}.low", low)
            _finite(f"{where}.high", high)
            if "choices" in spec:
                raise ConfigError(f"{where}.choices: only a categorical has choices")
            step = spec.get("step")
            if step is not None:
                if isinstance(step, bool) or not isinstance(step, (int, float)):
                    raise ConfigError(f"{where}.step: {step!r} is not a number")
                _finite(f"{where}.step", step)
                if step <= 0:
                    raise ConfigError(f"{where}.step: {step!r} must be > 0")
                if spec.get("log"):
                    raise ConfigError(f"{where}: log and step cannot be combined (Optuna samples a log scale "
                                      "without a grid)")
                if kind == "int" and int(step) != step:
                    raise ConfigError(f"{where}.step: an int dimension needs an integer step, got {step!r}")
            if not isinstance(spec.get("log", False), bool):
                raise ConfigError(f"{where}.log: {spec.get('log')!r} must be true or false")
            if low > high:
                raise ConfigError(f"{where}: low ({low}) is greater than high ({high})")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise ConfigError(f"{where}.low: a log scale needs low > 0, got {low}")
            if key.split(".")[-1] in _FRACTION_KEYS:
                for bound, value in (("low", low), ("high", high)):
                    check_fraction(f"{where}.{bound}", value, low_inclusive=True)
            if kind == "int" and (int(low) != low or int(high) != high):
                raise ConfigError(f"{where}: int bounds must be integers, got {low}, {high}")
            dims.append(Dimension(key, kind, float(low) if kind == "float" else int(low),
                                  float(high) if kind == "float" else int(high), log,
                                  step, when=when, size=size))
        seen.add(key)
    return dims


@dataclass
class MethodSpace:
    """One method's fixed settings and searched dimensions.

    ``target``: the dotted path of the method's class when the config names one (``_target_``,
    a user's own :class:`~prunelib.methods.base.PruningMethod`); None = ``prunelib.methods.METHODS[name]``.
    """

    name: str
    settings: dict[str, Any]
    dims: list[Dimension]
    target: str | None = None

    def method_class(self) -> type:
        """The method's class."""
        return method_class(self.name, self.target)

    def build(self, settings: Mapping[str, Any]) -> Any:
        """An instance of the method with ``settings``."""
        return self.method_class()(**settings)

    def active_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """``settings`` without the conditional keys whose ``when:`` is false for them.

        A dimension is active when every key it depends on is itself active and holds the
        required value (so a chain ``allocation -> distribution -> end_protection`` drops the
        tail with its head); keys no dimension declares are always active. What the console,
        MLflow and the CSVs show of a trial: an inactive key is absent, not its default.
        """
        inactive: set[str] = set()
        for dim in self.dims:
            if any(k in inactive or settings.get(k) != v for k, v in dim.when.items()):
                inactive.add(dim.key)
        return {k: v for k, v in settings.items() if k not in inactive}

    def probes(self) -> list[tuple[str, dict[str, Any]]]:
        """The settings a pre-flight builds the method with, each with the key it names on error:
        the fixed settings, then each searched method setting at each of its
        :meth:`Dimension.probe_values` with the conditions that make it live. The entries a
        value switches on come with it at their first probe value (``allocation: per_layer`` is
        probed with its ``ffn_fractions``), so a choice is not refused for lacking settings the
        space always samples with it. Entries are probed last first: a fault in an entry that a
        choice switches on names that entry, not the choice. ``trial.*`` entries are skipped.
        """
        out = [(f"method[{self.name}].settings", dict(self.settings))]
        for dim in reversed(self.dims):
            if dim.key.startswith("trial."):
                continue
            for value in dim.probe_values():
                settings = {**self.settings, **dim.when, dim.key: value}
                switched = {dim.key}
                for other in self.dims:  # in order, so a chain of conditions follows its head
                    if other.key.startswith("trial.") or other.key in switched:
                        continue
                    if any(k in switched for k in other.when) and \
                            all(settings.get(k) == v for k, v in other.when.items()):
                        settings[other.key] = other.probe_values()[0]
                        switched.add(other.key)
                shown = f"[{value[0]!r}] x {len(value)}" if isinstance(value, list) else repr(value)
                out.append((f"method[{self.name}].space.{dim.key}: value {shown}", settings))
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample this method's dimensions; returns ``{KEY: value}`` (unprefixed; a vector's
        value is a list)."""
        values: dict[str, Any] = {}
        for dim in self.dims:
            if all(values.get(k) == v for k, v in dim.when.items()):
                values[dim.key] = dim.suggest(trial, f"{self.name}.{dim.key}")
        return values


def load_method_configs(conf_dir: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """Every ``conf/method/*.yaml`` as a plain dict, keyed by the file's stem."""
    from omegaconf import OmegaConf

    folder = Path(conf_dir or CONF_DIR) / "method"
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        assert isinstance(cfg, dict)
        if cfg.get("name") != path.stem:
            raise ConfigError(f"{path}: name {cfg.get('name')!r} must equal the file name {path.stem!r}")
        out[path.stem] = cfg
    return out


def discover_method_configs(sources: list[tuple[str, str]] | None = None) -> dict[str, dict[str, Any]]:
    """Every method config on Hydra's search path, keyed by name.

    Args:
        sources: ``[(schema, path), ...]`` of the config sources (``("file", "/abs/dir")``,
            ``("pkg", "my_pkg.conf")``), e.g. from ``HydraConfig.get().runtime.config_sources``;
            so ``--config-dir`` and ``hydra.searchpath`` entries add their ``method/*.yaml``.
            None = the package's own tree only.

    Raises:
        ConfigError: a method file whose ``name`` differs from the file name.
    """
    if not sources:
        return load_method_configs()
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from omegaconf import OmegaConf

    search_path = ConfigSearchPathImpl()
    for schema, path in sources:
        if schema in ("file", "pkg"):
            search_path.append("prunesearch", f"{schema}://{path}")
    repo = ConfigRepository(search_path)
    out: dict[str, dict[str, Any]] = {}
    for name in repo.get_group_options("method"):
        result = repo.load_config(f"method/{name}")
        if result is None:
            continue
        cfg = OmegaConf.to_container(result.config, resolve=True)
        assert isinstance(cfg, dict)
        if cfg.get("name") != name:
            raise ConfigError(f"{result.path}/method/{name}.yaml: name {cfg.get('name')!r} must equal the file "
                              f"name {name!r}")
        out[name] = cfg
    return out


def method_class(name: str, target: str | None = None) -> type:
    """The class of method ``name``: ``target`` (a dotted path to a PruningMethod subclass) or the
    registered ``prunelib.methods.METHODS[name]``.

    Raises:
        ConfigError: unknown name, or a target that does not import or is not a PruningMethod.
    """
    from prunelib.methods import METHODS
    from prunelib.methods.base import PruningMethod

    if target is None:
        if name not in METHODS:
            raise ConfigError(f"method: unknown method {name!r}; registered: {sorted(METHODS)}, or give the "
                              "config a _target_ naming your PruningMethod class")
        return METHODS[name]
    from prunelib.targets import TargetError, resolve_target

    try:
        cls = resolve_target(target, f"method[{name}]._target_")
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise ConfigError(f"method[{name}]._target_={target}: not a prunelib PruningMethod subclass")
    return cls


def method_space(cfg: Mapping[str, Any]) -> MethodSpace:
    """Validate one method config (settings and space) into a :class:`MethodSpace`."""
    name = str(cfg.get("name"))
    if cfg.get("settings") is not None and not isinstance(cfg.get("settings"), Mapping):
        raise ConfigError(f"method[{name}].settings: expected a mapping, got {cfg.get('settings')!r}")
    settings = dict(cfg.get("settings") or {})
    for key, value in settings.items():
        _check_fraction(f"method[{name}].settings", key, value)
    target = cfg.get("_target_")
    return MethodSpace(name, settings, parse_space(name, cfg.get("space")), str(target) if target else None)


class SearchSpace:
    """The define-by-run search space over methods and their settings.

    Args:
        methods: method configs by name (from ``conf/method``), or their spaces already parsed
            (:func:`search.preflight.check_method` returns them); one entry when pinned.
        pinned: the method was chosen by the user (``+method=NAME``): it is not searched.
        search_settings: when False, only the method (if not pinned) is searched and each
            method runs with its fixed settings.
    """

    def __init__(self, methods: Mapping[str, Mapping[str, Any] | MethodSpace], pinned: bool,
                 search_settings: bool = True) -> None:
        if not methods:
            raise ConfigError("method: no method to search")
        self.spaces = {name: cfg if isinstance(cfg, MethodSpace) else method_space(cfg)
                       for name, cfg in methods.items()}
        self.pinned = pinned
        self.search_settings = search_settings

    @property
    def method_names(self) -> list[str]:
        """The methods this space covers, in a stable order."""
        return list(self.spaces)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        """Optuna define-by-run function (what Ray's ``OptunaSearch(space=...)`` calls)."""
        if self.pinned:
            name = self.method_names[0]
            if self.search_settings:
                self.spaces[name].suggest(trial)
            return {"method": name}
        name = trial.suggest_categorical("method", self.method_names)
        if self.search_settings:
            self.spaces[name].suggest(trial)
        return None

    def distributions(self, method: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distributions of one method, by Optuna parameter name (a vector's entries
        ``METHOD.KEY.i`` one by one, as they are sampled)."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for d in self.spaces[method].dims:
            out.update(d.distributions(f"{method}.{d.key}"))
        return out


def settings_from_params(space: SearchSpace, params: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split a sampled config into ``(method, method settings, trial overrides)``.

    ``params`` is what the searcher gave the trial: ``{"method": ..., "METHOD.KEY": value}``;
    a vector entry's parameters ``METHOD.KEY.i`` become one list under ``KEY``. Fixed settings
    from the config come first; sampled values override them.
    """
    method = str(params["method"])
    if method not in space.spaces:
        raise ConfigError(f"method: unknown method {method!r}; known: {space.method_names}")
    settings = dict(space.spaces[method].settings)
    trial_overrides: dict[str, Any] = {}
    prefix = f"{method}."
    vectors: dict[str, Dimension] = {}  # Optuna parameter name -> the vector it is an entry of
    for dim in space.spaces[method].dims:
        if dim.size is not None:
            vectors.update({param: dim for param in dim.param_names(prefix + dim.key)})
    for key, value in params.items():
        if not key.startswith(prefix):
            continue
        if key in vectors:
            dim = vectors[key]
            value = dim.value(params, prefix + dim.key)
            if value is None:  # not every entry was sampled: a searcher that did not use this space
                raise ConfigError(f"method[{method}].space.{dim.key}: the trial's parameters hold only some of "
                                  f"its {dim.size} entries {dim.param_names(prefix + dim.key)}")
            key = prefix + dim.key
        sub = key[len(prefix):]
        if sub.startswith("trial."):
            trial_overrides[sub[len("trial."):]] = value
        else:
            settings[sub] = value
    return method, settings, trial_overrides
