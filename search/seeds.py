"""Front points with their spread: rerun the front's trials over seeds (``search.seeds``).

A sweep samples each setting once; a front point may be a lucky seed. With ``search.seeds=N``
(N > 1) the trials on the final front, and only those, are run again with the seeds
``trial.seed + 1 .. trial.seed + N - 1`` (weights, data order and the validation split
follow the seed, as ShrinkBench recommends), and every front point is reported as the mean ± standard
deviation (sample, ddof 1) of its objectives over the N runs: printed, written to
``front/front_seeds.csv`` (which goes to the parent run's ``front_export/`` artifacts with the
rest of the front) and logged as ``<metric>_mean`` / ``<metric>_std`` / ``seeds`` on each front
trial's MLflow child run.

Reruns go to ``<output>/seeds/<trial id>-seed<k>/`` (masks and ``trial_result.json``), and a
rerun whose result is there is not run again, so a resumed sweep only runs the missing ones.
They are not trials of the sweep: they are not sampled, not tracked as child runs and do not
count against ``search.budget``; their cost is printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["rerun_plan", "summarise_seeds", "rerun_front"]

log = logging.getLogger("search")

# Reported with their spread besides the objectives, when the trials measure them.
_EXTRA = ("test_acc", "sparsity", "flops_deployed", "flops_effective", "flops_physical")


def rerun_plan(front: pd.DataFrame, configs: dict[str, dict[str, Any]], seeds: int,
               base_seed: int) -> list[tuple[str, int]]:
    """``[(trial_id, seed), ...]`` to run: each front trial with a known config, seeds
    ``base_seed + 1 .. base_seed + seeds - 1``. Front rows without a config are skipped."""
    if seeds <= 1 or front.empty:
        return []
    return [(str(tid), base_seed + k) for tid in front["trial_id"].astype(str) if tid in configs
            for k in range(1, seeds)]


def _rerun_dir(output_dir: Path, trial_id: str, seed: int) -> Path:
    return output_dir / "seeds" / f"{trial_id}-seed{seed}"


def summarise_seeds(front: pd.DataFrame, reruns: dict[tuple[str, int], dict[str, Any]],
                    metrics: list[str], base_seed: int) -> pd.DataFrame:
    """One row per front point: ``seeds`` (runs that finished) and ``<metric>_mean`` /
    ``<metric>_std`` over the original run and its reruns (std NaN with one run)."""
    out = []
    for _, row in front.iterrows():
        tid = str(row["trial_id"])
        ok = sorted(s for (t, s), r in reruns.items() if t == tid and r.get("status") == "ok")
        runs = [dict(row)] + [reruns[(tid, s)] for s in ok]
        summary: dict[str, Any] = {"trial_id": tid, "method": row.get("method"), "seeds": len(runs),
                                   "seed_list": " ".join(str(s) for s in [base_seed, *ok])}
        for m in metrics:
            vals = [float(r[m]) for r in runs if isinstance(r.get(m), (int, float)) and math.isfinite(float(r[m]))]
            summary[f"{m}_mean"] = statistics.fmean(vals) if vals else math.nan
            summary[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
        out.append(summary)
    return pd.DataFrame(out)


def _run_one(params: dict[str, Any], ctx: Any, trial_id: str, trial_dir: str, cpus: int) -> dict[str, Any]:
    """Ray task: one rerun (no tracking); returns its row or ``{"status": "failed", "error"}``."""
    import torch

    from search.trials.run import run_trial

    torch.set_num_threads(max(1, cpus))
    try:
        row = run_trial(params, ctx, trial_id=trial_id, trial_dir=trial_dir)
    except Exception as exc:  # one failed rerun must not lose the others
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {**row, "status": "ok"}


def rerun_front(front: pd.DataFrame, configs: dict[str, dict[str, Any]], ctx: Any, *, seeds: int,
                objectives: list[tuple[str, str]], output_dir: Path, front_dir: Path,
                resources: dict[str, float], concurrency: int,
                tracking: dict[str, str] | None = None) -> pd.DataFrame | None:
    """Rerun the front over seeds and report mean ± std (see the module doc).

    Args:
        front: the sweep's front (rows with ``trial_id`` and the objectives).
        configs: trial id -> the sampled parameters Tune gave that trial.
        ctx: the sweep's :class:`~search.trials.context.TrialContext`.
        seeds: runs per front point, the original included.
        objectives: the sweep's ``[(metric, mode), ...]``.
        output_dir / front_dir: the sweep's directory and its front export folder.
        resources: ``{"cpu": n, "gpu": fraction}`` per rerun, as per trial.
        concurrency: reruns at once.
        tracking: the sweep's tracking dict (parent run id...), or None.

    Returns:
        The summary table, or None when there is nothing to rerun.
    """
    import ray

    base_seed = int(ctx.trial_settings.seed)
    plan = rerun_plan(front, configs, seeds, base_seed)
    if not plan:
        return None
    reruns: dict[tuple[str, int], dict[str, Any]] = {}
    todo = []
    for tid, seed in plan:
        cached = _rerun_dir(output_dir, tid, seed) / "trial_result.json"
        if cached.is_file():
            reruns[(tid, seed)] = {**json.loads(cached.read_text()), "status": "ok"}
        else:
            todo.append((tid, seed))
    print(f"\nseeds: rerunning the {len(front)} front point(s) with {seeds - 1} more seed(s) each: "
          f"{len(todo)} run(s)" + (f" ({len(plan) - len(todo)} already done)" if len(todo) < len(plan) else ""),
          flush=True)
    cpus = int(max(1, resources.get("cpu", 1)))
    task = ray.remote(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0) or 0)(_run_one)
    pending: dict[Any, tuple[str, int]] = {}
    queue = list(todo)
    done = 0
    while queue or pending:
        while queue and len(pending) < max(1, concurrency):
            tid, seed = queue.pop(0)
            # A rerun is not a sweep point: it keeps no weights (the front point keeps its own).
            seeded = dataclasses.replace(ctx, trial={**ctx.trial, "seed": seed, "keep_weights": "none"},
                                         tracking=None, report_every_epoch=False)
            ref = task.remote(configs[tid], seeded, f"{tid}-seed{seed}",
                              str(_rerun_dir(output_dir, tid, seed)), cpus)
            pending[ref] = (tid, seed)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            tid, seed = pending.pop(ref)
            row = ray.get(ref)
            reruns[(tid, seed)] = row
            done += 1
            if row.get("status") == "ok":
                text = "  ".join(f"{m} {float(row.get(m, math.nan)):.4g}" for m, _ in objectives)
                print(f"[seeds {done}/{len(todo)}] {tid} seed {seed}: {text}  "
                      f"{float(row.get('trial_wall_s', 0.0)):.1f}s", flush=True)
            else:
                print(f"[seeds {done}/{len(todo)}] {tid} seed {seed} FAILED: {row.get('error')}", flush=True)
    metrics = [m for m, _ in objectives] + [m for m in _EXTRA if m in front.columns
                                            and m not in [o for o, _ in objectives]]
    table = summarise_seeds(front, reruns, metrics, base_seed)
    cost = sum(float(r.get("trial_wall_s", 0.0)) for (t, s), r in reruns.items() if (t, s) in todo)
    _print_table(table, metrics, seeds)
    print(f"seed reruns: {len(todo)} run(s), {cost * cpus:.0f} cpu_seconds", flush=True)
    from search.storage import atomic_write_text

    atomic_write_text(front_dir / "front_seeds.csv", table.to_csv(index=False))
    if tracking:
        _log_to_mlflow(table, front, metrics, front_dir / "front_seeds.csv", tracking)
    return table


def _fmt(mean: float, std: float, metric: str) -> str:
    if math.isnan(mean):
        return "?"
    if metric.startswith(("flops", "params")):
        scale, unit = next(((s, u) for s, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(mean) >= s), (1.0, ""))
        return f"{mean / scale:.2f}{unit}" + ("" if math.isnan(std) else f" ± {std / scale:.2f}{unit}")
    return f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")


def _print_table(table: pd.DataFrame, metrics: list[str], seeds: int) -> None:
    shown = pd.DataFrame({"trial_id": table["trial_id"], "method": table["method"], "seeds": table["seeds"],
                          **{m: [_fmt(a, b, m) for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
                             for m in metrics}})
    print(f"\nPareto front over {seeds} seeds (mean ± std):")
    print(shown.to_string(index=False), flush=True)


def _log_to_mlflow(table: pd.DataFrame, front: pd.DataFrame, metrics: list[str], csv: Path,
                   tracking: dict[str, str]) -> None:
    """``seeds`` and ``<metric>_mean`` / ``<metric>_std`` on each front trial's child run."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking["uri"])  # the csv goes up with the front's folder
        run_ids = {str(t): r for t, r in zip(front["trial_id"], front.get("mlflow_run_id", [None] * len(front)))}
        for _, row in table.iterrows():
            run_id = run_ids.get(str(row["trial_id"]))
            if not isinstance(run_id, str):
                continue
            client.log_metric(run_id, "seeds", float(row["seeds"]))
            for m in metrics:
                for stat in ("mean", "std"):
                    value = float(row[f"{m}_{stat}"])
                    if math.isfinite(value):
                        client.log_metric(run_id, f"{m}_{stat}", value)
    except Exception as exc:  # the table is printed and on disk; tracking trouble must not lose it
        log.warning("could not log the seed spread to MLflow: %s", exc)
        print(f"warning: could not log the seed spread to MLflow ({exc}); it is in {csv}", flush=True)
