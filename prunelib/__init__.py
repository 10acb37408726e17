"""prunelib: pruning for PyTorch models, importable with PyTorch and Lightning alone.

Quick use::

    from prunelib import MagnitudePruning, MaskSet, model_cost
    masks = MagnitudePruning(sparsity=0.8).finalize(model)   # data-free, on a trained model
    masks.save("masks.safetensors", model)

Conventions: sparsity is the fraction of zeroed entries among Conv/Linear weights; FLOPs are
per sample, forward, 1 multiply-add = 2 FLOPs (see :mod:`prunelib.flops`).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunelib.callbacks import PruningCallback
    from prunelib.flops import ModelCost, count_flops, count_params, model_cost
    from prunelib.masks import MaskFileError, MaskMismatchError, MaskSet, prunable_parameters, sparsity_report
    from prunelib.methods import (
        METHODS,
        SNIP,
        GradualMagnitudePruning,
        IterativeMagnitudePruning,
        MagnitudePruning,
        PruningMethod,
        RandomPruning,
        build_method,
    )
    from prunelib.selection import select_masks
    from prunelib.training import ClassifierModule, PruningResult, TrainConfig, evaluate, run_pruning

# Names are imported on first use (PEP 562): ``import prunelib.masks`` or a sweep's driver
# (which checks configs and FLOPs but never trains) does not pay for Lightning's import.
_EXPORTS: dict[str, str] = {
    "PruningCallback": "prunelib.callbacks",
    **dict.fromkeys(("ModelCost", "count_flops", "count_params", "model_cost"), "prunelib.flops"),
    **dict.fromkeys(("MaskFileError", "MaskMismatchError", "MaskSet", "prunable_parameters", "sparsity_report"),
                    "prunelib.masks"),
    **dict.fromkeys(("METHODS", "SNIP", "GradualMagnitudePruning", "IterativeMagnitudePruning", "MagnitudePruning",
                     "PruningMethod", "RandomPruning", "build_method"), "prunelib.methods"),
    "select_masks": "prunelib.selection",
    **dict.fromkeys(("ClassifierModule", "PruningResult", "evaluate", "run_pruning"), "prunelib.training"),
    "TrainConfig": "prunelib.train_config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunelib' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "PruningCallback",
    "ModelCost", "count_flops", "count_params", "model_cost",
    "MaskFileError", "MaskMismatchError", "MaskSet", "prunable_parameters", "sparsity_report",
    "METHODS", "SNIP", "GradualMagnitudePruning", "IterativeMagnitudePruning", "MagnitudePruning",
    "PruningMethod", "RandomPruning", "build_method", "select_masks",
    "ClassifierModule", "PruningResult", "TrainConfig", "evaluate", "run_pruning",
]
