"""Pareto-front figures: a static PNG (matplotlib, Agg) and a self-contained HTML (plotly).

No MLflow here; search.tracking logs what these functions write. Both plots put the cost
objective (FLOPs per sample, forward, 1 multiply-add = 2 FLOPs) on x and the accuracy-like
objective (a fraction) on y, and cope with 0 or 1 finished trials.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines and Ray workers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from search.pareto import Objectives, normalise_objectives, finished_rows  # noqa: E402

_LABELS = {
    "val_acc": "validation accuracy",
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "sparsity": "sparsity (fraction of weights zeroed)",
    "wall_s": "wall time (s)",
    "gpu_s": "GPU time (s)",
    "latency_ms": "latency (ms)",
    "epochs": "epochs trained",
    "extra_forward_passes": "extra forward passes",
}


def axis_label(metric: str) -> str:
    """Human-readable axis label with units for a metric name (e.g. "flops_effective" ->
    "FLOPs per sample (effective)"); unknown names are returned unchanged."""
    if metric in _LABELS:
        return _LABELS[metric]
    for prefix, what in (("flops_", "FLOPs per sample"), ("params_", "parameters")):
        if metric.startswith(prefix):
            return f"{what} ({metric[len(prefix):]})"
    return metric


def _plot_axes(objectives: Objectives | None) -> tuple[tuple[str, str] | None, tuple[str, str]]:
    """(x objective or None, y objective): cost on x, accuracy on y.

    With one objective there is no x objective; points are then plotted against their order.
    """
    objs = normalise_objectives(objectives)
    if len(objs) == 1:
        return None, objs[0]
    maxes = [o for o in objs if o[1] == "max"]
    mins = [o for o in objs if o[1] == "min"]
    y = maxes[0] if maxes else objs[0]
    flops_mins = [o for o in mins if "flops" in o[0].lower()]
    x_candidates = flops_mins + [o for o in mins if o not in flops_mins] + [o for o in objs if o != y]
    return x_candidates[0], y


def _plot_data(rows_df: pd.DataFrame | Sequence, front_df: pd.DataFrame | None, objectives: Objectives | None):
    objs = normalise_objectives(objectives)
    rows = rows_df if isinstance(rows_df, pd.DataFrame) else pd.DataFrame(list(rows_df))
    done = finished_rows(rows, objs)
    front = front_df if front_df is not None else done.iloc[0:0]
    x_obj, y_obj = _plot_axes(objs)
    if x_obj is None:
        # One objective: x is the trial's position among the finished trials.
        done = done.assign(_order=np.arange(len(done), dtype=float))
        front = front.assign(_order=done.loc[front.index, "_order"] if len(front) else [])
        x_name, x_label = "_order", "trial (order finished)"
    else:
        x_name, x_label = x_obj[0], axis_label(x_obj[0])
    if len(front):
        front = front.sort_values(x_name, kind="mergesort")
    return done, front, x_name, x_label, y_obj[0], axis_label(y_obj[0])


def _method_groups(done: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if "method" not in done.columns:
        return [("trials", done)] if len(done) else []
    methods = done["method"].fillna("unknown").astype(str)
    return [(m, done[methods == m]) for m in sorted(methods.unique())]


def _dense_x(rows: pd.DataFrame, x_name: str) -> float | None:
    """The dense model's value of the x metric (from flops_dense / params_dense), if known."""
    for prefix in ("flops_", "params_"):
        col = prefix + "dense"
        if x_name.startswith(prefix) and col in rows.columns:
            v = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                return float(v.max())
    return None


def plot_front_png(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    path: str | Path,
    title: str,
    log_x: bool = False,
) -> Path:
    """Write a PNG of all trials and their Pareto front; returns the path written.

    All finished trials are light points coloured by ``method``; the front (``front_df``,
    e.g. from search.pareto.pareto_front) is a step line with markers (the region it
    dominates lies below-right of it). x: the cost objective, e.g. "FLOPs per sample
    (effective)"; y: the accuracy-like objective, e.g. "validation accuracy". A dotted
    vertical line marks the dense model when ``flops_dense``/``params_dense`` is present.
    ``log_x`` uses a log scale when all x values are positive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, front, x_name, x_label, y_name, y_label = _plot_data(rows_df, front_df, objectives)

    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
    try:
        cmap = plt.get_cmap("tab10")
        for i, (method, grp) in enumerate(_method_groups(done)):
            ax.scatter(grp[x_name], grp[y_name], s=22, alpha=0.45, color=cmap(i % 10), label=method)
        if len(front):
            # steps-post: after a front point the attainable accuracy stays flat until the
            # next (more expensive, more accurate) point.
            ax.plot(front[x_name], front[y_name], drawstyle="steps-post", color="black", lw=1.4)
            ax.plot(front[x_name], front[y_name], "o", mfc="none", mec="black", ms=8,
                    label=f"Pareto front ({len(front)})")
        dense = _dense_x(rows_df if isinstance(rows_df, pd.DataFrame) else done, x_name)
        if dense is not None:
            ax.axvline(dense, color="grey", ls=":", lw=1.0, label="dense model")
        if done.empty:
            ax.text(0.5, 0.5, "no finished trials yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
        xs = done[x_name].to_numpy(dtype=float) if len(done) else np.array([])
        if log_x and xs.size and (xs > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"{title}  ({len(done)} finished trials)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)  # figures are not garbage-collected while pyplot tracks them
    return path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _hover_text(done: pd.DataFrame, metric_cols: list[str], param_cols: list[str]) -> list[str]:
    texts = []
    for _, row in done.iterrows():
        lines = [f"trial_id: {html.escape(_fmt(row.get('trial_id', row.name)))}"]
        if "method" in done.columns:
            lines.append(f"method: {html.escape(_fmt(row['method']))}")
        lines += [f"{c}: {html.escape(_fmt(row[c]))}" for c in metric_cols if c in done.columns]
        lines += [f"{c}: {html.escape(_fmt(row[c]))}" for c in param_cols if c in done.columns]
        texts.append("<br>".join(lines))
    return texts


def plot_front_html(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    path: str | Path,
    title: str,
    param_columns: Sequence[str] | None = None,
) -> Path:
    """Write an interactive, self-contained plotly HTML of the trials and front.

    Same layout as :func:`plot_front_png`. Hovering a point shows its trial_id, method,
    objective values and sampled parameters: the columns starting with ``param.`` plus any
    listed in ``param_columns``. plotly.js is embedded (``include_plotlyjs=True``), so the
    file opens offline. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, front, x_name, x_label, y_name, y_label = _plot_data(rows_df, front_df, objectives)
    objs = normalise_objectives(objectives)
    metric_cols = [n for n, _ in objs]
    params = [c for c in done.columns if str(c).startswith("param.")]
    params += [c for c in (param_columns or []) if c not in params]

    fig = go.Figure()
    for method, grp in _method_groups(done):
        fig.add_trace(go.Scatter(
            x=grp[x_name], y=grp[y_name], mode="markers", name=method, opacity=0.55,
            marker={"size": 8}, text=_hover_text(grp, metric_cols, params),
            hovertemplate="%{text}<extra></extra>",
        ))
    if len(front):
        fig.add_trace(go.Scatter(
            x=front[x_name], y=front[y_name], mode="lines+markers", name=f"Pareto front ({len(front)})",
            line={"shape": "hv", "color": "black", "width": 1.5},
            marker={"size": 11, "symbol": "circle-open", "color": "black"},
            text=_hover_text(front, metric_cols, params), hovertemplate="%{text}<extra></extra>",
        ))
    if done.empty:
        fig.add_annotation(text="no finished trials yet", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"color": "grey"})
    dense = _dense_x(rows_df if isinstance(rows_df, pd.DataFrame) else done, x_name)
    if dense is not None:
        fig.add_vline(x=dense, line_dash="dot", line_color="grey", annotation_text="dense model")
    fig.update_layout(
        title=f"{html.escape(title)} ({len(done)} finished trials)",
        xaxis_title=x_label, yaxis_title=y_label, template="plotly_white", hovermode="closest",
        legend={"title": "method"},
    )
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
