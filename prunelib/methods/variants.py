"""The ``variant`` setting of the seed methods: the paper's method, or our extended one.

BINGO, polarization and PAODING each take ``variant="paper" | "extended"``. One registry
name per method with a setting (rather than a second registered method such as
``bingo_ext``) because:

* a sweep can search the variant as one categorical (``space: variant``) and every other
  setting of the method keeps one name, one YAML file and one Optuna prefix;
* the trial kinds, the projected-FLOPs early stopping and the benchmark scripts that look a
  method up by name need no second entry;
* which variant is the default is one value in the settings class and its YAML.

Settings whose default differs between the variants are declared ``None`` in the settings
dataclass ("the variant's default") and filled in ``__post_init__`` by
:func:`resolve_variant`. In the paper variant, a value that contradicts the paper (an
extension switched on) is refused with a one-line ``ValueError`` that names the key; a
setting on which the paper is silent is accepted in both variants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prunelib.methods.base import MethodSettings, set_field

__all__ = ["VARIANTS", "PAPER", "EXTENDED", "resolve_variant", "equals", "one_of"]

PAPER = "paper"
EXTENDED = "extended"
VARIANTS = (EXTENDED, PAPER)

#: A paper rule: (the values the paper allows, what the paper does, in words).
Rule = tuple[Callable[[Any], bool], str]


def equals(value: Any) -> Callable[[Any], bool]:
    """A rule's test: the setting equals ``value``."""
    return lambda v: v == value


def one_of(*values: Any) -> Callable[[Any], bool]:
    """A rule's test: the setting is one of ``values``."""
    return lambda v: v in values


def resolve_variant(settings: MethodSettings, defaults: Mapping[str, tuple[Any, Any]],
                    paper_rules: Mapping[str, Rule]) -> None:
    """Fill the variant-dependent defaults of ``settings`` and refuse a paper contradiction.

    Args:
        settings: a frozen settings object with a ``variant`` field (changed in place with
            :func:`~prunelib.methods.base.set_field`; call from ``__post_init__``).
        defaults: key -> ``(paper default, extended default)`` for the fields left ``None``.
        paper_rules: key -> ``(test, what the paper does)``; in the paper variant a value the
            test rejects raises ``ValueError`` naming the key.
    """
    variant = getattr(settings, "variant")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    for key, (paper_value, extended_value) in defaults.items():
        if getattr(settings, key) is None:
            set_field(settings, key, paper_value if variant == PAPER else extended_value)
    if variant != PAPER:
        return
    for key, (allowed, paper_does) in paper_rules.items():
        value = getattr(settings, key)
        if not allowed(value):
            raise ValueError(f"{key}={value!r} contradicts variant 'paper' (the paper: {paper_does}); "
                             f"use variant 'extended' for it")
