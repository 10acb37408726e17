"""Training a classifier under a pruning method: the runner used by notebooks and by search.

:func:`run_pruning` runs a method's plan (its phases: train, fine-tune, IMP rounds...), one
Lightning ``Trainer`` per phase with a :class:`~prunelib.callbacks.PruningCallback`, then
measures the result on the validation split (and the test split only when asked, for the
final report). The method never owns a trainer; the runner does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from prunelib.callbacks import PruningCallback
from prunelib.flops import ModelCost, model_cost
from prunelib.masks import MaskSet
from prunelib.methods.base import PruningMethod

__all__ = ["ClassifierModule", "TrainConfig", "PruningResult", "evaluate", "evaluate_masked", "run_pruning"]

log = logging.getLogger("prunelib")


@dataclass
class TrainConfig:
    """How one training phase is run.

    Attributes:
        epochs: epochs of one full training run (a method's ``train`` phase).
        finetune_epochs: epochs of fine-tuning after a one-shot cut.
        finetune_lr: peak learning rate of fine-tune phases (default: ``lr / 10``): restarting
            at the full rate after a cut undoes more than it repairs on short fine-tunes.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adam"``.
        lr: peak learning rate; a cosine schedule decays it per epoch over each phase.
        momentum / weight_decay: optimizer settings (weight decay skips nothing: simple and
            standard for these small models).
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``).
        precision: Lightning precision string (``"32-true"``, ``"bf16-mixed"``).
        progress: show Lightning's progress bar (off in sweeps: it costs time per step).
        val_every_n_epochs: validation frequency inside phases, 0 = none (the default: on small
            training sets a full validation pass per epoch costs a large share of the run;
            validation after each phase and at the end is always measured).
    """

    epochs: int = 10
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    accelerator: str = "auto"
    precision: str = "32-true"
    progress: bool = False
    val_every_n_epochs: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("epochs and finetune_epochs must be >= 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class ClassifierModule(L.LightningModule):
    """Cross-entropy classification around any ``nn.Module`` held at ``self.model``.

    ``extra_losses`` are callables returning scalar tensors added to the training loss
    (regularisers a method attaches, e.g. gate polarisation). ``batch_losses`` are callables
    ``(inputs, logits) -> Tensor | None`` for terms that need the batch (knowledge distillation).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, lr_start_epoch: int = 0,
                 lr_total_epochs: int | None = None, lr: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config or TrainConfig()
        self.lr_start_epoch = lr_start_epoch
        self.lr_total_epochs = lr_total_epochs
        self.lr = lr  # overrides config.lr for the current phase (fine-tuning)
        self.extra_losses: list[Any] = []
        self.batch_losses: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        for extra in self.extra_losses:
            term = extra()
            if term is not None:
                loss = loss + term
        for batch_term in self.batch_losses:
            term = batch_term(x, logits)
            if term is not None:
                loss = loss + term
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr or c.lr, momentum=c.momentum, nesterov=c.momentum > 0,
                                  weight_decay=c.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr or c.lr, weight_decay=c.weight_decay)
        total = max(1, self.lr_total_epochs or (self.trainer.max_epochs or 1) + self.lr_start_epoch)
        start = self.lr_start_epoch

        def cosine(epoch: int) -> float:
            # Evaluated at the epoch's midpoint, so short runs still decay to a small rate.
            return 0.5 * (1.0 + math.cos(math.pi * min(start + epoch + 0.5, total) / total))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, device: torch.device | None = None) -> dict[str, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` over an iterable of batches."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate() got no samples")
    return {"acc": correct / total, "loss": loss_sum / total}


@torch.no_grad()
def evaluate_masked(model: nn.Module, masks: MaskSet, batches: Any) -> dict[str, float]:
    """:func:`evaluate` with ``masks`` applied, then the model restored exactly (weights,
    buffers): what a cut now would score, without making it."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        masks.apply(model)
        return evaluate(model, batches)
    finally:
        model.load_state_dict(saved)


@dataclass
class PruningResult:
    """What a pruning run produced and what it cost.

    Attributes:
        masks: the final masks (applied to ``model``).
        model: the trained, pruned network (original shapes).
        val_acc / val_loss: on the validation split, after the last phase.
        test_acc: on the test split, only when ``evaluate_test=True`` (final report), else None.
        cost: params and FLOPs per sample (dense / effective / physical).
        sparsity: global weight sparsity of Conv/Linear weights (fraction).
        epochs: epochs trained over all phases.
        extra_forward_passes / extra_backward_passes: method overhead in batch passes.
        extra_params: parameters the method trained besides the model's (gates), removed at the end.
        wall_s: seconds for the whole run.
        history: one dict per phase (name, epochs, val_acc, sparsity, seconds).
    """

    masks: MaskSet
    model: nn.Module
    val_acc: float
    val_loss: float
    test_acc: float | None
    cost: ModelCost
    sparsity: float
    epochs: int
    extra_forward_passes: int
    extra_backward_passes: int
    wall_s: float
    extra_params: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (the names used by search, MLflow and the benchmarks)."""
        out: dict[str, float] = {"val_acc": self.val_acc, "val_loss": self.val_loss,
                                 "sparsity": self.sparsity, "epochs": self.epochs,
                                 "extra_forward_passes": self.extra_forward_passes,
                                 "extra_backward_passes": self.extra_backward_passes,
                                 "extra_params": self.extra_params,
                                 "wall_s": self.wall_s, **self.cost.as_dict()}
        if self.test_acc is not None:
            out["test_acc"] = self.test_acc
        return out


@contextlib.contextmanager
def _quiet_lightning(quiet: bool) -> Iterator[None]:
    """Silence Lightning's per-fit banners (device summary, tips) when progress is off."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning",
                                                  "lightning.pytorch.utilities.rank_zero",
                                                  "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _make_trainer(config: TrainConfig, epochs: int, callbacks: Sequence[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator=config.accelerator, devices=1, precision=config.precision,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=config.progress, num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, config.val_every_n_epochs),
        limit_val_batches=1.0 if config.val_every_n_epochs > 0 else 0,
        callbacks=list(callbacks),
        deterministic=False,
    )


def run_pruning(model: nn.Module, datamodule: Any, method: PruningMethod,
                config: TrainConfig | None = None, *, evaluate_test: bool = False,
                callbacks: Sequence[L.Callback] = (), seed: int | None = 0,
                input_shape: tuple[int, ...] | None = None) -> PruningResult:
    """Train ``model`` on ``datamodule`` under ``method`` and measure the pruned result.

    Args:
        model: the network (modified in place: trained and masked).
        datamodule: a LightningDataModule with ``train/val/test_dataloader`` and
            ``input_shape`` (e.g. :class:`prunelib.data.ArrayDataModule`).
        method: the pruning method; its ``plan`` decides the phases.
        config: optimiser and epoch budget.
        evaluate_test: also measure the test split (final reports only; never for decisions).
        callbacks: extra Lightning callbacks for every phase (progress reporting, early stop).
        seed: seeds torch before training (None leaves the RNG alone).
        input_shape: one sample's shape for FLOPs; defaults to ``datamodule.input_shape``.
    """
    config = config or TrainConfig()
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    phases = method.plan(config.epochs, config.finetune_epochs)
    method.setup(model, datamodule)
    module = ClassifierModule(model, config)
    module.extra_losses.append(lambda: method.regularization(model))
    module.batch_losses.append(lambda inputs, logits: method.distillation_loss(model, inputs, logits))
    history: list[dict[str, Any]] = []
    epochs_done = 0
    for index, phase in enumerate(phases):
        if phase.epochs <= 0:
            method.on_phase_start(model, phase, index)
            method.on_phase_end(model, phase, index)
            continue
        t0 = time.perf_counter()
        train_loader = datamodule.train_dataloader()
        method.steps_per_epoch = max(1, len(train_loader))
        method.on_phase_start(model, phase, index)
        module.lr_start_epoch = phase.lr_start_epoch
        module.lr_total_epochs = phase.lr_total_epochs or phase.epochs + phase.lr_start_epoch
        module.lr = (config.finetune_lr or config.lr / 10) if phase.name == "finetune" else None
        callback = PruningCallback(method, phase, index, setup_method=False)
        with warnings.catch_warnings(), _quiet_lightning(not config.progress):
            trainer = _make_trainer(config, phase.epochs, [callback, *callbacks])
            # Small data sets give few batches; Lightning's worker/log-interval hints are noise here.
            warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|does not have many workers|LeafSpec).*")
            trainer.fit(module, datamodule=datamodule)
        epochs_done += phase.epochs
        method.on_phase_end(model, phase, index)
        val = evaluate(model, datamodule.val_dataloader())
        masks_now = method.masks
        sparsity = masks_now.sparsity(model) if masks_now is not None else 0.0
        history.append({"phase": phase.name, "epochs": phase.epochs, "val_acc": val["acc"],
                        "sparsity": sparsity, "seconds": time.perf_counter() - t0})
        log.info("phase %-8s %3d epochs  val_acc %.4f  sparsity %.3f  (%.1fs)", phase.name,
                 phase.epochs, val["acc"], sparsity, time.perf_counter() - t0)
    masks = method.finalize(model)
    val = evaluate(model, datamodule.val_dataloader())
    test_acc = evaluate(model, datamodule.test_dataloader())["acc"] if evaluate_test else None
    shape = tuple(input_shape or datamodule.input_shape)
    cost = model_cost(model, shape, masks)
    return PruningResult(masks=masks, model=model, val_acc=val["acc"], val_loss=val["loss"],
                         test_acc=test_acc, cost=cost, sparsity=masks.sparsity(model),
                         epochs=epochs_done, extra_forward_passes=method.cost.extra_forward_passes,
                         extra_backward_passes=method.cost.extra_backward_passes,
                         extra_params=method.cost.extra_params,
                         wall_s=time.perf_counter() - start, history=history)


def result_summary(result: PruningResult) -> dict[str, Any]:
    """A JSON-friendly summary of a result (metrics and phase history)."""
    return {"metrics": result.metrics(), "history": result.history, "cost": asdict(result.cost)}
