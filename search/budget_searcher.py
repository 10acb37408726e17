"""The searcher wrapper that enforces ``search.budget`` (see :mod:`search.budget`): no new trial
once the budget is spent; trials stopped early reach the sampler as pruned."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

if TYPE_CHECKING:
    from search.budget import BudgetLedger


__all__ = ["BudgetSearcher"]


class BudgetSearcher(Searcher):
    """A searcher wrapper: no new trial once the ledger's budget is spent; early-stopped
    trials reach the inner searcher as pruned (no result), failed ones as errors.

    Holds only the inner searcher, the ledger and sets, so Tune saves it with the experiment
    state and a resumed sweep keeps counting from where it was.

    Args:
        searcher: the sweep's searcher (OptunaSearch behind the concurrency limit).
        ledger: the budget and its bookkeeping.
    """

    def __init__(self, searcher: Searcher, ledger: BudgetLedger) -> None:
        self.searcher = searcher
        self.ledger = ledger
        self.live: set[str] = set()
        self.stopped_by_budget = False
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return _set_search_properties_backwards_compatible(self.searcher.set_search_properties, metric, mode,
                                                           config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.ledger.exhausted:
            if not self.stopped_by_budget:
                self.stopped_by_budget = True
                running = f"; {len(self.live)} running trial(s) finish" if self.live else ""
                print(f"budget spent: {self.ledger.describe()}; no new trials{running}", flush=True)
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.live.add(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.record(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        self.ledger.record(trial_id, result)
        if result is not None and result.get("final_result") is False:
            result = None  # stopped at an intermediate report: pruned (or failed), not a result
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
