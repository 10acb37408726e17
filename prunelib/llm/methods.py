"""The LLM one-shot pruners as methods of the common protocol (``prunelib.methods``).

``llm_magnitude``, ``wanda`` and ``sparsegpt`` are data-calibrated one-shot methods: no training
phase (``plan`` is empty); ``setup(model, datamodule)`` draws the calibration samples from the
training split of a :class:`~prunelib.data.text.TextDataModule`, ``finalize(model)`` prunes the
model block by block (:func:`prunelib.llm.oneshot.prune_model`) and returns the masks.

Use::

    method = Wanda(sparsity=0.5, pattern="2:4")
    method.setup(model, text_datamodule)
    masks = method.finalize(model)        # model pruned in place; method.result has the details
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from prunelib.llm.oneshot import OneShotResult, OneShotSettings, prune_model
from prunelib.masks import MaskSet
from prunelib.methods.base import Phase, PruningMethod

__all__ = ["LLM_METHODS", "LLMMagnitude", "OneShotLLMPruning", "SparseGPT", "Wanda"]


class OneShotLLMPruning(PruningMethod):
    """Block-by-block one-shot pruning of a transformer; subclasses fix the score.

    Args:
        sparsity: fraction of each pruned layer's weights zeroed (unstructured).
        pattern: ``"unstructured"``, ``"2:4"``, ``"4:8"`` (any ``"N:M"``: N kept in every M inputs).
        distribution: ``"uniform"`` or ``"owl"`` (outlier-weighted per-block sparsity).
        owl_m / owl_lambda: OWL's outlier threshold (x mean score) and sparsity spread.
        group: ``"row"``/``"layer"`` comparison group (None = the paper's).
        calib_samples: calibration sequences (papers: 128 of 2,048 tokens).
        calib_length: tokens per calibration sequence (None = the data's ``max_length``).
        calib_batch_size: sequences per calibration forward pass.
        calib_seed: which training samples calibrate.
        sequential: calibrate each block on the pruned previous blocks' outputs.
        device: where each block is processed (None = where the model is; the model itself
            stays where it is, so ``device="cuda"`` with a CPU model prunes one block on the GPU
            at a time).
        blocks_path: the blocks' ModuleList (None = found).
    """

    name: ClassVar[str] = "llm_oneshot"
    score: ClassVar[str] = "wanda"
    needs_data: ClassVar[bool] = True
    #: Methods for Hugging Face text models (``model=hf``), not for the image models.
    model_kinds: ClassVar[tuple[str, ...]] = ("hf",)

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", distribution: str = "uniform",
                 owl_m: float = 5.0, owl_lambda: float = 0.08, group: str | None = None,
                 calib_samples: int = 128, calib_length: int | None = None, calib_batch_size: int = 8,
                 calib_seed: int = 0, sequential: bool = True, device: str | None = None,
                 blocks_path: str | None = None) -> None:
        super().__init__()
        self.settings = OneShotSettings(method=self.score, sparsity=float(sparsity), pattern=str(pattern),
                                        distribution=str(distribution), owl_m=float(owl_m),
                                        owl_lambda=float(owl_lambda), group=group, sequential=bool(sequential),
                                        blocks_path=blocks_path, **self._score_settings())
        if int(calib_samples) < 1:
            raise ValueError(f"calib_samples must be >= 1, got {calib_samples!r}")
        if int(calib_batch_size) < 1:
            raise ValueError(f"calib_batch_size must be >= 1, got {calib_batch_size!r}")
        self.sparsity = self.settings.target_sparsity
        self.pattern = self.settings.pattern
        self.distribution = self.settings.distribution
        self.calib_samples = int(calib_samples)
        self.calib_length = calib_length
        self.calib_batch_size = int(calib_batch_size)
        self.calib_seed = int(calib_seed)
        self.device = device
        self._batches: list[Any] | None = None
        self.result: OneShotResult | None = None

    def _score_settings(self) -> dict[str, Any]:
        """Settings of :class:`OneShotSettings` only this score uses (SparseGPT's)."""
        return {}

    def config(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict (stored with the masks)."""
        from dataclasses import asdict

        return {**asdict(self.settings), "calib_samples": self.calib_samples, "calib_length": self.calib_length,
                "calib_batch_size": self.calib_batch_size, "calib_seed": self.calib_seed}

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """No training phase: one-shot."""
        return []

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Draw the calibration batches (magnitude with uniform distribution needs none)."""
        needs = self.settings.method != "magnitude" or self.settings.distribution == "owl"
        if not needs:
            self._batches = None
            return
        if datamodule is None or not hasattr(datamodule, "calibration_batches"):
            raise ValueError(f"method {self.name!r} needs calibration text: pass a TextDataModule")
        self._batches = datamodule.calibration_batches(self.calib_samples, seed=self.calib_seed,
                                                       batch_size=self.calib_batch_size, length=self.calib_length)

    def finalize(self, model: nn.Module) -> MaskSet:
        """Prune ``model`` in place block by block; returns the keep masks."""
        self.result = prune_model(model, self._batches, self.settings, device=self.device,
                                  progress=getattr(self, "progress", None))
        self.masks = self.result.masks
        self.masks.metadata["method"] = self.name
        self.cost.extra_forward_passes = (0 if self._batches is None else
                                          len(self._batches) * (2 + int(self.settings.distribution == "owl")))
        return self.masks


class LLMMagnitude(OneShotLLMPruning):
    """One-shot magnitude pruning of a transformer's block layers (per layer, or per row)."""

    name: ClassVar[str] = "llm_magnitude"
    score: ClassVar[str] = "magnitude"


class Wanda(OneShotLLMPruning):
    """Wanda (Sun et al. 2023): ``|W| x ||X||`` per output row, no weight update."""

    name: ClassVar[str] = "wanda"
    score: ClassVar[str] = "wanda"


class SparseGPT(OneShotLLMPruning):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with reconstruction, column blocks.

    Extra args: ``blocksize`` (columns per lazy-update block, 128) and ``percdamp`` (Hessian
    damping as a fraction of its mean diagonal, 0.01).
    """

    name: ClassVar[str] = "sparsegpt"
    score: ClassVar[str] = "sparsegpt"

    def __init__(self, sparsity: float = 0.5, pattern: str = "unstructured", distribution: str = "uniform",
                 owl_m: float = 5.0, owl_lambda: float = 0.08, group: str | None = None,
                 calib_samples: int = 128, calib_length: int | None = None, calib_batch_size: int = 8,
                 calib_seed: int = 0, sequential: bool = True, device: str | None = None,
                 blocks_path: str | None = None, blocksize: int = 128, percdamp: float = 0.01) -> None:
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)
        super().__init__(sparsity, pattern, distribution, owl_m, owl_lambda, group, calib_samples, calib_length,
                         calib_batch_size, calib_seed, sequential, device, blocks_path)

    def _score_settings(self) -> dict[str, Any]:
        return {"blocksize": self.blocksize, "percdamp": self.percdamp}


LLM_METHODS: tuple[type[OneShotLLMPruning], ...] = (LLMMagnitude, Wanda, SparseGPT)
