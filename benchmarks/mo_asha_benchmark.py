"""Does multi-objective early stopping pay, and does searching across methods pay? (issue 16)

Every sweep is a real ``run_sweep`` (Ray Tune + Optuna MO-TPE + MLflow) on lenet5 /
Fashion-MNIST (15,000 training images, 2,400 held out for validation by default: the validation
pass per epoch that early stopping needs then costs what it would on the full data set, about a
tenth of an epoch; keep that ratio when shrinking the training set, e.g. ``--limit-train 4000
--val-fraction 0.01``: 600 validation images, scored twice per epoch under mo_asha, the model
and its projection), over the five baselines and two seed methods, under one CPU budget
(``search.budget`` in cpu_seconds: trial seconds x ``trial.cpus``, summed over trials).
Hypervolume: validation accuracy up, the exported model's FLOPs (``flops_deployed``) down, reference (0, dense FLOPs),
printed normalised by that box (1.0 = a perfect model at zero FLOPs); the same front's points
are also scored by test accuracy ("HV test").

Part ``early``: the joint sweep three ways at the same budget: no early stopping,
accuracy-only ASHA (``search.scheduler=asha``) and ``mo_asha``, same rungs. Per sweep: HV, CPU
seconds spent, HV per 1,000 CPU seconds, trials run and stopped. "At equal trials" reads the
early-stopping sweeps' first N trials (by start time), N = the trials the sweep without early
stopping ran in the budget: their HV and CPU.

Part ``joint``: each method swept alone (``+method=NAME``) with budget / number of methods and
with the whole budget, same scheduler as the joint sweep (``--joint-scheduler``). Compared:
the joint sweep (part early's, same seed and budget); the union of the split single-method
fronts (what looping over the methods with the same total budget gives); the best
single-method sweep at each budget; and which methods sit on the joint front.

Results are appended to ``--out`` (JSON) after every sweep; a rerun skips sweeps already there.

    flock /tmp/prunesearch-cpu.lock python benchmarks/mo_asha_benchmark.py --budget 360
    RAY_worker_niceness=0 python benchmarks/mo_asha_benchmark.py --budget 200 --limit-train 4000 \
        --val-fraction 0.01 --epochs 3 --finetune-epochs 1      # ~75 min on 2 cores (RESULTS.md)
    python benchmarks/mo_asha_benchmark.py --budget 40 --seeds 0 --limit-train 2000 --epochs 2 \
        --methods magnitude gmp --out /tmp/tiny.json       # a smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sampler_hypervolume import mean_sd, sweep_overrides  # noqa: E402

METHODS = ["magnitude", "random", "snip", "gmp", "imp", "bingo", "polarization"]  # five baselines, two seed methods
VARIANTS = ["none", "asha", "mo_asha"]
KEEP = ("trial_id", "method", "status", "val_acc", "test_acc", "flops_deployed", "flops_effective", "flops_dense",
        "time_total_s", "timestamp", "epochs", "epoch")
# The sweep's default FLOPs objective: the exported model's (equal to the masked count for the
# unstructured methods swept here).
FLOPS = "flops_deployed"


# -- one sweep --------------------------------------------------------------------------------

def run_one(key: str, overrides: list[str], tmp: Path) -> dict[str, Any]:
    """Run a sweep; keep what the analysis needs (rows, cost, wall seconds)."""
    from search.tuner import run_sweep
    from tests.conftest import compose

    t0 = time.perf_counter()
    sweep = run_sweep(compose(overrides), tmp / key.replace("/", "-"))
    return {"rows": [{k: r.get(k) for k in KEEP if k in r} for r in sweep.rows], "cost": sweep.cost,
            "budget_spent": sweep.budget_spent, "wall_s": time.perf_counter() - t0, "overrides": overrides}


# -- analysis ---------------------------------------------------------------------------------

def _dense(rows: list[dict]) -> float:
    return max(float(r["flops_dense"]) for r in rows if r.get("flops_dense"))


def front_of(rows: list[dict]):
    from search import pareto

    ok = [r for r in rows if r.get("status") == "ok"]
    return pareto.pareto_front(ok, [("val_acc", "max"), (FLOPS, "min")]) if ok else None


def hv_of(rows: list[dict], dense: float, acc: str = "val_acc") -> float:
    """Normalised hypervolume of the validation front of ``rows`` (scored by ``acc``)."""
    from search import pareto

    front = front_of(rows)
    if front is None or front.empty:
        return 0.0
    pts = front[[acc, FLOPS]].astype(float).to_numpy()
    return pareto.hypervolume(pts, ["max", "min"], [0.0, dense]) / dense


def cpu_of(rows: list[dict], cpus: float = 1.0) -> float:
    return cpus * sum(float(r.get("time_total_s") or 0.0) for r in rows)


def cpu_to_reach(rows: list[dict], target: float) -> float | None:
    """CPU seconds (summed run time of the trials ended so far, in end order) at which the
    front's normalised HV first reaches ``target``; None if it never does."""
    dense = _dense(rows)
    ended = sorted(rows, key=lambda r: float(r.get("timestamp") or 0))
    spent = 0.0
    for i, row in enumerate(ended, 1):
        spent += float(row.get("time_total_s") or 0.0)
        if row.get("status") == "ok" and hv_of(ended[:i], dense) >= target - 1e-12:
            return spent
    return None


def first_trials(rows: list[dict], n: int) -> list[dict]:
    """The ``n`` trials that started first (start = end timestamp - run time)."""
    started = sorted(rows, key=lambda r: float(r.get("timestamp") or 0) - float(r.get("time_total_s") or 0))
    return started[:n]


def summary(rec: dict) -> dict[str, float]:
    rows = rec["rows"]
    dense = _dense(rows)
    cpu = rec["cost"]["cpu_seconds"]
    hv = hv_of(rows, dense)
    return {"hv": hv, "hv_test": hv_of(rows, dense, "test_acc"), "cpu": cpu, "hv_per_kcpu": 1000 * hv / cpu,
            "trials": len(rows), "stopped": sum(r.get("status") == "early_stopped" for r in rows),
            "failed": sum(r.get("status") == "failed" for r in rows), "epochs": rec["cost"]["trial_epochs"]}


def _ratio_cells(num: list[float], den: list[float]) -> str:
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    return mean_sd(ratios, ".3f") if ratios else "n/a"


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    seeds, methods = args.seeds, args.methods
    n_methods = len(methods)
    print(f"\n### {args.model} / {args.data}, limit_train={args.limit_train}, val_fraction={args.val_fraction}, "
          f"{args.epochs}+{args.finetune_epochs} epochs, "
          f"budget {args.budget:g} cpu_seconds, rungs grace {args.grace_period} x {args.reduction_factor:g}, "
          f"concurrency {args.concurrency}, seeds {seeds}; methods {', '.join(methods)}")

    early = {(v, s): results.get(f"early/{v}/seed{s}") for v in VARIANTS for s in seeds}
    if all(early.values()):
        stats = {k: summary(rec) for k, rec in early.items()}
        print("\n(a) equal CPU budget (mean ± sd over seeds)\n")
        print("| early stopping | HV (val) | HV (test) | CPU s spent | HV per 1000 CPU s | trials | stopped early | trial-epochs |")
        print("|---|---|---|---|---|---|---|---|")
        for v in VARIANTS:
            col = lambda k: [stats[(v, s)][k] for s in seeds]  # noqa: E731
            print(f"| {v} | {mean_sd(col('hv'))} | {mean_sd(col('hv_test'))} | {mean_sd(col('cpu'), '.0f')} | "
                  f"{mean_sd(col('hv_per_kcpu'), '.3f')} | {mean_sd(col('trials'), '.1f')} | "
                  f"{mean_sd(col('stopped'), '.1f')} | {mean_sd(col('epochs'), '.0f')} |")
        per = {v: [stats[(v, s)]["hv_per_kcpu"] for s in seeds] for v in VARIANTS}
        hv = {v: [stats[(v, s)]["hv"] for s in seeds] for v in VARIANTS}
        print(f"| mo_asha / none | HV {_ratio_cells(hv['mo_asha'], hv['none'])} | | | "
              f"{_ratio_cells(per['mo_asha'], per['none'])} | | | |")
        print(f"| mo_asha / asha | HV {_ratio_cells(hv['mo_asha'], hv['asha'])} | | | "
              f"{_ratio_cells(per['mo_asha'], per['asha'])} | | | |")

        print("\n(b) equal trials: the first N trials of each sweep, N = the trials without early stopping ran\n")
        print("| early stopping | N | HV (val) | CPU s | HV per 1000 CPU s |")
        print("|---|---|---|---|---|")
        eq: dict[str, list[float]] = {}
        for v in VARIANTS:
            hvs, cpus, pers, ns = [], [], [], []
            for s in seeds:
                n = len(early[("none", s)]["rows"])
                rows = first_trials(early[(v, s)]["rows"], n)
                h, c = hv_of(rows, _dense(early[(v, s)]["rows"])), cpu_of(rows)
                hvs.append(h), cpus.append(c), pers.append(1000 * h / c), ns.append(len(rows))
            eq[v] = pers
            print(f"| {v} | {mean_sd(ns, '.1f')} | {mean_sd(hvs)} | {mean_sd(cpus, '.0f')} | {mean_sd(pers, '.3f')} |")
        print(f"| mo_asha / none | | | | {_ratio_cells(eq['mo_asha'], eq['none'])} |")
        print(f"| mo_asha / asha | | | | {_ratio_cells(eq['mo_asha'], eq['asha'])} |")

        print("\n(c) CPU seconds until the front's HV first reaches the final HV of the sweep without early "
              "stopping (same seed); trials in order of their end, CPU = their summed run time\n")
        print("| early stopping | CPU s to that HV, per seed | reached | mean over the seeds that reached it |")
        print("|---|---|---|---|")
        for v in VARIANTS:
            need = [cpu_to_reach(early[(v, s)]["rows"], hv_of(early[("none", s)]["rows"],
                                                              _dense(early[("none", s)]["rows"]))) for s in seeds]
            got = [c for c in need if c is not None]
            print(f"| {v} | {', '.join('never' if c is None else f'{c:.0f}' for c in need)} | {len(got)}/{len(seeds)} "
                  f"| {mean_sd(got, '.0f') if got else 'n/a'} |")

    joint = {s: results.get(f"early/{args.joint_scheduler}/seed{s}") for s in seeds}
    split = {(m, s): results.get(f"single/{m}/split/seed{s}") for m in methods for s in seeds}
    whole = {(m, s): results.get(f"single/{m}/whole/seed{s}") for m in methods for s in seeds}
    if all(joint.values()) and all(split.values()) and all(whole.values()):
        print(f"\n(d) joint search vs single-method sweeps, {args.joint_scheduler}, HV (val) mean ± sd\n")
        print("| sweep | budget each | total budget | HV (val) | HV (test) |")
        print("|---|---|---|---|---|")

        def row(label: str, each: str, total: str, recs: list[list[dict]]) -> list[float]:
            hvs = [hv_of(rows, _dense(rows)) for rows in recs]
            tests = [hv_of(rows, _dense(rows), "test_acc") for rows in recs]
            print(f"| {label} | {each} | {total} | {mean_sd(hvs)} | {mean_sd(tests)} |")
            return hvs

        b, bs = f"{args.budget:g}", f"{args.budget / n_methods:.0f}"
        j = row("joint (all methods)", b, b, [joint[s]["rows"] for s in seeds])
        u = row(f"union of the {n_methods} split single-method fronts", bs, b,
                [[r for m in methods for r in split[(m, s)]["rows"]] for s in seeds])
        for m in methods:
            row(f"{m} alone", bs, bs, [split[(m, s)]["rows"] for s in seeds])
        for m in methods:
            row(f"{m} alone", b, b, [whole[(m, s)]["rows"] for s in seeds])
        best_split = [max(hv_of(split[(m, s)]["rows"], _dense(split[(m, s)]["rows"])) for m in methods) for s in seeds]
        best_whole = [max(hv_of(whole[(m, s)]["rows"], _dense(whole[(m, s)]["rows"])) for m in methods) for s in seeds]
        which = [max(methods, key=lambda m, s=s: hv_of(whole[(m, s)]["rows"], _dense(whole[(m, s)]["rows"])))
                 for s in seeds]
        print(f"| best single method per seed (split budget) | {bs} | {bs} | {mean_sd(best_split)} | |")
        print(f"| best single method per seed (whole budget: {', '.join(which)}) | {b} | {b} | {mean_sd(best_whole)} | |")
        print(f"\njoint / union of split fronts: {_ratio_cells(j, u)}; joint / best single (whole budget, "
              f"picked after the fact): {_ratio_cells(j, best_whole)}; joint / best single (split): "
              f"{_ratio_cells(j, best_split)}")
        counts: Counter = Counter()
        per_seed = []
        for s in seeds:
            front = front_of(joint[s]["rows"])
            c = Counter(front["method"]) if front is not None else Counter()
            counts.update(c)
            per_seed.append(", ".join(f"{m} {n}" for m, n in c.most_common()))
        print("\nmethods on the joint front (points, all seeds): "
              + ", ".join(f"{m} {n}" for m, n in counts.most_common()))
        for s, text in zip(seeds, per_seed):
            print(f"  seed {s}: {text}")


# -- driver -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["early", "joint"], choices=["early", "joint"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=360.0, help="cpu_seconds per sweep (the joint one)")
    ap.add_argument("--max-trials", type=int, default=400, help="search.n_trials (a cap; the budget binds)")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--limit-train", type=int, default=15000)
    ap.add_argument("--val-fraction", type=float, default=0.04,
                    help="validation share of the 60k training images (the default 0.1 = 6,000 would cost "
                         "more per epoch than a subset's training; scale it with --limit-train)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--grace-period", type=int, default=2, help="search.asha.grace_period (the default of conf/search)")
    ap.add_argument("--reduction-factor", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--joint-scheduler", default="mo_asha", choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=Path("mo_asha_benchmark.json"))
    ap.add_argument("--report-only", action="store_true", help="print the tables from --out and exit")
    args = ap.parse_args()

    results: dict[str, dict] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.report_only:
        report(results, args)
        return

    import ray

    plan: list[tuple[str, float, list[str]]] = []  # (key, budget, overrides)
    common = [f"search.n_trials={args.max_trials}", "search.budget.unit=cpu_seconds",
              f"data.val_fraction={args.val_fraction}",
              f"search.asha.grace_period={args.grace_period}", f"search.asha.reduction_factor={args.reduction_factor}"]
    for s in args.seeds:  # variants interleaved: a busier stretch of the shared machine hits all of them
        if "early" in args.parts:
            for v in VARIANTS:
                plan.append((f"early/{v}/seed{s}", args.budget, [f"search.methods=[{','.join(args.methods)}]",
                                                                 f"search.seed={s}", f"trial.seed={s}",
                                                                 f"search.scheduler={v}", *common]))
    for s in args.seeds:
        if "joint" in args.parts:
            for m in args.methods:
                for label, amount in (("split", args.budget / len(args.methods)), ("whole", args.budget)):
                    plan.append((f"single/{m}/{label}/seed{s}", amount, [f"+method={m}", f"search.seed={s}",
                                                                        f"trial.seed={s}",
                                                                        f"search.scheduler={args.joint_scheduler}",
                                                                        *common]))
    todo = [(k, b, o) for k, b, o in plan if k not in results]
    print(f"{len(plan)} sweeps ({len(plan) - len(todo)} already in {args.out}); about "
          f"{sum(b for _, b, _ in todo) / args.concurrency / 60:.0f} min of trials at {args.concurrency} at once",
          flush=True)
    ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for i, (key, amount, extra) in enumerate(todo, 1):
            name = key.replace("/", "-")
            overrides = [*extra, f"search.budget.amount={amount}", *sweep_overrides(args.data, args.model, args.limit_train, args.epochs,
                                                  args.finetune_epochs, args.concurrency, uri, name)]
            print(f"\n== [{i}/{len(todo)}] {key}", flush=True)
            results[key] = run_one(key, overrides, Path(tmp))
            args.out.write_text(json.dumps(results))
            st = summary(results[key])
            print(f"== [{i}/{len(todo)}] {key}: HV {st['hv']:.4f} (test {st['hv_test']:.4f}), {st['cpu']:.0f} cpu_s, "
                  f"{st['trials']} trials ({st['stopped']} stopped, {st['failed']} failed), "
                  f"{results[key]['wall_s']:.0f}s wall; {time.perf_counter() - start:.0f}s so far", flush=True)
    ray.shutdown()
    report(results, args)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    main()
