"""A resumed sweep counts trials that Tune's last checkpoint missed against ``search.n_trials``."""

from __future__ import annotations

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.config import build_search_space
from search.tracking import SweepTracker, log_trial_run
from search.tuner import _make_budget_limiter_class
from tests.conftest import compose


def _limiter(tmp_path, n_trials: int):
    cfg = compose(["+method=magnitude", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    space = build_search_space(cfg)
    tracker = SweepTracker(cfg["tracking"]["uri"], "budget-test")
    parent = tracker.start_parent("sweep", params={}, tags={})
    tracking = {"uri": cfg["tracking"]["uri"], "experiment_id": tracker.experiment_id, "parent_run_id": parent}
    searcher = OptunaSearch(space=space, metric=["val_acc", "flops_effective"], mode=["max", "min"])
    limiter = _make_budget_limiter_class()(searcher, 1, n_trials, tracking)
    return limiter, tracking


def _log(tracking, trial_id: str) -> None:
    log_trial_run(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"], trial_id,
                  params={"method": "magnitude"}, metrics={"val_acc": 0.5, "flops_effective": 1000.0})


def _run_one(limiter, trial_id: str, tracking) -> None:
    config = limiter.suggest(trial_id)
    assert isinstance(config, dict) and config["method"] == "magnitude"
    _log(tracking, trial_id)
    limiter.on_trial_complete(trial_id, {"val_acc": 0.5, "flops_effective": 1000.0})


def test_fresh_sweep_suggests_exactly_the_budget(tmp_path):
    limiter, tracking = _limiter(tmp_path, n_trials=3)
    for i in range(3):
        _run_one(limiter, f"t{i}", tracking)
    assert limiter.suggest("t3") == Searcher.FINISHED


def test_restored_limiter_counts_trials_logged_after_its_checkpoint(tmp_path):
    limiter, tracking = _limiter(tmp_path, n_trials=4)
    _run_one(limiter, "t0", tracking)
    checkpoint = limiter.get_state()  # Tune's last experiment checkpoint
    _run_one(limiter, "t1", tracking)  # finished and logged, then the driver was killed
    restored, _ = _limiter(tmp_path / "fresh", n_trials=4)
    restored.tracking = tracking
    restored.set_state(checkpoint)
    assert restored.suggested_ids == {"t0"}
    _run_one(restored, "t2", tracking)
    assert restored.orphan_ids == ["t1"]
    _run_one(restored, "t3", tracking)
    # t0, t1 (orphan), t2, t3: the budget of 4 is spent although the restored state knew only 3
    assert restored.suggest("t4") == Searcher.FINISHED


def test_limiter_state_survives_pickling(tmp_path):
    import pickle

    limiter, tracking = _limiter(tmp_path, n_trials=2)
    _run_one(limiter, "t0", tracking)
    state = pickle.loads(pickle.dumps(limiter.get_state()))
    assert state["suggested_ids"] == {"t0"} and state["n_trials"] == 2
