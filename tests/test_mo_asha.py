"""Multi-objective ASHA (search/schedulers.py): decisions on synthetic rung results, resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from search.pareto import crowding_distance, hypervolume, hypervolume_contributions, non_dominated_ranks
from search.schedulers import (
    STATE_FILE,
    MultiObjectiveASHA,
    RungBook,
    RungSettings,
    build_scheduler,
    scheduler_kind,
)
from search.space import ConfigError

OBJ = [("val_acc", "max"), ("flops_effective", "min")]


def _trial(trial_id: str, folder=None):
    """A stand-in for Tune's Trial: an id and (optionally) the experiment directory."""
    if folder is None:
        return SimpleNamespace(trial_id=trial_id)  # no storage: the rungs stay in memory
    return SimpleNamespace(trial_id=trial_id, local_experiment_path=str(folder))


def _report(sched, trial, epoch, acc, flops, **extra):
    return sched.on_trial_result(None, trial, {"epoch": epoch, "val_acc": acc, "flops_effective": flops,
                                               "final_result": False, **extra})


# --- pareto helpers ---------------------------------------------------------------------------

def test_ranks_peel_fronts_and_put_nan_last():
    v = np.array([[0.9, 10], [0.8, 20], [0.95, 30], [0.7, 30], [np.nan, 1]])
    assert non_dominated_ranks(v, ["max", "min"]).tolist() == [0, 1, 0, 2, 3]


def test_crowding_marks_extremes_infinite_and_interior_by_gap():
    d = crowding_distance(np.array([[0.0, 1.0], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]))
    assert math.isinf(d[0]) and math.isinf(d[3])
    assert d[1] == pytest.approx(0.9 / 1.0 + 0.9 / 1.0) and d[2] == pytest.approx(0.5 + 0.5)


def test_hypervolume_contributions_are_exclusive_volumes():
    v = np.array([[0.9, 10.0], [0.8, 5.0], [0.7, 8.0]])  # the last is dominated by the second
    ref = [0.0, 20.0]
    c = hypervolume_contributions(v, ["max", "min"], ref)
    total = hypervolume(v, ["max", "min"], ref)
    assert c[2] == 0.0
    assert c[0] == pytest.approx(total - hypervolume(v[1:], ["max", "min"], ref))
    assert c[0] == pytest.approx((0.9 - 0.8) * (20 - 10))


# --- decisions --------------------------------------------------------------------------------

def test_cheap_slightly_less_accurate_trial_survives_where_accuracy_asha_stops_it():
    sched = MultiObjectiveASHA(OBJ, RungSettings(grace_period=1, reduction_factor=3), verbose=False)
    ray_asha = _Bracket(min_t=1, max_t=100, reduction_factor=3, s=0)
    arrivals = [("a", 0.90, 800e3), ("b", 0.91, 800e3), ("c", 0.92, 800e3), ("cheap", 0.88, 200e3)]
    decisions = {}
    for tid, acc, flops in arrivals:
        decisions[tid] = _report(sched, _trial(tid), 1, acc, flops)
        asha = ray_asha.on_result(SimpleNamespace(trial_id=tid), 1, acc)
    assert decisions["cheap"] == TrialScheduler.CONTINUE
    assert asha == TrialScheduler.STOP  # accuracy alone: 0.88 is below the top third


def test_dominated_trials_stop_and_say_why(capsys):
    sched = MultiObjectiveASHA(OBJ, RungSettings(grace_period=1, reduction_factor=3))
    for tid, acc, flops in [("a", 0.92, 800e3), ("b", 0.88, 200e3), ("c", 0.91, 790e3), ("d", 0.90, 500e3)]:
        assert _report(sched, _trial(tid), 1, acc, flops) == TrialScheduler.CONTINUE
    # Dominated by "b" (more accurate and cheaper), and past the best ceil(5/3) = 2 by rank.
    assert _report(sched, _trial("worse"), 1, 0.85, 300e3) == TrialScheduler.STOP
    assert "stopping worse after 1 epochs (front 2" in capsys.readouterr().out
    assert sched.book.stopped == ["worse"]


def test_rungs_follow_grace_period_and_reduction_factor():
    assert RungSettings(1, 3).milestones_upto(30) == [1, 3, 9, 27]
    assert RungSettings(2, 3).milestones_upto(17) == [2, 6]
    assert RungSettings(1, 1.5).milestones_upto(4) == [1, 2, 3, 4]  # rounded up, never repeated
    sched = MultiObjectiveASHA(OBJ, RungSettings(grace_period=2, reduction_factor=3), verbose=False)
    assert _report(sched, _trial("t"), 1, 0.1, 1.0) == TrialScheduler.CONTINUE
    assert sched.book.rungs == {}  # before the grace period nothing is recorded
    _report(sched, _trial("t"), 2, 0.1, 1.0)
    _report(sched, _trial("t"), 5, 0.1, 1.0)  # between rungs: judged at 2 already, nothing new
    assert list(sched.book.rungs) == [2] and "t" in sched.book.rungs[2]


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_reduction_factor_sets_the_share_that_passes_by_rank(factor):
    # A chain: each trial is dominated by every earlier one, so the front is one trial and the
    # rest pass only by rank. Judged against the full rung, ceil(n / factor) pass.
    book = RungBook(OBJ, RungSettings(grace_period=1, reduction_factor=factor))
    n = 12
    for i in range(n):
        book.on_progress(f"t{i}", 1, [0.9 - 0.01 * i, 100.0 + i])
    kept = [t for t in book.rungs[1] if book.decide(1, t).keep]
    assert kept == [f"t{i}" for i in range(math.ceil(n / factor))]


def test_asynchronous_decisions_compare_with_trials_seen_so_far():
    book = RungBook(OBJ, RungSettings(grace_period=1, reduction_factor=2))
    # Worst first: alone it passes; later, better trials arrive.
    assert book.on_progress("bad", 1, [0.5, 900.0]).keep
    assert book.on_progress("good", 1, [0.9, 100.0]).keep
    late = book.on_progress("late", 1, [0.4, 950.0])  # would have passed alone, as "bad" did
    assert not late.keep and late.rank == 2 and late.size == 3 and late.quota == 2 and late.position == 2
    better = book.on_progress("better", 1, [0.6, 800.0])  # second front, place 2 of 4: passes
    assert better.keep and better.rank == 1 and better.position == 1


def test_tie_break_orders_a_rank_by_hypervolume_or_crowding():
    # Front 1 (after "top") holds three points; the middle one is crowded, adds little volume.
    points = {"top": [0.99, 5.0], "x": [0.90, 30.0], "mid": [0.80, 29.5], "y": [0.60, 10.0]}
    for tie_break in ("hypervolume", "crowding"):
        book = RungBook(OBJ, RungSettings(1, 2, tie_break))
        for tid, v in points.items():
            book.on_progress(tid, 1, v)
        order = sorted(points, key=lambda t: book.decide(1, t).position)
        assert order[0] == "top" and order[-1] == "mid", (tie_break, order)


def test_rung_reads_projected_objectives_and_skips_final_results():
    sched = MultiObjectiveASHA(OBJ, RungSettings(grace_period=1, reduction_factor=3), verbose=False)
    _report(sched, _trial("sparse"), 1, 0.80, 800e3, projected_flops_effective=100e3)
    assert sched.book.rungs[1]["sparse"]["values"] == [0.80, 100e3]
    final = {"epochs": 9, "val_acc": 0.1, "flops_effective": 1e9, "final_result": True}
    assert sched.on_trial_result(None, _trial("other"), final) == TrialScheduler.CONTINUE
    assert "other" not in sched.book.rungs[1]


def test_an_objective_missing_from_intermediate_reports_is_left_out():
    book = RungBook([("val_acc", "max"), ("val_fgsm_acc", "max")], RungSettings(1, 3))
    book.on_progress("a", 1, [0.9, math.nan])
    d = book.on_progress("b", 1, [0.5, math.nan])
    assert d.keep is False and d.rank == 1  # compared on accuracy alone


# --- resume -----------------------------------------------------------------------------------

def test_restored_scheduler_reads_its_rungs_and_repeats_its_decisions(tmp_path):
    settings = RungSettings(grace_period=1, reduction_factor=3)
    first = MultiObjectiveASHA(OBJ, settings, verbose=False)
    for tid, acc, flops in [("a", 0.92, 800e3), ("b", 0.88, 200e3), ("c", 0.91, 790e3), ("d", 0.90, 500e3)]:
        first.on_trial_add(None, _trial(tid, tmp_path))
        _report(first, _trial(tid, tmp_path), 1, acc, flops)
    assert _report(first, _trial("worse", tmp_path), 1, 0.85, 300e3) == TrialScheduler.STOP
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert set(saved["rungs"]["1"]) == {"a", "b", "c", "d", "worse"}

    # Tuner.restore unpickles the scheduler as it was built (empty rungs); it finds the file.
    restored = MultiObjectiveASHA(OBJ, settings, verbose=False)
    restored.on_trial_add(None, _trial("a", tmp_path))
    assert set(restored.book.rungs[1]) == {"a", "b", "c", "d", "worse"}
    # A new trial is judged against the trials from before the restart...
    assert _report(restored, _trial("e", tmp_path), 1, 0.84, 600e3) == TrialScheduler.STOP
    # ...a restarted trial that passed passes again, one that was stopped stops again.
    assert _report(restored, _trial("a", tmp_path), 1, 0.10, 900e3) == TrialScheduler.CONTINUE
    assert _report(restored, _trial("worse", tmp_path), 1, 0.99, 1.0) == TrialScheduler.STOP


def test_scheduler_survives_pickling_as_in_tuner_state(tmp_path):
    import pickle

    sched = MultiObjectiveASHA(OBJ, RungSettings(1, 3), verbose=False)
    _report(sched, _trial("a", tmp_path), 1, 0.9, 1.0)
    copy = pickle.loads(pickle.dumps(sched))
    assert copy.book.rungs == sched.book.rungs


# --- config -----------------------------------------------------------------------------------

def test_scheduler_choice_and_its_errors():
    assert scheduler_kind({}) == "none"
    assert scheduler_kind({"asha": {"enabled": True}}) == "asha"
    assert scheduler_kind({"scheduler": "mo_asha"}) == "mo_asha"
    assert isinstance(build_scheduler({"scheduler": "mo_asha", "asha": {"grace_period": 1}}, OBJ), MultiObjectiveASHA)
    assert build_scheduler({"scheduler": "none"}, OBJ) is None
    with pytest.raises(ConfigError, match="search.scheduler: 'hyperband'"):
        scheduler_kind({"scheduler": "hyperband"})
    with pytest.raises(ConfigError, match="search.asha.enabled"):
        scheduler_kind({"scheduler": "mo_asha", "asha": {"enabled": True}})
    with pytest.raises(ConfigError, match="search.asha.reduction_factor"):
        build_scheduler({"scheduler": "mo_asha", "asha": {"reduction_factor": 1}}, OBJ)
    with pytest.raises(ConfigError, match="search.asha.tie_break"):
        build_scheduler({"scheduler": "mo_asha", "asha": {"tie_break": "random"}}, OBJ)
    with pytest.raises(ConfigError, match="search.asha.grace_period"):
        build_scheduler({"scheduler": "mo_asha", "asha": {"grace_period": 0}}, OBJ)


@pytest.mark.parametrize("override, message", [
    ("search.scheduler=mo_asha search.asha.tie_break=best", "search.asha.tie_break: tie_break must be one of"),
    ("search.budget.amount=0", "search.budget.amount: 0 must be a number > 0"),
    ("search.budget.amount=10 search.budget.unit=gpu_seconds", "search.budget.unit: gpu_seconds, but trial.gpus is 0"),
    ("search.seeds=0", "search.seeds: 0 must be >= 1"),
    ("search.methods=[magnitude,nope]", "search.methods: ['nope'] not found"),
])
def test_preflight_names_the_bad_key(override, message):
    from search.config import validate_config
    from tests.conftest import compose

    with pytest.raises(ConfigError) as err:
        validate_config(compose(override.split()))
    assert str(err.value).startswith(message), str(err.value)


def test_search_methods_restricts_the_joint_search():
    from search.config import build_search_space
    from tests.conftest import compose

    assert build_search_space(compose(["search.methods=[gmp,snip]"])).method_names == ["gmp", "snip"]
    assert len(build_search_space(compose([])).method_names) > 5


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_mo_asha_sweep_under_a_budget_with_seed_reruns(tmp_path, ray_local, capsys):
    from search.tuner import run_sweep
    from tests.conftest import compose

    cfg = compose(["search.methods=[magnitude,gmp]", "search.scheduler=mo_asha", "search.asha.grace_period=1",
                   "search.asha.reduction_factor=2", "search.n_trials=30", "search.budget.amount=15",
                   "search.budget.unit=trial_epochs", "search.seeds=2", "search.concurrency=2",
                   "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=300",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    result = run_sweep(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert result.budget_spent and "budget spent:" in out and "of 15 trial_epochs" in out
    assert result.cost["trial_epochs"] >= 15 and len(result.rows) < 30
    assert {r["method"] for r in result.rows} <= {"magnitude", "gmp"}
    state = json.loads(next((tmp_path / "out" / "ray").rglob(STATE_FILE)).read_text())
    judged = set().union(*(set(r) for r in state["rungs"].values()))
    assert judged == {r["trial_id"] for r in result.rows if r["status"] != "failed"}
    assert {r["trial_id"] for r in result.rows if r["status"] == "early_stopped"} == set(state["stopped"])
    # Only the front's trials were rerun, once each (seeds=2), and summarised.
    front_ids = set(result.front["trial_id"])
    reruns = {p.name.rsplit("-seed", 1)[0] for p in (tmp_path / "out" / "seeds").iterdir()}
    assert reruns == front_ids and len(list((tmp_path / "out" / "seeds").iterdir())) == len(front_ids)
    assert set(result.front_seeds["trial_id"]) == front_ids and (result.front_seeds["seeds"] == 2).all()
    assert (tmp_path / "out" / "front" / "front_seeds.csv").is_file()
    assert "Pareto front over 2 seeds (mean ± std)" in out
