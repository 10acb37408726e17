"""Commands the project prints for a person to copy: built in one place, shell-quoted.

A trial id, run id or tracking URI comes from a store that anyone who can write to it
controls; pasted unquoted, ``t1$(touch x)`` would run. Every printed command goes through
:func:`shell_command`, which quotes each argument with :func:`shlex.quote`.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = ["export_command", "shell_command"]


def shell_command(argv: Sequence[str]) -> str:
    """``argv`` as one POSIX shell line, every word quoted where needed."""
    return shlex.join([str(a) for a in argv])


def export_command(parent_run_id: str, select: str, out: str, tracking_uri: str | None = None) -> str:
    """The ``python -m search.export`` line that takes one point of a sweep home.

    Args:
        parent_run_id: the sweep's MLflow parent run.
        select: a selector of :data:`search.pareto.SELECTOR_GRAMMAR` (``knee``, ``best:val_acc``,
            ``le:flops_deployed:2e6``, ``trial:<id>``...).
        out: the directory to write (weights, model spec, masks, settings); a
            ``.safetensors`` name writes the masks alone.
        tracking_uri: the store; omitted from the line when None.
    """
    argv = ["python", "-m", "search.export", f"run_id={parent_run_id}", f"select={select}", f"out={out}"]
    if tracking_uri:
        argv.append(f"tracking.uri={tracking_uri}")
    return shell_command(argv)
