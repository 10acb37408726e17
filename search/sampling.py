"""The sweep's Optuna sampler, built from its settings (:func:`make_sampler`), and the sweep's
Optuna store. The Ray Tune searcher that asks it is :class:`search.study_searcher.StudySearcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from search.settings import SAMPLERS
from search.errors import ConfigError

__all__ = ["SamplerFactory", "make_sampler", "open_optuna_storage"]

SamplerFactory = Callable[[Mapping[str, Any]], Any]


def make_sampler(search: Mapping[str, Any]) -> Any:
    """The Optuna sampler named by ``search.sampler`` (seeded by ``search.seed``).

    NSGA-II's population defaults to a quarter of the budget (at least 4): Optuna's default
    of 50 would make every trial of a small sweep random.
    """
    import optuna

    seed = int(search.get("seed", 0))
    kind = search["sampler"]
    if kind == "mo_tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search.get("n_startup_trials", 4)),
                                          multivariate=True, group=True, constant_liar=True)
    if kind == "nsga2":
        pop = search.get("population_size") or max(4, int(search["n_trials"]) // 4)
        return optuna.samplers.NSGAIISampler(population_size=int(pop), seed=seed)
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
