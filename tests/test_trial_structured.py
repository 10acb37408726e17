"""A trial with a structured method keeps, times and exports the physically smaller model, and
reports the metrics and costs of that model."""

from __future__ import annotations

import json

import pytest
import torch

from prunelib.surgery import load_surgered
from search.config import build_search_space
from search.trial import TrialContext, run_trial
from tests.conftest import compose


def test_paoding_trial_reports_physical_flops_fgsm_and_exports_the_smaller_model(tmp_path):
    cfg = compose(["+method=paoding", "trial.epochs=2", "data.limit_train=400", "trial.fgsm_epsilon=0.1",
                   "trial.export_onnx=true"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_physical", "min")])
    row = run_trial({"method": "paoding", "paoding.dense_ratio": 0.5}, ctx, trial_id="pao", trial_dir=tmp_path)
    assert row["flops_physical"] < 0.75 * row["flops_dense"]  # half the hidden neurons merged away
    assert 0.0 <= row["val_fgsm_acc"] <= row["val_acc"]
    assert row["epochs"] == 2  # the dense pre-training only: PAODING itself reads no data
    smaller = load_surgered(tmp_path / "surgered")
    assert (tmp_path / "surgered" / "model.onnx").stat().st_size > 1000
    n_params = sum(p.numel() for p in smaller.parameters())
    assert n_params == row["params_physical"] < row["params_dense"]
    assert smaller(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_rl_pruner_trial_writes_its_learned_distribution_and_a_smaller_model(tmp_path):
    cfg = compose(["+method=rl_pruner", "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_physical", "min")])
    row = run_trial({"method": "rl_pruner"}, ctx, trial_id="rl", trial_dir=tmp_path)
    assert row["flops_physical"] < row["flops_dense"]
    assert (tmp_path / "rl_pruner" / "rl_pruner_distribution.png").stat().st_size > 5000
    history = json.loads((tmp_path / "rl_pruner" / "rl_pruner_distribution.json").read_text())
    assert history  # the per-step distributions the method learned
    assert (tmp_path / "surgered" / "structure.json").is_file()


#: A BINGO neuron-mode trial: whole neurons / filters cut, so structured masks.
BINGO_NEURONS = {"method": "bingo", "bingo.unit": "neuron", "bingo.sparsity": 0.5, "bingo.probe_frac": 0.05}


def _bingo_context(*overrides: str) -> tuple[dict, TrialContext]:
    """A small BINGO config and its trial context, on the shipped default objectives."""
    cfg = compose(["+method=bingo", "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400",
                   "trial.fgsm_epsilon=0.1", *overrides])
    from search.settings import objectives_of  # search.objectives: null = the model's defaults

    objectives = objectives_of(cfg)
    return cfg, TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"],
                             space=build_search_space(cfg), objectives=objectives)


def test_structured_trial_metrics_are_those_of_the_exported_model(tmp_path):
    from prunelib.flops import count_flops
    from prunelib.robustness import fgsm_accuracy
    from prunelib.training import evaluate
    from search.trial import get_datamodule

    from tests.topologies import SHAPE, ResidualDepthwiseConcat

    # BatchNorm after every conv: a filter BINGO masks still adds its BN shift downstream, so
    # the masked model and the surgered one it ships compute different functions (val_loss
    # 2.312 masked against 2.321 exported in this trial): the row must hold the latter's.
    cfg, ctx = _bingo_context("model=custom", "+model._target_=tests.topologies.ResidualDepthwiseConcat")
    row = run_trial(BINGO_NEURONS, ctx, trial_id="bingo", trial_dir=tmp_path)
    assert row["artifact"] == "surgered"
    # What a user takes home, read back from disk.
    exported = load_surgered(tmp_path / "surgered", base_model=ResidualDepthwiseConcat())
    shape = SHAPE
    # Its cost is the artifact's own (physical), and it is the default objective's figure.
    assert row["flops_deployed"] == row["flops_physical"] == count_flops(exported, shape) < row["flops_effective"]
    assert row["params_deployed"] == row["params_physical"] == sum(p.numel() for p in exported.parameters())
    dm = get_datamodule(ctx.data, "cpu", int(cfg["trial"]["seed"]))
    assert row["val_acc"] == evaluate(exported, dm.val_dataloader())["acc"]
    assert row["val_loss"] == pytest.approx(evaluate(exported, dm.val_dataloader())["loss"], rel=1e-6)
    assert row["test_acc"] == evaluate(exported, dm.test_dataloader())["acc"]
    assert row["val_fgsm_acc"] == fgsm_accuracy(exported, dm.val_dataloader(), epsilon=0.1).attacked_accuracy
    assert exported(torch.randn(2, *shape)).shape == (2, 10)


def test_the_physical_flops_front_and_flops_le_select_on_the_exported_model(tmp_path):
    from prunelib.masks import MaskSet
    from search import pareto
    from search.export import export_point
    from search.tracking import SweepTracker

    # A tracked trial under a sweep parent that declares the shipped default objectives.
    _, ctx = _bingo_context()
    objectives = ctx.objectives
    assert objectives == pareto.DEFAULT_OBJECTIVES == [("val_acc", "max"), ("flops_deployed", "min")]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SweepTracker(uri, "deployed-flops")
    parent = tracker.start_parent("sweep", params={}, tags={"prunesearch.objectives": json.dumps(objectives)})
    ctx.tracking = {"uri": uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent}
    row = run_trial(BINGO_NEURONS, ctx, trial_id="bingo", trial_dir=tmp_path / "bingo")
    physical, effective = row["flops_deployed"], row["flops_effective"]
    assert physical == row["flops_physical"] < effective  # the masked figure overstates what it runs
    dense = {"trial_id": "dense", "method": "magnitude", "val_acc": 1.0, "flops_deployed": row["flops_dense"],
             "flops_effective": row["flops_dense"], "status": "ok"}
    rows = [{**row, "status": "ok"}, dense]
    assert "bingo" in set(pareto.pareto_front(rows, objectives)["trial_id"])
    limit = (physical + effective) / 2  # between what it runs and what its masks alone would say
    assert pareto.select_point(rows, objectives, f"flops_le:{limit}")["trial_id"] == "bingo"
    assert pareto.select_point(rows, objectives, "min_flops")["trial_id"] == "bingo"
    # On the masked figure the same budget finds nothing: the defect the default fixes.
    with pytest.raises(ValueError, match="no Pareto point has flops_effective"):
        pareto.select_point(rows, [("val_acc", "max"), ("flops_effective", "min")], f"flops_le:{limit}")
    # The export reads the trial back from MLflow and selects on the same figure.
    chosen = export_point(uri, parent, f"flops_le:{limit}", tmp_path / "picked.safetensors")
    assert chosen["trial_id"] == "bingo" and chosen["flops_deployed"] == physical and chosen["artifact"] == "surgered"
    assert MaskSet.load(tmp_path / "picked.safetensors").metadata["trial_id"] == "bingo"


def test_a_cost_that_cannot_be_measured_fails_the_trial_with_its_reason(tmp_path, monkeypatch):
    import prunelib.surgery
    from prunelib.surgery import SurgeryError
    from search.trial import TrialFailed

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise SurgeryError("group fc1 feeds an op surgery cannot cut")

    monkeypatch.setattr(prunelib.surgery, "surgery", refuse)
    cfg = compose(["+method=paoding", "trial.epochs=1", "data.limit_train=200"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_deployed", "min")])
    with pytest.raises(TrialFailed, match="cost of the exported model cannot be measured.*feeds an op"):
        run_trial({"method": "paoding", "paoding.dense_ratio": 0.5}, ctx, trial_id="cut", trial_dir=tmp_path)
    assert not (tmp_path / "trial_result.json").exists()  # no row with a dense stand-in


def test_a_structured_trial_traces_its_model_once_for_every_cost_report_and_the_export(tmp_path, monkeypatch):
    import prunelib.surgery as surgery_module
    from prunelib.flops import count_flops

    traced = []
    build = surgery_module._build_graph
    monkeypatch.setattr(surgery_module, "_build_graph", lambda m, s: traced.append(type(m).__name__) or build(m, s))
    cfg = compose(["+method=bingo", "method.settings.unit=neuron", "trial.epochs=2", "trial.finetune_epochs=1",
                   "data.limit_train=400"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_physical", "min")], report_every_epoch=True)
    reports = []
    row = run_trial({"method": "bingo", "bingo.sparsity": 0.5}, ctx, trial_id="once", trial_dir=tmp_path,
                    report=reports.append)
    assert len(reports) == 3 and all(r["projected_flops_physical"] < r["flops_dense"] for r in reports)
    assert reports[-1]["flops_physical"] == row["flops_physical"] < row["flops_dense"]  # the fine-tune epoch: cut
    # One trace: the per-epoch costs (current and projected), the final cost and the export.
    assert traced == ["MLP"]
    smaller = load_surgered(tmp_path / "surgered")
    assert count_flops(smaller, (1, 8, 8)) == row["flops_physical"]
