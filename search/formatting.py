"""How numbers are written for people: one place for the console and the dashboard.

Errors are written as their one meaningful line (:func:`exception_line`). FLOPs and parameter
counts are written with a unit (``100.40k``, ``3.21M``), fractions and
other floats with four decimals, hypervolumes with four significant digits, exactly as the
sweep's console lines and front table print them.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["exception_line", "format_count", "format_metric"]

_COUNT_PREFIXES = ("flops", "params", "dense_flops", "dense_params")


def format_count(value: Any) -> str:
    """A count (FLOPs per sample, parameters) with a k/M/G unit: ``100400 -> "100.40k"``.

    Values below 1000 are written as integers when they are whole and with four significant
    digits otherwise (fractions such as ``reverted_fraction`` stay readable); anything that is
    not a number is ``"?"``.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(v):
        return str(v)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}" if v == int(v) else f"{v:.4g}"


def format_metric(name: str, value: Any) -> str:
    """``value`` of the metric or setting ``name`` as the console writes it.

    ``flops*`` / ``params*`` (and the parent run's ``dense_flops`` / ``dense_params``) go
    through :func:`format_count`; ``*hypervolume`` gets four significant digits; other floats
    four decimals (whole floats of 2 or more, such as epochs, as integers); None is ``""``;
    a list (a per-layer vector setting) each entry so, in brackets; anything else its ``str``.
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_metric(name, v) for v in value) + "]"
    key = name.split(".")[-1] if name.startswith("param.") else name
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if key.startswith(_COUNT_PREFIXES):
            return format_count(v)
        if key.endswith("hypervolume"):
            return f"{v:.4g}"
        if isinstance(value, int) or (math.isfinite(v) and v == int(v) and abs(v) >= 2):
            return str(int(v))
        return f"{v:.4f}"
    return str(value)


_DECORATION = re.compile(r"^[\s^~\-|]*$")


def _last_line(error: Any) -> str:
    """The exception line of a traceback text (what a person needs first), at most 200 chars.

    Python 3.11+ tracebacks underline the failing expression with ``^^^^`` lines, and Ray adds
    its own frames; the exception's own line is the last line that is not decoration.
    """
    lines = [line.strip() for line in str(error or "").strip().splitlines()]
    lines = [line for line in lines if line and not _DECORATION.match(line)]
    return lines[-1][:200] if lines else "no reason recorded"


def exception_line(error: Any) -> str:
    """``Type: message`` of an exception (Ray's wrappers unwrapped to the trial's own
    exception), or the last meaningful line of an error text; at most 200 characters."""
    if isinstance(error, BaseException):
        exc: BaseException = error
        for _ in range(8):  # RayTaskError -> .cause; TuneError / chained -> __cause__
            inner = getattr(exc, "cause", None) or exc.__cause__
            if not isinstance(inner, BaseException) or inner is exc:
                break
            exc = inner
        if getattr(exc, "line_only", False):  # the line is the whole message (search.trials.context)
            return _last_line(str(exc))[:200]
        if type(exc).__name__ in ("RayTaskError", "TuneError") or "Traceback" in str(exc):
            return _last_line(str(exc))
        message = _last_line(str(exc)) if str(exc).strip() else ""
        return f"{type(exc).__name__}: {message}"[:200] if message else type(exc).__name__
    return _last_line(error)
