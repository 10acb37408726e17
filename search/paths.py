"""Paths a user typed, resolved where the sweep was launched (a leaf of ``search``: it imports no
other module of it).

Ray Tune runs trials with the trial directory as the working directory, so a relative path in
the config (``data.path``, ``model.path``, ``pair.*``) refers to the launch directory instead.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["launch_dir", "local_path", "resolve_launch_path"]


def launch_dir() -> Path:
    """Where the sweep was launched: relative paths the user typed refer to it (Ray Tune runs
    trials with the trial directory as working directory)."""
    return Path(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd())


def resolve_launch_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, relative to :func:`launch_dir` unless absolute."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else launch_dir() / p


def local_path(uri: str) -> Path | None:
    """Filesystem path of a ``sqlite:///`` / ``file:`` / plain-path store URI, else None (here,
    not in search.tracking: the driver asks it before Ray starts, without importing MLflow)."""
    if uri.startswith("sqlite:///"):
        # sqlite:///rel/path (relative) and sqlite:////abs/path (absolute), SQLAlchemy style.
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if uri.startswith("file:"):
        parsed = urllib.parse.urlparse(uri)
        return Path(urllib.request.url2pathname(parsed.path))
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(uri)
    return None
