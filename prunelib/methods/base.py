"""The method protocol: optional hooks that mirror a training run.

Methods differ in *when* they act, so the protocol is a set of hooks rather than one call.
A method scores and selects weights; a :mod:`~prunelib.schedules` object says when to cut;
the runner (:func:`prunelib.training.run_pruning`) owns the Lightning trainers and calls:

1. ``setup(model, datamodule)`` once (data-free methods accept ``datamodule=None``);
2. for each :class:`Phase` in ``plan(epochs, finetune_epochs)`` (the outer loop a method
   declares: fine-tuning after a one-shot cut, IMP rounds...):
   ``on_phase_start`` -> per step ``after_optimizer_step`` then ``on_train_batch_end``,
   per epoch ``on_train_epoch_end`` -> ``on_phase_end``;
3. ``finalize(model) -> MaskSet``.

Data-free methods implement only ``finalize`` (and ``plan`` returning no phases).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from prunelib.masks import MaskSet

__all__ = ["MethodSettings", "Phase", "PruningMethod", "set_field", "train_then_finetune"]


@dataclass(frozen=True)
class Phase:
    """One training run inside a method's plan.

    Attributes:
        name: label used in progress output and history (``"train"``, ``"finetune"``, ``"round2"``).
            A phase named ``"finetune"`` recovers after a cut: the runner trains it at
            ``TrainConfig.finetune_lr`` instead of restarting at the peak learning rate.
        epochs: epochs to train in this phase.
        lr_start_epoch: where in the LR schedule this phase starts (weight rewinding to epoch k
            replays the schedule from k).
        lr_total_epochs: length of the LR schedule this phase follows (default: ``epochs``).
        prunes: whether the method's step hooks may change the masks during this phase.
        recovers: the phase repairs the model after a cut (like ``"finetune"``): the runner
            trains it at ``TrainConfig.finetune_lr`` (RL-Pruner's recovery between steps).
    """

    name: str
    epochs: int
    lr_start_epoch: int = 0
    lr_total_epochs: int | None = None
    prunes: bool = True
    recovers: bool = False


def train_then_finetune(epochs: int, finetune_epochs: int, prunes: bool = True) -> list[Phase]:
    """The common plan: one training phase (kept at 0 epochs: its end is where a one-shot
    cut happens), then a fine-tune phase with the masks fixed when ``finetune_epochs > 0``."""
    phases = [Phase("train", epochs, prunes=prunes)]
    if finetune_epochs > 0:
        phases.append(Phase("finetune", finetune_epochs, prunes=False, recovers=True))
    return phases


@dataclass(frozen=True)
class MethodSettings:
    """Base of every method's settings: a frozen dataclass, validated in ``__post_init__``.

    Each method declares its own subclass as ``Settings``; the method's constructor takes the
    same keyword arguments (``build_method(name, **settings)`` and the ``conf/method`` YAML keys),
    or one ready ``Settings`` instance. :meth:`PruningMethod.config` returns its fields.
    """

    def as_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict (tuples become lists)."""
        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def set_field(settings: MethodSettings, name: str, value: Any) -> None:
    """Normalise a field of a frozen settings object in its ``__post_init__`` (e.g. to float)."""
    object.__setattr__(settings, name, value)


def _settings_signature(settings_cls: type[MethodSettings]) -> inspect.Signature:
    """The constructor signature a settings class implies (so ``inspect`` and the config
    checks see the method's keyword settings with their defaults)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(settings_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=default, annotation=f.type))
    return inspect.Signature(params)


@dataclass
class MethodCost:
    """Extra work a method adds on top of plain training.

    Attributes:
        extra_forward_passes: forward passes over one batch beyond training (probes,
            scoring batches, candidate evaluations).
        extra_backward_passes: backward passes beyond training (SNIP's scoring batch).
        extra_params: parameters the method adds during training (gates), removed at the end.
    """

    extra_forward_passes: int = 0
    extra_backward_passes: int = 0
    extra_params: int = 0


class PruningMethod:
    """Base class of every pruning method; every hook is optional.

    Subclasses set ``name`` (the registry key, also the ``conf/method/NAME.yaml`` file) and
    ``needs_data``. The current masks live in ``self.masks``; ``after_optimizer_step``
    re-applies them so pruned weights stay exactly zero through training.

    Capabilities (class attributes, read by the orchestrator to choose a method's trial kind and
    to check objectives before a sweep starts; no instance is built for that):

    * ``needs_pair``: the method works on a (pretrained, fine-tuned) pair of checkpoints instead
      of training (KEN): its trials run the pair's outer loop.
    * ``model_kinds``: the kinds of model it prunes: ``()`` = the PyTorch models a trial trains
      (built-in or the user's ``nn.Module``); ``("hf",)`` = Hugging Face text models only.
    * ``reported_metrics``: metric names its trials report besides those of their trial kind
      (a method that logs a figure of its own, for use as an objective).
    """

    name: ClassVar[str] = "base"
    needs_data: ClassVar[bool] = True
    needs_pair: ClassVar[bool] = False
    model_kinds: ClassVar[tuple[str, ...]] = ()
    reported_metrics: ClassVar[tuple[str, ...]] = ()
    #: The task loss ``loss_fn(model, (x, y)) -> Tensor`` for methods that need a loss or its
    #: gradients (SNIP, BINGO): set by the runner to the user's LightningModule's own loss
    #: (:func:`prunelib.training.module_loss`); None = cross-entropy of the logits.
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None
    Settings: ClassVar[type[MethodSettings]] = MethodSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], MethodSettings):
            settings = args[0]
            if not isinstance(settings, self.Settings):
                raise TypeError(f"method {self.name!r} takes {self.Settings.__name__}, "
                                f"got {type(settings).__name__}")
        else:
            settings = self.Settings(*args, **kwargs)
        self.settings = settings
        self.masks: MaskSet | None = None
        self.cost = MethodCost()
        self.steps_per_epoch: int = 1

    def task_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The loss of ``model`` on one batch: :attr:`loss_fn`, or cross-entropy by default."""
        if self.loss_fn is not None:
            return self.loss_fn(model, (x, y))
        return F.cross_entropy(model(x), y)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:  # a subclass without its own constructor still shows its settings
            parent = cls

            def init(self: PruningMethod, *args: Any, **kw: Any) -> None:
                super(parent, self).__init__(*args, **kw)

            init.__qualname__ = f"{cls.__qualname__}.__init__"
            cls.__init__ = init  # type: ignore[method-assign]
        init.__signature__ = _settings_signature(cls.Settings)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a setting reads from the settings object.
        settings = self.__dict__.get("settings")
        if settings is not None and name in type(settings).__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        settings = self.__dict__.get("settings")
        if settings is not None and name in type(settings).__dataclass_fields__:
            raise AttributeError(f"{name!r} is a setting of method {self.name!r}; settings are frozen "
                                 f"(build a new method, e.g. with dataclasses.replace(method.settings, ...))")
        super().__setattr__(name, value)

    # -- description -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The method's settings (the fields of :attr:`settings`) as a JSON-friendly dict."""
        return self.settings.as_dict()

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """The training phases this method needs, given the trial's epoch budget."""
        return [Phase("train", epochs)]

    # -- hooks -----------------------------------------------------------------------
    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Called once before any training; data-free methods get ``datamodule=None``."""
        if self.needs_data and datamodule is None:
            raise ValueError(f"method {self.name!r} needs training data; pass a datamodule")

    def on_phase_start(self, model: nn.Module, phase: Phase, index: int) -> None:
        """Called before each phase's trainer starts (rewinding happens here)."""

    def on_train_batch_end(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int) -> None:
        """Called after each optimizer step (``step`` counts steps within the phase, from 1)."""

    def on_train_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called at the end of each training epoch of a phase (``epoch`` from 0)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the method adds to the model for training (gates) that the training
        optimizer must step; the callback adds them to it when they were made after it."""
        return []

    def regularization(self, model: nn.Module) -> Tensor | None:
        """An extra loss term added to the training loss at every step (None = nothing).

        Methods that train gates or scores (polarization) return their regulariser here; the
        runner and :class:`~prunelib.callbacks.PruningCallback` add it to the module's loss.
        """
        return None

    def distillation_loss(self, model: nn.Module, inputs: Tensor, logits: Tensor) -> Tensor | None:
        """An extra loss term that needs the training batch: ``inputs`` and the model's
        ``logits`` on them (None = nothing). Knowledge distillation (RL-Pruner) compares the
        logits with a teacher's on the same inputs; the runner adds the term to the loss.
        """
        return None

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Keep pruned weights at zero after the optimizer moved them."""
        if self.masks is not None:
            self.masks.enforce(model)

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        """Called after each phase (one-shot cuts at the end of training happen here)."""

    def projected_masks(self, model: nn.Module) -> MaskSet | None:
        """The masks this method is heading for, judged from the model as it is now, without
        changing the model or the method (None = dense).

        Early stopping compares trials by the FLOPs they will end at, not by those of a model
        still dense or half-way up a sparsity ramp. Default: the current masks (right for
        methods whose masks are set at ``setup``, and all a method can say before a cut it
        cannot preview); methods with a sparsity target cut to it now, by magnitude.
        """
        return self.masks

    def write_artifacts(self, directory: str | os.PathLike) -> list[Path]:
        """Write what the method learned besides masks (pictures, logs) into ``directory``;
        returns the files written. Nothing by default (RL-Pruner writes its distribution)."""
        return []

    def method_metrics(self) -> dict[str, float]:
        """The figures this method measured itself, by the names it declares in
        ``reported_metrics`` (a trial adds them to its results after :meth:`finalize`, so they
        can be objectives). Nothing by default."""
        return {}

    def finalize(self, model: nn.Module) -> MaskSet:
        """The final masks (applied to ``model``); the method's result."""
        if self.masks is None:
            raise RuntimeError(f"method {self.name!r} produced no masks; was it run?")
        self.masks.apply(model)
        return self.masks
