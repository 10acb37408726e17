"""How one training phase is run (:class:`TrainConfig`), importable without Lightning.

The sweep's driver checks ``trial.*`` keys against these fields but never trains, so this
module imports nothing heavier than the standard library; :mod:`prunelib.training` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SPEED_SETTINGS", "TrainConfig"]


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
        channels_last: train with 4-D weights in channels-last (NHWC) memory layout, which GPU
            convolution kernels (tensor cores) run faster; the same function up to float
            rounding. Inputs are left as they come (1-channel images are NHWC already); the
            model is handed back in the default layout.
        compile: train through ``torch.compile`` of the model's forward pass (training and
            in-fit validation steps; the first steps pay the compile time); the same function up
            to float rounding. Off by default.
        compile_backend: the ``torch.compile`` backend when ``compile`` is on (``"inductor"``
            generates kernels; ``"aot_eager"`` traces without generating any, for debugging).
        cuda_graphs: replay each training step's forward and backward as CUDA graphs, which
            removes the per-kernel launch cost that dominates small models' steps. With
            ``compile``: inductor's ``"reduce-overhead"`` mode; without: ``torch.compile``'s
            ``"cudagraphs"`` backend (no kernel generation). CUDA only: on a CPU run it is
            ignored with a warning. Off by default.
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
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("epochs and finetune_epochs must be >= 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for key in ("channels_last", "compile", "cuda_graphs"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"compile_backend must be a torch.compile backend name, got {self.compile_backend!r}")
        if self.compile and self.cuda_graphs and self.compile_backend != "inductor":
            raise ValueError(f"cuda_graphs with compile needs compile_backend 'inductor' (its reduce-overhead "
                             f"mode), got {self.compile_backend!r}")


#: The :class:`TrainConfig` fields that change how fast a trial trains, not what it trains
#: (``trial.<name>`` in the sweep config).
SPEED_SETTINGS = ("channels_last", "compile", "compile_backend", "cuda_graphs")
