"""Sweep budgets: ``search.n_trials`` (a resumed sweep counts trials Tune's last checkpoint
missed) and ``search.budget`` in trial-epochs / CPU / GPU seconds (search/budget.py)."""

from __future__ import annotations

import pytest
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.budget import Budget, BudgetLedger, BudgetSearcher
from search.config import build_search_space
from search.space import ConfigError
from search.tracking import SweepTracker, log_trial_run
from search.tune_callbacks import make_budget_limiter_class as _make_budget_limiter_class
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


# --- search.budget: trial-epochs / CPU / GPU seconds (search/budget.py) -------------------------


class _Recorder(Searcher):
    """An inner searcher that suggests a fixed config and records what it is told."""

    def __init__(self) -> None:
        super().__init__(metric=["val_acc", "flops_effective"], mode=["max", "min"])
        self.completed: list[tuple[str, dict | None, bool]] = []

    def suggest(self, trial_id: str) -> dict:
        return {"method": "magnitude"}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append((trial_id, result, error))


def test_budget_config_and_its_errors():
    assert Budget.from_config({}) is None
    assert Budget.from_config({"budget": {"amount": None, "unit": "cpu_seconds"}}) is None
    assert Budget.from_config({"budget": {"amount": 60, "unit": "cpu_seconds"}}) == Budget(60.0, "cpu_seconds")
    with pytest.raises(ConfigError, match="search.budget.unit: 'hours'"):
        Budget.from_config({"budget": {"amount": 1, "unit": "hours"}})
    with pytest.raises(ConfigError, match="search.budget.amount: -5"):
        Budget.from_config({"budget": {"amount": -5, "unit": "trial_epochs"}})
    with pytest.raises(ConfigError, match="search.budget.unit: gpu_seconds, but trial.gpus is 0"):
        Budget.from_config({"budget": {"amount": 10, "unit": "gpu_seconds"}}, {"gpus": 0})
    with pytest.raises(ConfigError, match="search.budget: unknown key"):
        Budget.from_config({"budget": {"amount": 10, "units": "cpu_seconds"}})


def test_ledger_counts_what_trials_ran_in_every_unit():
    ledger = BudgetLedger(Budget(10, "trial_epochs"), cpus=2, gpus=0.25)
    ledger.record("a", {"epoch": 1, "time_total_s": 3.0, "final_result": False})
    ledger.record("a", {"epoch": 2, "time_total_s": 5.0, "final_result": False})
    ledger.record("b", {"epochs": 7, "time_total_s": 4.0, "final_result": True})
    assert ledger.totals() == {"trial_epochs": 9.0, "cpu_seconds": 18.0, "gpu_seconds": 2.25}
    assert not ledger.exhausted and ledger.describe() == "9.0 of 10 trial_epochs"
    ledger.record("a", {"epochs": 3, "time_total_s": 6.0, "final_result": True})
    assert ledger.exhausted and ledger.spent() == 10.0
    assert not BudgetLedger(None).exhausted


def test_budget_searcher_stops_suggesting_once_spent_and_says_so(capsys):
    inner = _Recorder()
    searcher = BudgetSearcher(inner, BudgetLedger(Budget(4, "trial_epochs")))
    assert searcher.suggest("a") == {"method": "magnitude"}
    assert searcher.suggest("b") == {"method": "magnitude"}
    searcher.on_trial_result("a", {"epoch": 2, "time_total_s": 1.0, "final_result": False})
    searcher.on_trial_complete("a", {"epochs": 3, "time_total_s": 2.0, "final_result": True})
    assert searcher.suggest("c") == {"method": "magnitude"}  # 3 of 4 epochs spent
    searcher.on_trial_result("b", {"epoch": 1, "time_total_s": 1.0, "final_result": False})
    assert searcher.suggest("d") == Searcher.FINISHED
    assert searcher.suggest("e") == Searcher.FINISHED
    out = capsys.readouterr().out
    assert out.count("budget spent: 4.0 of 4 trial_epochs; no new trials; 2 running trial(s) finish") == 1


def test_early_stopped_trials_reach_the_sampler_as_pruned_not_as_results():
    inner = _Recorder()
    searcher = BudgetSearcher(inner, BudgetLedger(None))
    searcher.suggest("stopped")
    searcher.suggest("done")
    searcher.on_trial_complete("stopped", {"epoch": 1, "val_acc": 0.9, "flops_effective": 1e6, "final_result": False})
    final = {"epochs": 4, "val_acc": 0.8, "flops_effective": 2e5, "final_result": True}
    searcher.on_trial_complete("done", final)
    assert inner.completed == [("stopped", None, False), ("done", final, False)]
    assert searcher.ledger.totals()["trial_epochs"] == 5.0  # the stopped trial's epoch still counts


def test_budget_searcher_state_survives_tune_checkpoints():
    import pickle

    searcher = BudgetSearcher(_Recorder(), BudgetLedger(Budget(100, "cpu_seconds")))
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"epochs": 2, "time_total_s": 30.0, "final_result": True})
    state = pickle.loads(pickle.dumps(searcher.get_state()))
    restored = BudgetSearcher(_Recorder(), BudgetLedger(Budget(100, "cpu_seconds")))
    restored.set_state(state)
    assert restored.ledger.spent() == 30.0 and restored.ledger.usage == {"a": [30.0, 2.0]}
