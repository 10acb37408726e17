"""Pareto fronts, hypervolume and point selection over trial results.

Pure numpy/pandas plus ``moocore`` (C implementations of the non-dominated sort and the exact
hypervolume: O(n log n) in 2-D and 3-D, O(n^2) in 4-D): importable without MLflow, Ray or Hydra.

A trial result is a flat mapping of metrics (``val_acc`` as a fraction in [0, 1],
``flops_deployed`` as FLOPs per sample of the exported model for one forward pass with
1 multiply-add = 2 FLOPs, ...). An objective is a pair ``(metric_name, "max" | "min")``; the
default objectives are ``[("val_acc", "max"), ("flops_deployed", "min")]``.

Over 500 lines because the front, the hypervolume, its reference box, the knee point and point
selection all share one reading of the rows (finished rows, objective directions, finite values);
each function is short.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import moocore
import numpy as np
import pandas as pd

from search.trials.metrics import COST_PREFIXES, FLOPS_DEPLOYED, VAL_ACC

Objective = tuple[str, str]
Objectives = Sequence[Objective]

DEFAULT_OBJECTIVES: list[Objective] = [(VAL_ACC, "max"), (FLOPS_DEPLOYED, "min")]

# Trial statuses that count as finished. "ok" is the trial-result convention, "finished" is
# what MLflow reports for a run that ended normally (see search.tracking.find_trial_runs).
OK_STATUSES = frozenset({"ok", "finished"})

SELECTOR_GRAMMAR = (
    "knee | max_acc | min_flops | flops_le:<float> | trial:<trial id> | best:<objective> | "
    "min:<objective> | max:<objective> | le:<objective>:<float> | ge:<objective>:<float>  (e.g. "
    "'best:val_f1': the front point best on val_f1; 'le:flops_deployed:2e6': the front point best on "
    "the other objectives with flops_deployed <= 2e6; 'trial:ab12cd34': that finished trial, on the "
    "front or not; max_acc, min_flops and flops_le:<float> are aliases of best:<first max objective>, "
    "min:<FLOPs objective> and le:<FLOPs objective>:<float>)"
)


def _check_directions(directions: Sequence[str], ncols: int) -> list[str]:
    dirs = [str(d).lower() for d in directions]
    if len(dirs) != ncols:
        raise ValueError(f"got {len(dirs)} directions for {ncols} objective columns")
    bad = [d for d in dirs if d not in ("max", "min")]
    if bad:
        raise ValueError(f"directions must be 'max' or 'min', got {bad}")
    return dirs


def _as_matrix(values: np.ndarray | Sequence[Sequence[float]], ncols: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        # A 1-D array is one point if its length matches the objective count, else a column.
        arr = arr.reshape(1, -1) if ncols is not None and arr.size == ncols else arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"values must be a 2-D array (points x objectives), got shape {arr.shape}")
    return arr


def _oriented(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Flip "min" columns so that larger is better in every column."""
    sign = np.array([1.0 if d == "max" else -1.0 for d in directions])
    return values * sign


def non_dominated_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the Pareto-optimal rows of ``values``.

    Args:
        values: array of shape (n_points, n_objectives), in each objective's own units.
        directions: "max" or "min" per column.

    Returns:
        Boolean array of shape (n_points,). A row is on the front when no other finite row is
        at least as good in every column and strictly better in one. Exact duplicates do not
        dominate each other, so both copies are kept. Rows with NaN or +-inf are never on the
        front (and never dominate anything).
    """
    arr = _as_matrix(values, len(directions))
    dirs = _check_directions(directions, arr.shape[1])
    n = arr.shape[0]
    finite = np.isfinite(arr).all(axis=1)
    mask = np.zeros(n, dtype=bool)
    if n == 0 or not finite.any():
        return mask
    good = _oriented(arr[finite], dirs)
    # keep_weakly: duplicates of a front point stay on the front (they dominate nothing).
    keep = moocore.is_nondominated(good, maximise=True, keep_weakly=True)
    mask[np.flatnonzero(finite)] = keep
    return mask


def normalise_objectives(objectives: Objectives | None) -> list[Objective]:
    """Objectives as a list of ``(name, "max"|"min")``; None gives the defaults."""
    objs = list(DEFAULT_OBJECTIVES if objectives is None else objectives)
    if not objs:
        raise ValueError("at least one objective is needed")
    out: list[Objective] = []
    for obj in objs:
        name, direction = obj
        direction = str(direction).lower()
        if direction not in ("max", "min"):
            raise ValueError(f"objective {name!r}: direction must be 'max' or 'min', got {direction!r}")
        out.append((str(name), direction))
    return out


def _to_frame(rows: Sequence[Mapping] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(rows, pd.DataFrame):
        return rows
    return pd.DataFrame(list(rows))


def finished_rows(rows: Sequence[Mapping] | pd.DataFrame, objectives: Objectives | None = None) -> pd.DataFrame:
    """Rows that count as finished trials with finite values for every objective.

    A row is kept when its ``status`` (if the column exists) is "ok" or "finished"
    (case-insensitive) or missing, and every objective column holds a finite number.
    Raises KeyError when an objective names a column that no row has although some rows
    are finished: that is almost always a typo in the objective name.
    """
    objs = normalise_objectives(objectives)
    df = _to_frame(rows)
    if df.empty:
        return df.copy()
    if "status" in df.columns:
        status = df["status"]
        ok = status.isna() | status.astype(str).str.lower().isin(OK_STATUSES)
        df = df[ok]
    if df.empty:
        return df.copy()
    missing = [name for name, _ in objs if name not in df.columns]
    if missing:
        raise KeyError(
            f"objective metric(s) {missing} not found in the trial results; "
            f"available columns: {sorted(map(str, df.columns))}"
        )
    names = [name for name, _ in objs]
    vals = df[names].apply(pd.to_numeric, errors="coerce")
    finite = np.isfinite(vals.to_numpy(dtype=float)).all(axis=1)
    out = df[finite].copy()
    for name in names:
        out[name] = vals.loc[out.index, name].astype(float)
    return out


def _sort_front(front: pd.DataFrame, objs: list[Objective]) -> pd.DataFrame:
    if front.empty:
        return front
    if len(objs) >= 2:
        # Ascending in the second objective (FLOPs by default): the front reads left to right
        # from the cheapest to the most accurate model, as it is plotted.
        key = objs[1][0]
        tie_key, tie_dir = objs[0]
        return front.sort_values(
            [key, tie_key], ascending=[True, tie_dir == "min"], kind="mergesort"
        )
    key, direction = objs[0]
    return front.sort_values(key, ascending=direction == "min", kind="mergesort")


def pareto_front(rows: Sequence[Mapping] | pd.DataFrame, objectives: Objectives | None = None) -> pd.DataFrame:
    """The Pareto-optimal trials.

    Args:
        rows: trial results (flat mappings or a DataFrame, one row per trial).
        objectives: ``[(metric, "max"|"min"), ...]``; defaults to
            ``[("val_acc", "max"), ("flops_deployed", "min")]``.

    Returns:
        The front rows (all columns, original index labels; for a list input the label is the
        position in the list). Failed trials (``status`` not "ok"/"finished") and rows with a
        missing or non-finite objective are ignored. Sorted ascending by the *second*
        objective's raw value (FLOPs for the defaults, so cheapest first), ties broken by the
        first objective, better first; with a single objective, best first.
    """
    objs = normalise_objectives(objectives)
    df = finished_rows(rows, objs)
    if df.empty:
        return df
    names = [n for n, _ in objs]
    mask = non_dominated_mask(df[names].to_numpy(dtype=float), [d for _, d in objs])
    return _sort_front(df[mask], objs)


def hypervolume(
    values: np.ndarray | Sequence[Sequence[float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> float:
    """Hypervolume dominated by ``values`` with respect to ``reference``.

    Args:
        values: (n_points, n_objectives) in each objective's own units; dominated points are
            allowed (they add nothing).
        directions: "max" or "min" per objective.
        reference: for a "max" objective a lower bound, for a "min" objective an upper bound.

    Returns:
        The volume (product of the objectives' units, e.g. accuracy x FLOPs per sample) of the
        region that some point dominates and that dominates the reference. Points that are not
        strictly better than the reference in every objective, or that have NaN/inf, add
        nothing; an empty set gives 0.0. Exact in any dimension (moocore: O(n log n) in 2-D
        and 3-D, O(n^2) in 4-D).
    """
    ref = np.asarray(reference, dtype=float).reshape(-1)
    arr = _as_matrix(values, ref.size)
    if arr.shape[0] == 0:
        return 0.0
    dirs = _check_directions(directions, arr.shape[1])
    if ref.size != arr.shape[1]:
        raise ValueError(f"reference has {ref.size} values for {arr.shape[1]} objectives")
    # Distance past the reference, positive when better, in every column.
    gain = _oriented(arr, dirs) - _oriented(ref.reshape(1, -1), dirs)
    ok = np.isfinite(gain).all(axis=1) & (gain > 0).all(axis=1)
    pts = gain[ok]
    if pts.shape[0] == 0:
        return 0.0
    if pts.shape[1] == 1:
        return float(pts.max())
    return float(moocore.hypervolume(pts, ref=np.zeros(pts.shape[1]), maximise=True))


def _dense_column(name: str) -> str | None:
    for prefix in COST_PREFIXES:
        if name.startswith(prefix):
            return prefix + "dense"
    return None


def default_reference(objectives: Objectives | None, rows: Sequence[Mapping] | pd.DataFrame) -> list[float]:
    """A reference point for :func:`hypervolume`, one value per objective.

    - "max" objectives whose observed values lie in [0, 1] (accuracy-like fractions), or
      with no observed values: 0.0. Other "max" objectives: 0.0 if all observed values are
      non-negative, else 1.1 x the smallest observed value.
    - "min" objectives named ``flops_*`` / ``params_*`` when the rows carry ``flops_dense`` /
      ``params_dense``: the (largest) dense value, so that hypervolumes of sweeps over the
      same model are comparable and a point counts only if it is cheaper than the dense
      model. Otherwise the largest observed value plus 10 % of its magnitude (1.1 x max for
      positive values; 1.0 if it is 0); NaN when nothing was observed (hypervolume is then 0).

    Only finished rows (see :func:`finished_rows`) are used.
    """
    objs = normalise_objectives(objectives)
    df = _to_frame(rows)
    if not df.empty and "status" in df.columns:
        status = df["status"]
        df = df[status.isna() | status.astype(str).str.lower().isin(OK_STATUSES)]

    def finite(col: str) -> np.ndarray:
        if df.empty or col not in df.columns:
            return np.array([], dtype=float)
        v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        return v[np.isfinite(v)]

    ref: list[float] = []
    for name, direction in objs:
        obs = finite(name)
        if direction == "max":
            # Accuracy-like fractions in [0, 1] (and any non-negative score) start from 0.
            if obs.size == 0 or obs.min() >= 0.0:
                ref.append(0.0)
            else:
                ref.append(float(1.1 * obs.min()))
            continue
        dense_col = _dense_column(name)
        dense = finite(dense_col) if dense_col else np.array([])
        if dense.size:
            ref.append(float(dense.max()))
        elif obs.size:
            top = float(obs.max())
            ref.append(top + 0.1 * abs(top) if top != 0.0 else 1.0)
        else:
            ref.append(math.nan)
    return ref


@dataclass(frozen=True)
class ReferenceBox:
    """The box a hypervolume is normalised by: per objective, from the reference point (worst)
    to the ideal value (best), in the objective's own units.

    The normalised hypervolume is the fraction of this box that the front dominates, so it
    lies in [0, 1] and reads the same for any model size: 1.0 would be a model with accuracy
    1.0 at zero FLOPs (for the default objectives, worst = (0, dense FLOPs), best = (1, 0)).

    Attributes:
        worst: the reference point (see :func:`default_reference`).
        best: the ideal corner (see :func:`reference_box`).
    """

    worst: tuple[float, ...]
    best: tuple[float, ...]

    def volume(self) -> float:
        """Product of the box's sides (the objectives' units multiplied); NaN if a side is unknown."""
        return float(np.prod(np.abs(np.subtract(self.best, self.worst)))) if self.worst else math.nan

    def as_dict(self) -> dict[str, list[float]]:
        """``{"worst": [...], "best": [...]}`` (JSON-friendly; logged as the tag ``prunesearch.hv_box``)."""
        return {"worst": [float(v) for v in self.worst], "best": [float(v) for v in self.best]}


def reference_box(objectives: Objectives | None, rows: Sequence[Mapping] | pd.DataFrame,
                  reference: Sequence[float] | None = None) -> ReferenceBox:
    """The box of :class:`ReferenceBox` for ``objectives``: the worst corner is ``reference``
    (default: :func:`default_reference`), the best corner per objective is

    - "max" objectives whose finished values all lie in [0, 1] (accuracies, fractions), or with
      none observed: 1.0; other "max" objectives: the largest observed value;
    - "min" objectives whose finished values are all non-negative (FLOPs, parameters, latency,
      seconds), or with none observed: 0.0; others: the smallest observed value.

    A corner taken from the data moves as a sweep finds better points; the fixed ones (1.0 and
    0.0) are what the default objectives use, so their normalised hypervolumes compare across
    sweeps and models.
    """
    objs = normalise_objectives(objectives)
    worst = list(reference) if reference is not None else default_reference(objs, rows)
    if len(worst) != len(objs):
        raise ValueError(f"reference has {len(worst)} values for {len(objs)} objectives")
    done = finished_rows(rows, objs) if len(_to_frame(rows)) else pd.DataFrame()
    best: list[float] = []
    for name, direction in objs:
        obs = done[name].to_numpy(dtype=float) if name in done.columns else np.array([])
        if direction == "max":
            best.append(1.0 if obs.size == 0 or (obs.min() >= 0.0 and obs.max() <= 1.0) else float(obs.max()))
        else:
            best.append(0.0 if obs.size == 0 or obs.min() >= 0.0 else float(obs.min()))
    return ReferenceBox(tuple(float(v) for v in worst), tuple(best))


def normalised_hypervolume(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str],
                           box: ReferenceBox) -> float:
    """The fraction (in [0, 1]) of ``box`` that ``values`` dominate.

    Points are clipped to the box first (a value better than the ideal counts as the ideal), so
    the result never exceeds 1. A box with a side of zero or unknown length gives 0.0.
    """
    volume = box.volume()
    if not math.isfinite(volume) or volume <= 0.0:
        return 0.0
    arr = _as_matrix(values, len(box.worst))
    if arr.shape[0] == 0:
        return 0.0
    dirs = _check_directions(directions, arr.shape[1])
    lo = np.minimum(box.worst, box.best)
    hi = np.maximum(box.worst, box.best)
    with np.errstate(invalid="ignore"):
        clipped = np.clip(arr, lo, hi)  # NaN stays NaN and is dropped by hypervolume
    return float(min(1.0, max(0.0, hypervolume(clipped, dirs, box.worst) / volume)))


@dataclass(frozen=True)
class FrontSummary:
    """A sweep's front at one moment, as the console, MLflow and the final report show it.

    Attributes:
        front: the Pareto-optimal finished rows (see :func:`pareto_front`), cheapest first.
        hypervolume: against ``box.worst``, in the objectives' units multiplied.
        hypervolume_normalised: the fraction of ``box`` the front dominates, in [0, 1].
        box: the declared reference box.
    """

    front: pd.DataFrame
    hypervolume: float
    hypervolume_normalised: float
    box: ReferenceBox


def front_summary(rows: Sequence[Mapping] | pd.DataFrame, objectives: Objectives | None,
                  reference: Sequence[float] | None = None) -> FrontSummary:
    """Front, raw and normalised hypervolume of ``rows`` (one call, one place).

    ``reference`` is the worst corner of the box (default: :func:`default_reference`, which for
    FLOPs objectives is the dense model's FLOPs, fixed during a sweep).
    """
    objs = normalise_objectives(objectives)
    df = _to_frame(rows)
    front = pareto_front(df, objs)
    box = reference_box(objs, df, reference)
    if front.empty:
        return FrontSummary(front, 0.0, 0.0, box)
    values = front[[n for n, _ in objs]].to_numpy(dtype=float)
    dirs = [d for _, d in objs]
    return FrontSummary(front, hypervolume(values, dirs, box.worst), normalised_hypervolume(values, dirs, box), box)


def _accuracy_objective(objs: list[Objective]) -> Objective:
    for name, direction in objs:
        if direction == "max":
            return name, direction
    raise ValueError(f"no 'max' (accuracy-like) objective among {objs}")


def _flops_objective(objs: list[Objective]) -> Objective:
    mins = [(n, d) for n, d in objs if d == "min"]
    for name, direction in mins:
        if "flops" in name.lower():
            return name, direction
    if mins:
        return mins[0]
    raise ValueError(f"no 'min' (cost-like) objective among {objs}")


def knee_point(front: pd.DataFrame, objectives: Objectives | None = None) -> Hashable:
    """Index label of the knee of a 2-objective front.

    Each of the first two objectives is rescaled to [0, 1] over the front, oriented so that
    larger is better; the knee is the point farthest from the straight line through the two
    extreme points (best in objective 1, best in objective 2). Fronts of 1 or 2 points, or
    fronts whose points are collinear, give the point with the best first objective (ties:
    best second objective). Further objectives are ignored.
    """
    objs = normalise_objectives(objectives)
    if front.empty:
        raise ValueError("knee_point: the front is empty (no finished trials)")
    names = [n for n, _ in objs[:2]]
    vals = front[names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(vals).all(axis=1)
    if not finite.any():
        raise ValueError("knee_point: no front point has finite objective values")
    labels = front.index[finite]
    good = _oriented(vals[finite], [d for _, d in objs[:2]])

    # Best first objective, ties broken by the second: lexicographic max.
    if good.shape[1] == 1:
        best_first = int(np.argmax(good[:, 0]))
    else:
        best_first = int(np.lexsort((-good[:, 1], -good[:, 0]))[0])
    if good.shape[0] <= 2 or good.shape[1] < 2:
        return labels[best_first]

    lo, hi = good.min(axis=0), good.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = (good - lo) / span
    a = norm[best_first]
    b = norm[int(np.lexsort((-good[:, 0], -good[:, 1]))[0])]
    d = b - a
    length = float(np.hypot(d[0], d[1]))
    if length == 0.0:
        return labels[best_first]
    # Perpendicular distance to the line a-b (2-D cross product / |b - a|). Only points on
    # the "good" side (towards the utopia point (1, 1)) count as knees.
    rel = norm - a
    cross = (d[0] * rel[:, 1] - d[1] * rel[:, 0]) / length
    utopia_side = np.sign(d[0] * (1 - a[1]) - d[1] * (1 - a[0])) or 1.0
    dist = cross * utopia_side
    i = int(np.argmax(dist))
    if dist[i] <= 1e-12:
        return labels[best_first]
    return labels[i]


@dataclass(frozen=True)
class Selector:
    """A parsed ``select=`` (see :data:`SELECTOR_GRAMMAR`), spoken in the sweep's objectives.

    Attributes:
        kind: ``knee``, ``best``, ``min``, ``max``, ``le``, ``ge`` or ``trial``.
        metric: the objective it reads (``best``/``min``/``max``/``le``/``ge``).
        value: the bound of ``le``/``ge``.
        trial_id: the trial of ``trial``.
        alias: what was typed when it was an alias (``max_acc``, ``min_flops``, ``flops_le:...``).
    """

    kind: str
    metric: str | None = None
    value: float | None = None
    trial_id: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, selector: str, objectives: Objectives | None) -> Selector:
        """Parse ``selector`` against the sweep's ``objectives``.

        Raises:
            ValueError: unknown form, a metric that is not an objective, or a bound that is not
                a number; the message gives the grammar or the objectives.
        """
        objs = normalise_objectives(objectives)
        names = [n for n, _ in objs]
        sel = str(selector).strip()
        low = sel.lower()
        if low == "knee":
            return cls("knee")
        if low.startswith("trial:"):
            return cls("trial", trial_id=sel.split(":", 1)[1].strip())
        if low == "max_acc":
            return cls("best", _accuracy_objective(objs)[0], alias="max_acc")
        if low == "min_flops":
            return cls("min", _flops_objective(objs)[0], alias="min_flops")
        if low.startswith("flops_le:"):
            return cls("le", _flops_objective(objs)[0], _bound(selector, sel.split(":", 1)[1]), alias=sel)
        kind, _, rest = sel.partition(":")
        kind = kind.lower()
        if kind not in ("best", "min", "max", "le", "ge") or not rest:
            raise ValueError(f"unknown selector {selector!r}; grammar: {SELECTOR_GRAMMAR}")
        metric, _, bound = rest.partition(":") if kind in ("le", "ge") else (rest, "", "")
        metric = metric.strip()
        if metric not in names:
            raise ValueError(f"selector {selector!r}: {metric!r} is not an objective of this sweep; its "
                             f"objectives are {names}")
        if kind in ("le", "ge"):
            if not bound:
                raise ValueError(f"selector {selector!r}: {kind}: needs a bound, e.g. {kind}:{metric}:1e6")
            return cls(kind, metric, _bound(selector, bound))
        return cls(kind, metric)

    def canonical(self) -> str:
        """The selector in the objectives' own words (``best:val_f1``, ``le:flops_deployed:2e+06``)."""
        if self.kind == "knee":
            return "knee"
        if self.kind == "trial":
            return f"trial:{self.trial_id}"
        if self.kind in ("le", "ge"):
            return f"{self.kind}:{self.metric}:{self.value:g}"
        return f"{self.kind}:{self.metric}"

    def describe(self, objectives: Objectives | None) -> str:
        """One line saying what it reads: ``max_acc = best:val_f1 (val_f1: the first max objective)``."""
        text = self.canonical()
        if self.alias is None:
            return text
        objs = normalise_objectives(objectives)
        role = ("the sweep's first max objective" if self.alias.lower() == "max_acc"
                else "the sweep's FLOPs objective" if "flops" in str(self.metric).lower()
                else "the sweep's first min objective")
        direction = dict(objs).get(str(self.metric), "?")
        return f"{self.alias} = {text} (reads {self.metric}: {role}, {direction})"


def _bound(selector: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise ValueError(f"selector {selector!r}: {raw.strip()!r} is not a number; grammar: {SELECTOR_GRAMMAR}") \
            from None


def select_point(
    rows: Sequence[Mapping] | pd.DataFrame,
    objectives: Objectives | None,
    selector: str | Selector,
) -> pd.Series:
    """Pick one trial, from the Pareto front of ``rows`` unless a trial is named.

    Selector grammar (:data:`SELECTOR_GRAMMAR`, :class:`Selector`):
        ``knee``: :func:`knee_point` of the front.
        ``best:<objective>``: the front point best on that objective in its direction; ties ->
            best on the other objectives, in their order.
        ``min:<objective>`` / ``max:<objective>``: the front point with its lowest / highest
            value; ties as for ``best``.
        ``le:<objective>:<float>`` / ``ge:<objective>:<float>``: among front points with the
            objective at most / at least the value, the best on the other objectives (in their
            order); ValueError naming the nearest available value if none.
        ``trial:<trial id>``: that finished trial, on the front or not (the dashboard's
            export command for a clicked point).
        Aliases: ``max_acc`` = ``best:<first max objective>``, ``min_flops`` = ``min:<FLOPs
        objective>`` (the first min objective whose name holds "flops", else the first min
        one), ``flops_le:<float>`` = ``le:<FLOPs objective>:<float>``.

    Returns:
        The chosen row as a pd.Series whose ``name`` is its index label in ``rows``.
    """
    objs = normalise_objectives(objectives)
    parsed = selector if isinstance(selector, Selector) else Selector.parse(selector, objs)
    selector = parsed.alias or parsed.canonical() if isinstance(selector, Selector) else selector  # for messages
    if parsed.kind == "trial":
        wanted = str(parsed.trial_id)
        table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if "status" in table:
            status = table["status"]
            table = table[status.isna() | status.astype(str).str.lower().isin(["ok", "finished", "early_stopped"])]
        match = table[table["trial_id"].astype(str) == wanted] if "trial_id" in table else table.iloc[0:0]
        if match.empty:
            raise ValueError(f"selector {selector!r}: no finished trial {wanted!r} in this sweep")
        return match.iloc[0]
    front = pareto_front(rows, objs)
    if front.empty:
        raise ValueError(f"selector {selector!r}: no finished trial has finite values for {objs}")
    if parsed.kind == "knee":
        return front.loc[knee_point(front, objs)]

    metric = str(parsed.metric)
    others = [(n, d) for n, d in objs if n != metric]

    def ordered(table: pd.DataFrame, first: list[tuple[str, str]]) -> pd.Series:
        keys = first + others + ([] if first else [(metric, dict(objs)[metric])])  # last: ties
        return table.sort_values([n for n, _ in keys], ascending=[d == "min" for _, d in keys],
                                 kind="mergesort").iloc[0]

    direction = dict(objs)[metric]
    if parsed.kind == "best":
        return ordered(front, [(metric, direction)])
    if parsed.kind in ("min", "max"):
        return ordered(front, [(metric, parsed.kind)])
    limit = float(parsed.value)  # type: ignore[arg-type]
    within = front[front[metric] <= limit] if parsed.kind == "le" else front[front[metric] >= limit]
    if within.empty:
        nearest = float(front[metric].min() if parsed.kind == "le" else front[metric].max())
        word = "smallest" if parsed.kind == "le" else "largest"
        sign = "<=" if parsed.kind == "le" else ">="
        raise ValueError(f"selector {selector!r}: no Pareto point has {metric} {sign} {limit:.6g}; "
                         f"the {word} {metric} available is {nearest:.6g}")
    if not others:
        return ordered(within, [(metric, direction)])
    return ordered(within, [])


def non_dominated_ranks(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: the front number of every row (0 = Pareto-optimal).

    Rows of front ``r`` are non-dominated once fronts ``0 .. r-1`` are removed (NSGA-II's
    ranking). Rows with NaN or +-inf rank after every finite row (one rank past the last front).
    """
    arr = _as_matrix(values, len(directions))
    dirs = _check_directions(directions, arr.shape[1])
    ranks = np.zeros(arr.shape[0], dtype=int)
    finite = np.isfinite(arr).all(axis=1)
    remaining = np.flatnonzero(finite)
    rank = 0
    while remaining.size:
        on_front = non_dominated_mask(arr[remaining], dirs)
        ranks[remaining[on_front]] = rank
        remaining = remaining[~on_front]
        rank += 1
    ranks[~finite] = rank
    return ranks


def crowding_distance(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """NSGA-II crowding distance of each row within the given set (usually one front).

    Per objective the rows are sorted; the two extremes get ``inf`` and an interior row the gap
    between its neighbours divided by the objective's range; the distances add over the
    objectives. Larger = more isolated (more worth keeping). Sets of one or two rows are all
    extremes (``inf``); rows with NaN get 0.
    """
    arr = _as_matrix(values)
    n, k = arr.shape
    out = np.zeros(n, dtype=float)
    finite = np.isfinite(arr).all(axis=1)
    idx = np.flatnonzero(finite)
    if idx.size <= 2:
        out[idx] = math.inf
        return out
    pts = arr[idx]
    dist = np.zeros(idx.size, dtype=float)
    for j in range(k):
        order = np.argsort(pts[:, j], kind="mergesort")
        col = pts[order, j]
        span = col[-1] - col[0]
        dist[order[0]] = dist[order[-1]] = math.inf
        if span > 0:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    out[idx] = dist
    return out


def hypervolume_contributions(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str],
                              reference: Sequence[float]) -> np.ndarray:
    """Exclusive hypervolume contribution of each row: ``HV(all) - HV(all but that row)``.

    In the objectives' units (see :func:`hypervolume`). Dominated rows, exact duplicates and
    rows not better than ``reference`` contribute 0.
    """
    arr = _as_matrix(values, len(directions))
    total = hypervolume(arr, directions, reference)
    out = np.zeros(arr.shape[0], dtype=float)
    for i in range(arr.shape[0]):
        out[i] = total - hypervolume(np.delete(arr, i, axis=0), directions, reference)
    return np.maximum(out, 0.0)
