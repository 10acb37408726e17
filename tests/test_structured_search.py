"""Structured transformer sweeps under a budget (issue 27, the search side): the text trial of
``llm_structured`` (dense counted before pruning, physical deployed figures, latency on the
exported checkpoint, the export reproducing the trial's perplexity in a fresh process),
``search.constraints`` (parsed once, checked against what trials report, handed to the sampler,
feasible trials marked and kept on the front), the default objectives of text sweeps, the front
of a text sweep reaching MLflow, and the bad structured inputs refused before Ray starts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

from prunelib.data.corpora import FORTUNES_ROOT, write_fortunes_corpus  # noqa: E402
from prunelib.models.hf import save_hf_model, train_tokenizer  # noqa: E402
from search.errors import ConfigError  # noqa: E402
from search.settings import SearchSettings, constraint_values, parse_constraints  # noqa: E402
from tests.conftest import compose  # noqa: E402

CATEGORIES = ["computers", "definitions", "people", "songs-poems"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# search.constraints: syntax, checks, sampler
# ------------------------------------------------------------------------------------------------
def test_constraints_parse_into_bounds_and_bad_ones_are_one_line_errors():
    relative, absolute = parse_constraints("search.constraints", ["params_deployed <= 0.5 * dense", "latency_ms<20"])
    assert relative.relative and relative.factor == 0.5 and relative.metric == "params_deployed"
    assert not absolute.relative and absolute.factor == 20 and absolute.op == "<"
    row = {"params_deployed": 40, "params_dense": 100, "latency_ms": 25.0}
    assert relative.met(row) and relative.violation(row) == pytest.approx(-0.2)
    assert not absolute.met(row) and absolute.violation(row) == pytest.approx(0.25)
    assert constraint_values([relative, absolute], row) == pytest.approx([-0.2, 0.25])
    assert constraint_values([absolute], {}) == [1.0]  # a metric the trial never reported: missed
    (at_least,) = parse_constraints("c", ["val_acc >= dense * 0.9"])
    assert at_least.met({"val_acc": 0.9, "dense_val_acc": 0.95}) and not at_least.met({"val_acc": 0.8,
                                                                                        "dense_val_acc": 0.95})
    for raw, match in (("params_deployed <= 1", r"search.constraints: expected a list"),
                       (["params_deployed == 5"], r"search.constraints\[0\]: operator '==' .* not one of"),
                       (["params_deployed <= 0.5 * dense", "flops_deployed ~ 3"], r"search.constraints\[1\]: .* is not"),
                       (["latency_ms <= inf"], r"search.constraints\[0\]: bound 'inf' .* not a finite number"),
                       (["latency_ms <= nan * dense"], r"search.constraints\[0\]: bound .* not a finite number"),
                       (["latency_ms <= 0.5 * dense"], r"search.constraints\[0\]: .* no dense value of 'latency_ms'"),
                       (["test_acc >= 0.5"], r"search.constraints\[0\]: 'test_acc' is measured on the test split"),
                       ([3], r"search.constraints\[0\]: 3 must be a string")):
        with pytest.raises(ConfigError, match=match) as info:
            SearchSettings.from_dict({"constraints": raw})
        assert "\n" not in str(info.value)


def test_preflight_refuses_a_constraint_on_a_metric_no_method_reports():
    from search.config import validate_config

    validate_config(compose(["+method=magnitude", "search.constraints=['flops_deployed <= 0.5 * dense']"]))
    from search.preflight import preflight

    latency = preflight(compose(["+method=magnitude", "search.constraints=['latency_ms <= 20']"]), build=False,
                        open_stores=False)
    assert latency.cfg["trial"]["measure_latency"] is True  # a latency budget makes every trial measure it
    with pytest.raises(ConfigError, match=r"^search.constraints\[0\]: 'val_ppl' is not reported by magnitude"):
        validate_config(compose(["+method=magnitude", "search.constraints=['val_ppl <= 30']"]))
    with pytest.raises(ConfigError, match=r"^search.constraints\[0\]: 'tokens_per_s' is not reported"):
        validate_config(compose(["+method=magnitude", "search.constraints=['tokens_per_s >= 3']"]))


def test_the_study_searcher_gives_each_trial_its_constraint_values_and_the_sampler_reads_them(tmp_path):
    from ray import tune

    from search.sampling import CONSTRAINTS_ATTR, trial_constraints_api
    from search.study_searcher import StudySearcher

    search = {"sampler": "mo_tpe", "seed": 0, "n_trials": 8, "n_startup_trials": 4,
              "constraints": ["flops_deployed <= 0.5 * dense"]}
    searcher = StudySearcher({"x": tune.uniform(0, 100)}, [("val_acc", "max"), ("flops_deployed", "min")], search,
                             study_name="c", storage_url=None)
    for i, flops in enumerate((10.0, 80.0)):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"val_acc": 0.5, "flops_deployed": flops, "flops_dense": 100.0})
    trials = searcher.study.get_trials()
    attrs = [t.user_attrs[CONSTRAINTS_ATTR]["flops_deployed <= 0.5 * dense"] for t in trials]
    assert attrs == pytest.approx([-0.8, 0.6]) and [t.user_attrs["feasible"] for t in trials] == [True, False]
    if trial_constraints_api():  # what TPE / NSGA-II read
        assert [t.constraints for t in trials] == [pytest.approx({"0": -0.8}), pytest.approx({"0": 0.6})]
    # A trial stopped early (no result) has no values; the sampler goes on.
    searcher.suggest("t2")
    searcher.on_trial_complete("t2", None, error=True)
    assert searcher.suggest("t3") is not None


def test_the_front_keeps_the_trials_that_met_the_constraints(capsys):
    from search.front_report import mark_feasible

    rows = [{"trial_id": "a", "flops_deployed": 10, "flops_dense": 100},
            {"trial_id": "b", "flops_deployed": 80, "flops_dense": 100}]
    constraints = parse_constraints("c", ["flops_deployed <= 0.5 * dense"])
    assert [r["trial_id"] for r in mark_feasible(rows, constraints)] == ["a"]
    assert [r["feasible"] for r in rows] == [True, False]
    assert "1 of 2 trial(s) met them; the front and front/ hold only those" in capsys.readouterr().out
    none = parse_constraints("c", ["flops_deployed <= 1"])
    assert mark_feasible(rows, none) == rows and "no trial met them" in capsys.readouterr().out
    assert mark_feasible(rows, ()) == rows


# ------------------------------------------------------------------------------------------------
# The front's MLflow logging and its console line
# ------------------------------------------------------------------------------------------------
def test_a_nested_layer_file_no_longer_breaks_the_plots_and_the_console_names_the_failure(tmp_path, capsys):
    from search.front_report import print_problems
    from search.plots import load_layer_sparsity

    (tmp_path / "layer_sparsity.json").write_text(json.dumps({"layers": {"x": {"sparsity": 0.5}},
                                                              "block_sparsity": [0.5], "w": 0.25}))
    rows = [{"trial_id": "t", "status": "ok", "masks_path": str(tmp_path / "masks.safetensors")}]
    assert load_layer_sparsity(rows) == {"t": {"w": 0.25}}  # the numbers only
    print_problems([], ["front after 3 trials: TypeError: float() argument must be ... not 'dict'"], lambda t: t)
    out = capsys.readouterr().out
    assert "MLflow logging failed for 0 trial(s) and 1 front update(s) (first error: front after 3 trials: TypeError" in out
    assert "unreachable" not in out
    print_problems([], ["front after 3 trials: ConnectionError: Max retries exceeded"], lambda t: t)
    assert "MLflow was unreachable for 0 trial(s) and 1 front update(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# A tiny Llama with grouped-query attention, and the default objectives of text sweeps
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A 3-block Llama, 4 query heads over 2 KV heads, hidden 32, saved with its tokenizer; the
    fortunes corpus as language-modelling text. Random weights: every figure is still real."""
    if not FORTUNES_ROOT.is_dir():
        pytest.skip("Debian's fortunes package is not installed (apt-get install fortunes)")
    root = tmp_path_factory.mktemp("gqa")
    corpus = write_fortunes_corpus(root / "corpus", CATEGORIES, max_chars=300)
    tok = train_tokenizer(corpus["txt"].read_text().split("\n\n"), "bpe", 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=True, initializer_range=0.1,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    return save_hf_model(model, tok, root / "llama"), corpus


def _text(gqa_llama, *extra: str) -> list[str]:
    model_dir, corpus = gqa_llama
    return ["model=hf", f"model.path={model_dir}", "data=text", f"data.path={corpus['txt']}", "data.max_length=16",
            "data.limit_eval=16", "data.limit_train=200", *extra]


STRUCTURED = ["+method=llm_structured", "method.settings.calib_samples=8", "method.settings.calib_batch_size=4"]
# Search one FFN fraction per block (the tiny Llama has 3) instead of one for all blocks.
PER_LAYER_SEARCH = ["method.space.allocation.choices=[per_layer]", "~method.space.ffn_sparsity",
                    "+method.space.ffn_fractions={type: float, low: 0.0, high: 0.7, size: 3, when: {allocation: per_layer}}"]


def test_default_objectives_are_perplexity_for_a_causal_lm_and_accuracy_elsewhere(gqa_llama):
    from search.settings import SweepSettings

    _, corpus = gqa_llama
    assert SweepSettings.from_dict(compose([])).objectives == (("val_acc", "max"), ("flops_deployed", "min"))
    lm = compose(_text(gqa_llama))
    assert SweepSettings.from_dict(lm).objectives == (("val_ppl", "min"), ("flops_deployed", "min"))
    table = compose(["model=hf", f"model.path={gqa_llama[0]}", "data=text", f"data.path={corpus['jsonl']}"])
    assert SweepSettings.from_dict(table).objectives == (("val_acc", "max"), ("flops_deployed", "min"))
    given = compose(_text(gqa_llama, "search.objectives=[{metric: val_loss, mode: min}]"))
    assert SweepSettings.from_dict(given).objectives == (("val_loss", "min"),)


# ------------------------------------------------------------------------------------------------
# Bad structured inputs: refused by the pre-flight's build step, before Ray starts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    (["method.settings.depth_sparsity=0.9"], r"^method\[llm_structured\]\.settings: depth_sparsity: 0.9 of 3 blocks "
                                             r"removes all 3"),
    (["method.settings.head_sparsity=0.0", "method.settings.keep_heads=3", "~method.space.head_sparsity"],
     r"^method\[llm_structured\]\.settings: keep_heads: 3 query heads is not a whole number of GQA groups"),
    (["method.space.depth_sparsity.high=0.95"], r"^method\[llm_structured\]\.space\.depth_sparsity: value 0.95: "
                                                r"depth_sparsity: 0.95 of 3 blocks removes all 3"),
    (["method.settings.blocks_path=model.blocks"], r"^method\[llm_structured\]\.settings: blocks_path: "),
    (["method.settings.allocation=per_layer", "method.settings.ffn_fractions=[0.1,0.2]", "~method.space.allocation",
      "~method.space.owl_lambda"], r"^method\[llm_structured\]\.settings: ffn_fractions: 2 fractions given, the "
                                   r"model has 3 blocks"),    # A searched per-block vector whose size is not the model's block count (3).
    (["method.space.allocation.choices=[uniform,per_layer]",
      "+method.space.ffn_fractions={type: float, low: 0.0, high: 0.5, size: 2, when: {allocation: per_layer}}"],
     r"^method\[llm_structured\]\.space\.ffn_fractions: value \[0\.0\] x 2: ffn_fractions: 2 fractions given, the "
     r"model has 3 blocks"),
])
def test_bad_structured_inputs_are_refused_before_ray_starts(gqa_llama, extra, match):
    from search.preflight import build_check, preflight

    cfg = compose(_text(gqa_llama, *STRUCTURED, *extra))
    with pytest.raises(ConfigError, match=match) as info:
        pre = preflight(cfg, build=False, open_stores=False)
        build_check(pre.cfg)
    assert "\n" not in str(info.value)


def test_a_per_block_vector_of_the_model_s_length_passes_the_pre_flight(gqa_llama):
    """The override that conf/method/llm_structured.yaml documents, at this model's 3 blocks."""
    from search.preflight import build_check, preflight

    cfg = compose(_text(gqa_llama, *STRUCTURED, *PER_LAYER_SEARCH))
    pre = preflight(cfg, build=False, open_stores=False)
    build_check(pre.cfg)
    dims = {d.key: d for d in pre.space.spaces["llm_structured"].dims}
    assert dims["ffn_fractions"].size == 3 and "ffn_sparsity" not in dims


def test_a_model_that_is_not_a_known_transformer_is_refused_naming_model_path(gqa_llama, tmp_path):
    from search.preflight import build_check, preflight

    model_dir, _ = gqa_llama
    # GPT-Neo: a causal LM whose blocks (transformer.h) are none of the known families.
    config = transformers.GPTNeoConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                                       attention_types=[[["global"], 2]], max_position_embeddings=64)
    other = transformers.GPTNeoForCausalLM(config)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    save_hf_model(other, tok, tmp_path / "neo")
    cfg = compose(_text(gqa_llama, *STRUCTURED) + [f"model.path={tmp_path / 'neo'}"])
    with pytest.raises(ConfigError, match=r"^model\.path: the blocks at 'transformer.h' of GPTNeoForCausalLM") as info:
        build_check(preflight(cfg, build=False, open_stores=False).cfg)
    assert "\n" not in str(info.value)


def test_subprocess_exit_status_is_2_for_a_bad_structured_setting(gqa_llama, tmp_path):
    """The command line: one line naming the key, exit 2, nothing started."""
    args = [sys.executable, "-m", "search", *_text(gqa_llama, *STRUCTURED, "method.settings.depth_sparsity=0.9"),
            f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "method[llm_structured].settings: depth_sparsity: 0.9 of 3 blocks removes all 3" in done.stderr + done.stdout


# ------------------------------------------------------------------------------------------------
# The structured text trial
# ------------------------------------------------------------------------------------------------
def _ctx(overrides: list[str], objectives):
    from search.config import build_search_space, validate_config
    from search.trial import TrialContext

    cfg = compose(overrides)
    validate_config(cfg)
    return TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                        objectives=objectives)


def _reload_and_score(artifact_dir: Path, model_dir: Path, data_path: Path, tmp_path: Path) -> dict:
    """In a fresh process: load the trial's export as transformers does (no prunesearch class),
    and score it on the same validation split; returns what it measured."""
    script = textwrap.dedent(f"""
        import json, sys, transformers
        from prunelib.artifact import read_manifest
        manifest = read_manifest({str(artifact_dir)!r})
        spec = manifest["spec"]["config"]
        auto = transformers.AutoModelForCausalLM
        model = auto.from_pretrained({str(artifact_dir)!r} + "/" + spec["path"], local_files_only=True,
                                     trust_remote_code=spec["trust_remote_code"]).eval()
        loaded_from = type(model).__module__
        from prunelib.data.text import build_text_datamodule
        from prunelib.llm import evaluate_text
        from prunelib.models.hf import load_tokenizer
        tok = load_tokenizer({str(model_dir)!r})
        dm = build_text_datamodule({str(data_path)!r}, tok, max_length=16, limit_eval=16, limit_train=200, seed=0)
        out = evaluate_text(model, dm, "val")
        print(json.dumps({{"ppl": float(out["ppl"]), "module": loaded_from,
                          "params": sum(p.numel() for p in model.parameters())}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["uniform", "per_layer"])
def test_structured_trial_reports_physical_costs_and_its_export_reproduces_its_perplexity(gqa_llama, tmp_path, case):
    from search.trial import run_trial

    model_dir, corpus = gqa_llama
    extra = ["trial.measure_latency=true", "method.settings.distill_steps=2"]
    params = {"method": "llm_structured", "llm_structured.ffn_sparsity": 0.5, "llm_structured.head_sparsity": 0.5,
              "llm_structured.depth_sparsity": 0.34, "llm_structured.importance": "fluctuation",
              "llm_structured.bias_compensation": True, "llm_structured.allocation": "uniform"}
    if case == "per_layer":  # per-block widths: the export needs its loader file (trust_remote_code)
        extra = ["method.settings.allocation=per_layer", "method.settings.ffn_fractions=[0.1,0.5,0.7]",
                 "~method.space.allocation", "~method.space.owl_lambda", "~method.space.ffn_sparsity",
                 "~method.space.depth_sparsity"]
        params = {"method": "llm_structured", "llm_structured.head_sparsity": 0.0,
                  "llm_structured.importance": "activation"}
    ctx = _ctx(_text(gqa_llama, *STRUCTURED, *extra), [("val_ppl", "min"), ("flops_deployed", "min")])
    row = run_trial(params, ctx, trial_id=f"s_{case}", trial_dir=tmp_path / "t")
    # Dense counted before the cut; deployed = the physical smaller model.
    assert row["artifact"] == "surgered" and row["flops_deployed"] == row["flops_physical"] < row["flops_dense"]
    assert row["params_deployed"] == row["params_physical"] < row["params_dense"]
    dense_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert row["params_dense"] == dense_params
    assert row["sparsity"] == pytest.approx(1 - row["params_physical"] / row["params_dense"])
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"])) and row["dense_val_ppl"] > 1
    assert row["extra_forward_passes"] > 0
    layers = json.loads((tmp_path / "t" / "layer_sparsity.json").read_text())
    assert all(isinstance(v, float) for v in layers.values()) and len(layers) == 6
    if case == "uniform":
        assert row["export_format"] == "stock" and row["latency_ms"] > 0
        assert row["distill_steps"] == 2 and row["distill_s"] > 0 and row["extra_backward_passes"] > 0
        assert layers["block0.ffn"] in (0.5, 1.0)
    else:
        assert row["export_format"] == "remote_code" and "latency_ms" not in row
        assert [layers[f"block{i}.ffn"] for i in range(3)] == [0.1, 0.5, 0.7]
    reloaded = _reload_and_score(tmp_path / "t", model_dir, corpus["txt"], tmp_path)
    assert reloaded["params"] == row["params_physical"]
    assert reloaded["ppl"] == pytest.approx(row["val_ppl"], rel=1e-4)
    assert reloaded["module"].startswith("transformers_modules" if case == "per_layer" else "transformers.")
    from prunelib.artifact import load_pruned  # the project's own loader reads the manifest's spec

    assert sum(p.numel() for p in load_pruned(tmp_path / "t").parameters()) == row["params_physical"]


# ------------------------------------------------------------------------------------------------
# Sweeps (Ray)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_structured_text_sweep_under_a_constraint_end_to_end(gqa_llama, tmp_path, ray_local, capsys):
    import mlflow

    from search.tuner import run_sweep

    model_dir, corpus = gqa_llama
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(_text(gqa_llama, *STRUCTURED, "search.n_trials=3", "search.concurrency=1",
                        "search.objectives=[{metric: val_ppl, mode: min}, {metric: flops_deployed, mode: min}]",
                        "search.constraints=['params_deployed <= 0.95 * dense']", f"tracking.uri={uri}"))
    result = run_sweep(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert len(result.rows) == 3 and all(r["status"] == "ok" for r in result.rows), out[-3000:]
    assert all("feasible" in r for r in result.rows)
    feasible = [r for r in result.rows if r["feasible"]]
    assert all(r["params_deployed"] <= 0.95 * r["params_dense"] for r in feasible)
    assert "MLflow logging failed" not in out and "MLflow was unreachable" not in out
    assert len(result.front) >= 1
    for _, point in result.front.iterrows():  # physical FLOPs of the smaller models
        assert point["flops_deployed"] == point["flops_physical"] < point["flops_dense"]
        assert not feasible or point["feasible"]
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert "hypervolume" in parent.data.metrics and "feasible_trials" in parent.data.metrics
    assert {"front/front.csv", "front/trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "front")}
    tags = {r["trial_id"]: client.get_run(r["mlflow_run_id"]).data.tags.get("prunesearch.feasible")
            for r in result.rows}
    assert tags == {r["trial_id"]: str(r["feasible"]).lower() for r in result.rows}
    # An exported front point loads in a fresh process and reproduces its perplexity.
    best = result.front.iloc[0]
    row = next(r for r in result.rows if r["trial_id"] == best["trial_id"])
    reloaded = _reload_and_score(Path(row["artifact_dir"]), model_dir, corpus["txt"], tmp_path)
    assert reloaded["ppl"] == pytest.approx(row["val_ppl"], rel=1e-4)


@pytest.mark.slow
def test_a_wanda_text_sweep_logs_its_front_to_the_parent_run(gqa_llama, tmp_path, ray_local, capsys):
    """Issue 27 Deliver 6: every front update of a text sweep failed in MLflow (a nested
    layer_sparsity.json); the parent run now holds the front, with perplexity by default."""
    import mlflow

    from search.tuner import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(_text(gqa_llama, "+method=wanda", "method.settings.calib_samples=8", "search.n_trials=2",
                        "search.concurrency=1", f"tracking.uri={uri}"))
    result = run_sweep(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert all(r["status"] == "ok" for r in result.rows), out[-3000:]
    assert "could not log the front" not in out and "MLflow logging failed" not in out, out[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert json.loads(parent.data.tags["prunesearch.objectives"]) == [["val_ppl", "min"], ["flops_deployed", "min"]]
    assert parent.data.metrics["front_size"] >= 1 and "final_hypervolume" in parent.data.metrics
    front_files = {a.path for a in client.list_artifacts(parent.info.run_id, "front")}
    assert {"front/front.csv", "front/front.png", "front/layer_sparsity.png"} <= front_files


@pytest.mark.slow
def test_a_structured_sweep_searches_one_ffn_fraction_per_block(gqa_llama, tmp_path, ray_local, capsys):
    """Issue 27 item 2: the per-layer vector searched by the orchestrator (``size:`` = the
    model's 3 blocks), each trial pruned with its own list, recorded as a list."""
    import mlflow

    from search.tuner import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = compose(_text(gqa_llama, *STRUCTURED, *PER_LAYER_SEARCH, "method.settings.head_sparsity=0.0",
                        "~method.space.head_sparsity", "~method.space.depth_sparsity", "search.n_trials=2",
                        "search.concurrency=1", f"tracking.uri={uri}"))
    result = run_sweep(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert len(result.rows) == 2 and all(r["status"] == "ok" for r in result.rows), out[-3000:]
    vectors = [r["param.ffn_fractions"] for r in result.rows]
    assert all(isinstance(v, list) and len(v) == 3 and all(0.0 <= f <= 0.7 for f in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert all(r["param.allocation"] == "per_layer" for r in result.rows)
    client = mlflow.tracking.MlflowClient(uri)
    for r, v in zip(result.rows, vectors):
        # Each trial pruned each block by its own entry (64 FFN channels a block: rounding 1/64).
        layers = json.loads((Path(r["masks_path"]).parent / "layer_sparsity.json").read_text())
        assert [layers[f"block{i}.ffn"] for i in range(3)] == pytest.approx(v, abs=1.01 / 64)
        assert client.get_run(r["mlflow_run_id"]).data.params["ffn_fractions"] == str(v)
    from search.tracking import find_trial_runs

    back = {row["trial_id"]: row["param.ffn_fractions"] for row in find_trial_runs(uri, result.parent_run_id)}
    assert back == {r["trial_id"]: r["param.ffn_fractions"] for r in result.rows}  # MLflow gives lists back
