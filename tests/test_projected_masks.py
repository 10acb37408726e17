"""``PruningMethod.projected_masks``: the masks a method is heading for, read mid-training
without changing anything, and the ``projected_*`` figures a trial reports each epoch."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from prunelib import TrainConfig, build_method, run_pruning
from prunelib.data import build_datamodule
from prunelib.masks import MaskSet
from prunelib.methods.base import PruningMethod
from prunelib.models import build_model


@pytest.fixture(scope="module")
def dm():
    return build_datamodule("digits", limit_train=384, batch_size=64)


class _Probe(L.Callback):
    """At every training epoch end: the projection, and proof that it changed nothing."""

    def __init__(self, method: PruningMethod) -> None:
        self.method = method
        self.seen: list[tuple[float, float]] = []  # (current sparsity, projected sparsity)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        masks = self.method.masks
        state = None if masks is None else {n: m.clone() for n, m in masks.masks.items()}
        projected = self.method.projected_masks(model)
        assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
        assert self.method.masks is masks
        if masks is not None:
            assert all(torch.equal(state[n], m) for n, m in masks.masks.items())
        current = masks.sparsity(model) if masks is not None else 0.0
        self.seen.append((current, projected.sparsity(model) if projected is not None else 0.0))


@pytest.mark.parametrize("name, settings, epochs", [
    ("magnitude", {"sparsity": 0.8}, 2),
    ("gmp", {"sparsity": 0.85, "end_fraction": 0.9}, 3),
    ("imp", {"sparsity": 0.8, "rounds": 2}, 2),
    ("gap", {"sparsity": 0.75, "num_partitions": 3, "epochs_per_step": 1}, 3),
    ("bingo", {"sparsity": 0.7, "probe_every_n_steps": 2}, 2),
    ("bingo", {"sparsity": 0.5, "unit": "neuron", "probe_every_n_steps": 2}, 2),
    ("polarization", {"sparsity": 0.5}, 2),
])
def test_projection_is_the_target_from_the_first_epoch(dm, name, settings, epochs):
    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = build_method(name, **settings)
    probe = _Probe(method)
    result = run_pruning(model, dm, method, TrainConfig(epochs=epochs, finetune_epochs=1, accelerator="cpu"),
                         callbacks=[probe])
    target = result.sparsity  # what the method reached (neuron mode: within a channel of the setting)
    assert target == pytest.approx(settings["sparsity"], abs=0.02)
    assert probe.seen, "no epoch was observed"
    assert all(p == pytest.approx(target, abs=0.02) for _, p in probe.seen), probe.seen
    # ...while the masks themselves were still behind at the first epoch (dense, mid-ramp, round 1).
    assert probe.seen[0][0] < target - 0.05


def test_polarization_projection_is_costed_on_the_surgered_model_while_gates_train(dm):
    """Mid-training (gates attached) the projection's cost is counted on a surgered copy: the
    gates' hooks must leave that copy alone, and the projected FLOPs are those of the target."""
    from prunelib.flops import model_cost

    torch.manual_seed(0)
    model = build_model("lenet5", dm.input_shape, dm.num_classes)
    method = build_method("polarization", sparsity=0.6)
    costs: list = []

    class _Cost(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if method._gates is not None:
                projected = method.projected_masks(pl_module.model)
                costs.append(model_cost(pl_module.model, dm.input_shape, projected))

    result = run_pruning(model, dm, method, TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"),
                         callbacks=[_Cost()])
    assert costs, "no epoch was observed with the gates attached"
    final = model_cost(result.model, dm.input_shape, result.masks)
    for cost in costs:
        assert cost.flops_deployed < cost.flops_dense  # the surgered copy is smaller
        assert cost.flops_deployed == pytest.approx(final.flops_deployed, rel=0.25)


def test_default_projection_is_the_current_masks():
    method = PruningMethod()
    assert method.projected_masks(torch.nn.Linear(2, 2)) is None
    method.masks = MaskSet()
    assert method.projected_masks(torch.nn.Linear(2, 2)) is method.masks


def test_a_trial_reports_where_it_is_heading_each_epoch():
    from search.config import build_search_space
    from search.trial import TrialContext, run_trial
    from tests.conftest import compose

    cfg = compose(["+method=magnitude", "method.settings.sparsity=0.7", "method.settings.distribution=global",
                   "trial.epochs=2", "trial.finetune_epochs=1", "data.limit_train=384", "tracking.kind=none"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max"), ("flops_effective", "min")], report_every_epoch=True)
    reports: list[dict] = []
    row = run_trial({"method": "magnitude"}, ctx, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    # Dense while training; the projection at the last training epoch is exactly the cut that
    # follows it (same weights, same ranking); after the cut both agree.
    assert reports[0]["flops_effective"] == row["flops_dense"]
    assert reports[1]["projected_flops_effective"] == row["flops_effective"] < row["flops_dense"]
    assert reports[2]["flops_effective"] == reports[2]["projected_flops_effective"] == row["flops_effective"]
    assert reports[0]["projected_sparsity"] == pytest.approx(0.7, abs=1e-3)
    # The accuracy of that cut model is reported beside it while it differs from the current one.
    assert all(0.0 <= r["projected_val_acc"] <= 1.0 for r in reports[:2]) and "projected_val_acc" not in reports[2]


def test_evaluate_masked_scores_the_cut_and_restores_the_model(dm):
    import copy

    from prunelib.training import evaluate, evaluate_masked

    torch.manual_seed(0)
    model = build_model("mlp", dm.input_shape, dm.num_classes)
    method = build_method("magnitude", sparsity=0.9)
    method.setup(model)
    masks = method.projected_masks(model)
    before = copy.deepcopy(model.state_dict())
    score = evaluate_masked(model, masks, dm.val_dataloader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cut = copy.deepcopy(model)
    masks.apply(cut)
    assert score == evaluate(cut, dm.val_dataloader()) != evaluate(model, dm.val_dataloader())
