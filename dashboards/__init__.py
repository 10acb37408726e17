"""A Pareto explorer over the MLflow store: ``python -m dashboards [--tracking-uri URI]``.

Pick sweeps, overlay their Pareto fronts by method (accuracy against FLOPs per sample, log
axis on demand), click a point for its settings, per-layer sparsity, pictures (KEN_viz,
RL-Pruner distributions) and the command that exports its masks. Reads the embedded SQLite
store (``sqlite:///mlflow.db`` in the working directory) by default, or a server by URI.
"""

from dashboards.app import create_app

__all__ = ["create_app"]
