"""A sweep's budget: what its trials cost, and no new trial once ``search.budget`` is spent.

``search.budget: {amount: A, unit: U}`` with ``U`` one of

* ``trial_epochs``: epochs trained, summed over trials (IMP's rounds and fine-tunes count);
* ``cpu_seconds``: trial seconds times ``trial.cpus``, summed over trials (the CPU time the
  trials held, what a cluster bills; Ray's start and the driver are not counted);
* ``gpu_seconds``: trial seconds times ``trial.gpus`` (fractions count as such).

A trial's cost is read from its results (Tune's ``time_total_s``; ``epoch`` of the per-epoch
reports, ``epochs`` of the final one), so trials stopped early cost what they ran. Once the
spent amount reaches the budget no new trial starts; trials already running finish (their cost
is counted, so a sweep ends at most a few trials past its budget) and the sweep reports it.
``search.n_trials`` still caps the number of trials.

:class:`~search.budget_searcher.BudgetSearcher` wraps the sweep's searcher to do this. It also tells the sampler that
a trial stopped early was *pruned*: Ray's ``OptunaSearch`` would otherwise record the trial's
last intermediate report (an epoch-1 model, dense FLOPs) as if it were the trial's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from search.errors import ConfigError

__all__ = ["UNITS", "Budget", "BudgetLedger", "BudgetSearcher"]

UNITS = ("trial_epochs", "cpu_seconds", "gpu_seconds")


@dataclass(frozen=True)
class Budget:
    """How much a sweep may spend.

    Attributes:
        amount: in ``unit`` (> 0).
        unit: ``trial_epochs``, ``cpu_seconds`` or ``gpu_seconds`` (see the module doc).
    """

    amount: float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r} is not one of {list(UNITS)}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, (int, float)) or not self.amount > 0:
            raise ValueError(f"amount {self.amount!r} must be a number > 0")

    @classmethod
    def from_config(cls, search: dict[str, Any], trial: dict[str, Any] | None = None) -> Budget | None:
        """``search.budget`` as a Budget (None when unset); ConfigError naming the key if bad."""
        budget = search.get("budget")
        if budget is None:
            return None
        if not isinstance(budget, dict):
            raise ConfigError(f"search.budget: expected {{amount: N, unit: {'|'.join(UNITS)}}}, got {budget!r}")
        unknown = set(budget) - {"amount", "unit"}
        if unknown:
            raise ConfigError(f"search.budget: unknown key(s) {sorted(unknown)}; it takes amount and unit")
        if budget.get("amount") is None:
            return None
        unit = budget.get("unit", "trial_epochs")
        if unit not in UNITS:
            raise ConfigError(f"search.budget.unit: {unit!r} is not one of {list(UNITS)}")
        amount = budget["amount"]
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            raise ConfigError(f"search.budget.amount: {amount!r} must be a number > 0 ({unit})")
        gpus = (trial or {}).get("gpus", 0)
        if unit == "gpu_seconds" and gpus in (0, None, 0.0):
            raise ConfigError("search.budget.unit: gpu_seconds, but trial.gpus is 0 (trials hold no GPU); "
                              "use cpu_seconds or give trials a GPU")
        return cls(float(amount), str(unit))


@dataclass
class BudgetLedger:
    """What each trial of a sweep has cost so far (plain data: saved with Tune's state).

    Attributes:
        budget: the limit, or None (the ledger then only counts).
        cpus / gpus: resources each trial holds (for CPU / GPU seconds).
        usage: trial id -> ``[seconds, epochs]``, the largest values its results reported.
    """

    budget: Budget | None
    cpus: float = 1.0
    gpus: float = 0.0
    usage: dict[str, list[float]] = field(default_factory=dict)

    def record(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """Take a trial's (intermediate or final) result into account."""
        if not result:
            return
        seconds, epochs = self.usage.get(trial_id, [0.0, 0.0])
        try:
            seconds = max(seconds, float(result.get("time_total_s") or 0.0))
        except (TypeError, ValueError):
            pass
        for key in ("epochs", "epoch"):  # the final result's total, else the per-epoch count
            value = result.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                epochs = max(epochs, float(value))
                break
        self.usage[trial_id] = [seconds, epochs]

    def totals(self) -> dict[str, float]:
        """Spent so far, in every unit."""
        seconds = sum(s for s, _ in self.usage.values())
        return {"trial_epochs": sum(e for _, e in self.usage.values()),
                "cpu_seconds": seconds * self.cpus, "gpu_seconds": seconds * self.gpus}

    def spent(self) -> float:
        """Spent so far in the budget's unit (CPU seconds without a budget)."""
        return self.totals()[self.budget.unit if self.budget else "cpu_seconds"]

    @property
    def exhausted(self) -> bool:
        """Whether the budget is spent (never without a budget)."""
        return self.budget is not None and self.spent() >= self.budget.amount

    def describe(self) -> str:
        """``'312.4 of 300 cpu_seconds'`` (or the CPU seconds spent, without a budget)."""
        if self.budget is None:
            return f"{self.spent():.1f} cpu_seconds"
        return f"{self.spent():.1f} of {self.budget.amount:g} {self.budget.unit}"


def __getattr__(name: str) -> Any:
    # BudgetSearcher is a Ray Tune searcher (search/budget_searcher.py): checking a config's
    # budget does not import Ray Tune.
    if name == "BudgetSearcher":
        from search.budget_searcher import BudgetSearcher

        return BudgetSearcher
    raise AttributeError(f"module 'search.budget' has no attribute {name!r}")
