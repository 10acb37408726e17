"""Every sampler of ``conf/search/`` runs a real sweep, and the searcher is saved and restored
without pickling the sampler (optuna 5.1's NSGA-II holds a lock; search/sampling.py)."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle as cloudpickle

from search.config import build_search_space
from search.sampling import make_sampler
from search.study_searcher import StudySearcher
from search.tuner import run_sweep
from tests.conftest import REPO, compose

SAMPLER_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "search").glob("*.yaml"))
OBJECTIVES = [("val_acc", "max"), ("flops_effective", "min")]


def _searcher(tmp_path: Path, sampler: str, storage: bool, factory=make_sampler) -> StudySearcher:
    cfg = compose(["+method=magnitude", f"search={sampler}"])
    url = f"sqlite:///{tmp_path}/optuna.db" if storage else None
    return StudySearcher(build_search_space(cfg), OBJECTIVES, cfg["search"], study_name="s", storage_url=url,
                         sampler_factory=factory)


def _finish(searcher: StudySearcher, trial_id: str, value: float) -> None:
    searcher.on_trial_complete(trial_id, {"val_acc": value, "flops_effective": 1000.0 * (1 - value)})


def test_conf_search_lists_every_sampler():
    assert set(SAMPLER_CONFIGS) == {"mo_tpe", "nsga2", "random"}


class _LockedSampler(optuna.samplers.RandomSampler):
    """A sampler that cannot be pickled, like optuna 5.1's NSGA-II (whatever the optuna here)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.lock = threading.Lock()
        self.seed = seed


def _locked_factory(search):  # noqa: ANN001, ANN202
    return _LockedSampler(int(search["seed"]))


@pytest.mark.parametrize("storage", [True, False], ids=["rdb", "in_memory"])
@pytest.mark.parametrize("sampler", SAMPLER_CONFIGS)
def test_the_searcher_saves_and_restores_without_pickling_its_sampler(tmp_path, sampler, storage):
    searcher = _searcher(tmp_path, sampler, storage)
    assert [searcher.suggest(f"t{i}")["method"] for i in range(3)] == ["magnitude"] * 3
    _finish(searcher, "t0", 0.9)
    _finish(searcher, "t1", 0.5)
    # What Tune does with it: cloudpickle into tuner.pkl, Searcher.save into the experiment dir.
    blob = cloudpickle.dumps(searcher)
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = _searcher(tmp_path, sampler, storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert type(restored.study.sampler) is type(make_sampler(compose([f"search={sampler}"])["search"]))
    # The running trial t2 is still the same Optuna trial, and it completes into the same study.
    _finish(restored, "t2", 0.7)
    assert restored.suggest("t3")["method"] == "magnitude"
    _finish(restored, "t3", 0.6)
    states = [t.state for t in restored.study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4
    values = [t.values for t in restored.study.get_trials(deepcopy=False)]
    assert values[2] == [0.7, pytest.approx(300.0)]
    unpickled = cloudpickle.loads(blob)
    assert len(unpickled.study.get_trials(deepcopy=False)) >= 3


def test_an_unpicklable_sampler_is_rebuilt_with_a_seed_moved_past_the_draws(tmp_path):
    searcher = _searcher(tmp_path, "random", storage=True, factory=_locked_factory)
    with pytest.raises(TypeError, match="lock"):
        pickle.dumps(searcher.study.sampler)
    drawn = [searcher.suggest(f"t{i}") for i in range(2)]
    _finish(searcher, "t0", 0.9)
    _finish(searcher, "t1", 0.8)
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = _searcher(tmp_path / "unused", "random", storage=False, factory=_locked_factory)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert isinstance(restored.study.sampler, _LockedSampler)
    assert restored.study.sampler.seed == 2  # seed 0 + the two trials already in the study
    # A restored random sampler does not replay the first draws.
    assert restored.suggest("t2") not in drawn


def test_a_new_searcher_on_a_study_with_trials_does_not_replay_its_draws(tmp_path):
    """A resumed sweep whose Tune state was lost builds a new searcher on the recorded study."""
    first = _searcher(tmp_path, "random", storage=True, factory=_locked_factory)
    drawn = [first.suggest(f"t{i}") for i in range(3)]
    for i, value in enumerate((0.9, 0.8, 0.7)):
        _finish(first, f"t{i}", value)
    again = _searcher(tmp_path, "random", storage=True, factory=_locked_factory)
    assert again.study.sampler.seed == 3  # seed 0 + the three trials the study holds
    assert again.suggest("t3") not in drawn
    assert _searcher(tmp_path / "fresh", "random", storage=True, factory=_locked_factory).study.sampler.seed == 0


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLER_CONFIGS)
def test_a_real_two_trial_sweep_runs_with_every_sampler(tmp_path, ray_local, sampler):
    cfg = compose(["+method=magnitude", f"search={sampler}", "search.n_trials=2", "search.concurrency=2",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "trial.epochs=2", "trial.finetune_epochs=1",
                   "data.limit_train=300"])
    result = run_sweep(cfg, tmp_path / "out")
    assert [r["status"] for r in result.rows] == ["ok", "ok"]
    study = optuna.load_study(study_name=_study_name(tmp_path / "out"), storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if sampler == "nsga2":  # the genetic sampler itself drew them (it tags each trial's generation)
        assert all("NSGAIISampler:generation" in t.system_attrs for t in study.trials)


def _study_name(output_dir: Path) -> str:
    import json

    return json.loads((output_dir / "sweep.json").read_text())["optuna_study"]
