"""The sweep's Ray Tune searcher: Ray's ``OptunaSearch`` on the sweep's study, saved without
pickling its sampler or its study.

Ray Tune pickles its search algorithm: into ``tuner.pkl`` when the ``Tuner`` is built, and into
the experiment directory every few seconds (``Searcher.save``), so that a sweep can resume.
Ray's ``OptunaSearch`` pickles its whole ``__dict__``: the sampler, the study (which holds the
sampler again) and one ``optuna.Trial`` per running trial. A sampler is not promised to be
picklable (optuna 5.1's genetic samplers, NSGA-II and NSGA-III, hold a ``threading.Lock``), so
:class:`StudySearcher` saves what rebuilds them instead:

- the sampler as its recipe: ``search`` settings and a factory (:func:`make_sampler`); a
  restored searcher builds a fresh sampler whose seed is shifted by the trials the study already
  holds, so a seeded random or startup phase does not replay the configurations it already drew;
- the study as its storage URL and name (the sweep's RDB store holds every trial); an in-memory
  study (no URL) as its frozen trials, added back on restore;
- running trials as their trial numbers in the study.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from search.sampling import CONSTRAINTS_ATTR, SamplerFactory, make_sampler, open_optuna_storage, trial_constraints_api

__all__ = ["StudySearcher"]


def _trials_held(storage: Any, study_name: str) -> int:
    """How many trials the study ``study_name`` holds in ``storage`` (0 when it does not exist)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


class StudySearcher(OptunaSearch):
    """Ray's ``OptunaSearch`` on the sweep's study, whose saved state holds neither the sampler nor
    the study (see the module docstring): any sampler works, picklable or not.

    Args:
        space: the define-by-run search space (``search.space.SearchSpace``).
        objectives: ``[(metric, "max"|"min"), ...]``.
        search: the ``search`` settings the sampler is built from (``sampler``, ``seed``, ...).
        study_name: the Optuna study (the sweep's name).
        storage_url: the study's RDB URL; None keeps the study in memory.
        sampler_factory: builds the sampler from ``search`` settings (:func:`make_sampler`).
    """

    def __init__(self, space: Any, objectives: Sequence[tuple[str, str]], search: Mapping[str, Any],
                 study_name: str, storage_url: str | None = None,
                 sampler_factory: SamplerFactory = make_sampler) -> None:
        self._search_settings = dict(search)
        self._sampler_factory = sampler_factory
        self._storage_url = storage_url
        storage = open_optuna_storage(storage_url) if storage_url else None
        # A new searcher on a study that already holds trials (a resumed sweep whose Tune state
        # was lost) moves its seed on past them too, as a restored one does.
        done = _trials_held(storage, study_name) if storage is not None else 0
        seed = int(self._search_settings.get("seed", 0))
        super().__init__(space=space, metric=[m for m, _ in objectives], mode=[d for _, d in objectives],
                         sampler=sampler_factory({**self._search_settings, "seed": seed + done}),
                         study_name=study_name, storage=storage)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Record the trial's constraint values (``search.constraints``) as its Optuna user
        attribute :data:`~search.sampling.CONSTRAINTS_ATTR` (<= 0: met) before Ray tells the
        study, so the sampler's ``constraints_func`` reads them; then as Ray's ``OptunaSearch``."""
        constraints = self._constraints()
        ot_trial = self._ot_trials.get(trial_id)
        if constraints and result and ot_trial is not None and trial_id not in self._completed_trials:
            from search.settings import constraint_values

            values = constraint_values(constraints, result)
            # Named by the constraint as written, in the user attrs (what people read) and, on an
            # Optuna that has them, as the trial's constraints (what the samplers read).
            ot_trial.set_user_attr(CONSTRAINTS_ATTR, {c.text: v for c, v in zip(constraints, values)})
            ot_trial.set_user_attr("feasible", all(v <= 0 for v in values))
            if trial_constraints_api():
                for i, value in enumerate(values):
                    ot_trial.set_constraint(str(i), value)
        super().on_trial_complete(trial_id, result, error)

    def _constraints(self) -> tuple[Any, ...]:
        """``search.constraints`` parsed once per searcher (kept with its state; the recipe
        holds them as written), not once per finished trial."""
        if "_constraint_list" not in self.__dict__:  # a new searcher, or one saved before this was kept
            from search.settings import parse_constraints

            self._constraint_list = tuple(parse_constraints("search.constraints",
                                                            self._search_settings.get("constraints")))
        return self._constraint_list

    @property
    def study(self) -> Any:
        """The ``optuna.Study`` the sampler works on."""
        return self._ot_study

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        study = state.pop("_ot_study", None)
        state.pop("_sampler", None)
        state.pop("_storage", None)
        state["_ot_trials"] = {tid: trial.number for tid, trial in self._ot_trials.items()}
        if self._storage_url is None:
            state["_frozen_trials"] = list(study.get_trials(deepcopy=False)) if study is not None else []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import optuna

        state = dict(state)
        numbers: dict[str, int] = state.pop("_ot_trials", {})
        frozen = state.pop("_frozen_trials", None)
        self.__dict__.update(state)
        storage = open_optuna_storage(self._storage_url) if self._storage_url else optuna.storages.InMemoryStorage()
        directions = ["minimize" if m == "min" else "maximize" for m in self._mode]
        study = optuna.create_study(storage=storage, study_name=self._study_name, directions=directions,
                                    pruner=optuna.pruners.NopPruner(), load_if_exists=True)
        if frozen:
            study.add_trials(frozen)
        # A fresh sampler; its seed moves on by the trials already drawn (no replayed draws).
        done = len(study.get_trials(deepcopy=False))
        seed = int(self._search_settings.get("seed", 0))
        study.sampler = self._sampler_factory({**self._search_settings, "seed": seed + done})
        self._storage, self._sampler, self._ot_study = storage, study.sampler, study
        self._ot_trials = {
            tid: optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
            for tid, number in numbers.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
