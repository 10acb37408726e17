"""A sweep's fixed cost and its marginal cost per trial, against a plain loop and prunelib's runner.

The same work in every trial: train ``epochs`` dense, one-shot global magnitude cut to
``sparsity``, fine-tune ``finetune_epochs``, evaluate on validation and test. Measured:

* plain: a hand-written loop over resident tensors (the floor), seconds per trial;
* runner: ``prunelib.run_pruning`` (Lightning Trainer per phase, callbacks, FLOPs counting);
* sweep: the user's command, ``python -m search +method=magnitude ...`` (Hydra, pre-flight, Ray
  Tune, Optuna, MLflow), run as a subprocess once per (concurrency, actor reuse) setting. Each
  trial's ``trial_result.json`` is written last (its mtime is when the trial's result exists);
  from those times:

  - fixed cost: command start to the first trial result (Python and package imports, Hydra,
    the pre-flight, Ray's start, the parent run, the first worker's start, imports and data,
    and the first trial itself);
  - marginal cost per trial: (last result - first result) / (trials - 1), the sweep's
    throughput once it runs (at concurrency c, c trials share the cores);
  - tail: last result to the command's exit (the front, its export and plots, Ray's shutdown).

  Actor reuse is the sweep's own setting (``reuse_actors=True``); "off" runs the same command
  with Tune's ``reuse_actors=False`` patched in, so every trial starts a fresh worker process.
  Each row also counts the worker processes that ran the trials (``worker_pid`` of the rows) and
  gives the in-trial seconds (``trial_wall_s``: data, model, training, measuring, logging) of a
  worker's first trial against those on a reused worker (imports, data and Lightning warm).

The first seconds (``--baseline REV`` adds the same sweeps run from a git worktree of ``REV``,
in the same run): each sweep's driver runs under a wrapper that notes, in seconds from the
command's start, when it got to the sweep function (imports and Hydra done), when its config was
checked (the driver of ``REV``: its whole pre-flight, data and model built in the driver), when
Ray was up, when data and model were built (this checkout: in a process of its own, while Ray
starts), when the MLflow parent run existed, and when Tune's ``fit`` began; then the
first and last trial results and the exit. ``--ray-start`` also times ``ray.init`` of a local
Ray alone, as the sweep starts it (the target "first result at most Ray's start + 3 s").

Prints tables; ratios are to the plain loop and the runner measured in this one run.

    python benchmarks/search_overhead.py --data digits --model mlp --trials 12 --baseline 35f58f3 --ray-start
    python benchmarks/search_overhead.py --data fashion_mnist --model lenet5 --limit-train 3000 \
        --epochs 2 --finetune-epochs 1 --trials 6 --baseline 35f58f3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prunelib import TrainConfig, build_method, run_pruning  # noqa: E402
from prunelib.data import build_datamodule  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.selection import select_masks  # noqa: E402
from prunelib.importance import magnitude_scores  # noqa: E402
from rows import run_meta, write_rows  # noqa: E402


def plain_trial(dm, model_name: str, epochs: int, finetune: int, sparsity: float, lr: float, seed: int) -> float:
    """One trial in plain PyTorch; returns wall seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_name, dm.input_shape, dm.num_classes)
    xtr, ytr = dm.split("train")
    bs = dm.batch_size
    masks = None

    def train(n_epochs: int) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, n_epochs))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(n_epochs):
            order = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
                if masks is not None:
                    masks.enforce(model)
            sched.step()

    train(epochs)
    masks = select_masks(model, magnitude_scores(model), sparsity)
    masks.apply(model)
    train(finetune)
    model.eval()
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = dm.split(split)
            (model(x).argmax(1) == y).float().mean().item()
    return time.perf_counter() - t0


def runner_trial(dm, model_name: str, epochs: int, finetune: int, sparsity: float, lr: float, seed: int) -> float:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_name, dm.input_shape, dm.num_classes)
    run_pruning(model, dm, build_method("magnitude", sparsity=sparsity),
                TrainConfig(epochs=epochs, finetune_epochs=finetune, lr=lr, accelerator="cpu"),
                evaluate_test=True, seed=seed)
    return time.perf_counter() - t0


# Runs the sweep command with Tune's actor reuse off (the counterfactual of the benchmark only).
_NO_REUSE = """
import runpy, sys
import ray.tune as tune
_tune_config = tune.TuneConfig
def _no_reuse(*args, **kwargs):
    kwargs["reuse_actors"] = False
    return _tune_config(*args, **kwargs)
tune.TuneConfig = _no_reuse
sys.argv = ["search", *sys.argv[1:]]
runpy.run_module("search", run_name="__main__", alter_sys=True)
"""


# Runs the sweep command with its steps timed (see the module doc): each probe wraps a function
# the driver calls and notes the time it was entered or returned from, once.
_TIMED = """
import atexit, importlib, json, runpy, sys, time
out = sys.argv.pop(1)
seen = {}
PROBES = [
    ("sweep called", "search.tuner", "run_sweep", "enter"),
    ("config checked", "search.tuner", "preflight", "exit"),
    ("Ray up", "search.tuner", "_init_ray", "exit"),
    ("Ray up", "search.ray_session", "init_ray", "exit"),
    ("data, model built", "search.preflight", "apply_build", "exit"),
    ("parent run", "search.tracking", "SweepTracker.start_parent", "exit"),
    ("fit", "ray.tune", "Tuner.fit", "enter"),
]
def probe(label, fn, when):
    def wrapped(*args, **kwargs):
        if when == "enter":
            seen.setdefault(label, time.time())
        try:
            return fn(*args, **kwargs)
        finally:
            if when == "exit":
                seen.setdefault(label, time.time())
    return wrapped
for label, module, name, when in PROBES:
    try:
        owner = importlib.import_module(module)
    except ImportError:
        continue
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, attr):
        setattr(owner, attr, probe(label, getattr(owner, attr), when))
atexit.register(lambda: open(out, "w").write(json.dumps(seen)))
sys.argv = ["search", *sys.argv[1:]]
runpy.run_module("search", run_name="__main__", alter_sys=True)
"""

#: The columns of the first-seconds table, in order.
STEPS = ("sweep called", "config checked", "Ray up", "data, model built", "parent run", "fit", "first result")


def _fresh_process_seconds(code: str, repeats: int, env: dict[str, str] | None = None) -> float:
    """Median of the seconds ``code`` prints last, each run in a fresh Python process."""
    times = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        times.append(float(proc.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def ray_start_seconds(repeats: int = 3) -> float:
    """Median seconds of ``ray.init`` of a local Ray as a sweep starts it (2 CPUs, no dashboard),
    each in a fresh process: the floor of a sweep's first result."""
    return _fresh_process_seconds("import time, logging, ray; t = time.time(); "
                                  "ray.init(address='local', include_dashboard=False, logging_level=logging.WARNING); "
                                  "print(time.time() - t); ray.shutdown()", repeats)


#: What a trial's worker imports before its first trial can train (Tune, the sweep's trial code
#: and, through it, Lightning, torchmetrics, torch._dynamo and MLflow): the module a local Ray's
#: workers import as they start.
WORKER_IMPORTS = ("search.trials.preload",)


def import_seconds(modules: tuple[str, ...], repeats: int = 3) -> float:
    """Median wall seconds of a fresh Python process that imports ``modules`` (this checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return _fresh_process_seconds(f"import time; t = time.time(); import {', '.join(modules)}; print(time.time() - t)",
                                  repeats, env)


def floor_seconds() -> dict[str, float]:
    """What bounds a sweep's first result from below, measured in fresh processes on this
    machine (median of 3): a trial's worker exists only once Ray is up, and imports
    :data:`WORKER_IMPORTS` before its first trial trains."""
    return {"lightning": import_seconds(("lightning",)), "mlflow": import_seconds(("mlflow",)),
            "worker imports": import_seconds(WORKER_IMPORTS)}


def _busy_cpu_seconds() -> float:
    """CPU seconds this machine has spent busy since boot, all cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def command_seconds(code: Path, demo: bool) -> dict[str, float]:
    """Wall seconds of ``python -m search --help``, of a pre-flight refusal (exit 2 expected) and,
    with ``demo``, of the README's demo (``./setup.sh``'s last line: ten digits trials), run with
    the package in ``code`` from an empty directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    commands = {"--help": (["--help"], 0),
                "refusal (exit 2)": (["+method=magnitude", "method.settings.sparsity=1.5"], 2)}
    if demo:
        commands["README demo"] = (["+method=magnitude"], 0)
    out = {}
    for label, (args, expected) in commands.items():
        with tempfile.TemporaryDirectory(prefix="prunesearch-cli-") as tmp:
            t0, busy0 = time.time(), _busy_cpu_seconds()
            proc = subprocess.run([sys.executable, "-m", "search", *args], cwd=tmp, env=env, capture_output=True,
                                  text=True)
            out[label] = time.time() - t0
            if label == "README demo":  # every process's CPU (Ray's, the workers'), the machine otherwise idle
                out["README demo CPU s"] = _busy_cpu_seconds() - busy0
        if proc.returncode != expected:
            raise RuntimeError(f"{label}: exit {proc.returncode}, expected {expected}:\n{proc.stderr[-2000:]}")
    return out


def worktree(rev: str) -> Path:
    """A git worktree of ``rev`` (the code the sweeps of a baseline run import)."""
    path = Path(tempfile.mkdtemp(prefix=f"prunesearch-{rev[:10]}-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def default_concurrency() -> int:
    """``concurrency`` of the default search config (conf/search/mo_tpe.yaml)."""
    import yaml

    return int(yaml.safe_load((REPO / "conf" / "search" / "mo_tpe.yaml").read_text())["concurrency"])


def _missing_results(out: Path, proc: subprocess.CompletedProcess, trials: int, found: int) -> str:
    """Keep the sweep's log and console output where they survive the temporary directory, and say
    which trials left no result (a trial that failed, or one the sweep never started)."""
    keep = Path(tempfile.mkdtemp(prefix="prunesearch-overhead-missing-"))
    (keep / "stdout.txt").write_text(proc.stdout)
    (keep / "stderr.txt").write_text(proc.stderr)
    for name in ("__main__.log", "sweep.json"):
        if (out / name).exists():
            (keep / name).write_bytes((out / name).read_bytes())
    trial_dirs = sorted(d.name for d in (out / "trials").iterdir()) if (out / "trials").exists() else []
    without = [d for d in trial_dirs if not (out / "trials" / d / "trial_result.json").exists()]
    errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if "error" in line.lower() or "failed" in line.lower()]
    return (f"expected {trials} trial results, found {found}; {len(trial_dirs)} trial folders, "
            f"without a result: {without or 'none'}; lines naming an error:\n" + "\n".join(errors[-20:])
            + f"\nthe sweep's output is kept in {keep}")


def sweep_costs(overrides: list[str], trials: int, concurrency: int, reuse: bool,
                code: Path = REPO) -> dict[str, float]:
    """Run the sweep command once (the package in ``code``); its first seconds (:data:`STEPS`),
    fixed, marginal and tail seconds from the trials' result files."""
    with tempfile.TemporaryDirectory(prefix="prunesearch-overhead-") as tmp:
        out = Path(tmp) / "out"
        steps_file = Path(tmp) / "steps.json"
        args = [*overrides, f"search.n_trials={trials}", f"search.concurrency={concurrency}",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={out}"]
        cmd = [sys.executable, "-c", _TIMED, str(steps_file), *args] if reuse else \
            [sys.executable, "-c", _NO_REUSE, *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        t_end = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"sweep command failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        files = sorted((out / "trials").glob("*/trial_result.json"), key=lambda f: f.stat().st_mtime)
        if len(files) != trials:
            raise RuntimeError(_missing_results(out, proc, trials, len(files)))
        done = [f.stat().st_mtime for f in files]
        rows = [json.loads(f.read_text()) for f in files]
        steps = {k: v - t0 for k, v in json.loads(steps_file.read_text()).items()} if steps_file.exists() else {}
        console = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.strip()]
    steps["first result"] = done[0] - t0
    first_on_worker = [float(r["trial_wall_s"]) for r in rows if int(r["worker_trials"]) == 1]
    reused = [float(r["trial_wall_s"]) for r in rows if int(r["worker_trials"]) > 1]
    return {"fixed": done[0] - t0, "marginal": (done[-1] - done[0]) / max(1, trials - 1),
            "tail": t_end - done[-1], "total": t_end - t0, "workers": len({r["worker_pid"] for r in rows}),
            "in_trial_first": statistics.mean(first_on_worker) if first_on_worker else float("nan"),
            "in_trial_reused": statistics.mean(reused) if reused else float("nan"), "steps": steps,
            "console_lines": len(console),
            "foreign_lines": [line for line in console if not _ours(line)]}


def _ours(line: str) -> bool:
    """A console line the sweep prints itself (not Tune's box, Ray's notices or a traceback)."""
    return bool(re.match(r"^(\[\d+/\d+\]|sweep |files: |tracking: |Pareto front|trial_id |\s*\S+\s+\S+\s+[\d.]+|"
                         r"  [0-9a-f]{8} |\d+ trials in|MLflow: |export one point|Optuna study|note: |$)", line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=12, help="trials per sweep")
    ap.add_argument("--baseline-trials", type=int, default=4, help="trials of the plain loop and the runner")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="sweep concurrencies to measure (default: 1 and conf/search/mo_tpe.yaml's)")
    ap.add_argument("--reuse", choices=["on", "off", "both"], default="both", help="Tune actor reuse")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also run the sweeps (actor reuse on) with the code of this git revision")
    ap.add_argument("--ray-start", action="store_true", help="time ray.init of a local Ray alone (3 runs)")
    ap.add_argument("--commands", action="store_true",
                    help="time --help, a pre-flight refusal and the README's digits demo (each code)")
    ap.add_argument("--floor", action="store_true",
                    help="time a fresh process importing Lightning, MLflow and a trial worker's modules (3 runs each)")
    ap.add_argument("--checkout-overrides", nargs="*", default=[],
                    help="overrides for this checkout's sweeps only (e.g. tracking.log_model=false "
                         "trial.keep_weights=none: without the take-home artifacts the baseline does not write)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every sweep and command this many times, the codes alternating; tables show "
                         "the median and each round's first result (this machine's speed drifts between runs)")
    ap.add_argument("--rows", type=Path, default=None,
                    help="also write the run's raw rows (.json.gz, with command, commit, machine, date) here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    if args.trials < 2:
        ap.error("--trials: at least 2 (the marginal cost is the slope between the first and last result)")
    concurrencies = args.concurrency or sorted({1, default_concurrency()})
    torch.set_num_threads(1)  # a sweep trial gets one CPU (trial.cpus=1); compare like with like
    dm = build_datamodule(args.data, limit_train=args.limit_train, batch_size=64 if args.data == "digits" else 128)
    common = (args.model, args.epochs, args.finetune_epochs, args.sparsity, args.lr)

    plain_trial(dm, *common, seed=0)  # warm-up: first-touch costs belong to no column
    plain = statistics.mean(plain_trial(dm, *common, seed=s) for s in range(args.baseline_trials))
    print(f"plain loop  : {plain:.3f} s/trial", flush=True)
    runner = statistics.mean(runner_trial(dm, *common, seed=s) for s in range(args.baseline_trials))
    print(f"prunelib run: {runner:.3f} s/trial", flush=True)

    overrides = ["+method=magnitude", f"data={args.data}", f"model={args.model}", "search.search_settings=false",
                 f"method.settings.sparsity={args.sparsity}", f"trial.epochs={args.epochs}",
                 f"trial.finetune_epochs={args.finetune_epochs}", f"trial.lr={args.lr}"] + \
        ([f"data.limit_train={args.limit_train}"] if args.limit_train else [])
    ray_start = ray_start_seconds() if args.ray_start else None
    if ray_start is not None:
        print(f"ray.init of a local Ray alone: {ray_start:.2f} s (median of 3)", flush=True)
    floor = floor_seconds() if args.floor else None
    if floor is not None:
        print("fresh-process imports (median of 3): " + ", ".join(f"{k} {v:.2f} s" for k, v in floor.items()),
              flush=True)
    codes = [("this checkout", REPO)] + ([(args.baseline, worktree(args.baseline))] if args.baseline else [])
    command_rounds: dict[str, list[dict[str, float]]] = {label: [] for label, _ in codes} if args.commands else {}
    sweeps = []
    for round_no in range(args.rounds):  # each round runs every code once: a slow spell hits both
        for label, code in codes if args.commands else []:
            times = command_seconds(code, demo=True)
            command_rounds[label].append(times)
            print(f"round {round_no}, {label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)
        for concurrency in concurrencies:
            for label, code in codes:
                for reuse in {"on": [True], "off": [False], "both": [True, False]}[args.reuse]:
                    if code != REPO and not reuse:
                        continue
                    extra = args.checkout_overrides if code == REPO else []
                    c = sweep_costs(overrides + extra, args.trials, concurrency, reuse, code)
                    print(f"round {round_no}, {label}, sweep concurrency {concurrency}, reuse "
                          f"{'on' if reuse else 'off'}: {c}", flush=True)
                    sweeps.append({"label": label, "concurrency": concurrency, "reuse": reuse, "round": round_no,
                                   "costs": c})
    commands = {label: {name: statistics.median(t[name] for t in rounds) for name in rounds[0]}
                for label, rounds in command_rounds.items()}
    settings = {"data": args.data, "model": args.model, "limit_train": args.limit_train, "epochs": args.epochs,
                "finetune_epochs": args.finetune_epochs, "trials": args.trials, "baseline": args.baseline,
                "rounds": args.rounds}
    doc = {"meta": run_meta("search_overhead.py", settings=settings, cpus=os.cpu_count()), "plain": plain,
           "runner": runner,
           "ray_start": ray_start, "floor": floor, "commands": commands, "command_rounds": command_rounds,
           "sweeps": sweeps}
    if args.rows:
        write_rows(args.rows, doc)
    print(f"\n{table_sweeps(doc)}\n\nThe first seconds (from the command's start; '-' = no such step in that code):\n"
          f"{table_first_seconds(doc)}")
    if commands:
        print(f"\nWhole commands, wall seconds:\n{table_commands(doc)}")
    if floor:
        print(f"\nThe floor of the first result:\n{table_floor(doc)}")
    for sweep in sweeps:
        if sweep["costs"]["foreign_lines"]:
            print(f"\n{sweep['label']}, concurrency {sweep['concurrency']}: lines not the sweep's own:\n  "
                  + "\n  ".join(sweep["costs"]["foreign_lines"][:12]))


def median_sweeps(doc: dict) -> list[dict]:
    """One row per code, concurrency and reuse: the median over its rounds of every number
    (each step too), with ``fixed_rounds`` (each round's first result, in order)."""
    groups: dict[tuple, list[dict]] = {}
    for sweep in doc["sweeps"]:
        groups.setdefault((sweep["label"], sweep["concurrency"], sweep["reuse"]), []).append(sweep["costs"])
    rows = []
    for (label, concurrency, reuse), costs in groups.items():
        merged = {k: statistics.median(c[k] for c in costs) for k, v in costs[0].items()
                  if isinstance(v, (int, float))}
        merged["steps"] = {k: statistics.median(c["steps"][k] for c in costs if k in c["steps"])
                           for k in costs[0]["steps"]}
        merged["foreign_lines"] = max((c["foreign_lines"] for c in costs), key=len)
        merged["fixed_rounds"] = [c["fixed"] for c in costs]
        rows.append({"label": label, "concurrency": concurrency, "reuse": reuse, "costs": merged})
    return rows


def _rounds_note(doc: dict) -> str:
    rounds = doc["meta"]["settings"].get("rounds", 1)
    return f" Median of {rounds} rounds, the codes alternating." if rounds > 1 else ""


def table_sweeps(doc: dict) -> str:
    """Fixed and marginal seconds of each sweep, against the plain loop and the runner (Markdown)."""
    st, plain, runner = doc["meta"]["settings"], doc["plain"], doc["runner"]
    lines = [f"{st['data']}/{st['model']}, {st['epochs']}+{st['finetune_epochs']} epochs"
             + (f", {st['limit_train']} train images" if st["limit_train"] else "")
             + f"; plain loop {plain:.3f} s/trial, prunelib runner {runner:.3f} s/trial (1 thread).{_rounds_note(doc)}",
             "",
             "| code | concurrency | actor reuse | trials | command -> first result s | marginal s/trial | marginal/plain "
             "| marginal/runner | last result -> exit s | total s | worker processes | in-trial s: first on a worker "
             "/ reused | console lines not the sweep's |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sweep in median_sweeps(doc):
        c = sweep["costs"]
        lines.append(f"| {sweep['label']} | {sweep['concurrency']} | {'on' if sweep['reuse'] else 'off'} | "
                     f"{st['trials']} | {c['fixed']:.1f} | {c['marginal']:.3f} | {c['marginal'] / plain:.2f} | "
                     f"{c['marginal'] / runner:.2f} | {c['tail']:.1f} | {c['total']:.1f} | {c['workers']:.0f} | "
                     f"{c['in_trial_first']:.2f} / {c['in_trial_reused']:.2f} | {len(c['foreign_lines'])} |")
    return "\n".join(lines)


def table_first_seconds(doc: dict) -> str:
    """When each sweep's driver reached each step, seconds from the command's start (Markdown)."""
    rounds = doc["meta"]["settings"].get("rounds", 1) > 1
    lines = ["| code | concurrency | " + " | ".join(STEPS) + " | exit | first result - Ray's start alone |"
             + (" first result, each round |" if rounds else ""),
             "|---|---|" + "---|" * (len(STEPS) + 2 + rounds)]
    for sweep in median_sweeps(doc):
        c = sweep["costs"]
        if not sweep["reuse"]:
            continue
        cells = [f"{c['steps'][k]:.1f}" if k in c["steps"] else "-" for k in STEPS]
        over = f"{c['fixed'] - doc['ray_start']:.1f}" if doc.get("ray_start") is not None else "-"
        each = (" " + " / ".join(f"{v:.1f}" for v in c["fixed_rounds"]) + " |") if rounds else ""
        lines.append(f"| {sweep['label']} | {sweep['concurrency']} | " + " | ".join(cells)
                     + f" | {c['total']:.1f} | {over} |" + each)
    return "\n".join(lines)


def table_commands(doc: dict) -> str:
    """Whole commands (--help, a refusal, the README demo), wall seconds per code (Markdown)."""
    commands = doc["commands"]
    if not commands:
        return "(not measured: run with --commands)"
    names = [n for n in next(iter(commands.values())) if not n.endswith("CPU s")]
    lines = [f"`ray.init` of a local Ray alone: **{doc['ray_start']:.2f} s** (median of 3)." if doc.get("ray_start")
             else "", "", "| code | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(f"{times[n]:.2f}" for n in names) + " |" for label, times in commands.items()]
    if len(commands) == 2 and all("README demo" in t for t in commands.values()):
        (new_label, new), (old_label, old) = commands.items()
        lines += ["", f"README demo, {new_label} / {old_label}: {new['README demo'] / old['README demo']:.2f}"]
    each = {label: rounds for label, rounds in doc.get("command_rounds", {}).items() if len(rounds) > 1}
    if each:
        lines += ["", f"Medians of {len(next(iter(each.values())))} rounds, the codes alternating; the README "
                  "demo in each round: " + "; ".join(f"{label} " + " / ".join(f"{t['README demo']:.1f}" for t in r)
                                                     for label, r in each.items()) + " s."]
    cpu = [(label, times) for label, times in commands.items() if "README demo CPU s" in times]
    if cpu:
        cores = doc["meta"].get("cpus") or os.cpu_count() or 1
        lines += ["", "README demo, CPU seconds of the whole machine while it ran (every process: the driver, "
                  f"Ray's, the workers'), and that work spread over its {cores} cores with none idle:", "",
                  "| code | wall s | CPU s | CPU s / cores |", "|---|---|---|---|"]
        lines += [f"| {label} | {t['README demo']:.1f} | {t['README demo CPU s']:.1f} | "
                  f"{t['README demo CPU s'] / cores:.1f} |" for label, t in cpu]
    return "\n".join(lines).strip("\n")


def table_floor(doc: dict) -> str:
    """The first result's floor on this machine: Ray's start, then a worker's imports (Markdown)."""
    floor, ray_start = doc.get("floor"), doc.get("ray_start")
    if not floor or ray_start is None:
        return "(not measured: run with --floor --ray-start)"
    firsts = [s["costs"] for s in median_sweeps(doc) if s["label"] == "this checkout" and s["reuse"]]
    first_trial = min((c["in_trial_first"] for c in firsts), default=None)
    lines = ["| seconds, fresh processes, median of 3 | |", "|---|---|",
             f"| `ray.init` of a local Ray alone | {ray_start:.2f} |",
             f"| `import lightning` | {floor['lightning']:.2f} |",
             f"| `import mlflow` | {floor['mlflow']:.2f} |",
             f"| a trial worker's imports (`import {', '.join(WORKER_IMPORTS)}`) | {floor['worker imports']:.2f} |",
             f"| Ray's start + the worker's imports: no trial can report sooner | "
             f"**{ray_start + floor['worker imports']:.2f}** |"]
    if first_trial is not None:
        lines.append(f"| ... + a worker's first trial (in-trial seconds, this run's sweeps) | "
                     f"{ray_start + floor['worker imports'] + first_trial:.2f} |")
    lines.append(f"| the issue's target: Ray's start + 3 s | {ray_start + 3:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
