"""RL-Pruner: distribution update, validation-only decisions, target, KD hook, end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from prunelib.data import build_datamodule
from prunelib.flops import model_cost
from prunelib.methods import METHODS, build_method
from prunelib.methods.rl_pruner import RLPruner, allocate_removals, update_distribution
from prunelib.models import build_model
from prunelib.training import ClassifierModule, TrainConfig, run_pruning

CONF = Path(__file__).resolve().parent.parent / "conf" / "method" / "rl_pruner.yaml"


@pytest.fixture(scope="module")
def digits():
    return build_datamodule("digits", batch_size=64)


class ValOnly:
    """A data module whose train and test loaders raise; records how often val is read."""

    def __init__(self, dm) -> None:
        self.dm, self.input_shape, self.val_reads = dm, dm.input_shape, 0

    def val_dataloader(self):
        self.val_reads += 1
        return self.dm.val_dataloader()

    def train_dataloader(self):
        raise AssertionError("the RL search read the training split")

    def test_dataloader(self):
        raise AssertionError("the RL search read the test split")


def test_update_moves_toward_the_best_sample_and_stays_positive():
    current = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    best = torch.tensor([0.0, 0.2, 0.8], dtype=torch.float64)  # planted best: all mass moves right
    new = update_distribution(current, best, step_length=0.5, ppo_clip=0.0)
    assert torch.allclose(new, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert (new - current).dot(best - current) > 0  # moved toward the best action
    # A full step onto an action with a zero entry: floored above zero, renormalised.
    new = update_distribution(current, best, step_length=1.0, ppo_clip=0.0)
    assert bool((new > 0).all()) and abs(float(new.sum()) - 1) < 1e-12 and float(new[2]) > 0.79
    # The clip bounds each entry's relative change (before renormalising) to +-20 %.
    clipped = update_distribution(current, best, step_length=1.0, ppo_clip=0.2)
    raw = clipped * (current * torch.tensor([0.8, 0.8, 1.2], dtype=torch.float64)).sum()
    assert torch.allclose(raw, current * torch.tensor([0.8, 0.8, 1.2], dtype=torch.float64))
    assert float(clipped[2]) > float(current[2]) and float(clipped[0]) < float(current[0])


def test_allocation_is_exact_and_respects_capacity():
    dist = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    assert allocate_removals(dist, 10, [100, 100, 100]) == [7, 2, 1]
    counts = allocate_removals(dist, 10, [3, 100, 100])  # the first group is nearly full
    assert counts[0] == 3 and sum(counts) == 10 and counts[1] > counts[2]
    assert allocate_removals(dist, 50, [3, 4, 5]) == [3, 4, 5]  # more asked than room


def test_the_search_reads_only_validation_data(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    data = ValOnly(digits)
    method = RLPruner(sparsity=0.5, prune_steps=2, rl_epochs=2, sample_num=3, reset_drop=None, eval_samples=100,
                      eval_batch_size=40)
    method.setup(model, data)
    method.prune(model)  # would raise on any train/test read
    assert data.val_reads == 1
    # 2 steps x (2 rounds x 3 samples + the step's starting point), 3 batches (100 / 40) each.
    assert method.report["candidates_evaluated"] == 14
    assert method.cost.extra_forward_passes == 14 * 3
    history = method.distribution_history
    assert len(history) == 3 and all(min(d) > 0 and abs(sum(d) - 1) < 1e-9 for d in history)


def test_decisions_follow_the_validation_labels(digits):
    """Poison the validation labels: the search (scored on them) must see chance accuracy."""
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    x, y = digits.split("val")
    poisoned = build_datamodule("digits", batch_size=64)
    poisoned._data["val"] = (x, (y + 1) % 10)  # every label wrong for a model trained on digits
    trained = run_pruning(model, digits, RLPruner(sparsity=0.0, prune_steps=1, rl_epochs=1, sample_num=1),
                          TrainConfig(epochs=3, finetune_epochs=0, accelerator="cpu")).model
    method = RLPruner(sparsity=0.3, prune_steps=1, rl_epochs=1, sample_num=2, reset_drop=None)
    method.setup(trained, poisoned)
    method.prune(trained)
    assert method._step_log[0]["val_acc"] < 0.2  # scored on the poisoned (validation) labels


@pytest.mark.parametrize("name, hidden", [("mlp", (30, 17)), ("vgg_small", None)])
def test_final_removal_hits_the_target_and_the_cost_estimate_is_physical(digits, name, hidden):
    torch.manual_seed(0)
    kwargs = {"hidden": hidden} if hidden else {"width": 0.25}
    model = build_model(name, digits.input_shape, digits.num_classes, **kwargs)
    method = RLPruner(sparsity=0.4, prune_steps=3, rl_epochs=1, sample_num=2, eval_samples=64)
    method.setup(model, digits)
    masks = method.prune(model)
    sizes = {g.root: g.size for g in method._groups}
    target = 0.4 * sum(sizes.values())
    removed = dict(zip(method.group_names, method.report["removed"]))
    assert abs(sum(removed.values()) - target) <= 1  # the total, rounded once
    for root, module in dict(model.named_modules()).items():
        if root in removed:
            kept = masks.masks[f"{root}.weight"]
            assert int((~kept).sum()) == removed[root] and int(kept.sum()) >= 1
    cost = model_cost(model, digits.input_shape, masks, round_to=None)
    assert cost.flops_physical == method.report["flops"] < cost.flops_dense
    assert cost.params_physical == method.report["params"]


class _Teacherish(RLPruner):
    """Counts calls of the KD hook."""

    calls = 0

    def distillation_loss(self, model, inputs, logits):
        type(self).calls += 1
        return super().distillation_loss(model, inputs, logits)


def test_kd_hook_is_called_in_the_finetune_phase_and_changes_the_loss(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    method = _Teacherish(sparsity=0.5, prune_steps=1, rl_epochs=1, sample_num=2, kd_weight=2.0)
    result = run_pruning(model, digits, method, TrainConfig(epochs=1, finetune_epochs=1, accelerator="cpu"))
    batches = len(digits.train_dataloader())
    assert _Teacherish.calls == 2 * batches  # called every step of both phases ...
    assert result.extra_forward_passes >= batches  # ... and the teacher ran in fine-tuning
    # The term itself: zero when the student is the teacher, positive once they differ.
    student = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    kd = RLPruner(kd_weight=1.0)
    kd._teacher, kd._distilling = student, True
    x, _ = digits.sample_batch("train", 16)
    assert float(kd.distillation_loss(student, x, student(x)).detach()) == pytest.approx(0.0, abs=1e-6)
    module = ClassifierModule(student)
    batch = digits.sample_batch("train", 16)
    kd._teacher = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))  # another net
    plain = float(module.training_step(batch, 0).detach())
    module.batch_losses.append(lambda inputs, logits: kd.distillation_loss(student, inputs, logits))
    assert float(module.training_step(batch, 0).detach()) > plain + 1e-4


def test_end_to_end_with_artifacts(digits, tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    method = build_method("rl_pruner", sparsity=0.5)
    result = run_pruning(model, digits, method, TrainConfig(epochs=3, finetune_epochs=2, accelerator="cpu"))
    assert result.val_acc > 0.8 and result.cost.flops_physical < 0.7 * result.cost.flops_dense
    # 3 steps, a KD recovery after each but the last (post_train_period 1), then the fine-tune.
    assert [h["phase"] for h in result.history] == ["pretrain", "recover1", "recover2", "finetune"]
    assert result.epochs == 3 + 2 * 1 + 2
    paths = method.write_artifacts(tmp_path)
    payload = json.loads(paths[0].read_text())
    assert payload["groups"] == method.group_names and len(payload["distribution_history"]) == 4
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_matches_the_constructor_and_is_registered():
    conf = yaml.safe_load(CONF.read_text())
    assert METHODS["rl_pruner"] is RLPruner
    method = build_method("rl_pruner", **conf["settings"])
    assert set(conf["space"]) <= set(conf["settings"])
    assert method.sparsity == conf["settings"]["sparsity"]


def test_bad_settings_are_refused():
    for bad in ({"sparsity": 1.0}, {"criterion": "variance"}, {"sample_num": 0}, {"ppo_clip": 1.0},
                {"post_train_period": -1}, {"bn_recalibration": -2}):
        with pytest.raises(ValueError):
            RLPruner(**bad)


def test_the_cost_of_a_depthwise_block_is_what_flops_py_counts_on_the_cut_model():
    """The candidates' cost is prunelib.flops on the physical model (depthwise layers included;
    a count dividing by ``weight.shape[1]`` = 1 gave negative FLOPs there)."""
    from prunelib.flops import count_flops
    from prunelib.surgery import surgery
    from tests.topologies import SHAPE, ResidualDepthwiseConcat, randomise_bn

    torch.manual_seed(0)
    model = randomise_bn(ResidualDepthwiseConcat())
    data = build_datamodule("digits", batch_size=64)
    method = RLPruner(sparsity=0.4, prune_steps=2, rl_epochs=1, sample_num=2, eval_samples=64, reset_drop=None)
    method.setup(model, data)
    masks = method.prune(model)
    names = method.group_names
    assert "stem" in names and "c" in names  # the depthwise + concat stream is a prunable group
    small = surgery(model, masks, SHAPE, round_to=None).model
    assert small.dw.out_channels < 8 and small.dw.groups == small.dw.out_channels
    assert (method.report["flops"], method.report["params"]) == (count_flops(small, SHAPE),
                                                                 sum(p.numel() for p in small.parameters()))
    assert 0 < method.report["flops"] < count_flops(model, SHAPE)
    # Every candidate's cost too, not only the committed one.
    for removed in ([1, 0], [3, 5], [0, 9]):
        cut = surgery(model, method.channel_masks(model, removed), SHAPE, round_to=None).model
        assert method.cost_of(model, removed) == (count_flops(cut, SHAPE), sum(p.numel() for p in cut.parameters()))


class _Recorder(RLPruner):
    """Records the rankings and the model's weights each step starts from."""

    def _rank(self, model):
        super()._rank(model)
        self.__dict__.setdefault("rankings", []).append([r.clone() for r in self._ranking])
        self.__dict__.setdefault("starts", []).append(model.net[1].weight.detach().clone())


def test_kd_recovery_runs_between_steps_and_rankings_follow_the_current_model(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    method = _Recorder(sparsity=0.5, prune_steps=3, rl_epochs=1, sample_num=2, post_train_period=1,
                       recover_epochs=1, kd_weight=1.0)
    result = run_pruning(model, digits, method, TrainConfig(epochs=2, finetune_epochs=1, accelerator="cpu"))
    assert [h["phase"] for h in result.history] == ["pretrain", "recover1", "recover2", "finetune"]
    assert len(method.rankings) == 3
    # Each step starts from the recovered weights, not from the dense model of the first step.
    assert not torch.equal(method.starts[0], method.starts[1])
    assert not torch.equal(method.starts[1], method.starts[2])
    # Channels removed at a step stay removed (they lead the next step's ranking) ...
    log = method._step_log
    for step in (1, 2):
        count = log[step - 1]["removed"][0]
        before = set(method.rankings[step - 1][0][:count].tolist())
        assert set(method.rankings[step][0][:count].tolist()) == before
    # ... and the recovery moved accuracy back up before the next step scored candidates.
    assert log[1]["start_val_acc"] > log[0]["val_acc"] - 0.02
    # Removed channels are zero through the recoveries and in the result.
    keep = result.masks.masks["net.1.weight"]
    assert torch.all(model.net[1].weight.detach()[~keep] == 0)
    # Without recovery (post_train_period 0) the plan has no recovery phase.
    assert [p.name for p in RLPruner(post_train_period=0).plan(2, 1)] == ["pretrain", "finetune"]


def test_taylor_criterion_and_bn_recalibration_read_a_few_training_batches(digits):
    torch.manual_seed(0)
    model = build_model("vgg_small", digits.input_shape, digits.num_classes, width=0.25)
    method = RLPruner(sparsity=0.3, prune_steps=1, rl_epochs=1, sample_num=2, criterion="taylor",
                      calibration_batches=2, bn_recalibration=2, eval_samples=64, reset_drop=None)
    method.setup(model, digits)
    masks = method.prune(model)
    assert len(method._train_batches) == 2 and method.cost.extra_backward_passes == 2
    # 3 candidates (2 samples + the start), each 1 validation batch + 2 recalibration batches.
    assert method.cost.extra_forward_passes == 2 + 3 * (1 + 2)
    assert method.report["removed"] and sum(method.report["removed"]) > 0
    # Every producer of every prunable group carries a mask, and the removed channels are zero rows.
    producers = [f"{p}.weight" for g in method._groups for p in g.producers]
    assert producers and all(k in masks.masks for k in producers)
    assert sum(int((~masks.masks[k]).reshape(len(masks.masks[k]), -1).all(1).sum()) for k in producers) > 0
    # The Taylor scores rank a planted dead filter first.
    torch.manual_seed(0)
    model = build_model("vgg_small", digits.input_shape, digits.num_classes, width=0.25)
    with torch.no_grad():
        model.features[0].weight[2] = 0.0
    probe = RLPruner(sparsity=0.3, criterion="taylor", calibration_batches=1)
    probe.setup(model, digits)
    probe._start(model)
    probe._rank(model)
    first = probe.group_names.index("features.0")
    assert int(probe._ranking[first][0]) == 2


def test_the_reset_resamples_the_step_and_is_not_taken_at_every_step(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=(32, 16))
    trained = run_pruning(model, digits, RLPruner(sparsity=0.0, prune_steps=1, rl_epochs=1, sample_num=1),
                          TrainConfig(epochs=3, finetune_epochs=0, accelerator="cpu")).model
    # Gentle steps: accuracy stays within 10 % of where each step starts, so no reset.
    gentle = RLPruner(sparsity=0.2, prune_steps=4, rl_epochs=1, sample_num=2, reset_drop=0.1)
    gentle.setup(trained, digits)
    gentle.prune(copy.deepcopy(trained))
    assert not any(s["reset"] for s in gentle._step_log), gentle._step_log
    # A threshold that every step trips: each step is resampled once from the reset distribution
    # (twice the candidates) and the better of the two searches is committed.
    harsh = RLPruner(sparsity=0.9, prune_steps=2, rl_epochs=1, sample_num=2, reset_drop=0.0)
    harsh.setup(trained, digits)
    harsh.prune(copy.deepcopy(trained))
    assert all(s["reset"] for s in harsh._step_log)
    assert harsh.report["candidates_evaluated"] == 2 * (1 + 2 * 2)
