"""prunelib: pruning for PyTorch models, importable with PyTorch and Lightning alone.

Quick use::

    from prunelib import MagnitudePruning, MaskSet, model_cost
    masks = MagnitudePruning(sparsity=0.8).finalize(model)   # data-free, on a trained model
    masks.save("masks.safetensors", model)

Conventions: sparsity is the fraction of zeroed entries among Conv/Linear weights; FLOPs are
per sample, forward, 1 multiply-add = 2 FLOPs (see :mod:`prunelib.flops`).
"""

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

__version__ = "0.1.0"

__all__ = [
    "PruningCallback",
    "ModelCost", "count_flops", "count_params", "model_cost",
    "MaskFileError", "MaskMismatchError", "MaskSet", "prunable_parameters", "sparsity_report",
    "METHODS", "SNIP", "GradualMagnitudePruning", "IterativeMagnitudePruning", "MagnitudePruning",
    "PruningMethod", "RandomPruning", "build_method", "select_masks",
    "ClassifierModule", "PruningResult", "TrainConfig", "evaluate", "run_pruning",
]
