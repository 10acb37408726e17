"""Sparsity over time: *when* to cut, separate from *what* to cut.

A schedule answers one question: at training step ``t`` (optimizer steps, counted from the
start of the phase that prunes), which sparsity should the masks have, if they should be
updated now? ``target_at(step)`` returns that fraction, or ``None`` for "leave the masks".
Methods ask their schedule at every step; the schedules are plain, picklable objects.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "OneShot", "Cubic", "IterativeRounds", "GrowPruneCycles"]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value}")


class Schedule:
    """Base class: a sparsity target as a function of the training step."""

    final_sparsity: float

    def target_at(self, step: int) -> float | None:
        """Sparsity (fraction) to prune to at ``step``, or None to leave the masks alone."""
        raise NotImplementedError


@dataclass
class OneShot(Schedule):
    """Prune once, to ``final_sparsity``, at ``at_step`` (0 = before the first update)."""

    final_sparsity: float
    at_step: int = 0

    def __post_init__(self) -> None:
        _check_fraction("final_sparsity", self.final_sparsity)

    def target_at(self, step: int) -> float | None:
        return self.final_sparsity if step == self.at_step else None


@dataclass
class Cubic(Schedule):
    """Gradual magnitude pruning's cubic ramp (Zhu & Gupta 2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` for
    ``t in {t0, t0 + dt, ..., t0 + n * dt}``; the last update lands exactly on ``s_f``.

    Attributes:
        final_sparsity: s_f, fraction.
        initial_sparsity: s_i, fraction (0 by default).
        start_step: t0, optimizer steps.
        n_updates: n, the number of mask updates after the first.
        frequency: dt, optimizer steps between updates.
    """

    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    n_updates: int = 10
    frequency: int = 100

    def __post_init__(self) -> None:
        _check_fraction("final_sparsity", self.final_sparsity)
        _check_fraction("initial_sparsity", self.initial_sparsity)
        if self.n_updates < 1 or self.frequency < 1 or self.start_step < 0:
            raise ValueError("Cubic needs n_updates >= 1, frequency >= 1 and start_step >= 0")

    @property
    def end_step(self) -> int:
        """The step of the last update (t0 + n * dt)."""
        return self.start_step + self.n_updates * self.frequency

    def sparsity_at(self, step: int) -> float:
        """The ramp's value at any step (clamped to [s_i, s_f] outside the window)."""
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.n_updates * self.frequency)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - frac) ** 3

    def target_at(self, step: int) -> float | None:
        if step < self.start_step or step > self.end_step:
            return None
        if (step - self.start_step) % self.frequency:
            return None
        if step == self.start_step and self.initial_sparsity == 0.0:
            return None  # nothing to prune yet
        return self.sparsity_at(step)

    @classmethod
    def fit_to(cls, final_sparsity: float, total_steps: int, start_fraction: float = 0.0,
               end_fraction: float = 0.75, n_updates: int = 10,
               initial_sparsity: float = 0.0) -> Cubic:
        """A ramp placed in a run of ``total_steps``: from ``start_fraction`` to ``end_fraction``.

        Ending before the run's end (0.75 by default) leaves steps to recover at a useful
        learning rate, as Zhu & Gupta advise. ``n_updates`` is reduced when the window is
        shorter than that many steps.
        """
        start = int(start_fraction * total_steps)
        window = max(1, int(end_fraction * total_steps) - start)
        n = max(1, min(n_updates, window))
        return cls(final_sparsity, initial_sparsity, start, n, max(1, window // n))


@dataclass
class IterativeRounds(Schedule):
    """Iterative pruning in ``rounds`` equal-ratio steps to ``final_sparsity``.

    After round r (1-based) the density is ``(1 - final_sparsity) ** (r / rounds)``, so each
    round removes the same fraction of the surviving weights (20 % per round gives the
    Lottery Ticket recipe's 0.8^r). Rounds are counted by the method's outer loop; ``step``
    here means the round number.
    """

    final_sparsity: float
    rounds: int = 3

    def __post_init__(self) -> None:
        _check_fraction("final_sparsity", self.final_sparsity)
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")

    def target_at(self, step: int) -> float | None:
        if not 1 <= step <= self.rounds:
            return None
        if step == self.rounds:
            return self.final_sparsity
        return 1.0 - (1.0 - self.final_sparsity) ** (step / self.rounds)

    @property
    def per_round_fraction(self) -> float:
        """Fraction of surviving weights removed in each round."""
        return 1.0 - (1.0 - self.final_sparsity) ** (1.0 / self.rounds)


@dataclass
class GrowPruneCycles(Schedule):
    """GaP's cyclic grow-and-prune steps (Ma et al. 2022, C-GaP / the repo's S-GaP).

    The prunable layers are split into ``num_partitions`` groups. ``rounds`` rounds of
    ``num_partitions`` steps each: at step ``k`` (1-based) group ``grown_partition(k)`` is
    grown dense and trained for ``epochs_per_step`` epochs while the others stay sparse, and at
    the step's end that group is pruned back to ``final_sparsity``. ``step`` here means the
    GaP step number, counted by the method's outer loop (one training phase per step).

    Attributes:
        final_sparsity: target fraction each group returns to at the end of its step.
        num_partitions: kappa, groups of layers grown one at a time (cyclic order).
        rounds: R, passes over all groups.
        epochs_per_step: T, training epochs of one step.
    """

    final_sparsity: float
    num_partitions: int = 3
    rounds: int = 1
    epochs_per_step: int = 1

    def __post_init__(self) -> None:
        _check_fraction("final_sparsity", self.final_sparsity)
        for name in ("num_partitions", "rounds", "epochs_per_step"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        """kappa * R grow-and-prune steps."""
        return self.num_partitions * self.rounds

    @property
    def growth_epochs(self) -> int:
        """Training epochs of all steps together (kappa * R * T), before any fine-tune."""
        return self.total_steps * self.epochs_per_step

    def grown_partition(self, step: int) -> int:
        """Index (0-based) of the group grown dense during step ``step`` (1-based)."""
        if not 1 <= step <= self.total_steps:
            raise ValueError(f"step must be in [1, {self.total_steps}], got {step}")
        return (step - 1) % self.num_partitions

    def target_at(self, step: int) -> float | None:
        """The grown group's sparsity at the end of step ``step``; None outside the steps."""
        return self.final_sparsity if 1 <= step <= self.total_steps else None
