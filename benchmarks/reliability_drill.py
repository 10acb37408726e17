"""Reliability drill: bad inputs, faults, killed drivers, rival drivers, racing stores, bad exports.

    python benchmarks/reliability_drill.py --trials 12 --out benchmarks/out/reliability

Each case is tried against the real code and classified:

- **refused before Ray**: a bad input stopped in the pre-flight with one line naming the key
  (exit 2 on the command line), nothing tracked, no Ray started, no trial files;
- **recovered**: a fault happened and the sweep still produced every trial's result exactly
  once (a retried dead worker, a resumed sweep after ``kill -9``, a refused rival driver that
  left the running sweep intact, a store created by racing sweeps, an export refused cleanly
  with ``out=`` intact, failures recorded with their reason);
- **lost**: a trial result that neither MLflow nor its ``trial_result.json`` holds, a trial
  run to the end twice, a half-written file, a parent run left RUNNING, or a bad input that
  got past the pre-flight. Target: 0.

Parts: (1) every bad input of ``tests/test_preflight.py``'s table, in-process, plus three
through the CLI; (2) a sweep with injected faults (raise, NaN, out of memory, worker killed);
(3) ``kill -9`` of the driver just after a trial finished and again mid-trial, a rival driver
meanwhile, then resume; (4) every trial failing; (5) three sweeps starting at once on one
fresh store; (6) exports against a dead server, a wrong SQLite path, a corrupt artifact and an
unwritable ``out=``; (7, ``identity``) resumes with another config or store, corrupt
``sweep.json``, in-memory and file stores, Hydra errors, two sweeps with one name; (8, ``data``)
bad data through the CLI (a stray test label, one class, a negative label, a lying ``__len__``)
and deterministic failures with retries allowed (raise and NaN run once, a killed worker is
retried); (9, ``storage``) a sweep on a full disk (a real small tmpfs when mounting is allowed,
else the ``enospc`` fault) and its resume, a front point whose trial folder is gone, export
names and a missing artifact, the dashboard over a malformed tag and mistyped stores.
Prints the Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from rows import read_rows, run_meta, write_rows  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
FAST = ["trial.epochs=3", "trial.finetune_epochs=1", "data.limit_train=600"]
CLI_BAD = {
    "model target does not import": ["model=custom", "model._target_=no_such_pkg_xyz.Net"],
    "objective not reported": ["+method=magnitude", "search.objectives=[{metric: val_fgsm_acc, mode: max}]"],
    "unknown trial key": ["+trial.epoch=3"],
}


def _reason(error: str | None) -> str:
    """``pkg.mod.SomeError: trial ab12 (..): message`` -> ``SomeError: message`` (groupable)."""
    if not error:
        return "none"
    last = [line for line in error.strip().splitlines() if line.strip() and not set(line.strip()) <= set("^~ ")][-1]
    cls, _, message = last.partition(": ")
    message = re.sub(r"trial (#\d+ )?(\(\w+\)|\w+):? ?", "", message)
    return f"{cls.rsplit('.', 1)[-1]}: {message[:60]}"


def _sweep(out: Path, *extra: str, n_trials: int = 6, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "search", "+method=magnitude", f"search.n_trials={n_trials}", "search.concurrency=1",
            f"trial.epochs={epochs}", "trial.finetune_epochs=1", "data.limit_train=600", "cluster.num_cpus=2",
            f"hydra.run.dir={out}/run", f"tracking.uri=sqlite:///{out}/mlflow.db", *extra]


def bad_inputs(out: Path) -> dict:
    """Every case of the pre-flight table, in-process, and three through the CLI."""
    import ray

    from search.space import ConfigError
    from search.tuner import run_sweep
    from tests.conftest import compose
    from tests.test_preflight import CASES

    refused, lost, examples, tracebacks = 0, [], [], 0
    for name, overrides, mutations, fragment in CASES:
        case = out / "bad" / re.sub(r"\W+", "_", name)
        case.mkdir(parents=True)
        cfg = compose([*overrides, f"tracking.uri=sqlite:///{case}/mlflow.db"])
        for mutate in mutations:
            mutate(cfg, case)
        try:
            run_sweep(cfg, case / "out")
            lost.append(f"{name}: not refused")
        except ConfigError as exc:
            clean = "\n" not in str(exc) and fragment in str(exc) and not ray.is_initialized() and \
                not (case / "mlflow.db").exists() and not (case / "out" / "ray").exists()
            refused += clean
            if not clean:
                lost.append(f"{name}: refused, but {str(exc)[:80]!r}")
            examples.append((name, str(exc)))
        if ray.is_initialized():
            ray.shutdown()
    for name, overrides in CLI_BAD.items():
        case = out / "bad_cli" / re.sub(r"\W+", "_", name)
        case.mkdir(parents=True)
        proc = subprocess.run([sys.executable, "-m", "search", *overrides, f"hydra.run.dir={case}/run",
                               f"tracking.uri=sqlite:///{case}/mlflow.db"], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
        tracebacks += _tracebacks(proc.stdout, proc.stderr)
        clean = proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout and \
            not (case / "mlflow.db").exists() and not (case / "run" / "ray").exists()
        refused += clean
        if not clean:
            lost.append(f"CLI {name}: exit {proc.returncode}")
    return {"case": "bad inputs (pre-flight table + 3 via the CLI)", "tried": len(CASES) + len(CLI_BAD),
            "refused": refused, "recovered": 0, "lost": len(lost), "mixed": 0, "tracebacks": tracebacks,
            "notes": lost, "examples": examples}


def faults(out: Path, n_trials: int) -> dict:
    """Injected raise / NaN / OOM / worker kill: failures recorded with their reason, the kill retried."""
    from search.tracking import find_trial_runs

    kinds = ["raise", "nan", "oom", "kill"]
    plan = {o: kinds[i % len(kinds)] for i, o in enumerate(range(2, n_trials + 1, 2))}
    case = out / "faults"
    case.mkdir()
    cmd = _sweep(case, "search.concurrency=2", "trial.max_retries=1", f"+trial.faults.state_dir={case}/faults",
                 "+trial.faults.plan='" + ",".join(f"{o}:{k}" for o, k in plan.items()) + "'", n_trials=n_trials)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=case, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    state = json.loads((case / "run" / "sweep.json").read_text())
    runs = {r["trial_id"]: r for r in find_trial_runs(f"sqlite:///{case}/mlflow.db", state["parent_run_id"])}
    ordinals = {int(p.name.split("-")[1]): p.read_text() for p in (case / "faults").glob("ordinal-*")}
    outcomes: Counter = Counter()
    lost = []
    for ordinal, trial_id in sorted(ordinals.items()):
        kind = plan.get(ordinal, "none")
        run = runs.get(trial_id)
        kept = (case / "run" / "trials" / trial_id / "trial_result.json").is_file()
        if run is None and not kept:
            lost.append(f"trial {trial_id} ({kind}) in neither MLflow nor trials/")
        elif run is not None and run["status"] == "ok":
            attempts = len((case / "faults" / f"attempts-{trial_id}").read_text())
            outcomes[f"{kind}: finished after {attempts} attempt(s)"] += 1
        else:
            # A deterministic failure (raise, NaN, out of memory) runs once: no retry runs it again.
            runs_of = len((case / "faults" / f"attempts-{trial_id}").read_text())
            if runs_of != 1:
                lost.append(f"trial {trial_id} ({kind}) ran {runs_of} times; a deterministic failure runs once")
            outcomes[f"{kind}: FAILED after {runs_of} run(s), reason recorded: {_reason(run and run['error'])}"] += 1
    completions = [len(p.read_text()) for p in (case / "faults").glob("completions-*")]
    lost += [f"a trial ran to the end {n} times" for n in completions if n > 1]
    if proc.returncode != 0:
        lost.append(f"sweep exit {proc.returncode}")
    injected = len(plan)
    return {"case": f"injected faults ({', '.join(f'{k}' for k in kinds)}) in a {n_trials}-trial sweep",
            "tried": injected, "refused": 0, "recovered": injected - len(lost), "lost": len(lost), "mixed": 0,
            "tracebacks": _tracebacks(proc.stdout, proc.stderr), "notes": lost, "outcomes": dict(outcomes),
            "wall_s": round(wall, 1)}


DATA_CASES = {
    # name: (data._target_ in tests/bad_data.py, its own keys, what the one line must name)
    "a stray label in the test split": ("bad_test_label", [], "the test split has label 42 at index 7, outside "
                                        "the 4 classes of the training split"),
    "a single-class training split": ("single_class", [], "the training split holds a single class"),
    "a negative validation label": ("negative_labels", [], "the val split has label -1 at index 5"),
    "a test split whose __len__ lies": ("lying_length", ["+data.split=test", "+data.claimed=100"],
                                        "the test split's __len__ says 100 items but iterating it yields 60"),
}


def data_cases(out: Path) -> dict:
    """Bad data through the CLI (refused in the pre-flight: one line naming the split, exit 2,
    nothing tracked, no Ray), and deterministic failures with ``trial.max_retries=2`` (a raise and
    a NaN run once; a killed worker is retried and finishes)."""
    from search.tracking import find_trial_runs

    notes: list[str] = []
    refused = recovered = tracebacks = 0
    for name, (target, own, fragment) in DATA_CASES.items():
        case = out / "data" / re.sub(r"\W+", "_", name)
        case.mkdir(parents=True)
        proc = subprocess.run([sys.executable, "-m", "search", "+method=magnitude", "data=custom",
                               f"data._target_=tests.bad_data.{target}", *own, "model=mlp",
                               f"hydra.run.dir={case}/run", f"tracking.uri=sqlite:///{case}/mlflow.db"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        tracebacks += "Traceback" in proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
        clean = proc.returncode == 2 and len(lines) == 1 and fragment in lines[0] and \
            "Traceback" not in proc.stderr + proc.stdout and not (case / "mlflow.db").exists() and \
            not (case / "run" / "ray").exists()
        refused += clean
        if not clean:
            notes.append(f"{name}: exit {proc.returncode}: {(lines or proc.stderr.splitlines() or [''])[-1][:160]}")

    case = out / "data" / "retries"
    case.mkdir(parents=True)
    plan = {1: "raise", 2: "nan", 3: "kill"}
    proc = subprocess.run(_sweep(case, "trial.max_retries=2", f"+trial.faults.state_dir={case}/faults",
                                 "+trial.faults.plan='" + ",".join(f"{o}:{k}" for o, k in plan.items()) + "'",
                                 n_trials=3), cwd=case, env=ENV, capture_output=True, text=True, timeout=900)
    tracebacks += "Traceback" in proc.stdout + proc.stderr
    ordinals = {int(p.name.split("-")[1]): p.read_text() for p in (case / "faults").glob("ordinal-*")}
    state = json.loads((case / "run" / "sweep.json").read_text())
    runs = {r["trial_id"]: r for r in find_trial_runs(f"sqlite:///{case}/mlflow.db", state["parent_run_id"])}
    want = {"raise": (1, "failed"), "nan": (1, "failed"), "kill": (2, "ok")}
    for ordinal, kind in plan.items():
        trial_id = ordinals.get(ordinal)
        if trial_id is None:
            notes.append(f"{kind}: trial #{ordinal} never started")
            continue
        attempts = len((case / "faults" / f"attempts-{trial_id}").read_text())
        status = (runs.get(trial_id) or {}).get("status")
        if (attempts, status) == want[kind]:
            recovered += 1
        else:
            notes.append(f"{kind}: ran {attempts} time(s), MLflow {status}; expected {want[kind]}")
    if proc.returncode != 0:
        notes.append(f"retry sweep exit {proc.returncode}")
    tried = len(DATA_CASES) + len(plan)
    return {"case": "data: stray test label, one class, negative label, lying __len__ (CLI); raise + NaN + kill "
                    "with max_retries=2", "tried": tried, "refused": refused, "recovered": recovered,
            "lost": tried - refused - recovered, "mixed": 0, "tracebacks": tracebacks, "notes": notes}


def killed_driver(out: Path, epochs: int = 2000) -> dict:
    """kill -9 just after a trial finished, a rival driver, kill -9 mid-trial, then resume.

    ``epochs``: per trial. Three trials must outlast the rival driver's refusal (its pre-flight
    builds the model and data first: about a minute on a loaded 2-core machine), or the resumed
    driver finishes the sweep before there is a trial left to kill mid-run."""
    from search.tracking import find_trial_runs
    from tests.test_resume_cluster import _assert_gone, _cleanup, _counts, _kill_driver, _wait

    case = out / "killed"
    case.mkdir()
    cmd = _sweep(case, "+trial.faults.plan='999:raise'", f"+trial.faults.state_dir={case}/faults", epochs=epochs)
    resume = ("search.resume=true", f"search.resume_dir={case}/run")
    popen = dict(cwd=case, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    notes, tried, recovered = [], 0, 0
    first = subprocess.Popen(cmd, **popen)
    try:
        _wait(lambda: len(_counts(case, "completions")) >= 1, first, what="a finished trial")
        workers = _kill_driver(first)
        tried += 1
        _assert_gone(workers)
    finally:
        _cleanup(first)
    second = subprocess.Popen(cmd + list(resume), **popen)
    try:
        # The rival starts once the resumed driver runs a trial (it holds the sweep's lock by then) and
        # runs beside it: its refusal comes after its own pre-flight, which can outlast several trials.
        _wait(lambda: set(_counts(case, "attempts")) - set(_counts(case, "completions"))
              and len(_counts(case, "attempts")) >= 2, second, what="a trial of the resumed sweep")
        with open(case / "rival.err", "w") as err:
            rival = subprocess.Popen(cmd + list(resume), cwd=case, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                     text=True)
            rival_code = rival.wait(timeout=600)
        tried += 1
        if rival_code == 2 and "another driver" in (case / "rival.err").read_text():
            recovered += 1
        else:
            notes.append(f"rival driver exit {rival_code}")
        _wait(lambda: len(_counts(case, "completions")) >= 3 and
              set(_counts(case, "attempts")) - set(_counts(case, "completions")), second,
              what="a trial in progress after three finished")
        workers = _kill_driver(second)
        tried += 1
        _assert_gone(workers)
    finally:
        _cleanup(second)
    third = subprocess.run(cmd + list(resume), cwd=case, env=ENV, capture_output=True, text=True, timeout=900)
    state = json.loads((case / "run" / "sweep.json").read_text())
    runs = find_trial_runs(f"sqlite:///{case}/mlflow.db", state["parent_run_id"])
    ok = {r["trial_id"] for r in runs if r["status"] == "ok"}
    completions = _counts(case, "completions")
    twice = [t for t, n in completions.items() if n > 1]
    if third.returncode == 0 and len(ok) == 6 and not twice and state.get("finished"):
        recovered += 2  # both kills
    else:
        notes.append(f"resume exit {third.returncode}, {len(ok)} of 6 ok, ran twice: {twice}")
    return {"case": "driver kill -9 after a trial finished and mid-trial; a rival driver; resume", "tried": tried,
            "refused": 0, "recovered": recovered, "lost": tried - recovered, "mixed": 0,
            "tracebacks": _tracebacks(third.stdout, third.stderr, (case / "rival.err").read_text()), "notes": notes,
            "executions": dict(Counter(completions.values()))}


def all_fail(out: Path) -> dict:
    from mlflow import MlflowClient

    case = out / "all_fail"
    case.mkdir()
    proc = subprocess.run(_sweep(case, "+trial.faults.plan='1:raise,2:raise'", f"+trial.faults.state_dir={case}/f",
                                 n_trials=2), cwd=case, env=ENV, capture_output=True, text=True, timeout=900)
    state = json.loads((case / "run" / "sweep.json").read_text())
    parent = MlflowClient(f"sqlite:///{case}/mlflow.db").get_run(state["parent_run_id"])
    good = proc.returncode == 1 and parent.info.status == "FAILED" and "^^^" not in proc.stdout and \
        proc.stdout.count("InjectedFault: injected fault") >= 2
    return {"case": "every trial fails: exit 1, parent FAILED with the reason, exception lines shown",
            "tried": 1, "refused": 0, "recovered": int(good), "lost": int(not good), "mixed": 0,
            "tracebacks": _tracebacks(proc.stdout, proc.stderr),
            "notes": [] if good else [f"exit {proc.returncode}, parent {parent.info.status}"]}


def racing_stores(out: Path) -> dict:
    case = out / "race"
    uri = f"sqlite:///{case}/fresh/mlflow.db"
    code = ("import sys; from search.tracking import SweepTracker; "
            f"t = SweepTracker({uri!r}, 'sweeps'); print(t.start_parent('s' + sys.argv[1], {{'a': 1}}, {{}}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    bad = sum(c != 0 for c in codes)
    return {"case": "three sweeps start at once on one fresh SQLite store", "tried": 3, "refused": 0,
            "recovered": 3 - bad, "lost": bad, "mixed": 0,
            "tracebacks": _tracebacks(*(o for pair in outputs for o in pair)),
            "notes": [f"exit codes {codes}"] if bad else []}


def exports(out: Path) -> dict:
    from tests.conftest import free_port
    from tests.test_reliability import make_store_with_a_corrupt_masks_file

    case = out / "export"
    case.mkdir()
    uri, parent = make_store_with_a_corrupt_masks_file(case)
    target = case / "keep" / "masks.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"earlier")
    tries = {
        "dead server": [f"run_id={parent}", f"out={target}", f"tracking.uri=http://127.0.0.1:{free_port()}"],
        "wrong sqlite path": [f"run_id={parent}", f"out={target}", f"tracking.uri=sqlite:///{case}/nope/mlflow.db"],
        "corrupt artifact": [f"run_id={parent}", f"out={target}", f"tracking.uri={uri}"],
        "unwritable out": [f"run_id={parent}", "out=/proc/prunesearch/m.safetensors", f"tracking.uri={uri}"],
    }
    notes, clean, tracebacks = [], 0, 0
    for name, args in tries.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "search.export", *args], env=ENV, capture_output=True, text=True,
                              timeout=300)
        seconds = time.perf_counter() - t0
        tracebacks += _tracebacks(proc.stdout, proc.stderr)
        ok = proc.returncode == 2 and proc.stderr.startswith("export: ") and "Traceback" not in proc.stderr and \
            target.read_bytes() == b"earlier" and not (case / "nope" / "mlflow.db").exists() and seconds < 60
        clean += ok
        if not ok:
            notes.append(f"{name}: exit {proc.returncode} in {seconds:.0f}s: {proc.stderr[-200:]}")
    return {"case": "export: dead server, wrong SQLite path, corrupt artifact, unwritable out=", "tried": len(tries),
            "refused": 0, "recovered": clean, "lost": len(tries) - clean, "mixed": 0, "tracebacks": tracebacks,
            "notes": notes}


def _interrupted_sweep(case: Path) -> Path:
    """A tiny sweep stopped by Ctrl-C before its trials ended (exit 130): a resumable sweep."""
    proc = subprocess.Popen(_sweep(case, "sweep_name=drill", n_trials=2, epochs=500), cwd=case, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((case / "run" / "trials").glob("*")):  # a trial runs: Tune's state exists
            time.sleep(3)  # past Tune's 1 s experiment-state checkpoint
            break
        time.sleep(0.5)
    os.killpg(proc.pid, 2)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 130:
        raise RuntimeError(f"the interrupted sweep exited {proc.returncode}: {out[-300:]}")
    return case / "run"


def _parent_children(uri: str, parent: str) -> list[dict]:
    from search.tracking import find_trial_runs

    return find_trial_runs(uri, parent)


def identity_cases(out: Path) -> dict:
    """Issue 24's identity, names and stores through the CLI: resumes with another model, method
    or store, corrupt sweep.json (given and found), in-memory and file stores, a float n_trials,
    Hydra's own errors (each: exit 2, one line, nothing written); an accepted change resumes the
    sweep and ends its parent FINISHED without the interruption's error; two sweeps started at
    once with one name on one store get two studies.

    ``mixed``: trials of two configs on one front or one study; ``tracebacks``: outputs holding one.
    """
    import optuna
    from mlflow import MlflowClient

    case = out / "identity"
    case.mkdir()
    run = _interrupted_sweep(case)
    uri = f"sqlite:///{case}/mlflow.db"
    state = json.loads((run / "sweep.json").read_text())
    resume = ["search.resume=true", f"search.resume_dir={run}"]
    corrupt = case / "corrupt"
    corrupt.mkdir()
    (corrupt / "sweep.json").write_text('{"name": "x", "sweep_root": ')  # cut short
    (case / "cwd" / "outputs" / "old").mkdir(parents=True)
    (case / "cwd" / "outputs" / "old" / "sweep.json").write_text("[]")
    refusals = {  # name: (overrides, fragment of the one line, a full command without _sweep's defaults)
        "resume with model=lenet5": (resume + ["model=lenet5"], "model.name (mlp -> lenet5)"),
        "resume with another method": (resume + ["method=random"], "method.name (magnitude -> random)"),
        "resume with another tracking.uri": (resume + [f"tracking.uri=sqlite:///{case}/other/mlflow.db"],
                                             "tracking.uri (sqlite:///"),
        "resume with another search.storage": (resume + [f"search.storage={case}/elsewhere"], "search.storage (unset ->"),
        "corrupt sweep.json": (["search.resume=true", f"search.resume_dir={corrupt}"], "is not readable JSON"),
        "corrupt sweep.json found by search.resume=true": (["search.resume=true"], "no unfinished sweep under"),
        "tracking.uri=sqlite:///:memory:": (["tracking.uri=sqlite:///:memory:"], "an in-memory store keeps nothing"),
        "tracking.uri=file://": ([f"tracking.uri=file://{case}/mlruns"], "no longer accepts the file store"),
        "tracking.uri=<plain path>": ([f"tracking.uri={case}/mlruns"], "no longer accepts the file store"),
        "search.optuna_storage in memory": (["search.optuna_storage=sqlite:///:memory:"], "an in-memory store"),
        "search.n_trials=3.5": (["search.n_trials=3.5"], "search.n_trials: 3.5 must be an integer"),
        "model=no_such_model (Hydra)": (["model=no_such_model"], "Could not find 'model/no_such_model'"),
        "bad override syntax (Hydra)": (["search.n_trials=["], "no viable alternative"),
    }
    notes: list[str] = []
    refused = tracebacks = mixed = 0
    before = (run / "sweep.json").read_text()
    children = len(_parent_children(uri, state["parent_run_id"]))
    for name, (overrides, fragment) in refusals.items():
        cmd = _sweep(case, *overrides, n_trials=2)
        if name.startswith("resume with another method"):
            cmd = [c if c != "+method=magnitude" else "+method=random" for c in cmd if c != "method=random"]
        if "tracking.uri=" in " ".join(overrides):
            cmd = [c for c in cmd if c != f"tracking.uri=sqlite:///{case}/mlflow.db"]
        cwd = case / "cwd" if overrides == ["search.resume=true"] else case
        proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
        text = proc.stdout + proc.stderr
        tracebacks += "Traceback" in text
        errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
        ok = proc.returncode == 2 and len(errors) == 1 and fragment in errors[0] and not (case / "other").exists() \
            and not (case / "elsewhere").exists() and not (case / "mlruns").exists() and "Traceback" not in text
        refused += ok
        if not ok:
            notes.append(f"{name}: exit {proc.returncode}: {(errors or [text[-200:]])[0][:200]}")
    if (run / "sweep.json").read_text() != before or len(_parent_children(uri, state["parent_run_id"])) != children:
        mixed += 1
        notes.append("a refused resume changed the sweep (sweep.json or its trial runs)")

    # An accepted change: the sweep resumes, runs its remaining trials and ends FINISHED, clean.
    proc = subprocess.run(_sweep(case, *resume, "sweep_name=drill", "trial.epochs=1",
                                 "search.resume_accept=[trial.epochs]", n_trials=2),
                          cwd=case, env=ENV, capture_output=True, text=True, timeout=900)
    tracebacks += "Traceback" in proc.stdout + proc.stderr
    parent = MlflowClient(uri).get_run(state["parent_run_id"])
    resumed = json.loads((run / "sweep.json").read_text())
    models = {r.data.params.get("model.name") for r in MlflowClient(uri).search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")}
    resumed_ok = proc.returncode == 0 and parent.info.status == "FINISHED" and \
        "prunesearch.error" not in parent.data.tags and resumed.get("accepted_changes") and resumed["finished"]
    if len(models - {None}) > 1:
        mixed += 1
    if not resumed_ok:
        notes.append(f"accepted resume: exit {proc.returncode}, parent {parent.info.status}, "
                     f"error tag {parent.data.tags.get('prunesearch.error')!r}: {proc.stderr[-200:]}")

    # Two sweeps started at once with one sweep_name on one store: two studies, never one.
    pair = out / "identity" / "pair"
    pair.mkdir()
    procs = [subprocess.Popen(_sweep(pair / str(i), "sweep_name=same", f"tracking.uri=sqlite:///{pair}/mlflow.db",
                                     n_trials=2, epochs=1), cwd=case, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    tracebacks += sum("Traceback" in o for o in outs)
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(f"sqlite:///{pair}/optuna.db")}
    names_ok = all(p.returncode == 0 for p in procs) and studies == {"same": 2, "same-2": 2}
    if any(n > 2 for n in studies.values()):
        mixed += 1
    if not names_ok:
        notes.append(f"two sweeps named 'same': exits {[p.returncode for p in procs]}, studies {studies}")
    tried = len(refusals) + 2
    recovered = int(bool(resumed_ok)) + int(names_ok)
    return {"case": "identity: resume with another config/store, corrupt sweep.json, in-memory and file stores, "
                    "float n_trials, Hydra errors; an accepted change; two sweeps with one name",
            "tried": tried, "refused": refused, "recovered": recovered, "lost": tried - refused - recovered,
            "mixed": mixed, "tracebacks": tracebacks, "notes": notes}


def _tracebacks(*outputs: str) -> int:
    return sum("Traceback" in (o or "") for o in outputs)


def _half_files(root: Path) -> list[str]:
    """Temporary files left behind, and masks or weights files that do not load, under ``root``."""
    from tests.test_storage_faults import load_safetensors_file

    bad = [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".part"))]
    for path in root.rglob("*.safetensors"):
        try:
            load_safetensors_file(path)
        except Exception as exc:
            bad.append(f"{path}: {str(exc)[:80]}")
    return bad


def _mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a small tmpfs at ``where`` (root, where mounting is allowed); False if it cannot."""
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    return proc.returncode == 0


def storage_cases(out: Path) -> dict:
    """A sweep on a full disk (a real small tmpfs when mount works, else the ``enospc`` fault),
    then its resume once space is freed; a front point whose trial folder is gone; export with a
    245- and a 300-character ``out=`` name and a missing masks artifact; a dashboard over a store
    with a malformed objectives tag and given mistyped store paths."""
    import contextlib
    import io

    import pandas as pd
    from mlflow import MlflowClient

    from dashboards import create_app
    from search.tracking import find_trial_runs
    from search.front_report import export_front as _export_front
    from tests.conftest import free_port
    from tests.sweep_store import log_trial, start_sweep
    from tests.test_storage_faults import _masks_file, _store_with_trials

    case = out / "storage"
    disk = case / "disk"
    disk.mkdir(parents=True)
    notes: list[str] = []
    tried = refused = recovered = tracebacks = mixed = 0
    mounted = _mount_tmpfs(disk, "600k")
    fault = "999:raise" if mounted else "2:enospc"  # the plan also counts each trial's completions
    cmd = [sys.executable, "-m", "search", "+method=magnitude", "search.n_trials=4", "search.concurrency=1",
           "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=200", "cluster.num_cpus=2",
           f"+trial.faults.plan='{fault}'", f"+trial.faults.state_dir={case}/faults", f"hydra.run.dir={disk}/run",
           f"tracking.uri=sqlite:///{case}/mlflow.db"]
    uri = f"sqlite:///{case}/mlflow.db"
    try:
        # 1. the full disk, then the resume
        tried += 1
        first = subprocess.run(cmd, cwd=case, env=ENV, capture_output=True, text=True, timeout=900)
        tracebacks += _tracebacks(first.stdout, first.stderr)
        lines = [line for line in first.stderr.splitlines() if line.startswith("storage error: ")]
        half = _half_files(disk)
        state = json.loads((disk / "run" / "sweep.json").read_text())
        parent = MlflowClient(uri).get_run(state["parent_run_id"]).info.status
        if first.returncode == 3 and len(lines) == 1 and not half and not state.get("finished") and parent == "KILLED":
            refused += 1
        else:
            notes.append(f"full disk: exit {first.returncode}, {len(lines)} storage line(s), parent {parent}, "
                         f"half files {half[:3]}: {first.stderr[-300:]}")
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        tried += 1
        second = subprocess.run(cmd + ["search.resume=true", f"search.resume_dir={disk}/run"], cwd=case, env=ENV,
                                capture_output=True, text=True, timeout=900)
        tracebacks += _tracebacks(second.stdout, second.stderr)
        state = json.loads((disk / "run" / "sweep.json").read_text())
        runs = find_trial_runs(uri, state["parent_run_id"])
        ok = [r["trial_id"] for r in runs if r["status"] == "ok"]
        on_disk = {p.parent.name for p in (disk / "run" / "trials").glob("*/trial_result.json")}
        mixed += len(on_disk - set(ok))  # a trial folder no run of this sweep accounts for
        completions = [len(p.read_text()) for p in (case / "faults").glob("completions-*")]
        half = _half_files(disk)
        if second.returncode == 0 and len(ok) == 4 == len(set(ok)) and on_disk == set(ok) and \
                sorted(completions) == [1, 1, 1, 1] and not half and state.get("finished"):
            recovered += 1
        else:
            notes.append(f"resume: exit {second.returncode}, {len(ok)} ok, completions {completions}, "
                         f"half files {half[:3]}: {second.stderr[-300:]}")
        # 2. a front point whose trial folder is gone: rebuilt from MLflow; one in neither place is named
        tried += 2
        front = pd.read_csv(disk / "run" / "front" / "front.csv")
        rows = front.to_dict("records")
        shutil.rmtree(disk / "run" / "trials" / str(rows[0]["trial_id"]))
        if len(rows) > 1:
            rows[1]["masks_path"], rows[1]["mlflow_run_id"] = str(case / "gone.safetensors"), "0" * 32
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            written = _export_front(pd.DataFrame(rows), rows, case / "front_again", {"uri": uri})
        said = printed.getvalue()
        if any(p.name.endswith(f"_{rows[0]['trial_id']}.safetensors") for p in written) and \
                "masks recovered from MLflow run" in said and not _half_files(case / "front_again"):
            recovered += 1
        else:
            notes.append(f"front point without its folder not recovered: {said[-300:]}")
        if len(rows) < 2 or f"front: trial {rows[1]['trial_id']}: its masks are in neither" in said:
            refused += 1
        else:
            notes.append(f"front point in neither place not named: {said[-300:]}")
    except Exception as exc:
        notes.append(f"sweep cases: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)

    # 3. export: long names and a missing masks artifact
    exports_dir = case / "export"
    exports_dir.mkdir()
    store_uri, sweep, _ = _store_with_trials(exports_dir, {"t0": _masks_file(exports_dir / "art")})
    bare_dir = exports_dir / "bare"
    bare_dir.mkdir()
    bare_uri, bare_sweep, _ = _store_with_trials(bare_dir, {"t1": None})
    earlier = exports_dir / "keep" / "masks.safetensors"
    earlier.parent.mkdir()
    earlier.write_bytes(b"earlier")
    tries = {"out= name of 245 characters (a legal name: exported)": ([f"run_id={sweep}", "select=max_acc",
                                                                    f"out={exports_dir / ('p' * 245)}",
                                                                    f"tracking.uri={store_uri}"], 0),
             "out= name of 300 characters": ([f"run_id={sweep}", f"out={exports_dir / ('q' * 300)}",
                                              f"tracking.uri={store_uri}"], 2),
             "missing masks artifact": ([f"run_id={bare_sweep}", f"out={earlier}", f"tracking.uri={bare_uri}"], 2)}
    for name, (args, expected) in tries.items():
        tried += 1
        proc = subprocess.run([sys.executable, "-m", "search.export", *args], env=ENV, capture_output=True, text=True,
                              timeout=300)
        tracebacks += _tracebacks(proc.stdout, proc.stderr)
        one_line = expected == 0 or (proc.stderr.startswith("export: ") and len(proc.stderr.strip().splitlines()) == 1)
        leftovers = [p for p in exports_dir.rglob("*") if p.name.endswith((".tmp", ".part"))]
        if proc.returncode == expected and one_line and earlier.read_bytes() == b"earlier" and not leftovers:
            recovered += expected == 0
            refused += expected == 2
        else:
            notes.append(f"export {name}: exit {proc.returncode}: {proc.stderr[-200:]}")

    # 4. dashboard: a malformed objectives tag; mistyped store paths
    dash = case / "dashboard"
    dash.mkdir()
    dash_uri = f"sqlite:///{dash}/mlflow.db"
    good_tracker, good = start_sweep(dash_uri, "good")
    log_trial(dash_uri, good_tracker, good, dash, "g1", "magnitude", 0.9, 1000.0, 0.5)
    bad_tracker, bad = start_sweep(dash_uri, "bad")
    bad_tracker.client.set_tag(bad, "prunesearch.objectives", "[[val_acc, max]")
    client = create_app(dash_uri, cache_parent=dash).test_client()
    listed = {s["run_id"]: s for s in client.get("/api/sweeps").get_json()["sweeps"]}
    detail = client.get(f"/api/sweeps/{bad}")
    tried += 1
    if set(listed) == {good, bad} and listed[bad]["error"] and listed[good]["error"] is None and detail.is_json \
            and client.get(f"/api/sweeps/{good}").status_code == 200:
        recovered += 1
    else:
        notes.append(f"dashboard with a malformed tag: listed {len(listed)}, detail {detail.status_code}")
    for store in (f"sqlite:///{dash}/nope/mlflow.db", f"{dash}/no/such/dir"):
        tried += 1
        proc = subprocess.run([sys.executable, "-m", "dashboards", "--tracking-uri", store, "--port", str(free_port())],
                              env=ENV, capture_output=True, text=True, timeout=120)
        tracebacks += _tracebacks(proc.stdout, proc.stderr)
        if proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and not (dash / "nope").exists() \
                and not (dash / "no").exists():
            refused += 1
        else:
            notes.append(f"dashboard {store}: exit {proc.returncode}: {proc.stderr[-200:]}")
    lost = tried - refused - recovered
    return {"case": "storage: a full disk then resume, a front point without its folder, export names and a missing "
                    "artifact, dashboard tags and store paths", "tried": tried, "refused": refused,
            "recovered": recovered, "lost": lost, "mixed": mixed, "tracebacks": tracebacks, "notes": notes,
            "disk": "real tmpfs of 600k, grown to 64m for the resume" if mounted else
                    "injected ENOSPC (trial.faults enospc: mount not allowed)"}


COLUMNS = ("tried", "refused", "recovered", "lost", "mixed", "tracebacks")


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table of the drill's rows, with a total line (targets: 0 lost, mixed, tracebacks)."""
    lines = ["| case | tried | refused before Ray | recovered | lost | mixed | tracebacks |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(str(r.get(k, 0)) for k in COLUMNS) + " |")
    total = {k: sum(int(r.get(k, 0)) for r in rows) for k in COLUMNS}
    lines.append("| **total** | " + " | ".join(
        f"**{total[k]}**" if k in ("lost", "mixed", "tracebacks") else str(total[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def results_table(doc: dict) -> str:
    """RESULTS.md's table from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return markdown_table(doc["rows"])


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Raw rows beside the table they make: the command, commit, machine and date inside (top level)."""
    write_rows(path, {**run_meta("reliability_drill.py"),
                      "rows": [{k: v for k, v in r.items() if k != "examples"} for r in rows]})


PARTS = ("bad_inputs", "faults", "killed", "all_fail", "race", "exports", "identity", "data", "storage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "reliability")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--kill-epochs", type=int, default=2000, help="epochs per trial of the driver-kill sweep")
    parser.add_argument("--rows", type=Path, default=None,
                        help="write the raw rows (with command, commit, machine and date) to this .json.gz")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the Markdown table of rows written earlier with --rows, and run nothing")
    args = parser.parse_args()
    if args.table_from:
        print(markdown_table(read_rows(args.table_from)["rows"]))
        return
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    rows, by_part = [], {}
    runs = {"bad_inputs": bad_inputs, "faults": lambda o: faults(o, args.trials),
            "killed": lambda o: killed_driver(o, args.kill_epochs), "all_fail": all_fail, "race": racing_stores,
            "exports": exports, "identity": identity_cases, "data": data_cases, "storage": storage_cases}
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            row = runs[name](out)
        except Exception as exc:  # a drill that could not place its fault: said, and the other parts still run
            row = {"case": f"{name}: DRILL ERROR", "tried": 0, "refused": 0,
                   "recovered": 0, "lost": 1, "mixed": 0, "tracebacks": 0, "notes": [f"drill error: {type(exc).__name__}: {str(exc)[:300]}"],
                   "outcomes": {}, "examples": []}
        row["seconds"] = round(time.perf_counter() - t0)
        row["part"] = name
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}, default=str), flush=True)
        rows.append(row)
        by_part[name] = row
    if args.rows:
        _write_rows(args.rows, rows)
    print("\n" + markdown_table(rows))
    if "faults" in by_part:
        print("\nInjected faults: " + "; ".join(f"{n}x {o}" for o, n in by_part["faults"]["outcomes"].items()))
    if "killed" in by_part:
        print(f"Driver kills: trials run to the end once each: {by_part['killed'].get('executions')}")
    if "bad_inputs" in by_part:
        print("\nBad-input messages (first 8):")
        for name, message in by_part["bad_inputs"]["examples"][:8]:
            print(f"- {name}: `config error: {message[:150]}`")
    print(f"\ndrill wall time {time.perf_counter() - start:.0f} s")
    for r in rows:
        for note in r["notes"]:
            print(f"LOST/UNCLEAN: {r['case']}: {note}")


if __name__ == "__main__":
    main()
