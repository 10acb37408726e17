"""The user's LightningModule as the training step: the pruning callback attached, never rewritten;
losses for SNIP/BINGO and RL-Pruner's distillation come from (or are added to) the module's own."""

from __future__ import annotations

import pytest

from prunelib.data import datamodule_from_config
from prunelib.methods import build_method
from prunelib.training import TrainConfig, run_pruning
from tests.user_code import F1Module, PlainNet

DATA = {"name": "custom", "_target_": "tests.user_code.digits_datasets", "batch_size": 64}
CPU = dict(accelerator="cpu", progress=False)


class CountingModule(F1Module):
    """Counts training_step calls made outside Lightning's loop (its logging switched off)."""

    def __init__(self, model, num_classes: int) -> None:  # noqa: ANN001
        super().__init__(model, num_classes, lr=3e-3)
        self.loss_calls = 0
        self.fit_calls = 0

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        if "log" in self.__dict__:  # module_loss silences self.log on the instance
            self.loss_calls += 1
        else:
            self.fit_calls += 1
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module")
def dm():
    return datamodule_from_config(DATA, seed=0)


def test_snip_scores_with_the_modules_loss_and_metrics_are_what_it_logs(dm):
    model = PlainNet(1, 10, width=8)
    module = CountingModule(model, 10)
    result = run_pruning(model, dm, build_method("snip", sparsity=0.5, batches=2), TrainConfig(epochs=1, **CPU),
                         module=module)
    assert module.loss_calls == 2 and module.fit_calls > 0  # SNIP's two scoring batches used the module's loss
    assert {"val_loss", "val_f1"} <= set(result.logged) and "val_acc" not in result.logged
    assert result.metrics()["val_f1"] == result.logged["val_f1"] and 0.0 < result.sparsity < 1.0
    assert type(module).training_step is CountingModule.training_step and "log" not in module.__dict__  # untouched


def test_bingo_probes_the_modules_loss(dm):
    model = PlainNet(1, 10, width=8)
    module = CountingModule(model, 10)
    run_pruning(model, dm, build_method("bingo", sparsity=0.5, probe_every_n_steps=4), TrainConfig(epochs=1, **CPU),
                module=module)
    assert module.loss_calls > 0


def test_rl_pruner_distils_into_the_users_module_during_finetuning(dm):
    model = PlainNet(1, 10, width=8)
    module = CountingModule(model, 10)
    method = build_method("rl_pruner", sparsity=0.25, prune_steps=1, rl_epochs=1, sample_num=2, eval_samples=128)
    terms = []
    original = method.distillation_loss

    def counted(net, inputs, logits):  # noqa: ANN001, ANN202
        term = original(net, inputs, logits)
        if term is not None:
            terms.append(float(term.detach()))
        return term

    method.distillation_loss = counted
    result = run_pruning(model, dm, method, TrainConfig(epochs=1, finetune_epochs=1, **CPU), module=module)
    steps = len(dm.train_dataloader())
    assert len(terms) == steps  # one KD term per fine-tune step, added by the callback's extra backward
    assert all(t >= 0 for t in terms)
    assert result.cost.flops_physical < result.cost.flops_dense


def test_trial_with_a_user_module_reports_its_metrics_and_refuses_an_unlogged_objective(tmp_path):
    from search.config import build_search_space
    from search.trial import ObjectiveNotLoggedError, TrialContext, run_trial
    from tests.conftest import compose

    cfg = compose(["+method=magnitude", "model=custom", "model._target_=tests.user_code.PlainNet", "+model.width=8",
                   "module._target_=tests.user_code.F1Module", "trial.epochs=2", "trial.finetune_epochs=0",
                   "trial.lr=0.003", "search.objectives=[{metric: val_f1, mode: max}, {metric: flops_effective, mode: min}]"])
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_f1", "max"), ("flops_effective", "min")], module=cfg["module"])
    row = run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="f1", trial_dir=tmp_path / "a")
    assert 0.0 < row["val_f1"] <= 1.0 and row["flops_effective"] < row["flops_dense"]
    ctx.objectives = [("val_acc", "max"), ("flops_effective", "min")]
    with pytest.raises(ObjectiveNotLoggedError, match=r"search.objectives: \['val_acc'\] never reported by "
                                                      r"module._target_=tests.user_code.F1Module"):
        run_trial({"method": "magnitude", "magnitude.sparsity": 0.5}, ctx, trial_id="f2", trial_dir=tmp_path / "b")
