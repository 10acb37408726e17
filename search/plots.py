"""A sweep's figures: Pareto fronts (PNG and self-contained HTML), accuracy against sparsity,
and the per-layer sparsity of trials side by side.

No MLflow here; search.tracking logs what these functions write (:func:`write_sweep_plots`).
Front plots put the cost objective (FLOPs per sample, forward, 1 multiply-add = 2 FLOPs) on x
and the accuracy-like objective (a fraction) on y; every plot copes with 0 or 1 finished
trials. A method has one colour (:func:`method_colours`) in every figure and in the dashboard;
the dense model, when the sweep measured it (:class:`DenseReference`), is a black star.

Over 500 lines because it is one function per figure, sharing the colours, axes and the
dense reference; splitting it would scatter those shared helpers.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless machines and Ray workers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from search.formatting import format_metric  # noqa: E402
from search.pareto import Objectives, finished_rows, normalise_objectives, pareto_front  # noqa: E402
from search.trials.metrics import COST_PREFIXES, LATENCY_MS, SPARSITY, TEST_ACC, VAL_ACC  # noqa: E402

# matplotlib's tab10, which is also plotly's default colour sequence.
METHOD_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DENSE_COLOUR = "#000000"
# The file a trial writes beside its masks (search/trial.py): layer name -> fraction zeroed.
LAYER_SPARSITY_FILE = "layer_sparsity.json"
_MAX_HEATMAP_TRIALS = 40


def method_colours(methods: Iterable[Any]) -> dict[str, str]:
    """A colour per method: the sorted method names take :data:`METHOD_PALETTE` in order
    (cycling after 10), so the same sweep gets the same colours in every figure."""
    return {m: METHOD_PALETTE[i % len(METHOD_PALETTE)] for i, m in enumerate(sorted({str(m) for m in methods}))}


@dataclass(frozen=True)
class DenseReference:
    """The unpruned model as a reference point on the sweep's plots.

    Attributes:
        val_acc: validation accuracy (fraction) of the dense model.
        flops: FLOPs per sample of the dense model (forward, 1 multiply-add = 2 FLOPs).
        params: parameters of the dense model.
    """

    val_acc: float | None = None
    flops: float | None = None
    params: float | None = None

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> DenseReference | None:
        """From a sweep parent run's metrics ``dense_val_acc``, ``dense_flops`` and
        ``dense_params``; None when none of them is logged (or finite)."""
        def finite(key: str) -> float | None:
            try:
                v = float(metrics[key])
            except (KeyError, TypeError, ValueError):
                return None
            return v if math.isfinite(v) else None

        ref = cls(val_acc=finite("dense_val_acc"), flops=finite("dense_flops"), params=finite("dense_params"))
        return None if ref.val_acc is None and ref.flops is None and ref.params is None else ref

    def value_of(self, metric: str) -> float | None:
        """The dense model's value of a trial metric, or None when unknown.

        ``flops_*`` (dense, effective and physical are the same for the dense model) ->
        :attr:`flops`; ``params_*`` -> :attr:`params`; ``val_acc``; ``sparsity`` -> 0.0.
        """
        if metric.startswith("flops"):
            return self.flops
        if metric.startswith("params"):
            return self.params
        if metric == VAL_ACC:
            return self.val_acc
        if metric == SPARSITY:
            return 0.0
        return None

    def point(self, x_metric: str, y_metric: str) -> tuple[float, float] | None:
        """(x, y) of the dense model in a plot of ``y_metric`` against ``x_metric``, if both are known."""
        x, y = self.value_of(x_metric), self.value_of(y_metric)
        return None if x is None or y is None else (x, y)

_LABELS = {
    VAL_ACC: "validation accuracy",
    TEST_ACC: "test accuracy",
    "train_acc": "training accuracy",
    SPARSITY: "sparsity (fraction of weights zeroed)",
    "wall_s": "wall time (s)",
    "gpu_s": "GPU time (s)",
    LATENCY_MS: "latency (ms)",
    "epochs": "epochs trained",
    "extra_forward_passes": "extra forward passes",
}


def axis_label(metric: str) -> str:
    """Human-readable axis label with units for a metric name (e.g. "flops_effective" ->
    "FLOPs per sample (effective)"); unknown names are returned unchanged."""
    if metric in _LABELS:
        return _LABELS[metric]
    for prefix, what in zip(COST_PREFIXES, ("FLOPs per sample", "parameters")):
        if metric.startswith(prefix):
            return f"{what} ({metric[len(prefix):]})"
    return metric


def plot_axes(objectives: Objectives | None) -> tuple[tuple[str, str] | None, tuple[str, str]]:
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
    x_obj, y_obj = plot_axes(objs)
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
    for prefix in COST_PREFIXES:
        col = prefix + "dense"
        if x_name.startswith(prefix) and col in rows.columns:
            v = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                return float(v.max())
    return None


def _dense_marks_png(ax: Any, dense: DenseReference | None, rows: pd.DataFrame, x_name: str, y_name: str) -> None:
    """The dense model: a star with a dotted accuracy line when its point is known, else a
    dotted vertical line at its x value when the trial rows carry ``flops_dense``."""
    point = dense.point(x_name, y_name) if dense else None
    if point is not None:
        ax.axhline(point[1], color="grey", ls=":", lw=1.0)
        ax.scatter([point[0]], [point[1]], marker="*", s=160, color=DENSE_COLOUR, zorder=5, label="dense model")
        return
    x = _dense_x(rows, x_name)
    if x is not None:
        ax.axvline(x, color="grey", ls=":", lw=1.0, label="dense model")


def plot_front_png(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    path: str | Path,
    title: str,
    log_x: bool = False,
    dense: DenseReference | None = None,
) -> Path:
    """Write a PNG of all trials and their Pareto front; returns the path written.

    All finished trials are light points coloured by ``method`` (:func:`method_colours`); the
    front (``front_df``, e.g. from search.pareto.pareto_front) is a step line with markers (the
    region it dominates lies below-right of it). x: the cost objective, e.g. "FLOPs per sample
    (effective)"; y: the accuracy-like objective, e.g. "validation accuracy". The dense model
    is a star with a dotted line at its accuracy when ``dense`` gives its point, else a dotted
    vertical line when ``flops_dense``/``params_dense`` is present.
    ``log_x`` uses a log scale when all x values are positive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done, front, x_name, x_label, y_name, y_label = _plot_data(rows_df, front_df, objectives)
    groups = _method_groups(done)
    colours = method_colours(m for m, _ in groups)

    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
    try:
        for method, grp in groups:
            ax.scatter(grp[x_name], grp[y_name], s=22, alpha=0.45, color=colours[method], label=method)
        if len(front):
            # steps-post: after a front point the attainable accuracy stays flat until the
            # next (more expensive, more accurate) point.
            ax.plot(front[x_name], front[y_name], drawstyle="steps-post", color="black", lw=1.4)
            ax.plot(front[x_name], front[y_name], "o", mfc="none", mec="black", ms=8,
                    label=f"Pareto front ({len(front)})")
        _dense_marks_png(ax, dense, rows_df if isinstance(rows_df, pd.DataFrame) else done, x_name, y_name)
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
    if isinstance(v, list):  # a vector setting
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _hover_text(done: pd.DataFrame, metric_cols: list[str], param_cols: list[str]) -> list[str]:
    """Hover lines per trial; a setting the trial does not have (an inactive conditional key,
    NaN in the frame) is left out rather than shown with a value."""
    texts = []
    for _, row in done.iterrows():
        lines = [f"trial_id: {html.escape(_fmt(row.get('trial_id', row.name)))}"]
        if "method" in done.columns:
            lines.append(f"method: {html.escape(_fmt(row['method']))}")
        lines += [f"{c}: {html.escape(_fmt(row[c]))}" for c in metric_cols if c in done.columns]
        lines += [f"{c}: {html.escape(_fmt(row[c]))}" for c in param_cols
                  if c in done.columns and not _missing(row[c])]
        texts.append("<br>".join(lines))
    return texts


def front_figure(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    title: str,
    param_columns: Sequence[str] | None = None,
    dense: DenseReference | None = None,
) -> go.Figure:
    """The plotly figure of :func:`plot_front_html`: a marker trace per method (named after
    it, in its :func:`method_colours` colour), the front as a black step line, and a
    "dense model" star when ``dense`` gives its point."""
    done, front, x_name, x_label, y_name, y_label = _plot_data(rows_df, front_df, objectives)
    objs = normalise_objectives(objectives)
    metric_cols = [n for n, _ in objs]
    params = [c for c in done.columns if str(c).startswith("param.")]
    params += [c for c in (param_columns or []) if c not in params]
    groups = _method_groups(done)
    colours = method_colours(m for m, _ in groups)

    fig = go.Figure()
    for method, grp in groups:
        fig.add_trace(go.Scatter(
            x=grp[x_name].tolist(), y=grp[y_name].tolist(), mode="markers", name=html.escape(method), opacity=0.55,
            marker={"size": 8, "color": colours[method]}, text=_hover_text(grp, metric_cols, params),
            hovertemplate="%{text}<extra></extra>",
        ))
    if len(front):
        fig.add_trace(go.Scatter(
            x=front[x_name].tolist(), y=front[y_name].tolist(), mode="lines+markers",
            name=f"Pareto front ({len(front)})", line={"shape": "hv", "color": "black", "width": 1.5},
            marker={"size": 11, "symbol": "circle-open", "color": "black"},
            text=_hover_text(front, metric_cols, params), hovertemplate="%{text}<extra></extra>",
        ))
    if done.empty:
        fig.add_annotation(text="no finished trials yet", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"color": "grey"})
    point = dense.point(x_name, y_name) if dense else None
    if point is not None:
        fig.add_hline(y=point[1], line_dash="dot", line_color="grey")
        fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers", name="dense model",
                                 marker={"symbol": "star", "size": 15, "color": DENSE_COLOUR},
                                 hovertemplate=f"dense model<br>{y_name}: %{{y}}<br>{x_name}: %{{x}}<extra></extra>"))
    else:
        dense_x = _dense_x(rows_df if isinstance(rows_df, pd.DataFrame) else done, x_name)
        if dense_x is not None:
            fig.add_vline(x=dense_x, line_dash="dot", line_color="grey", annotation_text="dense model")
    fig.update_layout(
        title=f"{html.escape(title)} ({len(done)} finished trials)",
        xaxis_title=x_label, yaxis_title=y_label, template="plotly_white", hovermode="closest",
        legend={"title": "method"},
    )
    return fig


def plot_front_html(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    path: str | Path,
    title: str,
    param_columns: Sequence[str] | None = None,
    dense: DenseReference | None = None,
) -> Path:
    """Write an interactive, self-contained plotly HTML of the trials and front.

    Same layout as :func:`plot_front_png` (the figure is :func:`front_figure`). Hovering a
    point shows its trial_id, method, objective values and sampled parameters: the columns
    starting with ``param.`` plus any listed in ``param_columns`` (a setting a trial does not
    have is not shown for it). plotly.js is embedded (``include_plotlyjs=True``), so the file
    opens offline. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = front_figure(rows_df, front_df, objectives, title, param_columns, dense)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def plot_accuracy_sparsity_png(
    rows_df: pd.DataFrame | Sequence,
    objectives: Objectives | None,
    path: str | Path,
    title: str,
    dense: DenseReference | None = None,
) -> Path:
    """Write a PNG of accuracy against sparsity, one colour per method; returns the path.

    x: the measured ``sparsity`` (fraction of zeroed Conv+Linear weights); y: the sweep's
    accuracy-like objective. Every finished trial is a light point; each method's best
    accuracy at a given sparsity or more (its non-dominated trials in accuracy up, sparsity
    up) is a step line in the method's colour. The dense model sits at sparsity 0 (a star)
    when ``dense`` knows its accuracy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, (y_name, _) = plot_axes(objectives)
    rows = rows_df if isinstance(rows_df, pd.DataFrame) else pd.DataFrame(list(rows_df))
    pair = [(y_name, "max"), ("sparsity", "max")]
    done = finished_rows(rows, pair) if {y_name, "sparsity"} <= set(rows.columns) else rows.iloc[0:0]
    groups = _method_groups(done)
    colours = method_colours(m for m, _ in groups)

    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=110)
    try:
        for method, grp in groups:
            ax.scatter(grp["sparsity"], grp[y_name], s=22, alpha=0.4, color=colours[method])
            best = pareto_front(grp, pair)
            # steps-pre: the best accuracy at sparsity s comes from the next sparser trial.
            ax.plot(best["sparsity"], best[y_name], drawstyle="steps-pre", marker="o", ms=5, lw=1.4,
                    color=colours[method], label=f"{method} ({len(grp)})")
        point = dense.point("sparsity", y_name) if dense else None
        if point is not None:
            ax.scatter([point[0]], [point[1]], marker="*", s=160, color=DENSE_COLOUR, zorder=5, label="dense model")
            ax.axhline(point[1], color="grey", ls=":", lw=1.0)
        if done.empty:
            ax.text(0.5, 0.5, "no finished trials with a sparsity yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
        ax.set_xlabel(axis_label("sparsity"))
        ax.set_ylabel(axis_label(y_name))
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(f"{title}  ({len(done)} finished trials)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def load_layer_sparsity(rows_df: pd.DataFrame | Sequence) -> dict[str, dict[str, float]]:
    """Per-layer sparsity (layer name -> fraction zeroed) of each finished trial, by trial id.

    Taken from a row's ``layer_sparsity`` mapping when it has one, else from the
    ``layer_sparsity.json`` the trial wrote beside its masks (``masks_path``); trials with
    neither are left out.
    """
    rows = rows_df.to_dict("records") if isinstance(rows_df, pd.DataFrame) else list(rows_df)
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        status = row.get("status")
        if not _missing(status) and str(status).lower() not in ("ok", "finished"):
            continue
        layers = row.get("layer_sparsity")
        if not isinstance(layers, Mapping):
            masks = row.get("masks_path")
            file = Path(str(masks)).parent / LAYER_SPARSITY_FILE if isinstance(masks, str) and masks else None
            if file is None or not file.is_file():
                continue
            try:
                layers = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
        # Only {layer: fraction}: a file of another shape (an older text trial wrote nested
        # details here) leaves that trial out of the per-layer plots instead of failing them.
        numbers = {str(k): float(v) for k, v in layers.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(layers, Mapping) else {}
        if numbers:
            out[str(row.get("trial_id"))] = numbers
    return out


def _layer_names(layers: Mapping[str, Mapping[str, float]]) -> list[str]:
    # Model order (the order the trials wrote them), the union over trials.
    return list(dict.fromkeys(name for per_trial in layers.values() for name in per_trial))


def layer_sparsity_figure(
    layers: Mapping[str, Mapping[str, float]],
    title: str,
    labels: Mapping[str, str] | None = None,
) -> go.Figure:
    """The plotly figure of :func:`plot_layer_sparsity_html`: two bar traces (trial A, trial
    B) over the layers, and one menu per trace listing every trial (a label's text up to its
    first " · " names the trial in the menus; the whole label is the legend)."""
    names = _layer_names(layers)
    ids = list(layers)
    labels = dict(labels or {})

    def ys(tid: str) -> list[float | None]:
        return [layers[tid].get(n) for n in names]

    def label(tid: str) -> str:
        return html.escape(labels.get(tid, tid))

    def short(tid: str) -> str:
        return html.escape(labels.get(tid, tid).split(" · ", 1)[0])

    fig = go.Figure()
    for slot, tid in enumerate(ids[:2]):
        # Category names are drawn as plotly's HTML subset: escaped like every other label.
        fig.add_trace(go.Bar(x=[html.escape(n) for n in names], y=ys(tid), name=label(tid),
                             marker={"color": METHOD_PALETTE[slot]}))
    if not ids:
        fig.add_annotation(text="no per-layer sparsity logged yet", showarrow=False, xref="paper",
                           yref="paper", x=0.5, y=0.5, font={"color": "grey"})
    menus = [{
        "buttons": [{"label": f"trial {'AB'[slot]}: {short(tid)}", "method": "restyle",
                     "args": [{"y": [ys(tid)], "name": label(tid)}, [slot]]} for tid in ids],
        "active": slot, "direction": "down", "showactive": True,
        "x": 0.45 * slot, "xanchor": "left", "y": 1.04, "yanchor": "bottom",
    } for slot in range(min(2, len(ids)))]
    fig.update_layout(
        title={"text": html.escape(title)}, barmode="group", template="plotly_white",
        xaxis={"automargin": True}, yaxis={"title": {"text": "sparsity (fraction of weights zeroed)"}, "range": [0, 1]},
        updatemenus=menus, margin={"t": 110},
        # At the figure's bottom edge, under the (rotated, long) layer names whatever their length.
        legend={"orientation": "h", "x": 0, "y": 0, "yref": "container", "yanchor": "bottom"},
    )
    return fig


def plot_layer_sparsity_html(
    layers: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a self-contained plotly HTML comparing the per-layer sparsity of two trials.

    ``layers`` maps trial id -> {layer name: fraction zeroed}; ``labels`` optional trial id ->
    legend text. Two menus ("trial A", "trial B") pick any two of the trials; their bars stand
    side by side per layer. The first two trials are shown first. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layer_sparsity_figure(layers, title, labels).write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def plot_layer_sparsity_png(
    layers: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a heatmap PNG of per-layer sparsity: one row per trial (at most 40, in the order
    given), one column per layer, colour = fraction of the layer's weights zeroed (0 to 1).
    Any two rows compare two trials layer by layer. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = list(layers)[:_MAX_HEATMAP_TRIALS]
    names = _layer_names({t: layers[t] for t in ids})
    labels = dict(labels or {})
    grid = np.array([[layers[t].get(n, np.nan) for n in names] for t in ids], dtype=float).reshape(len(ids), len(names))
    size = (min(18.0, 6.5 + 0.35 * len(names)), 2.4 + 0.3 * len(ids))
    fig, ax = plt.subplots(figsize=size, dpi=110, layout="constrained")
    try:
        if ids and names:
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
            fig.colorbar(image, ax=ax, label="sparsity (fraction zeroed)")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(ids)), [labels.get(t, t) for t in ids], fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-layer sparsity logged yet", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
            ax.set_axis_off()
        fig.suptitle(title, fontsize=10)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _trial_label(row: Mapping[str, Any], y_name: str, x_name: str | None) -> str:
    head = " ".join(str(p) for p in (row.get("trial_id"), row.get("method")) if not _missing(p))
    parts = [head] + [f"{m} {format_metric(m, row[m])}" for m in (y_name, x_name) if m and not _missing(row.get(m))]
    return " · ".join(parts)


def write_sweep_plots(
    rows_df: pd.DataFrame | Sequence,
    front_df: pd.DataFrame | None,
    objectives: Objectives | None,
    out_dir: str | Path,
    title: str,
    dense: DenseReference | None = None,
) -> list[Path]:
    """Write every figure of a sweep into ``out_dir``; returns the paths written.

    ``front.png`` and ``front.html`` (:func:`plot_front_png` / :func:`plot_front_html`),
    ``accuracy_vs_sparsity.png`` when the trials report ``sparsity``, and, when trials left
    their per-layer sparsity (:func:`load_layer_sparsity`), ``layer_sparsity.html`` (any two
    finished trials side by side) and ``layer_sparsity.png`` (the front's trials, cheapest first).
    """
    out = Path(out_dir)
    rows = rows_df if isinstance(rows_df, pd.DataFrame) else pd.DataFrame(list(rows_df))
    paths = [plot_front_png(rows, front_df, objectives, out / "front.png", title, dense=dense),
             plot_front_html(rows, front_df, objectives, out / "front.html", title, dense=dense)]
    if "sparsity" in rows.columns:
        paths.append(plot_accuracy_sparsity_png(rows, objectives, out / "accuracy_vs_sparsity.png",
                                                "accuracy against sparsity", dense=dense))
    layers = load_layer_sparsity(rows)
    if layers:
        x_obj, (y_name, _) = plot_axes(objectives)
        x_name = x_obj[0] if x_obj else None
        labels = {str(r.get("trial_id")): _trial_label(r, y_name, x_name) for r in rows.to_dict("records")}
        paths.append(plot_layer_sparsity_html(layers, out / "layer_sparsity.html",
                                              "per-layer sparsity: pick two trials", labels))
        on_front = [str(t) for t in front_df["trial_id"]] if front_df is not None and "trial_id" in front_df else []
        front_layers = {t: layers[t] for t in on_front if t in layers}
        if front_layers:
            paths.append(plot_layer_sparsity_png(front_layers, out / "layer_sparsity.png",
                                                 "per-layer sparsity of the front's trials", labels))
    return paths
