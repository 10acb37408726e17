"""``llm_structured``: structured pruning of a Hugging Face transformer as a protocol method.

One method with width and depth settings, not one method per axis: an orchestrator then searches
width against depth (and their per-layer allocation) inside one space, and width-only or
depth-only are the points where the other fractions are 0; FLAP, Minitron-style and magnitude
width pruning differ only in ``importance`` (and ``bias_compensation``), ShortGPT is
``depth_sparsity`` alone.

Use::

    method = LLMStructured(ffn_sparsity=0.5, head_sparsity=0.25, depth_sparsity=0.25)
    method.setup(model, text_datamodule)     # draws the calibration windows
    method.finalize(model)                    # model is now physically smaller
    method.result.cost.params_deployed        # physical parameters and FLOPs per sequence
    method.export(model, "out/", tokenizer)   # a checkpoint transformers loads back

``finalize`` returns an empty :class:`~prunelib.masks.MaskSet` (nothing is masked: the weights
are gone), with the structured result in its metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from prunelib.flops import ModelCost
from prunelib.llm.structured import StructuredResult, StructuredSettings, prune_structured
from prunelib.masks import MaskSet
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field

__all__ = ["LLMStructured", "LLMStructuredSettings", "STRUCTURED_METHODS"]


@dataclass(frozen=True)
class LLMStructuredSettings(StructuredSettings, MethodSettings):
    """Settings of :class:`LLMStructured`: those of
    :class:`~prunelib.llm.structured.StructuredSettings` (inherited, checked by its
    ``__post_init__``) plus the calibration draw.

    Attributes:
        calib_samples: calibration sequences from the training split.
        calib_length: tokens per calibration sequence (None = the data's ``max_length``).
        calib_batch_size: sequences per calibration forward pass.
        calib_seed: which training samples calibrate.
    """

    calib_samples: int = 128
    calib_length: int | None = None
    calib_batch_size: int = 8
    calib_seed: int = 0

    def __post_init__(self) -> None:
        StructuredSettings.__post_init__(self)  # every pruning setting checked here, at construction
        for key in ("calib_samples", "calib_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be an integer >= 1, got {value!r}")
        if self.calib_length is not None and (isinstance(self.calib_length, bool)
                                              or not isinstance(self.calib_length, int) or self.calib_length < 2):
            raise ValueError(f"calib_length: must be an integer >= 2 or null, got {self.calib_length!r}")
        set_field(self, "calib_seed", int(self.calib_seed))

    @property
    def structured(self) -> StructuredSettings:
        """The pruning settings alone (:class:`~prunelib.llm.structured.StructuredSettings`)."""
        return StructuredSettings(**{f.name: getattr(self, f.name) for f in fields(StructuredSettings)})


class LLMStructured(PruningMethod):
    """Structured width/head/hidden/depth pruning of a transformer (see the module docstring).

    ``device`` (an attribute, not a setting) is where each block is processed (None = where the
    model is). After :meth:`finalize`, :attr:`result` holds the
    :class:`~prunelib.llm.structured.StructuredResult` with ``result.cost`` the physical
    :class:`~prunelib.flops.ModelCost` (params and FLOPs per sequence of the data's
    ``max_length``) of the smaller model, when the data module gave an example input.
    """

    name: ClassVar[str] = "llm_structured"
    needs_data: ClassVar[bool] = True
    model_kinds: ClassVar[tuple[str, ...]] = ("hf",)
    Settings = LLMStructuredSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device: str | None = None
        self._batches: list[Any] | None = None
        self._example: dict[str, Any] | None = None
        self.result: StructuredResult | None = None

    @property
    def pattern(self) -> str:
        """What the one-shot text trials read for sparse storage: nothing is stored sparse."""
        return "unstructured"

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        """No training phase: one-shot (distillation, if any, runs inside :meth:`finalize`)."""
        return []

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        """Draw the calibration batches (and keep one example sequence for counting FLOPs)."""
        s = self.settings
        self._example = datamodule.example_input() if hasattr(datamodule, "example_input") else None
        if not s.structured.needs_data:
            self._batches = None
            return
        if datamodule is None or not hasattr(datamodule, "calibration_batches"):
            raise ValueError(f"method {self.name!r} needs calibration text: pass a TextDataModule")
        self._batches = datamodule.calibration_batches(s.calib_samples, seed=s.calib_seed,
                                                       batch_size=s.calib_batch_size, length=s.calib_length)

    def check_model(self, model: nn.Module) -> None:
        """The checks :meth:`finalize` makes on the model, without pruning it: its blocks are
        found and are of a known family, ``keep_heads`` is a whole number of GQA groups,
        ``depth_sparsity`` leaves a block, per-block fractions have one entry per block. Works on
        a model built on the meta device (no weights): a sweep's pre-flight runs it once.

        Raises:
            ValueError: one line naming the setting (or ``model``).
        """
        from prunelib.llm.structured import _block_fractions, _check_against_model, _model_parts

        s = self.settings.structured
        _, _, parts = _model_parts(model, s.blocks_path)
        _check_against_model(s, model, parts)
        _block_fractions(s, len(parts), [], parts[0].heads)

    def finalize(self, model: nn.Module) -> MaskSet:
        """Prune ``model`` in place (physically smaller); returns an empty MaskSet."""
        s = self.settings.structured
        self.result = prune_structured(model, self._batches, s, device=self.device,
                                       progress=getattr(self, "progress", None))
        n = len(self._batches or [])
        dense_pass = bool(n) and (s.depth_sparsity > 0 or s.allocation == "owl"
                                  or (s.hidden_sparsity > 0 and s.importance != "magnitude"))
        width_pass = bool(n) and s.prunes_width and (s.importance != "magnitude" or s.bias_compensation)
        distill = self.result.distill
        # Forward passes over one calibration batch: each capture, the dense pass, the width pass
        # (statistics, then the pruned block's outputs), and distillation (teacher + student).
        self.cost.extra_forward_passes = (n * (1 + int(dense_pass)) if dense_pass else 0) \
            + (n * 3 if width_pass else 0) + (distill.forward_passes if distill else 0)
        self.cost.extra_backward_passes = distill.backward_passes if distill else 0
        if self._example is not None:
            self.result.cost = self.cost_of(model, self._example)
        self.masks = self.result.masks
        self.masks.metadata["method"] = self.name
        return self.masks

    @staticmethod
    def cost_of(model: nn.Module, example_input: dict[str, Any]) -> ModelCost:
        """Physical params and FLOPs per sequence of ``example_input`` of a (pruned) model."""
        from prunelib.llm.report import text_model_cost

        return text_model_cost(model, example_input, None, physical_model=model)

    def export(self, model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Any:
        """Save the pruned model as a checkpoint ``transformers`` loads
        (:func:`prunelib.llm.structured_export.save_structured`)."""
        from prunelib.llm.structured_export import save_structured

        return save_structured(model, out_dir, tokenizer)


STRUCTURED_METHODS: tuple[type[PruningMethod], ...] = (LLMStructured,)

# Registered here too: when this module is imported before prunelib.methods, the package's own
# registration runs while this module is still loading (see prunelib/methods/__init__.py).
from prunelib.methods import register_method  # noqa: E402

for _cls in STRUCTURED_METHODS:
    register_method(_cls)
