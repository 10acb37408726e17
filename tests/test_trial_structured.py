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


def _bingo_neuron_trial(tmp_path, *overrides: str):
    """A BINGO neuron-mode trial (whole neurons / filters cut: structured) and its context."""
    cfg = compose(["+method=bingo", "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=400",
                   "trial.fgsm_epsilon=0.1", *overrides])
    objectives = [(o["metric"], o["mode"]) for o in cfg["search"]["objectives"]]  # the shipped default
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=objectives)
    row = run_trial({"method": "bingo", "bingo.unit": "neuron", "bingo.sparsity": 0.5, "bingo.reset_to": "zero",
                     "bingo.metric": "loss", "bingo.warmup_fraction": 0.1, "bingo.allocation": "scores",
                     "bingo.distribution": "uniform", "bingo.probe_frac": 0.05},
                    ctx, trial_id="bingo", trial_dir=tmp_path)
    return cfg, ctx, row


def test_structured_trial_metrics_are_those_of_the_exported_model(tmp_path):
    from prunelib.flops import count_flops
    from prunelib.robustness import fgsm_accuracy
    from prunelib.training import evaluate
    from search.trial import get_datamodule

    from tests.topologies import SHAPE, ResidualDepthwiseConcat

    # BatchNorm after every conv: a filter BINGO masks still adds its BN shift downstream, so
    # the masked model and the surgered one it ships compute different functions (val_loss
    # 2.312 masked against 2.321 exported in this trial): the row must hold the latter's.
    cfg, ctx, row = _bingo_neuron_trial(tmp_path, "model=custom",
                                        "+model._target_=tests.topologies.ResidualDepthwiseConcat")
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
    from search import pareto

    cfg, ctx, row = _bingo_neuron_trial(tmp_path)
    assert ctx.objectives == pareto.DEFAULT_OBJECTIVES == [("val_acc", "max"), ("flops_deployed", "min")]
    physical, effective = row["flops_deployed"], row["flops_effective"]
    assert physical < effective  # the masked figure overstates what the surgered model runs
    dense = {"trial_id": "dense", "method": "magnitude", "val_acc": 1.0, "flops_deployed": row["flops_dense"],
             "flops_effective": row["flops_dense"], "status": "ok"}
    rows = [{**row, "status": "ok"}, dense]
    front = pareto.pareto_front(rows, ctx.objectives)
    assert "bingo" in set(front["trial_id"])
    limit = (physical + effective) / 2  # between what it runs and what its masks alone would say
    assert pareto.select_point(rows, ctx.objectives, f"flops_le:{limit}")["trial_id"] == "bingo"
    assert pareto.select_point(rows, ctx.objectives, "min_flops")["trial_id"] == "bingo"
    # On the masked figure the same budget finds nothing: the defect the default fixes.
    with pytest.raises(ValueError, match="no Pareto point has flops_effective"):
        pareto.select_point(rows, [("val_acc", "max"), ("flops_effective", "min")], f"flops_le:{limit}")


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
