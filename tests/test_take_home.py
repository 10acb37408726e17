"""What a user takes home (issue 29): every finished trial keeps the weights it was measured on,
and the exported directory, loaded in a fresh process that imports the loader (prunelib) and no
prunesearch state, reproduces the validation metric the trial reported, to 1e-6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from search.config import build_search_space
from search.trial import TrialContext, run_trial
from tests.conftest import compose

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-6

#: What the fresh process must not have imported: it holds no prunesearch state.
NO_STATE = 'assert not {m.split(".")[0] for m in sys.modules} & {"search", "ray", "mlflow", "hydra", "optuna"}'


def _track(ctx: TrialContext, tmp_path: Path) -> tuple[str, str]:
    """A sweep parent run declaring ``ctx.objectives``; the trial logs its child run under it."""
    from search.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "take-home")
    parent = tracker.start_parent("sweep", params={}, tags={"prunesearch.objectives": json.dumps(ctx.objectives)})
    ctx.tracking = {"uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent}
    return uri, parent


def _fresh(body: str, cwd: Path) -> dict:
    """Run ``body`` in a new interpreter (the repository importable, for the tests' user code);
    it prints one JSON line last."""
    script = "import json, sys\n" + textwrap.dedent(body) + f"\n{NO_STATE}\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(uri: str, parent: str, select: str, out: Path) -> dict:
    from search.export import export_point

    row = export_point(uri, parent, select, out)
    assert (out / "pruned_model.json").is_file() and (out / "masks.safetensors").is_file()
    assert json.loads((out / "trial.json").read_text())["trial_id"] == row["trial_id"]
    return row


def _image_eval(out: Path, data: dict) -> str:
    return f"""
        from prunelib.artifact import load_pruned
        from prunelib.data import datamodule_from_config
        from prunelib.training import evaluate
        model = load_pruned({str(out)!r})
        assert not model.training
        dm = datamodule_from_config(json.loads({json.dumps(json.dumps(data))}), seed=0)
        print(json.dumps({{"val_acc": evaluate(model, dm.val_dataloader())["acc"]}}))
        """


@pytest.mark.parametrize("method, params", [
    ("magnitude", {"magnitude.sparsity": 0.7}),
    ("gmp", {"gmp.sparsity": 0.8}),
])
def test_a_masked_trial_keeps_its_weights_and_the_export_reproduces_its_accuracy(tmp_path, method, params):
    import mlflow

    from prunelib.masks import MaskSet
    from prunelib.training import evaluate

    cfg = compose([f"+method={method}", "trial.epochs=2", "trial.finetune_epochs=1"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_deployed", "min")])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": method, **params}, ctx, trial_id="m", trial_dir=tmp_path / "trials" / "m")
    assert row["artifact"] == "masked" and row["keep_weights"] == "all"
    assert (tmp_path / "trials" / "m" / "weights.safetensors").is_file()  # beside the masks
    exported = _export(uri, parent, "best:val_acc", tmp_path / "point")
    assert exported["trial_id"] == "m" and exported["export"]["source"].startswith("the trial's folder")
    assert "weights.safetensors" in exported["export"]["files"]
    fresh = _fresh(_image_eval(tmp_path / "point", cfg["data"]), tmp_path)
    assert abs(fresh["val_acc"] - row["val_acc"]) <= TOL
    # The zeros are in place: the weights are those of the masked model, not the dense one.
    from prunelib.artifact import load_pruned

    model = load_pruned(tmp_path / "point")
    masks = MaskSet.load(tmp_path / "point" / "masks.safetensors", model)
    params_ = dict(model.named_parameters())
    assert all(not bool(params_[n][~masks.expanded(n, params_[n])].any()) for n in masks.names())
    # The MLflow model of the child run is the same network, ready to evaluate.
    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model(row["model_uri"])
    assert not logged.training
    from prunelib.data import datamodule_from_config

    dm = datamodule_from_config(cfg["data"], seed=0)
    assert abs(evaluate(logged, dm.val_dataloader())["acc"] - row["val_acc"]) <= TOL
    info = mlflow.models.get_model_info(row["model_uri"])
    assert info.metadata["prunesearch"]["spec"]["config"]["name"] == "mlp"  # the spec travels with it
    # The trial folder gone (a lost disk, a remote storage out of reach): the MLflow model is enough.
    import shutil

    shutil.rmtree(tmp_path / "trials" / "m")
    again = _export(uri, parent, "best:val_acc", tmp_path / "from_mlflow")
    assert again["export"]["source"] == f"the trial's MLflow model {row['model_uri']}"
    fresh = _fresh(_image_eval(tmp_path / "from_mlflow", cfg["data"]), tmp_path)
    assert abs(fresh["val_acc"] - row["val_acc"]) <= TOL


def test_a_surgered_trial_exports_the_smaller_model_and_reproduces_its_accuracy(tmp_path):
    cfg = compose(["+method=paoding", "trial.epochs=2"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_deployed", "min")])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": "paoding", "paoding.dense_ratio": 0.5}, ctx, trial_id="s",
                    trial_dir=tmp_path / "trials" / "s")
    assert row["artifact"] == "surgered"
    exported = _export(uri, parent, "min:flops_deployed", tmp_path / "point")
    assert {"surgered/model.safetensors", "surgered/structure.json"} <= set(exported["export"]["files"])
    fresh = _fresh(_image_eval(tmp_path / "point", cfg["data"]) + """
        print(json.dumps({"val_acc": evaluate(model, dm.val_dataloader())["acc"],
                          "params": sum(p.numel() for p in model.parameters())}))
        """, tmp_path)
    assert abs(fresh["val_acc"] - row["val_acc"]) <= TOL
    assert fresh["params"] == row["params_physical"] < row["params_dense"]  # the smaller model itself
    import shutil

    shutil.rmtree(tmp_path / "trials" / "s")  # from the MLflow run alone
    again = _export(uri, parent, "min:flops_deployed", tmp_path / "from_mlflow")
    assert again["export"]["source"].startswith("the trial's MLflow model")
    assert abs(_fresh(_image_eval(tmp_path / "from_mlflow", cfg["data"]), tmp_path)["val_acc"] - row["val_acc"]) <= TOL


def test_a_ken_trial_exports_the_ken_model_and_reproduces_its_accuracy(tmp_path):
    cfg = compose(["+method=ken", "trial.epochs=2", "data.limit_train=300", "+model.hidden=[32,16]",
                   f"method.settings.pair_cache_dir={tmp_path / 'cache'}"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": "ken", "ken.keep_fraction": 0.3, "ken.layers": "no_head"}, ctx, trial_id="k",
                    trial_dir=tmp_path / "trials" / "k")
    _export(uri, parent, "trial:k", tmp_path / "point")
    fresh = _fresh(_image_eval(tmp_path / "point", cfg["data"]), tmp_path)
    assert abs(fresh["val_acc"] - row["val_acc"]) <= TOL
    assert row["finetuned_val_acc"] != row["val_acc"]  # the KEN model, not the fine-tuned one


@pytest.mark.parametrize("module, model_overrides", [
    ("tests.user_code.F1Module", ["model=custom", "model._target_=tests.user_code.PlainNet", "+model.width=8"]),
    ("tests.user_code.SelfBuiltF1Module", []),  # builds its own network: the spec is the module's
])
def test_a_users_module_and_metric_reproduce_from_the_export(tmp_path, module, model_overrides):
    cfg = compose(["+method=magnitude", *model_overrides, f"module._target_={module}", "trial.epochs=2",
                   "trial.finetune_epochs=0", "trial.lr=0.003",
                   "search.objectives=[{metric: val_f1, mode: max}, {metric: flops_deployed, mode: min}]"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_f1", "max"), ("flops_deployed", "min")], module=cfg["module"])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="u",
                    trial_dir=tmp_path / "trials" / "u")
    exported = _export(uri, parent, "max_acc", tmp_path / "point")
    assert exported["selected_by"].startswith("max_acc = best:val_f1 (reads val_f1")
    spec = json.loads((tmp_path / "point" / "pruned_model.json").read_text())["spec"]
    assert spec["kind"] == ("model" if model_overrides else "module")
    fresh = _fresh(f"""
        import lightning as L
        from prunelib.artifact import load_pruned
        from prunelib.data import datamodule_from_config
        from tests.user_code import F1Module
        model = load_pruned({str(tmp_path / "point")!r})
        dm = datamodule_from_config(json.loads({json.dumps(json.dumps(cfg["data"]))}), seed=0)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        logged = trainer.validate(F1Module(model, num_classes=10), datamodule=dm, verbose=False)[0]
        print(json.dumps({{"val_f1": logged["val_f1"]}}))
        """, tmp_path)
    assert abs(fresh["val_f1"] - row["val_f1"]) <= TOL


def test_a_text_trial_exports_a_model_transformers_loads_and_reproduces_its_perplexity(tmp_path, lm_dirs):
    from search.trials.text_config import TEXT_DATA_ARGS as _DATA_KEYS

    dirs, txt = lm_dirs
    cfg = compose(["model=hf", f"model.path={dirs['gpt2']}", "data=text", f"data.path={txt}", "data.max_length=32",
                   "data.limit_eval=32", "+method=wanda", "method.settings.calib_samples=8"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_ppl", "min"), ("flops_effective", "min")])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": "wanda", "wanda.pattern": "2:4"}, ctx, trial_id="w", trial_dir=tmp_path / "trials" / "w")
    exported = _export(uri, parent, "best:val_ppl", tmp_path / "point")
    assert "hf/config.json" in exported["export"]["files"]
    data = {k: cfg["data"][k] for k in _DATA_KEYS if k in cfg["data"]}
    fresh = _fresh(f"""
        import transformers
        from prunelib.artifact import load_pruned
        from prunelib.data.text import build_text_datamodule
        from prunelib.llm import evaluate_text
        from prunelib.models.hf import load_tokenizer
        out = {str(tmp_path / "point")!r}
        model = load_pruned(out)
        dm = build_text_datamodule(tokenizer=load_tokenizer(out + "/hf"), seed=0,
                                   **json.loads({json.dumps(json.dumps(data))}))
        plain = transformers.AutoModelForCausalLM.from_pretrained(out + "/hf", local_files_only=True)
        print(json.dumps({{"val_loss": float(evaluate_text(model, dm, "val")["loss"]),
                           "plain_loss": float(evaluate_text(plain.eval(), dm, "val")["loss"])}}))
        """, tmp_path)
    assert abs(fresh["val_loss"] - row["val_loss"]) <= TOL
    assert abs(fresh["plain_loss"] - row["val_loss"]) <= TOL  # transformers alone loads the same model


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    from tests.test_llm import CATEGORIES, FORTUNES_ROOT, write_fortunes_corpus

    if not FORTUNES_ROOT.is_dir():
        pytest.skip("Debian's fortunes package is not installed (apt-get install fortunes)")
    from prunelib.data.text import build_text_datamodule
    from prunelib.models.hf import build_small_model, save_hf_model, train_text_model, train_tokenizer

    corpus = write_fortunes_corpus(tmp_path_factory.mktemp("corpus"), CATEGORIES, max_chars=300)
    tok = train_tokenizer(corpus["txt"].read_text().split("\n\n"), "bpe", 400)
    dm = build_text_datamodule(corpus["txt"], tok, max_length=32, batch_size=16, limit_train=240, limit_eval=32)
    model = build_small_model("gpt2", "causal_lm", tok, layers=2, hidden=32, heads=2, max_positions=64)
    train_text_model(model, dm, epochs=1, lr=5e-3, progress=None)
    return {"gpt2": save_hf_model(model, tok, tmp_path_factory.mktemp("lm") / "gpt2")}, corpus["txt"]


@pytest.mark.parametrize("uri_root", [False, True], ids=["local", "file-uri"])
def test_keep_weights_front_removes_the_weights_of_trials_that_leave_the_front(tmp_path, uri_root):
    from prunelib.artifact import ArtifactError, load_pruned, read_manifest
    from search import pareto
    from search.storage import SweepStorage

    cfg = compose(["search.n_trials=3", "trial.epochs=2", "trial.finetune_epochs=1", "trial.keep_weights=front"])
    objectives = [("val_acc", "max"), ("flops_deployed", "min")]
    # A URI root (pyarrow's filesystems, as s3:// or gs://) stages each trial and uploads it.
    root = f"file://{tmp_path / 'sweep'}" if uri_root else str(tmp_path / "sweep")
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=objectives, sweep_root=root)
    uri, _ = _track(ctx, tmp_path)
    storage = SweepStorage(ctx.sweep_root)
    # Random and magnitude at the same uniform sparsity cost the same FLOPs; magnitude is far
    # more accurate, so it dominates random. The dense-ish trial is the front's other end.
    plan = [("rnd", {"method": "random", "random.sparsity": 0.9, "random.distribution": "uniform"}),
            ("mag", {"method": "magnitude", "magnitude.sparsity": 0.9, "magnitude.distribution": "uniform"}),
            ("low", {"method": "magnitude", "magnitude.sparsity": 0.2, "magnitude.distribution": "uniform"})]
    rows = {}
    for trial_id, params in plan:
        with storage.trial_dir(trial_id) as trial_dir:
            rows[trial_id] = run_trial(params, ctx, trial_id=trial_id, trial_dir=trial_dir)
    assert rows["rnd"]["flops_deployed"] == rows["mag"]["flops_deployed"]
    assert rows["rnd"]["val_acc"] < rows["mag"]["val_acc"]
    front = set(pareto.pareto_front(list(rows.values()), objectives)["trial_id"])
    assert "rnd" not in front and "mag" in front
    for trial_id, row in rows.items():
        folder = Path(row["artifact_dir"].removeprefix("file://"))
        assert folder == tmp_path / "sweep" / "trials" / trial_id
        if trial_id in front:
            assert load_pruned(folder) is not None  # front points keep theirs
        else:
            manifest = read_manifest(folder, check_weights=False)
            assert "off the front" in manifest["weights_removed"] and not (folder / "weights.safetensors").exists()
            assert (folder / "masks.safetensors").is_file()  # the masks stay
            with pytest.raises(ArtifactError, match="weights were removed"):
                load_pruned(folder)
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            model_id = row["model_uri"].split("/", 1)[1]
            with pytest.raises(MlflowException, match="not found"):  # its MLflow model is deleted ...
                MlflowClient(tracking_uri=uri).get_logged_model(model_id)
            left = [p for d in tmp_path.rglob(model_id) for p in d.rglob("*") if p.is_file()]
            assert not left  # ... and its files too (MLflow alone only marks it deleted)
    kept = [r for t, r in rows.items() if t in front]
    assert all(any(tmp_path.rglob(r["model_uri"].split("/", 1)[1])) for r in kept)
    # The export takes a front point from the storage folder (a URI too) and it loads.
    from search.export import export_point

    exported = export_point(uri, ctx.tracking["parent_run_id"], "best:val_acc", tmp_path / "point")
    assert exported["export"]["source"] == f"the trial's folder {rows[exported['trial_id']]['artifact_dir']}"
    fresh = _fresh(_image_eval(tmp_path / "point", cfg["data"]), tmp_path)
    assert abs(fresh["val_acc"] - rows[exported["trial_id"]]["val_acc"]) <= TOL
    # An off-front trial exports its masks and says its weights are gone.
    masks_only = export_point(uri, ctx.tracking["parent_run_id"], "trial:rnd", tmp_path / "rnd")
    assert masks_only["export"]["kind"] == "masks" and "off the front" in masks_only["export"]["source"]
    assert sorted(masks_only["export"]["files"]) == ["masks.safetensors", "trial.json"]


def test_keep_weights_none_keeps_masks_only_and_a_bad_value_is_a_config_error(tmp_path):
    from search.config import validate_config
    from search.space import ConfigError

    cfg = compose(["+method=magnitude", "trial.epochs=1", "trial.finetune_epochs=0", "trial.keep_weights=none"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_deployed", "min")])
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="n", trial_dir=tmp_path / "n")
    assert row["keep_weights"] == "none" and "artifact_dir" not in row
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["layer_sparsity.json", "masks.safetensors",
                                                                  "trial_result.json"]
    with pytest.raises(ConfigError, match=r"^trial.keep_weights: 'some'"):
        validate_config(compose(["trial.keep_weights=some"]))


def test_a_collapsed_trial_is_flagged_in_its_row_line_mlflow_and_front_table(tmp_path, capsys):
    from prunelib.training import CollapseCheck
    from search.tracking import find_trial_runs
    from search.front_report import print_front
    from search.tune_callbacks import make_front_callback_class as _make_callback_class

    # One class for nearly everything: a model whose logits are a constant.
    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    judged = CollapseCheck().judge(Constant(), [(torch.randn(10, 4), y)])
    assert judged["collapsed"] and judged["top_class_share"] == 1.0 and "one class (1)" in judged["collapse"]
    healthy = torch.nn.Linear(4, 3)
    with torch.no_grad():
        healthy.weight.copy_(torch.eye(3, 4) * 10)
        healthy.bias.zero_()
    x = torch.eye(4)[:3].repeat(4, 1)
    assert not CollapseCheck().judge(healthy, [(x, torch.tensor([0, 1, 2] * 4))])["collapsed"]
    # A trial whose pruning leaves a near-constant model: 98 % of every layer's weights gone at random.
    cfg = compose(["+method=random", "trial.epochs=1", "trial.finetune_epochs=0"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_deployed", "min")])
    uri, parent = _track(ctx, tmp_path)
    row = run_trial({"method": "random", "random.sparsity": 0.98, "random.distribution": "uniform"}, ctx,
                    trial_id="c", trial_dir=tmp_path / "c")
    assert row["collapsed"] is True and row["top_class_share"] >= 0.9 and row["collapse"].startswith("one class")
    logged = next(r for r in find_trial_runs(uri, parent) if r["trial_id"] == "c")
    assert logged["collapsed"] == 1.0 and logged["collapse"] == row["collapse"]  # metric and tag in MLflow
    callback = _make_callback_class()(ctx.objectives, 1, None, None)
    callback._print_line([{**row, "status": "ok"}], "c", None, None)
    assert f"COLLAPSED: {row['collapse']}" in capsys.readouterr().out
    import pandas as pd

    print_front(pd.DataFrame([{**row, "status": "ok"}]), ctx.objectives)
    table = capsys.readouterr().out
    assert "collapsed" in table.splitlines()[2] and "yes" in table


def _readme_take_home() -> tuple[str, str]:
    """The bash and Python blocks of README's "Take a point home", as written."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Take a point home"):]
    section = section[:section.index("\n## ", 1)]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return bash, python


@pytest.mark.slow
def test_readme_take_a_point_home_runs_as_written(tmp_path):
    bash, python = _readme_take_home()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # The commands of this environment (the installed prunesearch, prunesearch-export, python).
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", TUNE_GLOBAL_CHECKPOINT_S="1")
    proc = subprocess.run(["bash", "-e", "-c", bash], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "load it (eval mode, ready to evaluate):" in proc.stdout and "load_pruned(" in proc.stdout
    assert "select=best:val_acc" in proc.stdout
    run = subprocess.run([sys.executable, "-c", python + f"\n{NO_STATE.replace('assert', 'import sys; assert')}\n"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shown = float(run.stdout.strip().splitlines()[-1].split()[-1])
    trial = json.loads((tmp_path / "my_point" / "trial.json").read_text())
    rows = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/*/*/trials/*/trial_result.json")]
    assert len(rows) == 3 and trial["val_acc"] == max(r["val_acc"] for r in rows)
    assert abs(shown - trial["val_acc"]) <= 1e-6  # printed with 6 decimals: equal to rounding
