"""``python -m dashboards [--tracking-uri URI] [--host H] [--port P] [--allow-host NAME] [--refresh-s S]``:
serve the Pareto explorer."""

from __future__ import annotations

import argparse
import signal
import sys

from dashboards.app import close_app, create_app, default_tracking_uri


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the server loop, so the finally below and atexit remove the cache.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, check the store, and serve until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: sqlite:///mlflow.db in the working directory, "
                             "the file `python -m search` writes)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; the dashboard has no login)")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header names NAME (repeatable; '*' for any). "
                             "By default only the bound address (and localhost for a loopback one) is answered")
    parser.add_argument("--refresh-s", type=float, default=5.0,
                        help="seconds between refreshes of running sweeps in the page (0: off; default 5)")
    args = parser.parse_args(argv)
    if args.refresh_s < 0:
        parser.error("--refresh-s must be >= 0")
    uri = args.tracking_uri or default_tracking_uri()
    from search.tracking import TrackingUnavailableError, check_tracking

    try:
        # The dashboard reads sweeps: a mistyped path is refused, never created as an empty store.
        check_tracking(uri, must_exist=True)
    except TrackingUnavailableError as exc:
        print(f"error: --tracking-uri: {exc}; give the store your sweeps wrote (python -m search prints it)",
              file=sys.stderr)
        return 2
    app = create_app(uri, host=args.host, allowed_hosts=args.allow_host, refresh_s=args.refresh_s)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"prunesearch dashboard on http://{args.host}:{args.port}  (store {uri}; Ctrl-C stops)", flush=True)
    try:
        app.run(host=args.host, port=args.port, debug=False, use_reloader=False)
    except KeyboardInterrupt:
        pass
    finally:
        close_app(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
