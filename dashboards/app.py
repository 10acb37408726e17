"""The dashboard's Flask app: a JSON API over :mod:`dashboards.store` and one static page."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, request, send_file
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dashboards import store

__all__ = ["create_app", "default_tracking_uri"]

STATIC = Path(__file__).parent / "static"


def default_tracking_uri() -> str:
    """The embedded store the sweeps write by default: ``sqlite:///<cwd>/mlflow.db``."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in {path.parent}; reinstall plotly")
    return path


def create_app(tracking_uri: str | None = None) -> Flask:
    """A Flask app that serves the Pareto explorer for ``tracking_uri`` (default: the embedded store).

    Routes: ``/`` (the page), ``/api/sweeps``, ``/api/sweeps/<run_id>``,
    ``/api/trials/<run_id>?parent=<sweep run id>``, ``/api/artifact/<run_id>/<path>``.
    Everything is served locally (plotly.js comes from the installed plotly package), so the
    page works without internet access.
    """
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    cache = Path(tempfile.mkdtemp(prefix="prunesearch-dashboard-"))
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["TRACKING_URI"] = uri

    @app.errorhandler(MlflowException)
    def _mlflow_error(exc: MlflowException) -> Any:
        return jsonify({"error": str(exc.message)[:500]}), 404

    @app.get("/")
    def index() -> Any:
        return send_file(STATIC / "index.html")

    @app.get("/vendor/plotly.min.js")
    def plotly_js() -> Any:
        return send_file(_plotly_js(), mimetype="application/javascript", max_age=86400)

    @app.get("/api/sweeps")
    def sweeps() -> Any:
        return jsonify({"tracking_uri": uri, "sweeps": store.list_sweeps(client)})

    @app.get("/api/sweeps/<run_id>")
    def sweep(run_id: str) -> Any:
        return jsonify(store.sweep_detail(client, uri, run_id))

    @app.get("/api/trials/<run_id>")
    def trial(run_id: str) -> Any:
        parent = request.args.get("parent") or client.get_run(run_id).data.tags.get("mlflow.parentRunId", "")
        return jsonify(store.trial_detail(client, run_id, parent, uri, cache))

    @app.get("/api/artifact/<run_id>/<path:path>")
    def artifact(run_id: str, path: str) -> Any:
        if ".." in Path(path).parts:
            abort(400)
        return send_file(store.artifact_file(client, run_id, path, cache))

    return app
