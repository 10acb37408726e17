"""Training a classifier under a pruning method: the runner used by notebooks and by search.

:func:`run_pruning` runs a method's plan (its phases: train, fine-tune, IMP rounds...), one
Lightning ``Trainer`` per phase with a :class:`~prunelib.callbacks.PruningCallback`, then
measures the result on the validation split (and the test split only when asked, for the
final report). The method never owns a trainer; the runner does.

The result is measured on what the run ships (:func:`prunelib.flops.deployable`): the surgered,
physically smaller model for structured masks, the masked model otherwise.
"""

from __future__ import annotations

import contextlib
import functools
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
from prunelib.flops import Deployable, ModelCost, deployable
from prunelib.masks import MaskSet
from prunelib.methods.base import PruningMethod
from prunelib.train_config import SPEED_SETTINGS, TrainConfig

__all__ = ["ClassifierModule", "CollapseCheck", "TrainConfig", "PruningResult", "SPEED_SETTINGS", "evaluate",
           "evaluate_masked", "module_loss", "network_of", "run_pruning", "validate_module"]

log = logging.getLogger("prunelib")


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


@dataclass(frozen=True)
class CollapseCheck:
    """When a pruned classifier has collapsed: it gives one class to nearly every sample, or its
    accuracy is at chance. A collapsed model can still sit on a front (it is cheap), so a sweep
    flags it rather than letting its numbers pass for a result.

    Attributes:
        top_share: a model that gives one class to at least this fraction of the samples has
            collapsed (0.9: nine in ten).
        chance_margin: accuracy at most this much (a fraction) above chance has collapsed;
            chance is the share of the most frequent label (what always answering it scores).
    """

    top_share: float = 0.9
    chance_margin: float = 0.02

    @torch.no_grad()
    def judge(self, model: nn.Module, batches: Any, device: torch.device | None = None) -> dict[str, Any]:
        """The predictions of ``model`` over ``batches`` of ``(inputs, labels)``, judged.

        Returns:
            ``{"top_class_share", "classes_predicted", "chance_acc", "collapsed", "collapse"}``
            (``collapse``: the reason in words, None when not collapsed), or ``{}`` when the
            model is not a classifier (its output is not ``(N, classes)`` logits).
        """
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        preds, labels = [], []
        try:
            for batch in batches:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    return {}  # not (inputs, labels) batches: nothing to judge
                x, y = batch[0], batch[1]
                if not isinstance(x, torch.Tensor):
                    return {}
                out = model(x.to(device))
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
                    return {}
                preds.append(out.argmax(1).cpu())
                labels.append(torch.as_tensor(y).cpu())
        finally:
            model.train(was_training)
        if not preds:
            return {}
        p, y = torch.cat(preds), torch.cat(labels)
        if y.dim() != 1 or y.dtype.is_floating_point:
            return {}
        n = len(p)
        counts = torch.bincount(p)
        top = int(counts.argmax())
        share = float(counts.max()) / n
        acc = float((p == y).float().mean())
        chance = float(torch.bincount(y).max()) / n
        reason = None
        if share >= self.top_share:
            reason = f"one class ({top}) for {share:.0%} of the validation samples"
        elif acc <= chance + self.chance_margin:
            reason = f"accuracy {acc:.3f} at chance ({chance:.3f}, the most frequent label's share)"
        return {"top_class_share": share, "classes_predicted": int((counts > 0).sum()), "chance_acc": chance,
                "collapsed": reason is not None, "collapse": reason}


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
            Both accuracies (and ``logged``) are measured on :attr:`deployed`'s model.
        cost: params and FLOPs per sample (dense / effective / physical / deployed).
        sparsity: global weight sparsity of Conv/Linear weights (fraction).
        epochs: epochs trained over all phases.
        extra_forward_passes / extra_backward_passes: method overhead in batch passes.
        extra_params: parameters the method trained besides the model's (gates), removed at the end.
        wall_s: seconds for the whole run.
        history: one dict per phase (name, epochs, val_acc, sparsity, seconds).
        logged: with a user's LightningModule, what it logged in the final validation (and test)
            passes, by the names it logged them under (``val_loss``, ``val_f1``...); ``val_acc``
            and ``val_loss`` above are NaN unless it logged them.
        deployed: the artifact (the surgered model for structured masks, else ``model``) and
            its cost; ``cost`` is ``deployed.cost``.
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
    logged: dict[str, float] = field(default_factory=dict)
    deployed: Deployable | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (the names used by search, MLflow and the benchmarks)."""
        out: dict[str, float] = {**self.logged} if self.logged else {"val_acc": self.val_acc, "val_loss": self.val_loss}
        out.update({"sparsity": self.sparsity, "epochs": self.epochs,
                                 "extra_forward_passes": self.extra_forward_passes,
                                 "extra_backward_passes": self.extra_backward_passes,
                                 "extra_params": self.extra_params,
                                 "wall_s": self.wall_s, **self.cost.as_dict()})
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


def _uses_cuda(config: TrainConfig) -> bool:
    """Whether Lightning will put this run on a CUDA device."""
    return config.accelerator in ("gpu", "cuda") or (config.accelerator == "auto" and torch.cuda.is_available())


def _class_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module class's own forward: what a compiled instance-level forward wraps."""
    return type(module).forward(module, *args, **kwargs)


class _CudaGraphSteps(L.Callback):
    """Marks each step's start for CUDA-graph trees, so a replay never overwrites outputs in use."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.compiler.cudagraph_mark_step_begin()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def _speed_settings(model: nn.Module, config: TrainConfig) -> Iterator[list[L.Callback]]:
    """Apply ``config``'s speed settings to ``model`` for one fit and undo them afterwards.

    Yields the callbacks the settings need in that fit. Undoing keeps the trained model the
    user gets (and what surgery, saving and export see) a plain module in the default layout.
    """
    graphs = config.cuda_graphs and _uses_cuda(config)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile or graphs:
        if config.compile:
            options: dict[str, Any] = {"backend": config.compile_backend}
            if graphs:
                options["mode"] = "reduce-overhead"
        else:
            options = {"backend": "cudagraphs"}
        # An instance attribute shadows the class's forward. A partial that holds the module (not
        # a bound method) keeps a deepcopy taken during training calling its own forward.
        model.forward = functools.partial(torch.compile(_class_forward, **options), model)
    try:
        yield [_CudaGraphSteps()] if graphs else []
    finally:
        if "forward" in vars(model):
            del model.forward
        if config.channels_last:
            model.to(memory_format=torch.contiguous_format)


def _make_trainer(config: TrainConfig, epochs: int, callbacks: Sequence[L.Callback],
                  validate: bool | None = None) -> L.Trainer:
    validate = config.val_every_n_epochs > 0 if validate is None else validate
    return L.Trainer(
        max_epochs=epochs, accelerator=config.accelerator, devices=1, precision=config.precision,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=config.progress, num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, config.val_every_n_epochs),
        limit_val_batches=1.0 if validate else 0,
        callbacks=list(callbacks),
        deterministic=False,
    )


def network_of(module: L.LightningModule) -> nn.Module:
    """The network a LightningModule trains: its ``model`` attribute, else the module itself
    (the convention :class:`~prunelib.callbacks.PruningCallback` follows)."""
    net = getattr(module, "model", None)
    return net if isinstance(net, nn.Module) else module


@contextlib.contextmanager
def _no_logging(module: L.LightningModule) -> Iterator[None]:
    """Calls of ``module.log``/``log_dict`` do nothing inside (a step run outside Lightning's loop
    must not add to the module's logged metrics). The module's class is not touched."""
    module.log, module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


def module_loss(module: L.LightningModule) -> Any:
    """The training loss of a user's LightningModule as ``loss(model, (x, y)) -> Tensor``.

    It runs the module's own ``training_step`` on the batch (its logging switched off), so
    methods that need a loss or gradients (SNIP, BINGO) score what the module optimises.
    ``model`` must be the module's own network (the one being pruned).
    """
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if model is not network_of(module):
            raise ValueError("module_loss: the loss of a LightningModule is defined on its own network only")
        with _no_logging(module):
            out = module.training_step(batch, 0)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(module).__name__}.training_step must return the loss (a tensor or "
                            f"{{'loss': tensor}}), got {type(out).__name__}")
        return out

    return loss


def _float_metrics(metrics: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def validate_module(module: L.LightningModule, datamodule: Any, config: TrainConfig,
                    test: bool = False, limit_batches: int | float = 1.0) -> dict[str, float]:
    """What a LightningModule logs in one validation pass (and a test pass when ``test`` and it
    defines ``test_step``), by the names it logs them under."""
    logged: dict[str, float] = {}
    with warnings.catch_warnings(), _quiet_lightning(not config.progress):
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec|"
                                                  "limit_val_batches|limit_test_batches).*")
        trainer = L.Trainer(accelerator=config.accelerator, devices=1, precision=config.precision, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=config.progress, limit_val_batches=limit_batches,
                            limit_test_batches=limit_batches)
        for result in trainer.validate(module, datamodule=datamodule, verbose=False):
            logged.update(_float_metrics(result))
        if test and type(module).test_step is not L.LightningModule.test_step:
            for result in trainer.test(module, datamodule=datamodule, verbose=False):
                logged.update(_float_metrics(result))
    return logged


@contextlib.contextmanager
def _module_of(module: L.LightningModule, net: nn.Module) -> Iterator[L.LightningModule]:
    """``module`` training ``net`` instead of its own network for the time of the block (its
    ``model`` attribute swapped, then restored); a module that is its own network yields
    ``net``, its surgered copy."""
    if network_of(module) is module:
        if not isinstance(net, L.LightningModule):
            raise TypeError(f"the deployed copy of {type(module).__name__} is not a LightningModule")
        yield net
        return
    own = module.model
    module.model = net
    try:
        yield module
    finally:
        module.model = own


def run_pruning(model: nn.Module, datamodule: Any, method: PruningMethod,
                config: TrainConfig | None = None, *, evaluate_test: bool = False,
                callbacks: Sequence[L.Callback] = (), seed: int | None = 0,
                input_shape: tuple[int, ...] | None = None,
                module: L.LightningModule | None = None) -> PruningResult:
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
        module: a user's LightningModule that trains ``model`` (``network_of(module) is model``):
            its own loss, optimizer and metrics are used as they are; the pruning callback is
            attached to it, the method's loss terms are added by the callback, methods that
            need a loss get the module's (:func:`module_loss`), and the result's metrics are
            what it logs (:attr:`PruningResult.logged`). Default: :class:`ClassifierModule`
            (cross-entropy, ``config``'s optimizer and cosine schedule).
    """
    config = config or TrainConfig()
    if config.cuda_graphs and not _uses_cuda(config):
        warnings.warn("cuda_graphs: ignored, this run trains on the CPU (CUDA graphs need a CUDA device)",
                      stacklevel=2)
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    phases = method.plan(config.epochs, config.finetune_epochs)
    own_module = module is None
    if own_module:
        module = ClassifierModule(model, config)
        module.extra_losses.append(lambda: method.regularization(model))
        module.batch_losses.append(lambda inputs, logits: method.distillation_loss(model, inputs, logits))
    else:
        if network_of(module) is not model:
            raise ValueError(f"run_pruning: the module's network ({type(network_of(module)).__name__}) is not "
                             "the model being pruned; build the module around it")
        method.loss_fn = module_loss(module)
    method.setup(model, datamodule)
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
        if isinstance(module, ClassifierModule):
            module.lr_start_epoch = phase.lr_start_epoch
            module.lr_total_epochs = phase.lr_total_epochs or phase.epochs + phase.lr_start_epoch
            recovers = phase.recovers or phase.name == "finetune"
            module.lr = (config.finetune_lr or config.lr / 10) if recovers else None
        # A module that does not collect loss terms itself gets them from the callback.
        callback = PruningCallback(method, phase, index, setup_method=False, add_loss_terms=not own_module)
        with warnings.catch_warnings(), _quiet_lightning(not config.progress), \
                _speed_settings(model, config) as speed_callbacks:
            trainer = _make_trainer(config, phase.epochs, [callback, *speed_callbacks, *callbacks])
            # Small data sets give few batches; Lightning's worker/log-interval hints are noise here.
            warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|does not have many workers|LeafSpec).*")
            trainer.fit(module, datamodule=datamodule)
        epochs_done += phase.epochs
        method.on_phase_end(model, phase, index)
        if own_module:
            val_acc = evaluate(model, datamodule.val_dataloader())["acc"]
        else:
            val_acc = validate_module(module, datamodule, config).get("val_acc", float("nan"))
        masks_now = method.masks
        sparsity = masks_now.sparsity(model) if masks_now is not None else 0.0
        history.append({"phase": phase.name, "epochs": phase.epochs, "val_acc": val_acc,
                        "sparsity": sparsity, "seconds": time.perf_counter() - t0})
        log.info("phase %-8s %3d epochs  val_acc %.4f  sparsity %.3f  (%.1fs)", phase.name,
                 phase.epochs, val_acc, sparsity, time.perf_counter() - t0)
    masks = method.finalize(model)
    shape = tuple(input_shape or datamodule.input_shape)
    # Measured on what is shipped: a structured run's surgered model (SurgeryError if it cannot be cut).
    art = deployable(model, masks, shape)
    logged: dict[str, float] = {}
    if own_module:
        val = evaluate(art.model, datamodule.val_dataloader())
        test_acc = evaluate(art.model, datamodule.test_dataloader())["acc"] if evaluate_test else None
    else:
        with _module_of(module, art.model) as deployed_module:
            logged = validate_module(deployed_module, datamodule, config, test=evaluate_test)
        val = {"acc": logged.get("val_acc", float("nan")), "loss": logged.get("val_loss", float("nan"))}
        test_acc = logged.get("test_acc") if evaluate_test else None
    return PruningResult(masks=masks, model=model, val_acc=val["acc"], val_loss=val["loss"],
                         test_acc=test_acc, cost=art.cost, deployed=art, sparsity=masks.sparsity(model),
                         epochs=epochs_done, extra_forward_passes=method.cost.extra_forward_passes,
                         extra_backward_passes=method.cost.extra_backward_passes,
                         extra_params=method.cost.extra_params,
                         wall_s=time.perf_counter() - start, history=history, logged=logged)


def result_summary(result: PruningResult) -> dict[str, Any]:
    """A JSON-friendly summary of a result (metrics and phase history)."""
    return {"metrics": result.metrics(), "history": result.history, "cost": asdict(result.cost)}
