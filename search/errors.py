"""The error every configuration check raises (standard library only: importable by every
module of ``search`` without an import circle)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""
