"""A Pareto explorer over the MLflow store: ``python -m dashboards [--tracking-uri URI]``.

Pick sweeps, overlay their Pareto fronts by method (accuracy against FLOPs per sample, log
axis on demand; accuracy against sparsity), with the dense model as a reference star; click a
point for its settings, metrics (written as the console writes them), training curves,
per-layer sparsity beside any other trial's, pictures (KEN_viz, RL-Pruner distributions) and
the command that exports it (weights, spec, masks). Running sweeps refresh by themselves. Reads the embedded
SQLite store (``sqlite:///mlflow.db`` in the working directory) by default, or a server by URI.
Binds 127.0.0.1 and answers only requests addressed to it (``--allow-host`` for more).
"""

from dashboards.app import create_app

__all__ = ["create_app"]
