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

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from prunelib.llm.oneshot import OneShotResult, OneShotSettings, prune_model
from prunelib.masks import MaskSet
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field

__all__ = ["LLM_METHODS", "LLMMagnitude", "LLMPruningSettings", "OneShotLLMPruning", "SparseGPT", "SparseGPTSettings",
           "Wanda"]


@dataclass(frozen=True)
class LLMPruningSettings(MethodSettings):
    """Settings of the one-shot LLM pruners (:class:`OneShotLLMPruning`).

    Attributes:
        sparsity: fraction of each pruned layer's weights zeroed (unstructured; an N:M pattern
            fixes it at 1 - N/M).
        pattern: ``"unstructured"``, ``"2:4"``, ``"4:8"`` (any ``"N:M"``: N kept in every M inputs).
        distribution: ``"uniform"`` or ``"owl"`` (outlier-weighted per-block sparsity).
        owl_m / owl_lambda: OWL's outlier threshold (x mean score) and sparsity spread.
        group: ``"row"``/``"layer"`` comparison group (None = the paper's).
        calib_samples: calibration sequences (papers: 128 of 2,048 tokens).
        calib_length: tokens per calibration sequence (None = the data's ``max_length``).
        calib_batch_size: sequences per calibration forward pass.
        calib_seed: which training samples calibrate.
        sequential: calibrate each block on the pruned previous blocks' outputs.
        blocks_path: the blocks' ModuleList (None = found).
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    distribution: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    group: str | None = None
    calib_samples: int = 128
    calib_length: int | None = None
    calib_batch_size: int = 8
    calib_seed: int = 0
    sequential: bool = True
    blocks_path: str | None = None

    def __post_init__(self) -> None:
        for key in ("calib_samples", "calib_batch_size"):
            if isinstance(getattr(self, key), bool) or int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
            set_field(self, key, int(getattr(self, key)))
        for key in ("sparsity", "owl_m", "owl_lambda"):
            set_field(self, key, float(getattr(self, key)))
        set_field(self, "calib_seed", int(self.calib_seed))


@dataclass(frozen=True)
class SparseGPTSettings(LLMPruningSettings):
    """:class:`LLMPruningSettings` plus SparseGPT's column block (``blocksize``, 128) and Hessian
    damping (``percdamp``, a fraction of its mean diagonal, 0.01)."""

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.blocksize, bool) or int(self.blocksize) < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize!r}")
        set_field(self, "blocksize", int(self.blocksize))
        set_field(self, "percdamp", float(self.percdamp))


class OneShotLLMPruning(PruningMethod):
    """Block-by-block one-shot pruning of a transformer; subclasses fix the score.

    Settings: :class:`LLMPruningSettings`. ``device`` (an attribute, not a setting) is where
    each block is processed: None = where the model is; the model itself stays where it is, so
    ``device="cuda"`` with a CPU model prunes one block on the GPU at a time.
    """

    name: ClassVar[str] = "llm_oneshot"
    score: ClassVar[str] = "wanda"
    needs_data: ClassVar[bool] = True
    #: Methods for Hugging Face text models (``model=hf``), not for the image models.
    model_kinds: ClassVar[tuple[str, ...]] = ("hf",)
    Settings = LLMPruningSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        # What prune_model reads, taken from the settings by field name (SparseGPT's blocksize
        # and percdamp included); its own checks (pattern, distribution, group) run here.
        shared = {f.name: getattr(s, f.name) for f in fields(OneShotSettings)
                  if f.name != "method" and hasattr(s, f.name)}
        self.oneshot = OneShotSettings(method=self.score, **shared)
        self.device: str | None = None
        self._batches: list[Any] | None = None
        self.result: OneShotResult | None = None

    @property
    def target_sparsity(self) -> float:
        """The fraction of pruned-layer weights zeroed (1 - N/M for an N:M pattern)."""
        return self.oneshot.target_sparsity

    def config(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict (stored with the masks)."""
        return {**self.settings.as_dict(), "method": self.score, "target_sparsity": self.target_sparsity}

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """No training phase: one-shot."""
        return []

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Draw the calibration batches (magnitude with uniform distribution needs none)."""
        needs = self.oneshot.method != "magnitude" or self.oneshot.distribution == "owl"
        if not needs:
            self._batches = None
            return
        if datamodule is None or not hasattr(datamodule, "calibration_batches"):
            raise ValueError(f"method {self.name!r} needs calibration text: pass a TextDataModule")
        s = self.settings
        self._batches = datamodule.calibration_batches(s.calib_samples, seed=s.calib_seed,
                                                       batch_size=s.calib_batch_size, length=s.calib_length)

    def finalize(self, model: nn.Module) -> MaskSet:
        """Prune ``model`` in place block by block; returns the keep masks."""
        self.result = prune_model(model, self._batches, self.oneshot, device=self.device,
                                  progress=getattr(self, "progress", None))
        self.masks = self.result.masks
        self.masks.metadata["method"] = self.name
        self.cost.extra_forward_passes = (0 if self._batches is None else
                                          len(self._batches) * (2 + int(self.oneshot.distribution == "owl")))
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
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with reconstruction, column blocks
    (settings: :class:`SparseGPTSettings`)."""

    name: ClassVar[str] = "sparsegpt"
    score: ClassVar[str] = "sparsegpt"
    Settings = SparseGPTSettings


LLM_METHODS: tuple[type[OneShotLLMPruning], ...] = (LLMMagnitude, Wanda, SparseGPT)

# Registered here too: when this module is imported before prunelib.methods, the package's own
# registration runs while this module is still loading (see prunelib/methods/__init__.py).
from prunelib.methods import register_method  # noqa: E402

for _cls in LLM_METHODS:
    register_method(_cls)
