"""The one door for user code: import a callable by dotted path and call it with what it accepts.

A user's model, data set or LightningModule is named by a dotted path (``model._target_``,
``data._target_``, ``module._target_``). :func:`call_target` calls it with

* the *documented* keys the project offers (for a model: ``input_shape``, ``in_channels``,
  ``num_classes``), each passed only when the callable's signature names it, and
* the config's *own* keys, always passed: a key the callable does not accept is an error naming
  it (a typo must not vanish silently).

Nothing else is injected (no default ``width``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["TargetError", "accepted_parameters", "call_target", "resolve_target"]


class TargetError(ValueError):
    """A ``_target_`` does not import, is not callable, or rejects its arguments; names the target."""


def resolve_target(target: str, what: str = "model target") -> Callable[..., Any]:
    """Import ``"package.module.Attr"`` (or ``"package.module:Attr"``) and return the attribute.

    Raises:
        TargetError: the path is malformed, the module does not import, or the attribute is missing.
    """
    if not isinstance(target, str) or not target or target == "???":
        raise TargetError(f"{what} must be a dotted path like 'my.module.Factory', got {target!r}")
    if ":" in target:
        module_name, _, attr_path = target.partition(":")
    else:
        module_name, _, attr_path = target.rpartition(".")
    if not module_name or not attr_path:
        raise TargetError(f"{what} {target!r} is not a dotted path like 'my.module.Factory'")
    # Walk back so "pkg.mod.Class.factory" works: import the longest prefix that is a module.
    parts = module_name.split(".") + attr_path.split(".")
    error: Exception | None = None
    for cut in range(len(module_name.split(".")), 0, -1):
        mod_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(mod_name)
        except ImportError as e:
            if error is None:
                error = e
            continue
        except Exception as e:  # the user's module raised while importing
            raise TargetError(f"{what} {target!r}: importing {mod_name!r} raised {type(e).__name__}: {e}") from e
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as e:
            raise TargetError(f"{what} {target!r}: module {mod_name!r} has no attribute path "
                              f"{'.'.join(parts[cut:])!r}") from e
        if not callable(obj):
            raise TargetError(f"{what} {target!r} is not callable")
        return obj
    raise TargetError(f"{what} {target!r} could not be imported: {error}") from error


def accepted_parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """``(named keyword parameters, takes **kwargs)`` of a callable (a class: its ``__init__``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume nothing
        return set(), False
    named = {n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_target(target: str | Callable[..., Any], documented: Mapping[str, Any], own: Mapping[str, Any],
                what: str) -> Any:
    """Call ``target`` with the documented keys it names and all of the config's own keys.

    Args:
        target: a dotted path or the callable itself.
        documented: keys the project offers (passed only where the signature names them).
        own: the config's own keys (always passed; one the callable cannot take is an error).
        what: how errors name the target, e.g. ``"model._target_"``.

    Raises:
        TargetError: the target does not import, rejects a key, or raised while being called
            (the message names ``what``, the target and the exception's own line).
    """
    factory = resolve_target(target, what) if isinstance(target, str) else target
    label = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
    named, var_kw = accepted_parameters(factory)
    unknown = sorted(k for k in own if k not in named) if not var_kw else []
    if unknown:
        raise TargetError(f"{what}={label}: does not accept {unknown}; it takes {sorted(named)}")
    kwargs = {k: v for k, v in documented.items() if k in named and k not in own}
    kwargs.update(own)
    try:
        return factory(**kwargs)
    except TargetError:
        raise
    except Exception as e:
        line = (str(e).strip().splitlines() or [""])[-1]
        raise TargetError(f"{what}={label} raised {type(e).__name__}: {line}") from e
