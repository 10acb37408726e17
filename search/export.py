"""``prunesearch-export``: take one point of a finished sweep home, as a directory that loads.

Usage::

    prunesearch-export select=knee out=my_point            # the newest sweep in ./mlflow.db
    prunesearch-export run_id=<parent run id> select=best:val_f1 out=my_point onnx=true \
        [tracking.uri=sqlite:///mlflow.db]

``select`` speaks the sweep's objectives (:data:`search.pareto.SELECTOR_GRAMMAR`): ``knee``
(default), ``best:<objective>``, ``min:<objective>``, ``max:<objective>``,
``le:<objective>:<value>``, ``ge:<objective>:<value>``, ``trial:<id>``; ``max_acc``, ``min_flops``
and ``flops_le:<value>`` stay as aliases and the command says which metric they read. The point
is chosen among the sweep's finished trials (read back from MLflow) on the sweep's own
objectives. Without ``run_id``, the newest sweep of the store.

``out`` is a directory (:mod:`prunelib.artifact`'s layout): the trained, pruned weights the
trial was measured on (the masked model with its zeros, or the surgered model), the model
spec, the masks, the trial's settings and metrics (``trial.json`` and in the manifest) and,
with ``onnx=true``, ``model.onnx``. ``prunelib.artifact.load_pruned(out)`` returns the model
ready to evaluate; the command prints those lines. The files come from the trial's folder
under the sweep's storage (a path or URI) or, when that is gone, from its MLflow run (the
logged model). A trial whose weights were not kept (``trial.keep_weights=none``, or removed
once it left the front) gives a directory with the masks only, and the command says so.
``out=FILE.safetensors`` writes the masks file alone (the former behaviour).

The store is checked first (an unreachable server fails in seconds; a SQLite path that holds
no store is refused, never created), ``out`` must be writable before anything is downloaded,
and the result is written atomically: assembled in a temporary directory beside ``out``, checked
(the masks load; the model loads where its code is importable), then renamed. A failure
leaves ``out`` as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["describe_export", "export_point", "latest_sweep", "main"]

_USAGE = ("usage: prunesearch-export [run_id=<parent run id>] [select=knee|best:<objective>|min:<objective>|"
          "max:<objective>|le:<objective>:<value>|ge:<objective>:<value>|trial:<id>|max_acc|min_flops|"
          "flops_le:<value>] [out=DIR (or FILE.safetensors: masks only)] [onnx=true] "
          "[tracking.uri=sqlite:///mlflow.db]")


def _check_out(out: Path) -> None:
    """``out`` must be a path in a directory we can write (created if missing): a masks file
    (``.safetensors``) or an export directory (absent, empty, or an earlier export)."""
    too_long = [part for part in out.parts if len(os.fsencode(part)) > 255]  # NAME_MAX of Linux file systems
    if too_long:
        raise ValueError(f"out: the name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} bytes; a file "
                         "name may have at most 255 (File name too long)")
    if out.suffix == ".safetensors" and out.is_dir():
        raise ValueError(f"out: {out} is a directory; give a file name such as {out / 'masks.safetensors'}")
    if out.suffix != ".safetensors" and out.exists():
        if not out.is_dir():
            raise ValueError(f"out: {out} is a file; give a directory (or a .safetensors name for the masks alone)")
        if any(out.iterdir()) and not (out / "trial.json").is_file():
            raise ValueError(f"out: {out} exists and is not an earlier export (no trial.json); choose another "
                             "directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out: cannot create {out.parent}: {exc.strerror or exc}") from exc
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"out: {out} is not writable")


def latest_sweep(uri: str) -> str:
    """The parent run of the newest sweep in the store (by start time).

    Raises:
        ValueError: the store holds no sweep.
    """
    from mlflow import MlflowClient

    from search.tracking import TAG_ROLE

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        raise ValueError(f"run_id: {uri} holds no sweep; run one first or give run_id=<parent run id>")
    return runs[0].info.run_id


def export_point(uri: str, parent_run_id: str | None, select: str = "knee",
                 out: str | Path = "masks.safetensors", onnx: bool = False) -> dict[str, Any]:
    """Write the sweep point chosen by ``select`` to ``out``; returns that trial's row, with
    ``export`` describing what was written (see :func:`_write_point`).

    ``out`` ending in ``.safetensors``: the masks file alone. Otherwise a directory (see the
    module doc). ``parent_run_id`` None: the newest sweep of the store.

    Raises ValueError (its message starts with the argument at fault) when the store is not
    usable, ``out`` is not writable, the run is not a sweep, it has no finished trial, the
    selector matches nothing, or the files fetched do not load; ``out`` is then left as it was.
    """
    from mlflow import MlflowClient

    from search import pareto
    from search.tracking import TrackingUnavailableError, check_tracking, find_trial_runs

    try:
        check_tracking(uri, must_exist=True)
    except TrackingUnavailableError as exc:
        raise ValueError(f"tracking.uri: {exc}") from exc
    out = Path(out).expanduser().absolute()
    _check_out(out)
    parent_run_id = parent_run_id or latest_sweep(uri)
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
    try:
        selector = pareto.Selector.parse(select, objectives)
    except ValueError as exc:
        raise ValueError(f"select: {exc}") from exc
    try:
        picked = pareto.select_point(rows, objectives, selector)
    except ValueError as exc:
        raise ValueError(f"select: {exc}") from exc
    chosen = {k: v for k, v in picked.items()}
    chosen["selected_by"] = selector.describe(objectives)
    chosen["objectives"] = [list(o) for o in objectives]
    chosen["sweep_run_id"] = parent_run_id
    if out.suffix == ".safetensors":
        _write_masks_file(uri, chosen, out)
        chosen["export"] = {"out": str(out), "files": [out.name], "kind": "masks"}
    else:
        chosen["export"] = _write_point(uri, chosen, out, onnx)
    return chosen


def _download(uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """One artifact of a run, downloaded into ``dst``.

    Raises:
        ValueError: the run has no such artifact (or the store would not give it).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # our own disk, not the artifact: said as such by main()
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"run_id: run {run_id} has no artifact {artifact_path!r} in MLflow ({line})") from exc


def _write_masks_file(uri: str, chosen: dict[str, Any], out: Path) -> None:
    """The masks of the chosen trial as one file, atomically (``out=FILE.safetensors``)."""
    from prunelib.masks import MaskFileError, MaskSet

    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name[:100]}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory(prefix="prunesearch-export-") as scratch:
            shutil.copyfile(_download(uri, chosen["run_id"], "masks/masks.safetensors", Path(scratch)), tmp)
        try:
            MaskSet.load(tmp)  # the file we hand out must load
        except MaskFileError as exc:
            raise ValueError(f"run_id: the masks of trial {chosen.get('trial_id')} are not a valid masks file "
                             f"({exc}); {out} was not written") from exc
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _copy_from_storage(source: str, files: list[str], dest: Path) -> bool:
    """Copy ``files`` (relative) of a trial folder (a path or URI) into ``dest``; False if one is missing."""
    from search.storage import copy_out

    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if not copy_out(source.rstrip("/") + "/" + rel, dest / rel):
            return False
    return True


def _read_storage_manifest(source: str) -> dict[str, Any] | None:
    from prunelib.artifact import MANIFEST_FILE
    from search.storage import copy_out

    with tempfile.TemporaryDirectory(prefix="prunesearch-export-") as scratch:
        local = Path(scratch) / MANIFEST_FILE
        try:
            if not copy_out(source.rstrip("/") + "/" + MANIFEST_FILE, local):
                return None
            return json.loads(local.read_text())
        except (OSError, ValueError):
            return None


def _fetch_weights(uri: str, chosen: dict[str, Any], dest: Path) -> tuple[dict[str, Any] | None, str]:
    """Put the chosen trial's pruned model (manifest and files) into ``dest``.

    Returns ``(manifest, source)``: the manifest as copied (None when the trial kept no weights)
    and where the files came from (or why there are none)."""
    from prunelib.artifact import save_pruned

    source = chosen.get("artifact_dir")
    if isinstance(source, str) and source:
        manifest = _read_storage_manifest(source)
        if manifest is not None and manifest.get("weights_removed"):
            return None, f"not kept: {manifest['weights_removed']}"
        if manifest is not None and _copy_from_storage(source, list(manifest.get("files") or []), dest):
            return manifest, f"the trial's folder {source}"
    model_uri = chosen.get("model_uri")
    if isinstance(model_uri, str) and model_uri.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(uri)
        try:
            info = mlflow.models.get_model_info(model_uri)
            manifest = (info.metadata or {}).get("prunesearch")
            if manifest and manifest.get("artifact") == "surgered":
                _download(uri, chosen["run_id"], "surgered", dest)
            elif manifest:
                from prunelib.artifact import ModelSpec

                spec = ModelSpec.from_dict(manifest["spec"]) if manifest.get("spec") else None
                save_pruned(dest, mlflow.pytorch.load_model(model_uri), spec, "masked")
                manifest = {**json.loads((dest / "pruned_model.json").read_text()),
                            **{k: v for k, v in manifest.items() if k not in ("files", "weights")}}
            if manifest:
                return manifest, f"the trial's MLflow model {model_uri}"
        except Exception as exc:  # the model is gone or its code is not importable here
            return None, f"not found: the trial folder {source!r} is gone and its MLflow model failed ({exc})"
    policy = chosen.get("keep_weights")
    if policy == "none":
        return None, "not kept: the sweep ran with trial.keep_weights=none"
    return None, "not kept: this trial has no saved weights (a sweep from before weights were kept?)"


def _write_point(uri: str, chosen: dict[str, Any], out: Path, onnx: bool) -> dict[str, Any]:
    """Assemble the export directory in a temporary folder beside ``out``, check it, rename it."""
    from prunelib.artifact import MANIFEST_FILE, MASKS_FILE, ONNX_FILE, ArtifactError, load_pruned, write_manifest
    from prunelib.masks import MaskFileError, MaskSet
    from prunelib.targets import TargetError

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name[:100]}.", suffix=".part"))
    try:
        manifest, source = _fetch_weights(uri, chosen, tmp)
        if not (tmp / MASKS_FILE).is_file():
            shutil.copyfile(_download(uri, chosen["run_id"], f"masks/{MASKS_FILE}", tmp / ".dl"), tmp / MASKS_FILE)
            shutil.rmtree(tmp / ".dl", ignore_errors=True)
        try:
            MaskSet.load(tmp / MASKS_FILE)
        except MaskFileError as exc:
            raise ValueError(f"run_id: the masks of trial {chosen.get('trial_id')} are not a valid masks file "
                             f"({exc}); {out} was not written") from exc
        row = {k: v for k, v in chosen.items() if k != "export"}
        metrics = {k: v for k, v in row.items() if not k.startswith("param.") and isinstance(v, (int, float))}
        settings = {k[len("param."):]: v for k, v in row.items() if k.startswith("param.")}
        (tmp / "trial.json").write_text(json.dumps(row, indent=1, default=str))
        notes: list[str] = []
        if manifest is not None:
            manifest = {**manifest, "trial_id": row.get("trial_id"), "method": row.get("method"),
                        "sweep_run_id": row.get("sweep_run_id"), "selected_by": row.get("selected_by"),
                        "objectives": row.get("objectives"), "settings": settings, "metrics": metrics}
            write_manifest(tmp, manifest)
            try:
                model = load_pruned(tmp)  # the directory we hand out must load
                if onnx:
                    _write_onnx(model, manifest, tmp / ONNX_FILE, notes)
            except (TargetError, ImportError) as exc:  # the user's code is not importable here
                notes.append(f"not loaded here to check it ({str(exc).splitlines()[0][:200]})")
            except (ArtifactError, RuntimeError, OSError) as exc:
                raise ValueError(f"run_id: the pruned model of trial {chosen.get('trial_id')} does not load "
                                 f"({str(exc).splitlines()[0][:300]}); {out} was not written") from exc
            onnx_files = [p.name for p in tmp.glob(f"{ONNX_FILE}*") if p.is_file()]  # + external data
            manifest["files"] = sorted({*manifest.get("files", []), MASKS_FILE, "trial.json", *onnx_files})
            write_manifest(tmp, manifest)
        elif onnx:
            notes.append("no ONNX: the trial kept no weights")
        if out.exists():
            shutil.rmtree(out)  # an earlier export (checked by _check_out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "files": files, "kind": manifest.get("artifact") if manifest else "masks",
            "source": source, "notes": notes, "manifest": MANIFEST_FILE if manifest else None,
            "spec": (manifest or {}).get("spec")}


def _write_onnx(model: Any, manifest: dict[str, Any], path: Path, notes: list[str]) -> None:
    from prunelib.surgery import export_onnx

    shape = (manifest.get("spec") or {}).get("input_shape")
    if not shape:
        notes.append("no ONNX: the model has no fixed input shape (a text model)")
        return
    export_onnx(model, path, tuple(shape))


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


_ROLES = {"pruned_model.json": "manifest: model spec, artifact kind, settings and metrics",
          "weights.safetensors": "trained weights, pruned entries zero (the masked model as measured)",
          "surgered/model.safetensors": "the surgered (smaller) model's weights",
          "surgered/structure.json": "which channels were removed (rebuilds the smaller shapes)",
          "masks.safetensors": "the masks (prunelib.MaskSet.load)",
          "trial.json": "the trial's settings and metrics",
          "model.onnx": "ONNX, dynamic batch", "model.onnx.data": "the ONNX model's weights (beside it)",
          "surgered/model.onnx": "ONNX of the surgered model"}


def describe_export(row: dict[str, Any]) -> str:
    """What ``prunesearch-export`` prints: the point, the files written and the Python that loads it."""
    exp = row["export"]
    shown = {k: row.get(k) for k in ("trial_id", "method", *[m for m, _ in row.get("objectives", [])],
                                      "test_acc", "sparsity", "artifact") if k in row}
    lines = [f"selected with select={row.get('selected_by')}: " + ", ".join(f"{k}={v}" for k, v in shown.items())]
    if row.get("collapsed"):
        lines.append(f"warning: this model collapsed ({row.get('collapse') or 'one class / chance accuracy'})")
    out = Path(exp["out"])
    if exp["kind"] == "masks" and exp.get("manifest") is None and out.suffix == ".safetensors":
        lines.append(f"wrote {out} (masks only; out=DIR writes the weights, spec and settings too)")
        return "\n".join(lines)
    lines.append(f"wrote {out}/ ({exp['kind']}; weights from {exp['source']}):")
    for rel in exp["files"]:
        role = _ROLES.get(rel, "the Hugging Face model (transformers loads it)" if rel.startswith("hf/") else "")
        lines.append(f"  {rel:<28} {_size(out / rel):>9}  {role}")
    lines += [f"  note: {n}" for n in exp.get("notes", [])]
    if exp.get("manifest") is None:
        lines.append(f"weights: {exp['source']}; the directory holds the masks and the trial's settings only")
        return "\n".join(lines)
    spec = exp.get("spec") or {}
    lines += ["load it (eval mode, ready to evaluate):", "    from prunelib.artifact import load_pruned",
              f"    model = load_pruned({str(out)!r})"]
    target = (spec.get("config") or {}).get("_target_")
    if target:
        lines.append(f"    # the model's own code must be importable: {target}")
    if spec.get("input_shape"):
        lines.append(f"    logits = model(x)  # x: a float tensor (N, {', '.join(map(str, spec['input_shape']))})")
    if spec.get("kind") == "hf":
        lines.append(f"    # or: transformers' from_pretrained({str(out / 'hf')!r})")
    return "\n".join(lines)


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
    unknown = set(args) - {"run_id", "select", "out", "tracking.uri", "onnx"}
    if unknown:
        raise SystemExit(f"export: unknown argument(s) {sorted(unknown)}\n{_USAGE}")
    if args.get("onnx", "false").lower() not in ("true", "false"):
        raise SystemExit(f"export: onnx must be true or false, got {args['onnx']!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.get("tracking.uri") or f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    try:
        row = export_point(uri, args.get("run_id"), args.get("select", "knee"),
                           args.get("out", "masks.safetensors"), onnx=args.get("onnx", "false").lower() == "true")
    except ValueError as exc:
        print(f"export: {str(exc).splitlines()[0] if str(exc) else exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing out= failed (full disk, name, permission): out= is as it was
        where = str(exc.filename or args.get("out", "out"))
        where = where if len(where) <= 120 else where[:60] + "..." + where[-40:]
        print(f"export: out: {where}: {exc.strerror or exc}; nothing was written", file=sys.stderr)
        return 2
    print(describe_export(row))
    return 0


def cli() -> None:
    """The ``prunesearch-export`` console command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
