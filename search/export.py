"""``python -m search.export``: take one point of a finished sweep home as a masks file.

Usage::

    python -m search.export run_id=<parent run id> select=knee out=masks.safetensors \
        [tracking.uri=sqlite:///mlflow.db]

``select`` is ``knee`` (default), ``max_acc``, ``min_flops`` or ``flops_le:<FLOPs per
sample>``. The point is chosen among the sweep's finished trials (read back from MLflow)
on the sweep's own objectives, and its masks file is written to ``out``; load it with
``prunelib.MaskSet.load(out, model)``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["export_point", "main"]

_USAGE = ("usage: python -m search.export run_id=<parent run id> [select=knee|max_acc|min_flops|trial:<id>|"
          "flops_le:<value>] [out=masks.safetensors] [tracking.uri=sqlite:///mlflow.db]")


def export_point(uri: str, parent_run_id: str, select: str = "knee",
                 out: str | Path = "masks.safetensors") -> dict[str, Any]:
    """Write the masks of the sweep point chosen by ``select`` to ``out``; returns that row.

    Raises ValueError when the run is not a sweep, has no finished trial, or the selector
    matches nothing (the message says what is available).
    """
    import mlflow
    from mlflow import MlflowClient

    from prunelib.masks import MaskSet
    from search import pareto
    from search.tracking import find_trial_runs

    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:
        raise ValueError(f"run_id: no run {parent_run_id!r} in {uri}: {exc}") from exc
    objectives_tag = parent.data.tags.get("prunesearch.objectives")
    if objectives_tag is None:
        raise ValueError(f"run_id: {parent_run_id} is not a prunesearch sweep (parent) run")
    objectives = [tuple(o) for o in json.loads(objectives_tag)]
    rows = [r for r in find_trial_runs(uri, parent_run_id) if r.get("status") == "ok"]
    if not rows:
        raise ValueError(f"run_id: sweep {parent_run_id} has no finished trial to export")
    chosen = pareto.select_point(rows, objectives, select)
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(run_id=chosen["run_id"],
                                                artifact_path="masks/masks.safetensors")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, out)
    MaskSet.load(out)  # the file we hand out must load
    return {k: v for k, v in chosen.items()}


def _parse(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for token in argv:
        if token in ("-h", "--help"):
            print(_USAGE)
            sys.exit(0)
        key, sep, value = token.lstrip("-").partition("=")
        if not sep:
            raise SystemExit(f"export: expected key=value, got {token!r}\n{_USAGE}")
        args[key.replace("-", "_")] = value
    unknown = set(args) - {"run_id", "select", "out", "tracking.uri"}
    if unknown:
        raise SystemExit(f"export: unknown argument(s) {sorted(unknown)}\n{_USAGE}")
    if "run_id" not in args:
        raise SystemExit(f"export: run_id is required\n{_USAGE}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.get("tracking.uri") or f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    try:
        row = export_point(uri, args["run_id"], args.get("select", "knee"),
                           args.get("out", "masks.safetensors"))
    except ValueError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    shown = {k: row.get(k) for k in ("trial_id", "method", "val_acc", "test_acc", "sparsity",
                                      "flops_effective", "flops_dense") if k in row}
    print(f"wrote {args.get('out', 'masks.safetensors')}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
