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
from rows import read_rows, run_meta, write_rows  # noqa: E402

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


def _settings(doc: dict[str, Any]) -> dict[str, Any]:
    """The run's settings (seeds, methods, budget, ...) as the rows file records them."""
    return doc["meta"]["settings"]


def _early(doc: dict[str, Any]) -> dict[tuple[str, int], dict] | None:
    sweeps, seeds = doc["sweeps"], _settings(doc)["seeds"]
    early = {(v, s): sweeps.get(f"early/{v}/seed{s}") for v in VARIANTS for s in seeds}
    return early if all(early.values()) else None


def table_equal_budget(doc: dict[str, Any]) -> str:
    """(a) The joint sweep three ways at one CPU budget, mean ± sd over seeds (Markdown)."""
    early, seeds = _early(doc), _settings(doc)["seeds"]
    if early is None:
        return "(a) not run: part early is incomplete"
    stats = {k: summary(rec) for k, rec in early.items()}
    lines = ["| early stopping | HV (val) | HV (test) | CPU s spent | HV per 1000 CPU s | trials | stopped early "
             "| trial-epochs |", "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        col = lambda k: [stats[(v, s)][k] for s in seeds]  # noqa: E731
        lines.append(f"| {v} | {mean_sd(col('hv'))} | {mean_sd(col('hv_test'))} | {mean_sd(col('cpu'), '.0f')} | "
                     f"{mean_sd(col('hv_per_kcpu'), '.3f')} | {mean_sd(col('trials'), '.1f')} | "
                     f"{mean_sd(col('stopped'), '.1f')} | {mean_sd(col('epochs'), '.0f')} |")
    per = {v: [stats[(v, s)]["hv_per_kcpu"] for s in seeds] for v in VARIANTS}
    hv = {v: [stats[(v, s)]["hv"] for s in seeds] for v in VARIANTS}
    for other in ("none", "asha"):
        lines.append(f"| mo_asha / {other} | {_ratio_cells(hv['mo_asha'], hv[other])} | | | "
                     f"**{_ratio_cells(per['mo_asha'], per[other])}** | | | |")
    return "\n".join(lines)


def table_equal_trials(doc: dict[str, Any]) -> str:
    """(b) The first N trials of each sweep, N = the trials the sweep without early stopping ran."""
    early, seeds = _early(doc), _settings(doc)["seeds"]
    if early is None:
        return "(b) not run: part early is incomplete"
    lines = ["| early stopping | N | HV (val) | CPU s | HV per 1000 CPU s |", "|---|---|---|---|---|"]
    eq: dict[str, list[float]] = {}
    for v in VARIANTS:
        hvs, cpus, pers, ns = [], [], [], []
        for s in seeds:
            rows = first_trials(early[(v, s)]["rows"], len(early[("none", s)]["rows"]))
            h, c = hv_of(rows, _dense(early[(v, s)]["rows"])), cpu_of(rows)
            hvs.append(h), cpus.append(c), pers.append(1000 * h / c), ns.append(len(rows))
        eq[v] = pers
        lines.append(f"| {v} | {mean_sd(ns, '.1f')} | {mean_sd(hvs)} | {mean_sd(cpus, '.0f')} | {mean_sd(pers, '.3f')} |")
    for other in ("none", "asha"):
        lines.append(f"| mo_asha / {other} | | | | **{_ratio_cells(eq['mo_asha'], eq[other])}** |")
    return "\n".join(lines)


def table_time_to_hv(doc: dict[str, Any]) -> str:
    """(c) CPU seconds until a sweep's front first reaches the final HV of the same seed's sweep
    without early stopping (trials in order of their end, CPU = their summed run time)."""
    early, seeds = _early(doc), _settings(doc)["seeds"]
    if early is None:
        return "(c) not run: part early is incomplete"
    lines = ["| early stopping | final HV, per seed | target (none's final HV) | CPU s to the target, per seed "
             "| reached |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        target = [hv_of(early[("none", s)]["rows"], _dense(early[("none", s)]["rows"])) for s in seeds]
        final = [hv_of(early[(v, s)]["rows"], _dense(early[(v, s)]["rows"])) for s in seeds]
        need = [cpu_to_reach(early[(v, s)]["rows"], t) for s, t in zip(seeds, target)]
        lines.append(f"| {v} | {' / '.join(f'{h:.4f}' for h in final)} | {' / '.join(f'{t:.4f}' for t in target)} | "
                     f"{', '.join('never' if c is None else f'{c:.0f}' for c in need)} | "
                     f"{sum(c is not None for c in need)}/{len(seeds)} |")
    return "\n".join(lines)


def table_joint(doc: dict[str, Any]) -> str:
    """(d) The joint search against each method swept alone with budget / methods and with the
    whole budget (HV mean ± sd; CPU s actually spent, summed over a row's sweeps, per seed)."""
    st = _settings(doc)
    sweeps, seeds, methods, sched = doc["sweeps"], st["seeds"], st["methods"], st["joint_scheduler"]
    joint = {s: sweeps.get(f"early/{sched}/seed{s}") for s in seeds}
    split = {(m, s): sweeps.get(f"single/{m}/split/seed{s}") for m in methods for s in seeds}
    whole = {(m, s): sweeps.get(f"single/{m}/whole/seed{s}") for m in methods for s in seeds}
    if not (all(joint.values()) and all(split.values()) and all(whole.values())):
        return "(d) not run: part joint is incomplete"
    lines = ["| sweep | budget each | CPU s spent (per seed) | HV (val) | HV (test) |", "|---|---|---|---|---|"]

    def row(label: str, each: str, recs: list[list[dict]]) -> list[float]:
        rows = [[r for rec in group for r in rec["rows"]] for group in recs]
        hvs = [hv_of(r, _dense(r)) for r in rows]
        tests = [hv_of(r, _dense(r), "test_acc") for r in rows]
        cpu = mean_sd([sum(rec["cost"]["cpu_seconds"] for rec in group) for group in recs], ".0f")
        lines.append(f"| {label} | {each} | {cpu} | {mean_sd(hvs)} | {mean_sd(tests)} |")
        return hvs

    b, bs = f"{st['budget']:g}", f"{st['budget'] / len(methods):.0f}"
    j = row(f"joint (all {len(methods)} methods)", b, [[joint[s]] for s in seeds])
    u = row(f"union of the {len(methods)} split single-method fronts", bs,
            [[split[(m, s)] for m in methods] for s in seeds])
    for label, each, table in (("split", bs, split), ("whole", b, whole)):
        for m in methods:
            row(f"{m} alone ({label})", each, [[table[(m, s)]] for s in seeds])
    hv = lambda rec: hv_of(rec["rows"], _dense(rec["rows"]))  # noqa: E731
    best_split = [max(hv(split[(m, s)]) for m in methods) for s in seeds]
    best_whole = [max(hv(whole[(m, s)]) for m in methods) for s in seeds]
    which = [max(methods, key=lambda m, s=s: hv(whole[(m, s)])) for s in seeds]
    which_split = [max(methods, key=lambda m, s=s: hv(split[(m, s)])) for s in seeds]
    lines.append(f"| best single method per seed, split ({', '.join(which_split)}) | {bs} | | {mean_sd(best_split)} | |")
    lines.append(f"| best single method per seed, whole budget ({', '.join(which)}; picked after the fact) | {b} | "
                 f"| {mean_sd(best_whole)} | |")
    counts: Counter = Counter()
    per_seed = []
    for s in seeds:
        front = front_of(joint[s]["rows"])
        c = Counter(front["method"]) if front is not None else Counter()
        counts.update(c)
        per_seed.append(f"seed {s}: " + ", ".join(f"{m} {n}" for m, n in c.most_common()))
    lines += ["", f"Joint / union of the split fronts **{_ratio_cells(j, u)}**; joint / best split single method "
              f"{_ratio_cells(j, best_split)}; joint / best single method with the whole budget (known only after "
              f"running all {len(methods)}) **{_ratio_cells(j, best_whole)}**. Methods on the joint front (points, "
              f"all seeds): " + ", ".join(f"{m} {n}" for m, n in counts.most_common()) + f" ({'; '.join(per_seed)})."]
    return "\n".join(lines)


def report(doc: dict[str, Any]) -> None:
    """Print every table of the run (the ones RESULTS.md shows, from the same functions)."""
    st = _settings(doc)
    print(f"\n### {st['model']} / {st['data']}, limit_train={st['limit_train']}, val_fraction={st['val_fraction']}, "
          f"{st['epochs']}+{st['finetune_epochs']} epochs, budget {st['budget']:g} cpu_seconds, rungs grace "
          f"{st['grace_period']} x {st['reduction_factor']:g}, concurrency {st['concurrency']}, seeds {st['seeds']}; "
          f"methods {', '.join(st['methods'])}")
    for title, fn in (("(a) equal CPU budget (mean ± sd over seeds)", table_equal_budget),
                      ("(b) equal trials", table_equal_trials), ("(c) CPU seconds to the HV of no early stopping",
                                                                 table_time_to_hv),
                      (f"(d) joint search vs single-method sweeps, {st['joint_scheduler']}", table_joint)):
        print(f"\n{title}\n\n{fn(doc)}")


SETTINGS = ("seeds", "methods", "budget", "data", "model", "limit_train", "val_fraction", "epochs", "finetune_epochs",
            "grace_period", "reduction_factor", "concurrency", "joint_scheduler")


def load_doc(path: Path) -> dict[str, Any]:
    """The run's document ``{"meta": {...}, "sweeps": {key: record}}`` (``.json`` or ``.json.gz``)."""
    if not path.is_file():
        return {"meta": {}, "sweeps": {}}
    return read_rows(path)


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
    ap.add_argument("--out", type=Path, default=Path("mo_asha_benchmark.json.gz"),
                    help="the rows file: {meta, sweeps}; .json.gz is what benchmarks/results/ holds")
    ap.add_argument("--report-only", action="store_true", help="print the tables from --out and exit")
    args = ap.parse_args()

    doc = load_doc(args.out)
    if args.report_only:
        report(doc)
        return
    if not doc["meta"]:
        doc["meta"] = run_meta("mo_asha_benchmark.py", settings={k: getattr(args, k) for k in SETTINGS})
    results: dict[str, dict] = doc["sweeps"]

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
            write_rows(args.out, doc)
            st = summary(results[key])
            print(f"== [{i}/{len(todo)}] {key}: HV {st['hv']:.4f} (test {st['hv_test']:.4f}), {st['cpu']:.0f} cpu_s, "
                  f"{st['trials']} trials ({st['stopped']} stopped, {st['failed']} failed), "
                  f"{results[key]['wall_s']:.0f}s wall; {time.perf_counter() - start:.0f}s so far", flush=True)
    ray.shutdown()
    report(doc)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    main()
