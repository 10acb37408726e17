"""A trial with a structured method keeps, times and exports the physically smaller model."""

from __future__ import annotations

import json

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
