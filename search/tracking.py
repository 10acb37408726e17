"""MLflow tracking for sweeps: one parent run per sweep, one child run per trial.

Children are linked to their parent with the tag ``mlflow.parentRunId`` (the MLflow UI nests
them) and carry ``prunesearch.trial_id`` so that logging a trial again (a retried worker, a
resumed sweep) reuses its run instead of creating a duplicate. Everything goes through an
explicit ``mlflow.MlflowClient(tracking_uri=...)``: no global active run, so the driver and
several Ray workers can log at the same time.

Works with MLflow 3's default store, ``sqlite:///<abs path>/mlflow.db``, with a tracking
server (``http://host:port``) and with the deprecated ``file:`` store.

Over 500 lines: it holds three jobs over one MLflow client and its retry/locking helpers (the
store checks, the sweep's parent run with its front, the trial runs and finding them again); the
split by job (``tracking_store`` / ``tracking_sweep`` / ``tracking_trials``) waits until issue 27's
front logging, which edits this module in parallel, is merged, so the two do not collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import posixpath
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from search import pareto
from search.paths import local_path

if TYPE_CHECKING:
    from search.settings import TrackingSettings

log = logging.getLogger(__name__)


class _PickleCaution(logging.Filter):
    """Drops mlflow.pytorch's caution about pickled models, printed for every logged model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Saving pytorch model by Pickle")


def quiet_mlflow_logging() -> None:
    """MLflow's own INFO lines (database creation and migration, system metrics started and
    stopped) are not a sweep user's business: show its warnings and errors only, unless
    ``MLFLOW_LOGGING_LEVEL`` says otherwise."""
    if os.environ.get("MLFLOW_LOGGING_LEVEL"):
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    pytorch_log = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _PickleCaution) for f in pytorch_log.filters):
        pytorch_log.addFilter(_PickleCaution())


quiet_mlflow_logging()

# MLflow 3 limits (mlflow.utils.validation): param values 6000 chars, keys 250 chars,
# tag values 8000 chars, 100 params/tags and 1000 metrics per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
MAX_ERROR_CHARS = 5000
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000

TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "prunesearch.trial_id"
TAG_ROLE = "prunesearch.role"
TAG_ERROR = "prunesearch.error"
# Non-numeric trial results (method name, ...) are stored as tags under this prefix: tags
# can be overwritten when a trial is logged again, params cannot.
TAG_INFO = "prunesearch.info."
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# A trial's earlier attempt (killed with its driver, failed before a retry) points at the run
# that replaced it.
TAG_SUPERSEDED_BY = "prunesearch.superseded_by"
CONVENTIONS = (
    "FLOPs: per sample, forward pass, 1 multiply-add = 2 FLOPs (dense / effective = zeros "
    "skipped / physical = after surgery); flops_deployed / params_deployed: measured on the artifact a "
    "trial exports (physical for a surgered model, effective for masks only), the default FLOPs objective; "
    "every metric of a structured trial is measured on its surgered model; sparsity: fraction of zeroed "
    "Conv+Linear weights; "
    "accuracies: fractions in [0, 1]; selection on the validation split, test split for reporting"
)
SERVER_HINT = "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db"

T = TypeVar("T")


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def now_ms() -> int:
    """Now, in milliseconds since the epoch (MLflow's timestamps)."""
    return int(time.time() * 1000)


def _check_writable_dir(directory: Path, uri: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking URI {uri!r}: cannot create directory {directory}: {exc}"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TrackingUnavailableError(f"MLflow tracking URI {uri!r}: directory {directory} is not writable")


def check_sqlite_file(path: Path, uri: str, must_exist: bool = False, mlflow_store: bool = True) -> None:
    """An SQLite store's file: its directory writable and, if it exists, a readable database
    (``mlflow_store``: one whose tables, if any, are MLflow's).

    Raises:
        TrackingUnavailableError: naming the URI and what is wrong.
    """
    import sqlite3

    path = path.expanduser().absolute()
    if must_exist and not path.is_file():
        raise TrackingUnavailableError(f"{uri!r}: no database at {path}")
    _check_writable_dir(path.parent, uri)
    if not path.exists():
        return
    if not os.access(path, os.W_OK):
        raise TrackingUnavailableError(f"{uri!r}: database {path} is not writable")
    try:
        # Read-write, never create: a driver killed inside a write leaves a hot journal, which
        # SQLite rolls back only on a connection that may write (read-only fails on it).
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise TrackingUnavailableError(f"{uri!r}: {path} is not a readable SQLite database ({exc})") from exc
    if mlflow_store and tables and "experiments" not in tables:
        raise TrackingUnavailableError(f"{uri!r}: {path} is an SQLite database but not an MLflow store "
                                       f"(its tables: {sorted(tables)[:6]})")


#: URI schemes MLflow can track to (the database ones need their driver installed).
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_tracking(uri: str, timeout_s: float = 5, must_exist: bool = False) -> None:
    """Fail fast, with a one-line message, when the tracking store is not usable.

    - ``http(s)://``: ``<uri>/health`` and one MLflow API call, each with a ``timeout_s``-second
      timeout (seconds), so an unreachable or foreign server fails in seconds.
    - ``sqlite:///path``: the database's directory is created if missing and must be writable;
      an existing file must be a readable SQLite database holding an MLflow store.
    - ``file:`` URIs or plain paths (MLflow's deprecated file store): the directory is created if
      missing and must be writable.
    - ``postgresql://``, ``mysql://``, ``mssql://``: one connection is opened (``timeout_s``).
    - Any other scheme is refused.

    Args:
        must_exist: the store must already exist (reading a sweep back: never create an empty one).

    Raises:
        TrackingUnavailableError: naming the URI and how to start a server or switch stores.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ("file" if uri.startswith("file:") else "")
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only)
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start one with `{SERVER_HINT}` "
                f"(it needs ~15 s before it answers {url}), or use the embedded store: tracking=mlflow_sqlite"
            ) from exc
        if status != 200:
            raise TrackingUnavailableError(f"MLflow tracking server {uri}: {url} answered HTTP {status}, expected 200")
        api = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(api, timeout=timeout_s) as resp:  # noqa: S310
                ok = resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            ok = False
        if not ok:
            raise TrackingUnavailableError(f"{uri} answers /health but not MLflow's REST API ({api}); is it an "
                                           "MLflow tracking server?")
        return
    if scheme == "sqlite":
        path = local_path(uri)
        if path is None or str(path) in ("", ":memory:"):
            return
        check_sqlite_file(path, uri, must_exist=must_exist)
        return
    if scheme in ("file", ""):
        path = local_path(uri)
        if path is None:
            raise TrackingUnavailableError(f"{uri!r} is not a tracking URI MLflow understands; use sqlite:///PATH "
                                           "or http://HOST:PORT")
        if must_exist and not path.expanduser().is_dir():
            raise TrackingUnavailableError(f"{uri!r}: no MLflow file store at {path}")
        _check_writable_dir(path.expanduser().absolute(), uri)
        return
    if scheme in ("postgresql", "mysql", "mssql"):
        try:
            import sqlalchemy

            args = {"connect_timeout": int(timeout_s)} if scheme in ("postgresql", "mysql") else {}
            engine = sqlalchemy.create_engine(uri, connect_args=args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrackingUnavailableError(f"{uri}: cannot open the database ({type(exc).__name__}: {line})") from exc
        return
    if scheme == "databricks":
        return
    raise TrackingUnavailableError(f"{uri!r}: scheme {scheme!r} is not supported; use one of "
                                   f"{list(SUPPORTED_SCHEMES)}")


def _creation_lock(uri: str) -> Any:
    """A lock serialising the creation of a file-backed store (no-op for servers)."""
    import contextlib

    path = local_path(uri) if uri.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:"):
        return contextlib.nullcontext()
    from search.storage import store_creation_lock

    return store_creation_lock(path.expanduser().absolute())


def _retry(fn: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Call ``fn``, retrying when SQLite reports a lock (several workers writing at once)."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MlflowException or sqlalchemy OperationalError
            if i == attempts - 1 or "locked" not in str(exc).lower():
                raise
            log.debug("MLflow store locked during %s; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def safe_key(key: str) -> str:
    """A key MLflow accepts for params, metrics and tags.

    MLflow allows only alphanumerics, ``_ - . space /`` (and ``:`` except on Windows, so it
    is replaced too), no path tricks (``//``, leading ``/``, ``..``) and 250 characters.
    Other characters become ``_``; long keys keep their start plus a hash of the full key,
    so they stay unique.
    """
    safe = re.sub(r"[^\w.\- /]", "_", key) or "_"
    norm = posixpath.normpath(safe)
    if norm != safe or norm == "." or norm.startswith(("..", "/")):
        safe = safe.replace("/", "_")
        if safe.strip(".") == "" or safe.startswith(".."):
            safe = safe.replace(".", "_")
    if len(safe) <= MAX_KEY and safe == key:
        return key
    if len(safe) <= MAX_KEY:
        return safe
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return safe[: MAX_KEY - 11] + "-" + digest


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[truncated {len(text) - limit} chars]"
    return text[: limit - len(marker) - 16] + marker


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``.

    Lists and other values are kept as they are (they are stringified when logged).
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    return _truncate(str(value), MAX_PARAM_VALUE)


def _is_number(value: Any) -> bool:
    # numbers.Real covers int, float, bool and numpy's int/float scalars; np.bool_ is separate.
    return isinstance(value, (numbers.Real, np.bool_))


def log_batch(client: MlflowClient, run_id: str, metrics: Sequence[Metric] = (),
               params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
    """log_batch in as few requests as MLflow's per-request limits allow (each request is one
    store transaction: a trial's results usually fit in one)."""
    params, tags, metrics = list(params), list(tags), list(metrics)
    while params or tags or metrics:
        p, params = params[:_BATCH_PARAMS], params[_BATCH_PARAMS:]
        t, tags = tags[:_BATCH_PARAMS], tags[_BATCH_PARAMS:]
        m, metrics = metrics[:_BATCH_METRICS - len(p) - len(t)], metrics[_BATCH_METRICS - len(p) - len(t):]
        _retry(lambda: client.log_batch(run_id, metrics=m, params=p, tags=t), "log results")


def _new_params(client: MlflowClient, run_id: str | None, params: Mapping[str, Any]) -> list[Param]:
    """Params not yet on the run. MLflow params are immutable: re-logging a key with a
    different value fails, so on a reused run changed values are skipped with a warning."""
    existing = client.get_run(run_id).data.params if run_id else {}
    out = []
    for key, value in flatten(params).items():
        k, v = safe_key(str(key)), _param_value(value)
        if k in existing:
            if existing[k] != v:
                log.warning("run %s: param %r already logged as %r; keeping it (new value %r)",
                            run_id, k, existing[k], v)
            continue
        out.append(Param(k, v))
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts next to a sqlite database (``<db dir>/mlartifacts``) rather than MLflow's
    default ``./mlruns`` in whatever the current directory happens to be."""
    if uri.startswith("sqlite:///"):
        path = local_path(uri)
        if path is not None and str(path) not in ("", ":memory:"):
            return (path.expanduser().absolute().parent / "mlartifacts").as_uri()
    return None


def _as_artifact_uri(location: str) -> str:
    if "://" in location or location.startswith("file:"):
        return location
    return Path(location).expanduser().absolute().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Experiment id for ``name``, creating it (or restoring a deleted one) if needed.

    ``artifact_location`` only applies when the experiment is created: MLflow fixes it then.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            # The experiment trains models. (MLflow 3.17's UI reads its view from its own sidebar
            # switch instead, see UI_TRAINING_VIEW; the tag still tells other clients.)
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException:
            # Another process created it between our lookup and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.info("experiment %r keeps its artifact location %s (asked for %s)",
                 name, exp.artifact_location, artifact_location)
    return exp.experiment_id


class SweepTracker:
    """The parent run of a sweep, driven from the process that runs the tuner.

    Args:
        uri: MLflow tracking URI, e.g. ``sqlite:////abs/out/mlflow.db`` or ``http://127.0.0.1:5000``.
        experiment: experiment name (created if missing).
        artifact_location: where the experiment's artifacts go when it is created (a path or
            URI; put it under the sweep's output dir). Default for sqlite stores:
            ``<db dir>/mlartifacts``; otherwise the store's default.
    """

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri = uri
        location = _as_artifact_uri(artifact_location) if artifact_location else _default_artifact_location(uri)
        with _creation_lock(uri):  # two sweeps starting on one fresh store would race in its migration
            self.client = MlflowClient(tracking_uri=uri)  # opening the store migrates its schema
            self.experiment_id: str = _retry(
                lambda: get_or_create_experiment(self.client, experiment, location), "create experiment"
            )
        self.run_id: str | None = None
        self._reference: list[float] | None = None

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("SweepTracker: call start_parent() first")
        return self.run_id

    def sweep_name_taken(self, name: str) -> bool:
        """Whether a sweep's parent run in this experiment is already called ``name``."""
        filt = f"tags.`{TAG_ROLE}` = 'sweep' and attributes.run_name = {_quote(name)}"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=filt, max_results=1,
                                                      run_view_type=ViewType.ALL), "search runs")
        return bool(runs)

    def start_parent(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any],
                     resume_run_id: str | None = None) -> str:
        """Create the sweep's parent run, or re-open ``resume_run_id``; returns the run id.

        ``params`` (the resolved config) is flattened with dotted keys and logged as MLflow
        params (keys > 250 chars are shortened with a hash, values > 6000 chars truncated).
        On resume, params already logged are kept (MLflow params are immutable). ``tags`` are
        set as given, plus ``prunesearch.role=sweep``, the conventions string, and the git
        commit (``mlflow.source.git.commit``) when this source tree is a git checkout.
        """
        all_tags: dict[str, Any] = {TAG_ROLE: "sweep", "prunesearch.conventions": CONVENTIONS}
        commit = _git_commit()
        if commit:
            all_tags[TAG_GIT_COMMIT] = commit  # the one tag MLflow's UI shows (no second copy)
        all_tags.update(tags)
        tag_list = [RunTag(safe_key(str(k)), _truncate(str(v), MAX_TAG_VALUE)) for k, v in all_tags.items()]
        if resume_run_id:
            run = _retry(lambda: self.client.get_run(resume_run_id), "get run")
            if run.info.experiment_id != self.experiment_id:
                raise ValueError(
                    f"run {resume_run_id} belongs to experiment {run.info.experiment_id}, "
                    f"not {self.experiment_id}"
                )
            self.run_id = resume_run_id
            _retry(lambda: self.client.update_run(resume_run_id, status="RUNNING"), "reopen run")
        else:
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=run_name), "create run")
            self.run_id = run.info.run_id
        log_batch(self.client, self.run_id, params=_new_params(
            self.client, self.run_id if resume_run_id else None, params), tags=tag_list)
        return self.run_id

    def log_front(self, rows: list[dict], objectives: pareto.Objectives | None, step: int,
                  reference: Sequence[float] | None = None, final: bool = False,
                  summary: pareto.FrontSummary | None = None, plot_interval_s: float = 0.0) -> dict:
        """Log the Pareto front of ``rows`` on the parent run.

        Logs the metrics ``hypervolume`` (raw: the objectives' units multiplied),
        ``hypervolume_normalised`` (the fraction of the reference box the front dominates, in
        [0, 1]) and ``front_size`` at ``step`` (pass the number of ended trials; a step already
        logged is not logged twice). The box's corners go in the tags ``prunesearch.hv_reference``
        (the reference point: ``reference`` if given, else search.pareto.default_reference, the
        dense model's FLOPs for FLOPs objectives, so it stays fixed during a sweep) and
        ``prunesearch.hv_box`` (JSON ``{"worst": [...], "best": [...]}``).

        The artifacts ``front/front.csv``, ``trials.csv`` and the figures of
        search.plots.write_sweep_plots (``front.png``, ``front.html``, ``accuracy_vs_sparsity.png``,
        ``layer_sparsity.html/png``; the dense model from the parent's ``dense_*`` metrics),
        overwriting the previous ones, are written only when the front differs from the one
        last written (other trial ids, or other objective values), and with ``final=True`` when
        any row changed since: the plotly pages are megabytes, so a sweep of hundreds of trials
        does not upload them after every trial. With ``plot_interval_s`` (``tracking.front_plots_s``)
        a changed front is drawn at most that often (seconds since the last drawing); the final
        call draws whatever changed since: drawing takes a CPU for a few tenths of a second,
        which on a small machine the trials would otherwise wait for.

        ``summary`` is :func:`search.pareto.front_summary` of the same rows, when the caller
        has it already.

        Returns:
            ``{"hypervolume": float, "hypervolume_normalised": float, "front_size": int,
            "reference": list[float], "box": dict, "plotted": bool}``.
        """
        run_id = self._require_run()
        objs = pareto.normalise_objectives(objectives)
        df = pd.DataFrame(list(rows))
        if summary is None:
            summary = pareto.front_summary(df, objs, reference)
        front = summary.front
        names = [n for n, _ in objs]
        front_key = tuple(sorted((str(r.get("trial_id", i)), *(float(r[n]) for n in names))
                                 for i, r in front.iterrows()))
        rows_key = (len(df), tuple(sorted(map(str, df["trial_id"]))) if "trial_id" in df else ())
        # What this tracker last wrote: the front (trial ids, objective values), the rows, the step.
        last = getattr(self, "_front_state", None)
        if last is None:
            last = self._front_state = {"front": None, "rows": None, "step": None, "plotted_at": None}
        due = last["plotted_at"] is None or time.monotonic() - last["plotted_at"] >= plot_interval_s
        plotted = (final and (front_key != last["front"] or rows_key != last["rows"])) or (
            due and front_key != last["front"])
        if plotted:
            title = f"Pareto front: {', '.join(f'{n} ({d})' for n, d in objs)}"
            with tempfile.TemporaryDirectory(prefix="prunesearch_front_") as tmp:
                out = Path(tmp)
                front.to_csv(out / "front.csv", index=False)
                df.to_csv(out / "trials.csv", index=False)
                from search import plots  # matplotlib and plotly: only when plots are drawn

                dense = plots.DenseReference.from_metrics(
                    _retry(lambda: self.client.get_run(run_id), "get run").data.metrics)
                plots.write_sweep_plots(df, front, objs, out, title, dense=dense)
                _retry(lambda: self.client.log_artifacts(run_id, str(out), artifact_path="front"), "log artifacts")
            last["front"], last["rows"], last["plotted_at"] = front_key, rows_key, time.monotonic()
        ref = list(summary.box.worst)
        if int(step) != last["step"]:
            ts = now_ms()
            log_batch(self.client, run_id, metrics=[
                Metric("hypervolume", float(summary.hypervolume), ts, int(step)),
                Metric("hypervolume_normalised", float(summary.hypervolume_normalised), ts, int(step)),
                Metric("front_size", float(len(front)), ts, int(step)),
            ], tags=[RunTag("prunesearch.hv_reference", str(ref)),
                     RunTag("prunesearch.hv_box", json.dumps(summary.box.as_dict()))])
            last["step"] = int(step)
        return {"hypervolume": float(summary.hypervolume),
                "hypervolume_normalised": float(summary.hypervolume_normalised),
                "front_size": int(len(front)), "reference": ref, "box": summary.box.as_dict(), "plotted": plotted}

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the parent run with ``status`` (FINISHED, FAILED or KILLED); ``reason`` (why it
        failed or stopped) goes into the tag ``prunesearch.error``. A run that ends FINISHED
        loses the reason an earlier, interrupted attempt left (a resumed sweep is not failed)."""
        run_id = self._require_run()
        if reason:
            _retry(lambda: self.client.set_tag(run_id, TAG_ERROR, _truncate(str(reason), MAX_ERROR_CHARS)),
                   "set reason")
        elif status == "FINISHED" and TAG_ERROR in _retry(lambda: self.client.get_run(run_id), "get run").data.tags:
            _retry(lambda: self.client.delete_tag(run_id, TAG_ERROR), "clear reason")
        _retry(lambda: self.client.set_terminated(run_id, status=status), "terminate run")


def _quote(value: str) -> str:
    # MLflow's filter grammar: single-quoted strings, backslash-escaped quotes.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, extra_filter: str = "") -> list:
    filt = f"tags.`{TAG_PARENT}` = {_quote(parent_run_id)}"
    if extra_filter:
        filt += " and " + extra_filter
    runs, token = [], None
    while True:
        page = _retry(lambda: client.search_runs([experiment_id], filter_string=filt, max_results=1000,
                                                 order_by=["attributes.start_time ASC"], page_token=token),
                      "search runs")
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_trial_run(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    artifacts: Mapping[str, str] | None = None,
    status: str = "FINISHED",
    error: str | None = None,
    step: int = 0,
    run_id: str | None = None,
) -> str:
    """Log one finished (or failed) trial as a child run of ``parent_run_id``; returns its id.

    Safe to call from a Ray worker. Idempotent per ``trial_id``: an existing child of the
    parent with the tag ``prunesearch.trial_id == trial_id`` (the run :func:`start_trial_run`
    made when the trial started) is reused (new params are added, metrics are logged again at
    ``step``, status and tags updated). Two processes logging the *same* trial at the same
    instant may still race; distinct trials never do.

    Args:
        params: the trial's sampled params (nested dicts flattened with dots).
        metrics: the trial's results. Real numbers (incl. bools, numpy scalars, NaN) become
            metrics; anything else (method name, ...) becomes the tag ``prunesearch.info.<key>``.
        artifacts: artifact sub-directory -> local file (or directory) path.
        status: MLflow run status, FINISHED or FAILED (or KILLED).
        error: for a failed trial, the error text, stored (first 5000 chars) in ``prunesearch.error``.
        step: the step of the metrics: the trial's last epoch when its per-epoch history was
            logged (the final values are that epoch's entry), else 0.
        run_id: the trial's run when the caller holds it (made by :func:`start_trial_run`, still
            RUNNING): no search for it.
    """
    artifacts = dict(artifacts or {})
    missing = {sub: p for sub, p in artifacts.items() if not Path(p).exists()}
    if missing:
        # Checked before anything is written so a bad call leaves no half-logged run.
        raise FileNotFoundError(f"trial {trial_id}: artifact files not found: {missing}")
    client = MlflowClient(tracking_uri=uri)
    created = False
    if run_id is None:
        existing = _child_runs(client, experiment_id, parent_run_id,
                               f"tags.`{TAG_TRIAL}` = {_quote(str(trial_id))}")
        if existing:
            run_id = existing[0].info.run_id
            if len(existing) > 1:
                log.warning("trial %s has %d child runs under %s; using %s", trial_id, len(existing),
                            parent_run_id, run_id)
            _retry(lambda: client.update_run(run_id, status="RUNNING"), "reopen run")
        else:
            run = _retry(lambda: client.create_run(experiment_id, run_name=str(trial_id), tags={
                TAG_PARENT: parent_run_id, TAG_TRIAL: str(trial_id), TAG_ROLE: "trial"}), "create run")
            run_id, created = run.info.run_id, True

    ts = now_ms()
    metric_list: list[Metric] = []
    tag_list: list[RunTag] = []
    for key, value in flatten(metrics).items():
        k = safe_key(str(key))
        if _is_number(value):
            metric_list.append(Metric(k, float(value), ts, int(step)))
        elif value is not None:
            tag_list.append(RunTag(safe_key(TAG_INFO + str(key)), _truncate(str(value), MAX_TAG_VALUE)))
    if error is not None:
        tag_list.append(RunTag(TAG_ERROR, _truncate(str(error), MAX_ERROR_CHARS)))
    log_batch(client, run_id, metrics=metric_list,
               params=_new_params(client, None if created else run_id, params), tags=tag_list)
    for sub, local in artifacts.items():
        p = Path(local)
        if p.is_dir():
            _retry(lambda: client.log_artifacts(run_id, str(p), artifact_path=sub or None), "log artifacts")
        else:
            _retry(lambda: client.log_artifact(run_id, str(p), artifact_path=sub or None), "log artifact")
    _retry(lambda: client.set_terminated(run_id, status=status), "terminate run")
    return run_id


def start_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                    params: Mapping[str, Any]) -> str:
    """Create a trial's child run as the trial starts (RUNNING, start time now); returns its id.

    MLflow then shows the trial while it runs and its real duration once
    :func:`log_trial_run` ends it. An earlier attempt's run of the same trial (RUNNING when its
    driver or worker died, FAILED before a retry, KILLED) is ended KILLED if it was still
    RUNNING, tagged ``prunesearch.superseded_by`` with the new run and moved to MLflow's
    deleted runs (restorable in the UI), so the trial keeps one run whose history is this
    attempt's. A FINISHED run of the trial is reused as it is.
    """
    client = MlflowClient(tracking_uri=uri)
    earlier = _child_runs(client, experiment_id, parent_run_id, f"tags.`{TAG_TRIAL}` = {_quote(str(trial_id))}")
    finished = [r for r in earlier if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    run = _retry(lambda: client.create_run(experiment_id, run_name=str(trial_id), tags={
        TAG_PARENT: parent_run_id, TAG_TRIAL: str(trial_id), TAG_ROLE: "trial"}), "create run")
    run_id = run.info.run_id
    for old in earlier:
        old_id = old.info.run_id
        if old.info.status == "RUNNING":
            _retry(lambda: client.set_terminated(old_id, status="KILLED"), "end an earlier attempt")
        _retry(lambda: client.set_tag(old_id, TAG_SUPERSEDED_BY, run_id), "tag an earlier attempt")
        _retry(lambda: client.delete_run(old_id), "retire an earlier attempt")
    log_batch(client, run_id, params=_new_params(client, None, params))
    return run_id


def end_unfinished_trial_runs(uri: str, parent_run_id: str, reason: str,
                              known: Collection[str] | None = None) -> list[str]:
    """End KILLED the sweep's child runs still RUNNING (call once no trial runs any more: a
    trial the scheduler stopped early, or whose worker or driver died, never ended its run);
    ``reason`` goes into ``prunesearch.error``. Returns the trial ids it ended.

    With ``known`` (a resumed sweep: the trials its Tuner ran or restored), a RUNNING run of any
    other trial is an attempt a killed driver left behind that Tune's checkpoint never held, so
    the resumed sweep sampled another trial in its place: it is retired to MLflow's deleted runs
    (restorable), as a retried trial's earlier attempt is, instead of staying as a trial.
    """
    client = MlflowClient(tracking_uri=uri)
    parent = _retry(lambda: client.get_run(parent_run_id), "get run")
    ended = []
    for run in _child_runs(client, parent.info.experiment_id, parent_run_id, "attributes.status = 'RUNNING'"):
        run_id = run.info.run_id
        trial_id = run.data.tags.get(TAG_TRIAL, run.info.run_name)
        _retry(lambda: client.set_tag(run_id, TAG_ERROR, _truncate(reason, MAX_ERROR_CHARS)), "set reason")
        _retry(lambda: client.set_terminated(run_id, status="KILLED"), "terminate run")
        if known is not None and trial_id not in known:
            _retry(lambda: client.delete_run(run_id), "retire an attempt the resumed sweep replaced")
            continue
        ended.append(trial_id)
    return ended


#: The MLflow UI's query parameter for its "Model training" view. MLflow 3.17's UI picks an
#: experiment's pages (runs table, or GenAI overview and traces) from its sidebar switch, which
#: the browser remembers and which starts on GenAI; it ignores the experiment's
#: ``mlflow.experimentKind`` tag. A link with this parameter opens the runs table.
UI_TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None,
           ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of an experiment's runs (or of one run), in the training view.

    ``ui`` is where ``mlflow ui`` serves (its default); a tracking server's own URI is used
    as it is.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui.rstrip("/")
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base}/{page}?{UI_TRAINING_VIEW}"


def _parse_param(text: str) -> Any:
    """MLflow stores params as strings; recover ints, floats, bools, None and lists of numbers
    (a vector setting, ``size:`` in a space, is logged as ``str(list)``)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            items = json.loads(text)
        except ValueError:
            return text
        numbers_only = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
        return items if numbers_only else text
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) or text.lower() in ("nan", "inf", "-inf") else text


_STATUS = {"FINISHED": "ok", "FAILED": "failed", "RUNNING": "running", "KILLED": "killed", "SCHEDULED": "scheduled"}


#: The copy of a sweep's ``sweep.json`` in its MLflow parent run (search.tuner writes it with
#: every state change; a resume whose local file is gone reads it back).
SWEEP_STATE_ARTIFACT = "sweep_state.json"


def saved_sweep_state(tracking: TrackingSettings,
                      output_dir: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """``(parent run id, state)``: the newest copy of the ``sweep.json`` of the sweep whose output
    directory is ``output_dir``, from the store the ``tracking`` settings name; None when
    tracking is off, the store does not exist (a missing SQLite file is not created), or it
    holds no such copy (a sweep from before the copies, an unreachable server)."""
    from search.settings import tracking_uri

    uri = tracking_uri(tracking)
    if uri is None or (uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file()):
        return None
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL,
                                  filter_string=f"tags.`prunesearch.output_dir` = '{Path(output_dir)}' and "
                                                f"tags.`{TAG_ROLE}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        with tempfile.TemporaryDirectory(prefix="prunesearch-state-") as tmp:
            text = Path(client.download_artifacts(runs[0].info.run_id, SWEEP_STATE_ARTIFACT, tmp)).read_text()
        state = json.loads(text)
    except Exception as exc:  # no copy (a sweep from before), or the store is unreachable
        log.info("no copy of the sweep state of %s in %s (%s)", output_dir, uri, exc)
        return None
    if not isinstance(state, dict) or not {"name", "sweep_root", "finished"} <= set(state):
        return None
    return runs[0].info.run_id, state


def find_trial_runs(uri: str, parent_run_id: str) -> list[dict]:
    """The child (trial) runs of a sweep's parent run, oldest first, as flat dicts.

    Each dict holds: the metrics (latest values, under their own names), the non-numeric
    results (from ``prunesearch.info.*`` tags, under their own names), the params under
    ``param.<name>`` (parsed back to int/float/bool/None where they look like one; the
    prefix avoids clashes such as a target ``sparsity`` param vs the measured metric),
    ``trial_id``, ``run_id``, ``mlflow_status`` (FINISHED/FAILED/...), ``status`` ("ok" for
    FINISHED, else the lower-cased MLflow status, as search.pareto expects) and ``error``
    (None unless the trial failed with an error text).
    """
    client = MlflowClient(tracking_uri=uri)
    parent = _retry(lambda: client.get_run(parent_run_id), "get run")
    out = []
    for run in _child_runs(client, parent.info.experiment_id, parent_run_id):
        row: dict[str, Any] = {}
        for key, value in run.data.tags.items():
            if key.startswith(TAG_INFO):
                row[key[len(TAG_INFO):]] = value
        row.update(run.data.metrics)
        row.update({f"param.{k}": _parse_param(v) for k, v in run.data.params.items()})
        row["trial_id"] = run.data.tags.get(TAG_TRIAL, run.info.run_name)
        row["run_id"] = run.info.run_id
        row["mlflow_status"] = run.info.status
        row["status"] = _STATUS.get(run.info.status, str(run.info.status).lower())
        row["error"] = run.data.tags.get(TAG_ERROR)
        out.append(row)
    return out
