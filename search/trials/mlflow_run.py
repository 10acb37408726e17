"""A trial's MLflow run while it trains: created when the trial starts, per-epoch metrics,
system metrics, the surgered model; :func:`search.tracking.log_trial_run` ends it.

:meth:`TrialRun.start` makes the child run (RUNNING) at the trial's start, so MLflow shows a
running trial and its real duration. :meth:`TrialRun.epoch_logger` is a Lightning callback
that logs, after every epoch (``step`` = the trial's epoch index from 0, over all its
phases), ``train_loss`` (the mean training loss of the epoch), ``val_acc`` and ``val_loss``
(the masked model after the epoch's pruning step, on the validation split) and ``sparsity``
(the schedule's curve); a user's LightningModule logs its own metrics (those Lightning holds
at the epoch's end) instead of ``val_acc``/``val_loss``. The last epoch's entry is held back:
the trial's final results (measured after the method's ``finalize``) take its place, so each
per-epoch metric has one entry per epoch and its latest value is the trial's result.

Epoch metrics are written by one background thread per worker process (:class:`_MetricWriter`),
which merges whatever epochs queued up while it wrote into one ``log_batch``: a trial's epochs
never wait for the store, and a fast trial's dozen epochs cost a few writes, not a dozen.
:meth:`TrialRun.close` waits for them before the run ends, so every curve point is kept.
(MLflow's own ``synchronous=False`` logging was tried: it flushes on a timer, and waiting for it
at the end of a sub-second trial cost more than writing synchronously.)

A tracking outage never stops a trial: any MLflow error here is logged once and the trial
goes on without the run; :func:`search.trials.common.record_trial` then falls back to
``trial_result.json`` as before.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch

from search.settings import TrackingSettings

__all__ = ["TrialRun"]

log = logging.getLogger("search")

# The trials of this process that have a run open (a Ray worker runs one trial at a time).
_OPEN: dict[str, TrialRun] = {}
_LOCK = threading.Lock()


class TrialRun:
    """The MLflow child run of one trial in progress (see the module doc).

    Args:
        uri: the tracking URI.
        run_id: the child run.
        trial_id: the trial's id.
        options: the sweep's tracking options (``epoch_metrics``, ``log_model``,
            ``system_metrics_s``; see ``conf/tracking``).
    """

    def __init__(self, uri: str, run_id: str, trial_id: str, options: dict[str, Any]) -> None:
        self.uri = uri
        self.run_id = run_id
        self.trial_id = trial_id
        # Options a hand-built context leaves out take the tracking group's defaults (their one home).
        wanted = {**TrackingSettings().trial_logging(), **{k: options[k] for k in TrackingSettings.TRIAL_LOGGING
                                                            if k in options}}
        self.epoch_metrics = bool(wanted["epoch_metrics"])
        self.log_models = bool(wanted["log_model"])
        self.failed: str | None = None  # the first MLflow error: later calls are skipped
        self.pending: tuple[int, dict[str, float]] | None = None  # the last epoch, held back
        self._monitor: Any = None
        self._client_cache: Any = None
        interval = float(wanted["system_metrics_s"] or 0)
        if interval > 0:
            self._start_system_metrics(interval)

    @classmethod
    def start(cls, ctx: Any, trial_id: str, params: dict[str, Any]) -> TrialRun | None:
        """The run of a trial starting now (None without tracking, or when MLflow is unreachable:
        the trial goes on and its result is logged at the end, or kept in ``trial_result.json``)."""
        if not ctx.tracking:
            return None
        from search.space import settings_from_params
        from search.tracking import start_trial_run

        try:
            method_name, settings, overrides = settings_from_params(ctx.space, params)
            run_params = {"method": method_name, **settings, **{f"trial.{k}": v for k, v in overrides.items()}}
            run_id = start_trial_run(ctx.tracking["uri"], ctx.tracking["experiment_id"],
                                     ctx.tracking["parent_run_id"], trial_id, run_params)
        except Exception as exc:  # the result is logged (or kept on disk) at the end
            log.warning("trial %s: could not create its MLflow run at the start (%s: %s)", trial_id,
                        type(exc).__name__, str(exc)[:300])
            return None
        run = cls(ctx.tracking["uri"], run_id, trial_id, ctx.tracking)
        with _LOCK:
            _OPEN[str(trial_id)] = run
        return run

    @classmethod
    def current(cls, trial_id: str) -> TrialRun | None:
        """The open run of ``trial_id`` in this process (or None), left open."""
        with _LOCK:
            return _OPEN.get(str(trial_id))

    @classmethod
    def pop(cls, trial_id: str) -> TrialRun | None:
        """The open run of ``trial_id`` in this process, removed from the open ones (or None)."""
        with _LOCK:
            return _OPEN.pop(str(trial_id), None)

    def _client(self) -> Any:
        if self._client_cache is None:
            from mlflow import MlflowClient

            self._client_cache = MlflowClient(tracking_uri=self.uri)
        return self._client_cache

    def _guard(self, what: str, fn: Any, outage: bool = True) -> Any:
        """``fn()``, or None when it fails: a failed metrics write (``outage``) stops the live
        logging of this trial; a model or system-metrics failure only warns."""
        if self.failed is not None:
            return None
        try:
            return fn()
        except Exception as exc:  # the trial goes on; its end falls back to the file if MLflow is gone
            self._failed(what, exc, outage)
            return None

    def _failed(self, what: str, exc: BaseException, outage: bool = True) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:300]
        if outage:
            self.failed = reason
        log.warning("trial %s: MLflow %s failed (%s)%s", self.trial_id, what, reason,
                    "; no more live logging for this trial" if outage else "")

    def _start_system_metrics(self, interval_s: float) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        def start() -> Any:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, tracking_uri=self.uri)
            monitor.start()
            return monitor

        self._monitor = self._guard("system metrics", start, outage=False)

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """Log the metrics of epoch ``step``: the previous epoch's held-back ones are written now,
        these are held back until the next epoch or :meth:`close`."""
        if self.pending is not None:
            self._write(*self.pending)
        self.pending = (int(step), {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one epoch's metrics for the background writer: training does not wait for the
        store; :meth:`close` does."""
        if not metrics or self.failed is not None:
            return
        from mlflow.entities import Metric

        from search.tracking import now_ms, safe_key

        ts = now_ms()
        batch = [Metric(safe_key(k), v, ts, step) for k, v in metrics.items()]
        _MetricWriter.instance().submit(self._client(), self.run_id, batch)

    def _confirm_writes(self) -> None:
        """Wait for the queued epoch writes; a failed one stops the live logging (and the trial's
        end falls back to ``trial_result.json`` as for any outage)."""
        error = _MetricWriter.instance().flush(self.run_id)
        if error is not None and self.failed is None:
            self._failed("epoch metrics", error)

    def close(self, final: dict[str, Any]) -> int:
        """Stop the system metrics and write the held-back last epoch, less the keys the trial's
        ``final`` results hold (those are logged at the same step by ``log_trial_run``).

        Returns:
            The step for the final results: the last epoch logged, or 0 without epochs.
        """
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.finish()
            except Exception as exc:
                log.warning("trial %s: stopping MLflow's system metrics failed (%s)", self.trial_id, exc)
        if self.pending is None:
            self._confirm_writes()
            return 0
        step, metrics = self.pending
        self.pending = None
        self._write(step, {k: v for k, v in metrics.items() if k not in final})
        self._confirm_writes()  # every curve point is in the store before the run ends
        return step

    def epoch_logger(self, method: Any, val_batches: Any, own_module: bool) -> L.Callback | None:
        """The Lightning callback that logs per-epoch metrics (None when ``epoch_metrics`` is off).

        Args:
            method: the trial's pruning method (its masks give the sparsity).
            val_batches: a callable returning the validation batches (for the built-in classifier).
            own_module: the built-in classifier trains (True), or a user's LightningModule (False).
        """
        return _EpochLogger(self, method, val_batches, own_module) if self.epoch_metrics else None

    def log_model(self, model: torch.nn.Module, input_shape: tuple[int, ...] | None,
                  manifest: dict[str, Any] | None = None) -> str | None:
        """Log ``model`` (the network a trial was measured on: the masked model with its zeros,
        or the surgered one) as the MLflow model ``model`` of this run, in eval mode, so
        ``mlflow.pytorch.load_model(uri)`` returns it ready to evaluate (pickled: loading needs
        this project's packages and the model's own code; a user's model defined in a single
        file is shipped with it). ``manifest`` (:mod:`prunelib.artifact`: the model spec, the
        artifact kind) goes in the model's metadata under ``prunesearch``. A signature is
        inferred from a batch of ``input_shape`` samples (none for text models). Returns the
        model's ``models:/`` URI, or None when ``log_model`` is off or MLflow failed."""
        if not self.log_models:
            return None

        def log_it() -> str:
            import mlflow
            from mlflow.models import infer_signature
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            was_training = model.training
            device = next(model.parameters()).device
            client = self._client()
            # Made here in the run's experiment: left to MLflow, a model logged by run id joins the
            # default experiment "0" and its files land in ./mlruns of the worker's directory.
            experiment_id = client.get_run(self.run_id).info.experiment_id
            requirement = f"torch=={torch.__version__.split('+', 1)[0]}"
            try:
                # Pickled as it is loaded back: ready to evaluate, on the CPU (a model pickled on a
                # GPU does not load on a machine without one). The trial's measurements are done.
                model.eval().to("cpu")
                signature = None
                if input_shape is not None:
                    with torch.no_grad():
                        example = torch.zeros((2, *input_shape))
                        out = model(example)
                    if isinstance(out, torch.Tensor):
                        signature = infer_signature(example.numpy(), out.numpy())
                logged = client.create_logged_model(experiment_id, name="model", source_run_id=self.run_id)
                with _use_tracking_uri(self.uri):
                    info = mlflow.pytorch.log_model(
                        model, name="model", run_id=self.run_id, model_id=logged.model_id, signature=signature,
                        pip_requirements=[requirement], serialization_format="pickle",
                        code_paths=_user_code_files(model) or None,
                        metadata={"prunesearch": manifest} if manifest else None)
            finally:
                model.train(was_training).to(device)
            return info.model_uri

        return self._guard("model logging", log_it, outage=False)


class _MetricWriter:
    """One thread per process writing queued metrics to MLflow, merged per run (see the module
    doc). ``flush(run_id)`` returns once that run's metrics are written, with the first error a
    write of it raised (None when all went through)."""

    _instance: _MetricWriter | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued: dict[str, tuple[Any, list[Any]]] = {}  # run id -> (client, metrics)
        self._writing: set[str] = set()
        self._errors: dict[str, BaseException] = {}
        threading.Thread(target=self._loop, name="prunesearch-mlflow-metrics", daemon=True).start()

    @classmethod
    def instance(cls) -> _MetricWriter:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, client: Any, run_id: str, metrics: list[Any]) -> None:
        with self._cond:
            _, queued = self._queued.setdefault(run_id, (client, []))
            queued.extend(metrics)
            self._cond.notify_all()

    def flush(self, run_id: str) -> BaseException | None:
        with self._cond:
            self._cond.wait_for(lambda: run_id not in self._queued and run_id not in self._writing)
            return self._errors.pop(run_id, None)

    def _loop(self) -> None:
        from search.tracking import log_batch

        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queued))
                run_id = next(iter(self._queued))
                client, metrics = self._queued.pop(run_id)
                self._writing.add(run_id)
            try:
                log_batch(client, run_id, metrics=metrics)
            except Exception as exc:  # reported to the trial by flush()
                with self._cond:
                    self._errors.setdefault(run_id, exc)
            finally:
                with self._cond:
                    self._writing.discard(run_id)
                    self._cond.notify_all()


def _user_code_files(model: torch.nn.Module) -> list[str]:
    """The files of a user's own top-level modules the model's classes come from (``mycode.py``
    beside the sweep), so its MLflow model loads where that file is not importable. Installed
    packages (torch, prunelib, transformers, the user's own packages) are not copied."""
    import sys
    import sysconfig

    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                              sysconfig.get_paths()["stdlib"])}
    files = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if "." in name or not path or name in ("__main__", "builtins"):
            continue
        resolved = Path(path).resolve()
        if resolved.suffix == ".py" and not any(root in resolved.parents for root in installed):
            files.append(str(resolved))
    return files


class _EpochLogger(L.Callback):
    """Per-epoch metrics of a trial to its MLflow run (see the module doc); the step counts
    epochs over all of the trial's phases (one Lightning fit per phase)."""

    def __init__(self, run: TrialRun, method: Any, val_batches: Any, own_module: bool) -> None:
        self.run = run
        self.method = method
        self.val_batches = val_batches
        self.own_module = own_module
        self.step = 0
        self._loss_sum: torch.Tensor | None = None
        self._batches = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._batches = None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Summed on the device: one transfer per epoch, not one per step.
            value = loss.detach().float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the pruning callback's epoch step (it comes first in the trainer's callbacks):
        # the masks, the sparsity and the validation figures describe the same model.
        from prunelib.training import evaluate, network_of

        network = network_of(pl_module)
        metrics: dict[str, float] = {}
        if not self.own_module:
            for key, value in trainer.callback_metrics.items():
                if str(key).endswith("_step"):
                    continue
                try:
                    metrics[str(key).removesuffix("_epoch")] = float(value)
                except (TypeError, ValueError):
                    continue
        if self._batches and "train_loss" not in metrics:
            metrics["train_loss"] = float(self._loss_sum) / self._batches
        if self.own_module:
            with torch.no_grad():
                val = evaluate(network, self.val_batches())
            metrics.update(val_acc=val["acc"], val_loss=val["loss"])
        masks = self.method.masks
        metrics["sparsity"] = masks.sparsity(network) if masks is not None else 0.0
        self.run.log_epoch(self.step, metrics)
        self.step += 1
