"""A sweep is one experiment (issue 24): its identity is recorded and a resume with another
config is refused; names are claimed, never merged; a corrupt state file is one line; Hydra's
own errors exit 2; a resumed sweep that finishes loses its stale error tag."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from search.identity import RESUMABLE_KEYS, claim_study_name, sweep_identity
from search.preflight import preflight
from search.space import ConfigError
from search.sweep_state import record_identity as _record_identity
from search.tuner import STATE_FILE, find_resume_dir, run_sweep
from tests.conftest import REPO, compose

FAST = ["trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=200", "search.concurrency=1"]


def _cfg(tmp_path: Path, *overrides: str, method: str = "magnitude") -> dict:
    return compose([f"+method={method}", *FAST, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides])


def _recorded_sweep(tmp_path: Path, *overrides: str, dirname: str = "sweep") -> Path:
    """An interrupted sweep's directory whose sweep.json records the identity of ``overrides``."""
    out = tmp_path / dirname
    out.mkdir(parents=True)
    pre = preflight(_cfg(tmp_path, *overrides), out, build=False, open_stores=False)
    state = {"name": "magnitude-digits-1", "sweep_root": str(out), "finished": False,
             "identity": sweep_identity(pre.cfg, out)}
    (out / STATE_FILE).write_text(json.dumps(state))
    return out


def _resume(tmp_path: Path, out: Path, *overrides: str, method: str = "magnitude") -> str:
    """run_sweep's refusal of a resume of ``out`` (nothing may start: no Ray, no store written)."""
    import ray

    before = (out / STATE_FILE).read_text()
    with pytest.raises(ConfigError) as err:
        run_sweep(_cfg(tmp_path, "search.resume=true", f"search.resume_dir={out}", *overrides, method=method), out)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (out / "ray").exists()
    assert (out / STATE_FILE).read_text() == before  # the sweep is untouched, still resumable
    message = str(err.value)
    assert "\n" not in message
    return message


def test_resume_with_another_model_is_refused_naming_every_differing_key(tmp_path):
    out = _recorded_sweep(tmp_path)
    message = _resume(tmp_path, out, "model=lenet5")
    assert message.startswith(f"search.resume: this config differs from the sweep in {out}: ")
    assert "model.name (mlp -> lenet5)" in message
    assert "search.resume_accept=[" in message and "model.name" in message.split("search.resume_accept=[")[1]


def test_resume_with_another_method_or_store_is_refused(tmp_path):
    out = _recorded_sweep(tmp_path)
    message = _resume(tmp_path, out, method="random")
    assert "method.name (magnitude -> random)" in message
    message = _resume(tmp_path, out, f"search.optuna_storage=sqlite:///{tmp_path}/elsewhere.db")
    assert "search.optuna_storage (sqlite:///" in message and "elsewhere.db)" in message


def test_resume_with_another_tracking_uri_is_refused(tmp_path):
    out = _recorded_sweep(tmp_path)
    cfg = _cfg(tmp_path, "search.resume=true", f"search.resume_dir={out}",
               f"tracking.uri=sqlite:///{tmp_path}/other/mlflow.db")
    changed = r"tracking\.uri \(sqlite:///.*/mlflow\.db -> sqlite:///.*/other/mlflow\.db\)"
    with pytest.raises(ConfigError, match=changed):
        run_sweep(cfg, out)
    assert not (tmp_path / "other").exists()


def test_resumable_keys_may_change_and_accepted_changes_are_recorded(tmp_path, capsys):
    out = _recorded_sweep(tmp_path)
    state = json.loads((out / STATE_FILE).read_text())
    pre = preflight(_cfg(tmp_path, "search.resume=true", f"search.resume_dir={out}", "search.n_trials=40",
                         "search.concurrency=2", "trial.max_retries=3", "search.budget.amount=50"),
                    out, build=False, open_stores=False)
    assert _record_identity(pre.cfg, out, state, resuming=True)["identity"] == state["identity"]
    assert "search.n_trials" in RESUMABLE_KEYS and "search.budget" in RESUMABLE_KEYS
    pre = preflight(_cfg(tmp_path, "search.resume=true", "trial.epochs=2", "search.resume_accept=[trial.epochs]"),
                    out, build=False, open_stores=False)
    new = _record_identity(pre.cfg, out, state, resuming=True)
    assert new["identity"]["trial.epochs"] == 2  # the accepted config is the sweep's from now on
    assert [(c["key"], c["old"], c["new"]) for c in new["accepted_changes"]] == [("trial.epochs", 1, 2)]
    assert "accepted changes: trial.epochs (1 -> 2)" in capsys.readouterr().out
    pre = preflight(_cfg(tmp_path, "search.resume=true", "trial.epochs=2", "trial.lr=0.2",
                         "search.resume_accept=[trial.epochs]"), out, build=False, open_stores=False)
    with pytest.raises(ConfigError, match=r"trial\.lr \(0\.05 -> 0\.2\); resume with the sweep's config") as err:
        _record_identity(pre.cfg, out, state, resuming=True)
    assert "trial.epochs" not in str(err.value)  # accepted, so not listed


def test_a_sweep_recorded_before_identities_is_adopted_with_a_note(tmp_path, capsys):
    out = _recorded_sweep(tmp_path)
    state = json.loads((out / STATE_FILE).read_text())
    del state["identity"]
    pre = preflight(_cfg(tmp_path, "search.resume=true"), out, build=False, open_stores=False)
    new = _record_identity(pre.cfg, out, state, resuming=True)
    assert new["identity"]["model.name"] == "mlp"
    assert "predates recorded identities" in capsys.readouterr().out


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "is not readable JSON"),
    (b"\xff\xfe\x00garbage", "is not readable JSON"),
    (b"[1, 2, 3]", "holds a JSON list, not a sweep's state"),
    (b'{"name": "x"}', "lacks ['sweep_root', 'finished']"),
], ids=["not json", "not utf-8", "a list", "missing keys"])
def test_a_corrupt_sweep_json_is_one_line_naming_the_file(tmp_path, content, fragment, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / STATE_FILE).write_bytes(content)
    with pytest.raises(ConfigError) as err:
        run_sweep(_cfg(tmp_path, "search.resume=true", f"search.resume_dir={out}"), out)
    assert str(err.value).startswith(f"search.resume_dir: {out / STATE_FILE} ") and fragment in str(err.value)
    assert "\n" not in str(err.value)
    good = _recorded_sweep(tmp_path, dirname="good")
    assert find_resume_dir(tmp_path) == good  # the corrupt one is skipped, with a note
    assert f"note: skipped {out}:" in capsys.readouterr().out


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *overrides, f"hydra.run.dir={tmp_path}/run",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)


def test_cli_corrupt_state_and_hydra_errors_exit_2_in_one_line(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / STATE_FILE).write_text("{truncated")
    (tmp_path / "outputs" / "old").mkdir(parents=True)
    (tmp_path / "outputs" / "old" / STATE_FILE).write_text("[]")
    for overrides, fragment in [
        (["search.resume=true", f"search.resume_dir={out}"], f"config error: search.resume_dir: {out / STATE_FILE} is "
                                                             "not readable JSON"),
        (["search.resume=true"], "config error: search.resume: no unfinished sweep under"),  # the corrupt one skipped
        (["model=no_such_model"], "config error: In 'config': Could not find 'model/no_such_model'; Available "
                                  "options in 'model': custom, hf, lenet5, mlp"),
        (["search.n_trials=["], "config error: no viable alternative at input '['"),
    ]:
        proc = _cli(tmp_path, *overrides)
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and fragment in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
        assert not (tmp_path / "mlflow.db").exists()


def test_finished_parent_run_loses_the_error_of_its_interrupted_attempt(tmp_path):
    from search.tracking import TAG_ERROR, SweepTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "prunesearch")
    run_id = tracker.start_parent("s", params={}, tags={})
    tracker.finish("KILLED", reason="interrupted: 2 of 4 trials ended")
    assert tracker.client.get_run(run_id).data.tags[TAG_ERROR].startswith("interrupted")
    tracker.start_parent("s", params={}, tags={}, resume_run_id=run_id)
    tracker.finish("FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and TAG_ERROR not in run.data.tags
    assert tracker.sweep_name_taken("s") and not tracker.sweep_name_taken("s-2")


def _claim_many(url: str, base: str, n: int, names: list[str]) -> None:
    import optuna

    storage = optuna.storages.RDBStorage(url)  # one connection pool per racer, as in separate drivers
    for _ in range(n):
        names.append(claim_study_name(storage, base, ["maximize", "minimize"]))


def test_names_claimed_by_racing_drivers_never_collide(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.storages.RDBStorage(url)  # the store exists (its creation is serialised elsewhere)
    names: list[str] = []
    threads = [threading.Thread(target=_claim_many, args=(url, "all-digits-20261206-120000", 3, names))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 12 and len(set(names)) == 12, names
    assert "all-digits-20261206-120000" in names and "all-digits-20261206-120000-12" in names
    assert claim_study_name(url, "mine", ["maximize"], taken=lambda n: n in ("mine", "mine-2")) == "mine-3"
    # Two processes (two drivers) racing for one name from a fresh start.
    code = ("import sys; from search.identity import claim_study_name; "
            "print(claim_study_name(sys.argv[1], 'shared', ['maximize', 'minimize']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    got = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert got == ["shared", "shared-2"]


@pytest.mark.slow
def test_two_sweeps_with_one_name_get_two_studies(tmp_path):
    import optuna

    import ray

    try:
        for _ in range(2):
            run_sweep(_cfg(tmp_path, "search.n_trials=2", "sweep_name=mine", "tracking.log_model=false",
                           "tracking.system_metrics_s=0"), tmp_path / f"out{_}")
    finally:  # the sweep started this Ray; later tests check that a refusal starts none
        ray.shutdown()
    states = [json.loads((tmp_path / f"out{i}" / STATE_FILE).read_text()) for i in range(2)]
    assert [s["name"] for s in states] == ["mine", "mine-2"]
    assert states[0]["identity"]["model.name"] == "mlp" and states[0]["identity"]["search.optuna_storage"]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert studies == {"mine": 2, "mine-2": 2}  # neither sampler saw the other's trials


@pytest.mark.slow
def test_a_missing_sweep_json_is_restored_from_the_mlflow_parent_run(tmp_path, capsys):
    """Every state write is mirrored in the parent run: with the local file gone, a resume reads
    the copy back (here: the sweep had finished, so the resume is refused, as with the file)."""
    import ray

    out = tmp_path / "out"
    quiet = ("tracking.log_model=false", "tracking.system_metrics_s=0")
    try:
        run_sweep(_cfg(tmp_path, "search.n_trials=1", *quiet), out)
    finally:
        ray.shutdown()
    saved = json.loads((out / STATE_FILE).read_text())
    assert saved["finished"] is True
    (out / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match=r"search.resume_dir: the sweep in .* finished \(1 trials\); nothing to resume"):
        run_sweep(_cfg(tmp_path, "search.resume=true", f"search.resume_dir={out}", "search.n_trials=1", *quiet), out)
    assert not ray.is_initialized()
    assert json.loads((out / STATE_FILE).read_text()) == saved
    assert "was missing; restored from MLflow parent run" in capsys.readouterr().out
