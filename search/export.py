"""``python -m search.export``: take one point of a finished sweep home as a masks file.

Usage::

    python -m search.export run_id=<parent run id> select=knee out=masks.safetensors \
        [tracking.uri=sqlite:///mlflow.db]

``select`` is ``knee`` (default), ``max_acc``, ``min_flops`` or ``flops_le:<FLOPs per
sample>``. The point is chosen among the sweep's finished trials (read back from MLflow)
on the sweep's own objectives, and its masks file is written to ``out``; load it with
``prunelib.MaskSet.load(out, model)``. ``min_flops`` and ``flops_le:`` read the sweep's FLOPs
objective: by default ``flops_deployed``, the FLOPs of the model the trial exports (physical
for a surgered model, effective for masks only).

The store is checked first (an unreachable server fails in seconds; a SQLite path that holds
no store is refused, never created), ``out`` must be writable before anything is downloaded,
and the file is written atomically: downloaded to a temporary file beside ``out``, loaded as
a masks file, then renamed. A failure leaves ``out`` as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["export_point", "main"]

_USAGE = ("usage: python -m search.export run_id=<parent run id> [select=knee|max_acc|min_flops|trial:<id>|"
          "flops_le:<value>] [out=masks.safetensors] [tracking.uri=sqlite:///mlflow.db]")


def _check_out(out: Path) -> None:
    """``out`` must be a file path in a directory we can write (created if missing)."""
    if out.is_dir():
        raise ValueError(f"out: {out} is a directory; give a file name such as {out / 'masks.safetensors'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out: cannot create {out.parent}: {exc.strerror or exc}") from exc
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"out: {out} is not writable")


def export_point(uri: str, parent_run_id: str, select: str = "knee",
                 out: str | Path = "masks.safetensors") -> dict[str, Any]:
    """Write the masks of the sweep point chosen by ``select`` to ``out``; returns that row.

    Raises ValueError (its message starts with the argument at fault) when the store is not
    usable, ``out`` is not writable, the run is not a sweep, it has no finished trial, the
    selector matches nothing, or the downloaded file is not a valid masks file; ``out`` is
    then left as it was.
    """
    import mlflow
    from mlflow import MlflowClient

    from prunelib.masks import MaskFileError, MaskSet
    from search import pareto
    from search.tracking import TrackingUnavailableError, check_tracking, find_trial_runs

    try:
        check_tracking(uri, must_exist=True)
    except TrackingUnavailableError as exc:
        raise ValueError(f"tracking.uri: {exc}") from exc
    out = Path(out).expanduser().absolute()
    _check_out(out)
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"run_id: no run {parent_run_id!r} in {uri}: {line}") from exc
    objectives_tag = parent.data.tags.get("prunesearch.objectives")
    if objectives_tag is None:
        raise ValueError(f"run_id: {parent_run_id} is not a prunesearch sweep (parent) run")
    objectives = [tuple(o) for o in json.loads(objectives_tag)]
    rows = [r for r in find_trial_runs(uri, parent_run_id) if r.get("status") == "ok"]
    if not rows:
        raise ValueError(f"run_id: sweep {parent_run_id} has no finished trial to export")
    chosen = pareto.select_point(rows, objectives, select)
    mlflow.set_tracking_uri(uri)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix="prunesearch-export-") as scratch:
            local = mlflow.artifacts.download_artifacts(run_id=chosen["run_id"], dst_path=scratch,
                                                        artifact_path="masks/masks.safetensors")
            shutil.copyfile(local, tmp)
        try:
            MaskSet.load(tmp)  # the file we hand out must load
        except MaskFileError as exc:
            raise ValueError(f"run_id: the masks of trial {chosen.get('trial_id')} are not a valid masks file "
                             f"({exc}); {out} was not written") from exc
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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
        print(f"export: {str(exc).splitlines()[0] if str(exc) else exc}", file=sys.stderr)
        return 2
    shown = {k: row.get(k) for k in ("trial_id", "method", "val_acc", "test_acc", "sparsity", "artifact",
                                      "flops_deployed", "flops_effective", "flops_dense") if k in row}
    print(f"wrote {args.get('out', 'masks.safetensors')}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def cli() -> None:
    """The ``prunesearch-export`` console command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
