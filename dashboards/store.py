"""What the dashboard reads from MLflow: sweeps, their trials and fronts, trial artifacts.

Plain functions over an ``MlflowClient`` so they can be tested without a browser or server.
Numbers go to the page twice: raw (for the plots) and as the console writes them
(``display``, from :mod:`search.formatting`), so the page never formats a number itself.

Run ids and artifact paths come from the URL: they are checked (:func:`check_run_id`,
:func:`artifact_relpath`) and the local copy is resolved inside the cache before any file is
read or any folder made; an artifact is downloaded only when the run lists it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from mlflow import MlflowClient

from search import pareto
from search.commands import export_command
from search.formatting import format_metric
from search.plots import DenseReference, axis_label, method_colours, plot_axes
from search.tracking import TAG_ROLE, _parse_param, find_trial_runs

__all__ = ["NotFound", "Unreadable", "RASTER_TYPES", "TEXT_SUFFIXES", "CURVE_METRICS", "check_run_id",
           "artifact_relpath", "inline_type", "artifact_file", "list_sweeps", "sweep_detail", "trial_detail"]

# MLflow's own run id grammar (mlflow.utils.validation), ASCII only: no dots, no slashes.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
# Served inline: raster images and plain text. Everything else (SVG and HTML included: they
# run script) goes out as an attachment.
RASTER_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp"}
TEXT_SUFFIXES = (".txt", ".log", ".json", ".csv", ".yaml", ".yml", ".md")
# Per-epoch metrics a trial logs with step = epoch: its training curves.
CURVE_METRICS = ("train_loss", "val_loss", "val_acc", "train_acc", "sparsity")
# Where downloads land before they are moved into place (run ids never start with a dot).
_PARTIAL = ".partial"


class NotFound(LookupError):
    """A run id, artifact path or artifact the dashboard does not serve (answered 404)."""


class Unreadable(ValueError):
    """A sweep whose tags the dashboard cannot read (answered 422; marked in the sweep list)."""


def _finite(value: Any) -> Any:
    # JSON has no NaN/inf: the browser gets null instead.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_run_id(run_id: Any) -> str:
    """``run_id`` when it is a well-formed MLflow run id, else :class:`NotFound`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise NotFound(f"run {str(run_id)[:80]!r} not found")
    return run_id


def artifact_relpath(path: str) -> PurePosixPath:
    """An artifact path from a URL as a relative POSIX path, or :class:`NotFound`.

    Refused: empty paths, absolute paths, backslashes, NUL and control characters, and any
    ``.``/``..``/empty segment (``a//b`` included), before anything touches the disk.
    """
    parts = path.split("/") if isinstance(path, str) else []
    if (not parts or any(p in ("", ".", "..") for p in parts) or "\\" in path
            or any(ord(c) < 32 or ord(c) == 127 for c in path) or len(path) > 1000):
        raise NotFound(f"artifact {str(path)[:80]!r} not found")
    return PurePosixPath(*parts)


def inline_type(path: str | PurePosixPath) -> str | None:
    """The content type an artifact is shown with in the page, or None for a download.

    Raster images keep their image type; plain-text files are ``text/plain``.
    """
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in RASTER_TYPES:
        return RASTER_TYPES[suffix]
    if suffix in TEXT_SUFFIXES:
        return "text/plain; charset=utf-8"
    return None


def _inside(root: Path, target: Path) -> bool:
    return target.resolve(strict=False).is_relative_to(root.resolve(strict=False))


def artifact_file(client: MlflowClient, run_id: str, path: str, cache: Path) -> Path:
    """Download one artifact of ``run_id`` into ``cache`` (once) and return its local path.

    Raises :class:`NotFound` for a malformed run id or path, a path that would resolve outside
    the cache, or a file the run does not list; nothing is created in those cases.
    """
    rel = artifact_relpath(path)
    target = cache / check_run_id(run_id) / rel
    if not _inside(cache, target):
        raise NotFound(f"artifact {path[:80]!r} not found")
    if target.is_file():
        return target
    parent = str(rel.parent) if str(rel.parent) != "." else None
    listed = {item.path: item.is_dir for item in client.list_artifacts(run_id, parent)}
    if listed.get(str(rel)) is not False:  # absent (None) or a folder (True)
        raise NotFound(f"run {run_id} has no artifact file {path[:80]!r}")
    staging = cache / _PARTIAL
    staging.mkdir(exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=staging))
    try:
        # Concurrent requests each download into their own folder; the last rename wins.
        local = Path(client.download_artifacts(run_id, str(rel), str(partial)))
        if not _inside(partial, local) or not local.is_file():
            raise NotFound(f"run {run_id} has no artifact file {path[:80]!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _display(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: format_metric(k, v) for k, v in values.items()}


def list_sweeps(client: MlflowClient) -> list[dict[str, Any]]:
    """Every sweep (parent run tagged ``prunesearch.role=sweep``), newest first; ``error`` says why
    a sweep cannot be shown (its tags are unreadable), else None."""
    experiments = client.search_experiments()
    if not experiments:
        return []
    runs = client.search_runs([e.experiment_id for e in experiments],
                              filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=500)
    names = {e.experiment_id: e.name for e in experiments}
    out = []
    for r in runs:
        metrics = r.data.metrics
        hv = _finite(metrics.get("final_hypervolume", metrics.get("hypervolume")))
        try:
            _objectives(r)
            error = None
        except Unreadable as exc:  # listed and marked, never a reason to hide the other sweeps
            error = str(exc)
        out.append({
            "error": error,
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "experiment": names.get(r.info.experiment_id, r.info.experiment_id),
            "status": r.info.status,
            "start_time": r.info.start_time,
            "methods": r.data.tags.get("prunesearch.methods", ""),
            "data": r.data.tags.get("prunesearch.data", ""),
            "model": r.data.tags.get("prunesearch.model", ""),
            "hypervolume": hv,
            "hypervolume_display": format_metric("hypervolume", hv),
        })
    return out


def _objectives(run: Any) -> list[tuple[str, str]]:
    """The sweep's objectives from its ``prunesearch.objectives`` tag (default when absent).

    Raises:
        Unreadable: the tag is not JSON, or not a list of ``[metric, "max"|"min"]`` pairs.
    """
    tag = run.data.tags.get("prunesearch.objectives")
    if not tag:
        return list(pareto.DEFAULT_OBJECTIVES)
    try:
        value = json.loads(tag)
    except json.JSONDecodeError as exc:
        raise Unreadable(f"its prunesearch.objectives tag is not JSON ({exc.msg}): {tag[:60]!r}") from exc
    if (not isinstance(value, list) or not value
            or not all(isinstance(o, list) and len(o) == 2 and isinstance(o[0], str) and o[1] in ("max", "min")
                       for o in value)):
        raise Unreadable(f"its prunesearch.objectives tag is not a list of [metric, \"max\"|\"min\"] pairs: "
                         f"{tag[:60]!r}")
    return [(str(m), str(d)) for m, d in value]


def _dense(metrics: Mapping[str, float], x_name: str | None, y_name: str) -> dict[str, Any] | None:
    ref = DenseReference.from_metrics(metrics)
    if ref is None:
        return None
    front = ref.point(x_name, y_name) if x_name else None
    return {
        "val_acc": ref.val_acc, "flops": ref.flops, "params": ref.params,
        "display": {"val_acc": format_metric("val_acc", ref.val_acc), "flops": format_metric("flops", ref.flops),
                    "params": format_metric("params", ref.params),
                    "x": format_metric(x_name, front[0]) if front else "", "y": format_metric(y_name, ref.value_of(y_name))},
        # Where the dense model sits in each plot of the page (null: not measured).
        "front_point": front,
        "sparsity_point": ref.point("sparsity", y_name),
    }


def sweep_detail(client: MlflowClient, uri: str, run_id: str) -> dict[str, Any]:
    """A sweep: objectives and plot axes, its trials (flat rows, raw and ``display``), the
    Pareto front of each method (accuracy against the cost objective, and accuracy against
    sparsity), a colour per method and the dense model's reference point.

    ``fronts`` maps method -> trial ids on that method's own front (cheapest first);
    ``sparsity_fronts`` method -> trial ids with the best accuracy at their sparsity or
    more; ``front`` is the sweep's overall front. Failed and running trials are listed (with
    their error) but are on no front. ``dense`` is None unless the parent run logged
    ``dense_val_acc`` / ``dense_flops`` / ``dense_params``.
    """
    run = client.get_run(check_run_id(run_id))
    objectives = _objectives(run)
    x_obj, (y_name, _) = plot_axes(objectives)
    x_name = x_obj[0] if x_obj else None
    rows = find_trial_runs(uri, run_id)
    ok = [r for r in rows if r["status"] == "ok"]
    methods = sorted({str(r.get("method")) for r in ok})
    fronts: dict[str, list[str]] = {}
    sparsity_fronts: dict[str, list[str]] = {}
    for method in methods:
        subset = [r for r in ok if str(r.get("method")) == method]
        fronts[method] = [str(t) for t in pareto.pareto_front(subset, objectives)["trial_id"]]
        with_sparsity = [r for r in subset if "sparsity" in r and y_name in r]
        sparsity_fronts[method] = [str(t) for t in pareto.pareto_front(
            with_sparsity, [(y_name, "max"), ("sparsity", "max")])["trial_id"]] if with_sparsity else []
    overall = [str(t) for t in pareto.pareto_front(ok, objectives)["trial_id"]] if ok else []
    keep = {m for m, _ in objectives} | {"val_acc", "test_acc", "sparsity", "flops_dense", "flops_effective",
                                         "flops_physical", "params_dense", "params_effective", "params_physical",
                                         "flops_deployed", "params_deployed", "artifact",
                                         "method", "trial_id", "run_id", "status", "error", "reverted_fraction",
                                         "val_fgsm_acc", "wall_s", "epochs"}
    trials = []
    for r in rows:
        # Only what the trial has: a conditional setting it did not use is absent, not a default.
        row = {k: _finite(v) for k, v in r.items() if (k in keep or k.startswith("param.")) and v is not None}
        row["display"] = _display({k: v for k, v in row.items() if k not in ("run_id", "trial_id", "error")})
        trials.append(row)
    return {
        "run_id": run_id, "name": run.info.run_name, "status": run.info.status, "objectives": objectives,
        "axes": {"x": x_name, "y": y_name, "x_label": axis_label(x_name) if x_name else "trial (order finished)",
                 "y_label": axis_label(y_name), "sparsity_label": axis_label("sparsity")},
        "trials": trials, "fronts": fronts, "sparsity_fronts": sparsity_fronts, "front": overall,
        "colours": method_colours(methods), "dense": _dense(run.data.metrics, x_name, y_name),
    }


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def _curves(client: MlflowClient, run_id: str, logged: Mapping[str, float]) -> dict[str, dict[str, list]]:
    curves = {}
    for name in CURVE_METRICS:
        if name not in logged:
            continue
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, name):
            # A trial logged again (a retried worker) repeats steps: keep the latest value.
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        steps = sorted(by_step)
        curves[name] = {"step": steps, "value": [_finite(by_step[s][1]) for s in steps]}
    return curves


def trial_detail(client: MlflowClient, run_id: str, parent_run_id: str, uri: str, cache: Path) -> dict[str, Any]:
    """One trial: its settings and metrics (raw and ``display``), per-layer sparsity, training
    curves (per-epoch metric history), pictures, other files and its export command (for a
    finished trial)."""
    run = client.get_run(check_run_id(run_id))
    check_run_id(parent_run_id)
    paths = _artifact_paths(client, run_id)
    layers: dict[str, float] = {}
    # The trial logs its per-layer sparsity under "layers/" (layer_sparsity.json).
    layer_file = next((p for p in paths if p.endswith("layer_sparsity.json")
                       or (p.startswith("layers/") and p.endswith(".json"))), None)
    if layer_file:
        layers = json.loads(artifact_file(client, run_id, layer_file, cache).read_text())
    trial_id = run.data.tags.get("prunesearch.trial_id", run.info.run_name)
    params = {k: _finite(_parse_param(v)) for k, v in run.data.params.items()}
    metrics = {k: _finite(v) for k, v in run.data.metrics.items()}
    finished = run.info.status == "FINISHED"
    return {
        "run_id": run_id,
        "trial_id": trial_id,
        "status": run.info.status,
        "params": params,
        "params_display": {k: format_metric("param." + k, v) for k, v in params.items()},
        "metrics": metrics,
        "metrics_display": _display(metrics),
        "info": {k.split("prunesearch.info.", 1)[1]: v for k, v in run.data.tags.items()
                 if k.startswith("prunesearch.info.")},
        "error": run.data.tags.get("prunesearch.error"),
        "layer_sparsity": layers,
        "curves": _curves(client, run_id, run.data.metrics),
        "images": [p for p in paths if PurePosixPath(p).suffix.lower() in RASTER_TYPES],
        "files": [{"path": p, "inline": inline_type(p) is not None} for p in paths
                  if PurePosixPath(p).suffix.lower() not in RASTER_TYPES],
        "export_command": export_command(parent_run_id, f"trial:{trial_id}", f"point-{trial_id}", uri)
        if finished else None,
    }
