"""Pruning methods, one small class each, behind the hooks of :mod:`prunelib.methods.base`.

``build_method("magnitude", sparsity=0.8)`` builds one by its registry name, which is also
the name of its Hydra config ``conf/method/NAME.yaml``.
"""

from __future__ import annotations

from typing import Any

from prunelib.methods.base import MethodCost, Phase, PruningMethod
from prunelib.methods.baselines import (
    SNIP,
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    MagnitudePruning,
    RandomPruning,
)

__all__ = ["METHODS", "build_method", "register_method", "MethodCost", "Phase", "PruningMethod",
           "MagnitudePruning", "RandomPruning", "SNIP", "GradualMagnitudePruning",
           "IterativeMagnitudePruning", "BINGO", "PolarizationGates"]

METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Add a method class to the registry under ``cls.name`` (usable as a decorator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


for _cls in (MagnitudePruning, RandomPruning, SNIP, GradualMagnitudePruning, IterativeMagnitudePruning):
    register_method(_cls)

# Seed methods register after the baselines (their modules import the registry above).
from prunelib.methods.bingo import BINGO  # noqa: E402
from prunelib.methods.polarization import PolarizationGates  # noqa: E402

register_method(BINGO)
register_method(PolarizationGates)

from prunelib.methods.ken import KEN  # noqa: E402

register_method(KEN)

from prunelib.methods.paoding import PAODING  # noqa: E402

register_method(PAODING)

from prunelib.methods.gap import GrowAndPrune  # noqa: E402

register_method(GrowAndPrune)

from prunelib.methods.rl_pruner import RLPruner  # noqa: E402

register_method(RLPruner)

# One-shot LLM pruners and structured (physically smaller) pruning of Hugging Face transformers
# (model=hf; prunelib.llm imports no transformers). Each of those modules also registers its
# methods when it finishes loading: imported first, it is still loading here (it imports
# prunelib.methods.base, which runs this package), so what it registers itself is what counts.
import prunelib.llm.methods as _llm_methods  # noqa: E402
import prunelib.llm.structured_method as _structured_method  # noqa: E402

for _cls in (*getattr(_llm_methods, "LLM_METHODS", ()), *getattr(_structured_method, "STRUCTURED_METHODS", ())):
    register_method(_cls)

def build_method(name: str, **settings: Any) -> PruningMethod:
    """Instantiate the registered method ``name`` with its settings.

    Raises ValueError for an unknown name (listing the known ones) and TypeError naming the
    unexpected setting when ``settings`` holds a key the method does not take.
    """
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        return cls(**settings)
    except TypeError as exc:
        raise TypeError(f"method {name!r}: {exc}") from exc
