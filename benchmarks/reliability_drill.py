"""Reliability drill: inject faults into a real sweep and count what happened to every trial.

    python benchmarks/reliability_drill.py --trials 12 --out benchmarks/out/reliability

Part 1 runs ``python -m search`` with ``trial.faults`` (raise, NaN, out of memory, worker
killed) and reads the outcome of each faulty trial back from MLflow and from Optuna's study.
Part 2 feeds bad inputs to the CLI and checks each stops before any trial with one message.
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BAD_INPUTS = {
    "unknown method": ["+method=nonexistent"],
    "unknown model": ["model=nonexistent"],
    "sparsity 1.5": ["+method=magnitude", "method.settings.sparsity=1.5"],
    "negative epochs": ["trial.epochs=-1"],
    "missing data set": ["data=fashion_mnist", "data.root=/nonexistent/fashion"],
    "bad fault plan": ["+trial.faults.plan=x:boom", "+trial.faults.state_dir=/tmp/x"],
}


def _plan(n_trials: int) -> dict[int, str]:
    kinds = ["raise", "nan", "oom", "kill"]
    # Every other trial from the 2nd gets a fault, cycling through the kinds.
    return {ordinal: kinds[i % len(kinds)] for i, ordinal in enumerate(range(2, n_trials + 1, 2))}


def _reason(error: str | None) -> str:
    """``pkg.mod.SomeError: trial ab12 (..): message`` -> ``SomeError: message`` (groupable)."""
    if not error:
        return "none"
    last = error.strip().splitlines()[-1]
    cls, _, message = last.partition(": ")
    message = re.sub(r"trial (#\d+ )?(\(\w+\)|\w+):? ?", "", message)
    return f"{cls.rsplit('.', 1)[-1]}: {message[:60]}"


def fault_drill(out: Path, n_trials: int) -> list[dict]:
    from ray.tune.search.optuna import OptunaSearch

    from search.tracking import find_trial_runs

    plan = _plan(n_trials)
    plan_text = ",".join(f"{o}:{k}" for o, k in plan.items())
    uri = f"sqlite:///{out}/mlflow.db"
    cmd = [sys.executable, "-m", "search", "+method=magnitude", f"search.n_trials={n_trials}",
           "search.concurrency=2", "trial.max_retries=1", "trial.epochs=3", "trial.finetune_epochs=1",
           f"+trial.faults.plan='{plan_text}'", f"+trial.faults.state_dir={out}/faults",
           f"hydra.run.dir={out}/run", f"tracking.uri={uri}"]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(proc.stdout[-2500:], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"the sweep itself failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    state = json.loads((out / "run" / "sweep.json").read_text())
    runs = find_trial_runs(uri, state["parent_run_id"])
    by_trial = {r["trial_id"]: r for r in runs}
    ordinals = {int(p.name.split("-")[1]): p.read_text() for p in (out / "faults").glob("ordinal-*")}
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(next((out / "run" / "ray").iterdir())))
    optuna_states = Counter(t.state.name for t in searcher._ot_study.trials)

    rows = []
    for kind in ("raise", "nan", "oom", "kill"):
        targets = [ordinals[o] for o, k in plan.items() if k == kind and o in ordinals]
        outcomes = Counter()
        for tid in targets:
            run = by_trial.get(tid)
            attempts = len((out / "faults" / f"attempts-{tid}").read_text())
            if run is None:
                outcomes["missing from MLflow"] += 1
            elif run["status"] == "ok":
                outcomes[f"finished after {attempts} attempts"] += 1
            else:
                outcomes[f"FAILED, reason recorded: {_reason(run['error'])}"] += 1
        rows.append({"fault": kind, "injected": len(targets), "outcomes": dict(outcomes)})
    clean = [ordinals[o] for o in ordinals if o not in plan]
    rows.append({"fault": "none", "injected": len(clean),
                 "outcomes": dict(Counter("finished" if by_trial.get(t, {}).get("status") == "ok" else "LOST"
                                          for t in clean))})
    ids = [r["trial_id"] for r in runs]
    summary = {"trials": n_trials, "child_runs": len(runs), "duplicates": len(ids) - len(set(ids)),
               "optuna": dict(optuna_states), "wall_s": round(wall, 1),
               "front": len(list((out / "run" / "front").glob("*.safetensors")))}
    return rows, summary


def bad_input_drill(out: Path) -> list[dict]:
    rows = []
    for name, overrides in BAD_INPUTS.items():
        case = out / "bad" / name.replace(" ", "_")
        case.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "search", *overrides, f"hydra.run.dir={case}/run",
                               f"tracking.uri=sqlite:///{case}/mlflow.db"], cwd=case, capture_output=True,
                              text=True, timeout=300)
        text = (proc.stdout + proc.stderr).strip()
        message = next((line for line in text.splitlines() if "error" in line.lower() or "Could not" in line),
                       text.splitlines()[0] if text else "")
        rows.append({"input": name, "exit": proc.returncode, "traceback": "Traceback" in text,
                     "trial_started": (case / "run" / "ray").exists(),
                     "tracked": (case / "mlflow.db").exists(), "message": message[:110]})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "reliability")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    faults, summary = fault_drill(out, args.trials)
    bad = bad_input_drill(out)

    print("\n| fault injected | trials | outcome |\n|---|---|---|")
    for row in faults:
        print(f"| {row['fault']} | {row['injected']} | "
              + "; ".join(f"{n}x {o}" for o, n in row["outcomes"].items()) + " |")
    print(f"\nsweep: {summary['trials']} trials, {summary['child_runs']} MLflow child runs, "
          f"{summary['duplicates']} duplicated, Optuna states {summary['optuna']}, "
          f"{summary['front']} front points exported, {summary['wall_s']} s")
    print("\n| bad input | exit | trial started | tracked | traceback | message |\n|---|---|---|---|---|---|")
    for row in bad:
        print(f"| {row['input']} | {row['exit']} | {row['trial_started']} | {row['tracked']} | "
              f"{row['traceback']} | `{row['message']}` |")


if __name__ == "__main__":
    main()
