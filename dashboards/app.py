"""The dashboard's Flask app: a JSON API over :mod:`dashboards.store` and one static page.

Hardened for a machine shared with others: run ids and artifact paths are checked before any
file access (:mod:`dashboards.store`), only raster images and plain text are shown inline (any
other artifact is an attachment with ``Content-Security-Policy: sandbox``), every response
carries ``X-Content-Type-Options: nosniff``, the Host header must name the address the
dashboard is bound to (DNS rebinding), and the artifact cache is removed at exit.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request, send_file
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from werkzeug.exceptions import HTTPException

from dashboards import store
from search.plots import DENSE_COLOUR, METHOD_PALETTE

__all__ = ["create_app", "default_tracking_uri", "allowed_host_names", "close_app", "LOOPBACK_NAMES"]

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
# The page loads only its own scripts, styles (plotly adds inline styles) and data.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def default_tracking_uri() -> str:
    """The embedded store the sweeps write by default: ``sqlite:///<cwd>/mlflow.db``."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in {path.parent}; reinstall plotly")
    return path


def _host_name(host: str) -> str:
    """The name part of a Host header (``[::1]:8050`` -> ``::1``), lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") <= 1 else host


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names the dashboard answers to; None means any (``extra`` holds ``*``).

    The bound address itself and ``extra``; a loopback address also answers to
    ``localhost``/``127.0.0.1``/``::1``; a wildcard address (``0.0.0.0``, ``::``) to those and
    this machine's host names. A name an attacker's DNS points at this machine is not among
    them, so a page on another site cannot read the dashboard through DNS rebinding.
    """
    extra = [str(e).strip().lower() for e in extra if str(e).strip()]
    if "*" in extra:
        return None
    bind = _host_name(bind_host) if bind_host not in _ANY_ADDRESS else bind_host
    names = {bind, *extra} - {""}
    if bind in LOOPBACK_NAMES or bind.startswith("127.") or bind in _ANY_ADDRESS:
        names |= LOOPBACK_NAMES
    if bind in _ANY_ADDRESS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        names -= _ANY_ADDRESS
    return frozenset(names)


def close_app(app: Flask) -> None:
    """Remove the app's artifact cache now (it is also removed when the process exits)."""
    app.extensions["prunesearch.close"]()


def create_app(tracking_uri: str | None = None, *, host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               refresh_s: float = 5.0, cache_parent: str | Path | None = None) -> Flask:
    """A Flask app that serves the Pareto explorer for ``tracking_uri`` (default: the embedded store).

    Args:
        host: the address the server binds; requests must name it (or a name allowed with it,
            see :func:`allowed_host_names`) in their Host header, else they get 400.
        allowed_hosts: further Host names to answer to; ``"*"`` answers to any.
        refresh_s: seconds between the page's refreshes of running sweeps (0: never).
        cache_parent: where the artifact cache folder is made (default: the system temp
            folder); the folder is removed at exit or by :func:`close_app`.

    Routes: ``/`` (the page), ``/api/sweeps``, ``/api/sweeps/<run_id>``,
    ``/api/trials/<run_id>?parent=<sweep run id>``, ``/api/artifact/<run_id>/<path>``.
    Everything is served locally (plotly.js comes from the installed plotly package), so the
    page works without internet access.
    """
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    cache = Path(tempfile.mkdtemp(prefix="prunesearch-dashboard-", dir=cache_parent))
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    # "a//b" reaches the artifact check (and is refused) instead of being redirected to "a/b".
    app.url_map.merge_slashes = False
    app.config["TRACKING_URI"] = uri
    app.config["ARTIFACT_CACHE"] = cache
    app.config["ALLOWED_HOSTS"] = allowed_host_names(host, allowed_hosts)
    app.extensions["prunesearch.close"] = weakref.finalize(app, shutil.rmtree, str(cache), ignore_errors=True)

    @app.before_request
    def _check_host() -> Any:
        allowed = app.config["ALLOWED_HOSTS"]
        name = _host_name(request.headers.get("Host", ""))
        if allowed is not None and name not in allowed:
            return (f"Host {name[:100]!r} is not an address this dashboard serves ({', '.join(sorted(allowed))}); "
                    f"start it with --allow-host {name[:100] or 'NAME'} to allow it\n", 400,
                    {"Content-Type": "text/plain; charset=utf-8"})
        return None

    @app.after_request
    def _headers(response: Any) -> Any:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        return response

    @app.errorhandler(store.NotFound)
    def _not_found(exc: store.NotFound) -> Any:
        return jsonify({"error": str(exc)[:500]}), 404

    @app.errorhandler(MlflowException)
    def _mlflow_error(exc: MlflowException) -> Any:
        return jsonify({"error": str(exc.message)[:500]}), 404

    @app.errorhandler(store.Unreadable)
    def _unreadable(exc: store.Unreadable) -> Any:
        return jsonify({"error": f"this sweep cannot be shown: {exc}"[:500]}), 422

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        # The API answers JSON whatever went wrong (the page reads every answer as JSON).
        if request.path.startswith("/api/"):
            return jsonify({"error": f"{exc.code} {exc.name}: {exc.description}"[:500]}), exc.code
        return exc

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        app.logger.exception("dashboard request %s failed", request.path)
        return jsonify({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]}), 500

    @app.get("/")
    def index() -> Any:
        return send_file(STATIC / "index.html")

    @app.get("/vendor/plotly.min.js")
    def plotly_js() -> Any:
        return send_file(_plotly_js(), mimetype="application/javascript", max_age=86400)

    @app.get("/api/sweeps")
    def sweeps() -> Any:
        return jsonify({"tracking_uri": uri, "refresh_s": refresh_s, "palette": list(METHOD_PALETTE),
                        "dense_colour": DENSE_COLOUR, "sweeps": store.list_sweeps(client)})

    @app.get("/api/sweeps/<run_id>")
    def sweep(run_id: str) -> Any:
        return jsonify(store.sweep_detail(client, uri, store.check_run_id(run_id)))

    @app.get("/api/trials/<run_id>")
    def trial(run_id: str) -> Any:
        store.check_run_id(run_id)
        parent = request.args.get("parent") or client.get_run(run_id).data.tags.get("mlflow.parentRunId", "")
        return jsonify(store.trial_detail(client, run_id, store.check_run_id(parent), uri, cache))

    @app.get("/api/artifact/<run_id>/<path:path>")
    def artifact(run_id: str, path: str) -> Any:
        local = store.artifact_file(client, run_id, path, cache)
        shown = store.inline_type(path)
        if shown is not None:
            response = send_file(local, mimetype=shown)
        else:
            response = send_file(local, mimetype="application/octet-stream", as_attachment=True,
                                 download_name=local.name)
        # Whatever a file holds, it never runs in the dashboard's origin.
        response.headers["Content-Security-Policy"] = "sandbox"
        return response

    return app
