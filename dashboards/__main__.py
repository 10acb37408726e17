"""``python -m dashboards [--tracking-uri URI] [--host H] [--port P]``: serve the Pareto explorer."""

from __future__ import annotations

import argparse
import sys

from dashboards.app import create_app, default_tracking_uri


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, check the store, and serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: sqlite:///mlflow.db in the working directory, "
                             "the file `python -m search` writes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8050)
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    from search.tracking import TrackingUnavailableError, check_tracking

    try:
        check_tracking(uri)
    except TrackingUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(uri)
    print(f"prunesearch dashboard on http://{args.host}:{args.port}  (store {uri}; Ctrl-C stops)", flush=True)
    app.run(host=args.host, port=args.port, debug=False, use_reloader=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
