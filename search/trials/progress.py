"""The trial side of a sweep's progress (see :mod:`search.progress` for the channel): a Lightning
callback in each trial that sends its state to the sweep's board. Imported by the workers only.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from search.progress_board import SEND_AFTER_S, SEND_INTERVAL_S, board_name, format_epoch_line, publish
from search.settings import TrialSettings

__all__ = ["TrialProgress", "trial_progress"]

log = logging.getLogger("search")


class TrialProgress(L.Callback):
    """Sends a trial's progress (see the module docstring); attach it to every phase's trainer.

    Args:
        trial_id / method: who the records are about.
        phases: the method's plan, ``[(phase name, epochs), ...]`` (the epoch count and ETA).
        metric: the validation metric to show (logged by the module as it validates).
        board: the sweep's board name; None = no sweep (epoch lines are printed here).
        verbose: one record per finished epoch (``trial.verbose``).
        start: ``time.perf_counter()`` when the trial started (default: now).
        send_after_s / send_interval_s: no live record before the first, then at most one per
            the second (seconds).
    """

    def __init__(self, trial_id: str, method: str, phases: Sequence[tuple[str, int]], metric: str = "val_acc", *,
                 board: str | None = None, verbose: bool = False, start: float | None = None,
                 send_after_s: float = SEND_AFTER_S, send_interval_s: float = SEND_INTERVAL_S) -> None:
        self.trial_id = str(trial_id)
        self.method = str(method)
        epochs = [max(0, int(e)) for _, e in phases]
        self.total = sum(epochs)
        self._before = [sum(epochs[:i]) for i in range(len(epochs))]
        self.metric = metric
        self.board = board
        self.verbose = verbose
        self.start = time.perf_counter() if start is None else start
        self.send_after_s = send_after_s
        self.send_interval_s = send_interval_s
        self._trained_from: float | None = None
        self._last_send = -math.inf
        self._loss_sum: Any = None
        self._loss_n = 0
        self._value: float | None = None
        self._value_epoch: int | None = None
        self.run = time.time()  # tells a retried trial's records from its first attempt's
        self._epochs: deque[dict[str, Any]] = deque(maxlen=200)  # verbose: the epoch records

    def _phase(self, trainer: L.Trainer) -> tuple[str, int, Any]:
        from prunelib.callbacks import PruningCallback

        for cb in trainer.callbacks:
            if isinstance(cb, PruningCallback):
                return cb.phase.name, cb.phase_index, cb.method
        return "train", 0, None

    def _epoch(self, trainer: L.Trainer) -> int:
        _, index, _ = self._phase(trainer)
        before = self._before[index] if index < len(self._before) else 0
        return before + int(trainer.current_epoch) + 1

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, kind: str, in_epoch: float) -> dict[str, Any]:
        """The trial's state now (``in_epoch``: fraction of the current epoch done)."""
        from prunelib.training import network_of

        now = time.perf_counter()
        phase, _, method = self._phase(trainer)
        epoch = self._epoch(trainer)
        done = min(1.0, (epoch - 1 + in_epoch) / self.total) if self.total else 0.0
        masks = getattr(method, "masks", None)
        sparsity = float(masks.sparsity(network_of(pl_module))) if masks is not None else 0.0
        trained = now - (self._trained_from or now)
        eta = trained * (1.0 - done) / done if done > 0 else None
        loss = float(self._loss_sum) / self._loss_n if self._loss_n else None
        return {"trial": self.trial_id, "method": self.method, "kind": kind, "phase": phase, "epoch": epoch,
                "epochs": self.total, "done": done, "sparsity": sparsity, "metric": self.metric,
                "value": self._value, "value_epoch": self._value_epoch, "loss": loss,
                "elapsed_s": now - self.start, "eta_s": eta}

    def _send(self, record: dict[str, Any]) -> None:
        self._last_send = time.perf_counter()
        record["run"] = self.run
        if record["kind"] == "epoch":
            self._epochs.append(record)
        sent = False
        if self.board is not None:
            try:
                sent = publish(self.board, self.trial_id, {"live": {**record, "kind": "live"},
                                                           "epochs": list(self._epochs)})
            except Exception as exc:  # progress must never stop a trial
                log.debug("progress board: %s", exc)
                sent = True
        if not sent and record["kind"] == "epoch":  # not in a sweep: the epoch line goes here
            print(format_epoch_line(record), flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training is over after the last phase: the line says the trial is measuring now
        # (export, test split, tracking), not a stale ETA.
        if self.board is not None and self._epoch(trainer) > self.total \
                and time.perf_counter() - self.start >= self.send_after_s:
            record = self.record(trainer, pl_module, "live", 0.0)
            record.update({"phase": "measure", "epoch": self.total, "done": 1.0, "eta_s": None})
            self._send(record)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._trained_from is None:
            self._trained_from = time.perf_counter()
        self._loss_sum, self._loss_n = None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if hasattr(loss, "detach"):
            # Summed on the device; read once per record (no sync per step).
            self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
            self._loss_n += 1
        if self.board is None:
            return
        now = time.perf_counter()
        if now - self.start < self.send_after_s or now - self._last_send < self.send_interval_s:
            return
        batches = trainer.num_training_batches
        in_epoch = (batch_idx + 1) / batches if isinstance(batches, int) and batches > 0 else 0.0
        self._send(self.record(trainer, pl_module, "live", in_epoch))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self._value, self._value_epoch = float(value), self._epoch(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.verbose:
            self._send(self.record(trainer, pl_module, "epoch", 1.0))


def trial_progress(trial_id: str, method: str, phases: Sequence[Any], objectives: Sequence[tuple[str, str]],
                   trial: TrialSettings, sweep_root: str | None,
                   start: float | None = None) -> TrialProgress | None:
    """The progress callback of a trial: in a sweep (Ray running, a sweep root) it reports to
    the sweep's board; outside one only ``trial.verbose`` prints epoch lines; else None.

    ``start``: ``time.perf_counter()`` when the trial started. ``phases``: the method's plan (:class:`~prunelib.methods.base.Phase` objects or
    ``(name, epochs)`` pairs). The metric shown is the first ``val_*`` objective, else ``val_acc``.
    """
    verbose = trial.verbose
    board = None
    if sweep_root and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            board = board_name(sweep_root)
    if board is None and not verbose:
        return None
    metric = next((m for m, _ in objectives if str(m).startswith("val_")), "val_acc")
    plan = [(p.name, p.epochs) if hasattr(p, "epochs") else (str(p[0]), int(p[1])) for p in phases]
    return TrialProgress(trial_id, method, plan, metric, board=board, verbose=verbose, start=start)
