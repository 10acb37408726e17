"""The sweep's Optuna sampler, built from its settings (:func:`make_sampler`), and the sweep's
Optuna store. The Ray Tune searcher that asks it is :class:`search.study_searcher.StudySearcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from search.settings import SAMPLERS, SearchSettings
from search.errors import ConfigError

__all__ = ["CONSTRAINTS_ATTR", "SamplerFactory", "constraints_func", "make_sampler", "open_optuna_storage",
           "trial_constraints_api"]

SamplerFactory = Callable[[Mapping[str, Any]], Any]


#: The Optuna trial user attribute that holds a trial's constraint values (<= 0: met), set by
#: :class:`search.study_searcher.StudySearcher` when the trial completes.
CONSTRAINTS_ATTR = "constraints"


def trial_constraints_api() -> bool:
    """Whether this Optuna stores constraints on the trial (``Trial.set_constraint``, Optuna 5):
    its samplers then read them from every trial themselves, and ``constraints_func`` (deprecated
    there) is not needed."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def constraints_func(n_constraints: int) -> Callable[[Any], list[float]]:
    """Optuna's ``constraints_func`` for an Optuna without ``Trial.set_constraint``: a trial's
    values from its user attribute :data:`CONSTRAINTS_ATTR`; a trial without them (stopped
    before it reported) misses every one."""
    def read(trial: Any) -> list[float]:
        values = trial.user_attrs.get(CONSTRAINTS_ATTR)
        values = list(values.values()) if isinstance(values, dict) else values
        return [float(v) for v in values] if values and len(values) == n_constraints else [1.0] * n_constraints
    return read


def make_sampler(search: SearchSettings | Mapping[str, Any]) -> Any:
    """The Optuna sampler named by ``search.sampler`` (seeded by ``search.seed``), from the typed
    settings or the ``search`` section (parsed here: a searcher keeps the plain section, which
    Ray Tune pickles, as its recipe).

    NSGA-II's population defaults to a quarter of the budget (at least 4): Optuna's default
    of 50 would make every trial of a small sweep random. With ``search.constraints`` the
    TPE and NSGA-II samplers take each trial's constraint values into account (TPE models
    feasible trials apart, NSGA-II ranks feasible ones first): Optuna 5 reads them from the
    trial (``Trial.set_constraint``, set by :class:`search.study_searcher.StudySearcher`);
    an older Optuna gets a ``constraints_func`` (:func:`constraints_func`). Random search
    ignores them (the front still keeps the trials that meet them).
    """
    import optuna

    settings = search if isinstance(search, SearchSettings) else SearchSettings.from_dict(search)
    seed, kind = settings.seed, settings.sampler
    n_constraints = len(settings.constraint_list)
    constrained = ({"constraints_func": constraints_func(n_constraints)}
                   if n_constraints and not trial_constraints_api() else {})
    if kind == "mo_tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.n_startup_trials,
                                          multivariate=True, group=True, constant_liar=True, **constrained)
    if kind == "nsga2":
        pop = settings.population_size or max(4, settings.n_trials // 4)
        return optuna.samplers.NSGAIISampler(population_size=int(pop), seed=seed, **constrained)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"search.sampler: {kind!r} is not one of {list(SAMPLERS)}")


def open_optuna_storage(url: str) -> Any:
    """The sweep's Optuna RDB storage, created under a lock (a fresh SQLite file would race)."""
    import optuna

    from search.storage import store_creation_lock

    if url.startswith("sqlite:///"):
        with store_creation_lock(Path(url[len("sqlite:///"):])):
            return optuna.storages.RDBStorage(url)
    return optuna.storages.RDBStorage(url)
