"""PAODING (data-free pruning) and the FGSM robustness metric."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from prunelib.methods import METHODS, build_method
from prunelib.methods.paoding import PAODING, merge_neurons, normalized_interval, output_impact, pair_saliency
from prunelib.models import build_model
from prunelib.robustness import fgsm_accuracy
from prunelib.surgery import surgery

SHAPE = (1, 8, 8)
CONF = Path(__file__).resolve().parent.parent / "conf" / "method" / "paoding.yaml"


def _mlp_with_duplicate(keep: int = 3, dup: int = 7) -> nn.Module:
    """An MLP whose first hidden layer has neurons ``keep`` and ``dup`` identical (w and b)."""
    torch.manual_seed(0)
    model = build_model("mlp", SHAPE, 10, hidden=(16, 8)).eval()
    layer = model.net[1]
    with torch.no_grad():
        layer.bias.uniform_(-0.2, 0.2)
        layer.weight[dup] = layer.weight[keep]
        layer.bias[dup] = layer.bias[keep]
    return model


@pytest.mark.parametrize("mode", ["impact", "baseline"])
def test_merging_duplicate_neurons_is_exact(mode):
    model = _mlp_with_duplicate()
    reference = copy.deepcopy(model)
    # One pair in the first hidden layer (ceil(0.05 * 16) = 1), the second layer left alone.
    method = PAODING(conv_ratio=0.0, dense_ratio=0.05, step=0.05, mode=mode, input_shape=SHAPE,
                     exclude=["net.3"])
    method.setup(model, None)
    masks = method.finalize(model)
    kept = masks.masks["net.1.weight"]
    assert int((~kept).sum()) == 1 and not bool(kept[3] & kept[7])  # the duplicate pair went
    x = torch.randn(32, *SHAPE)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    small = surgery(model, masks, SHAPE, round_to=None).model
    assert small.net[1].out_features == 15 and small.net[3].in_features == 15
    torch.testing.assert_close(small(x), reference(x), rtol=1e-5, atol=1e-5)


def test_merge_adds_outgoing_weights_and_zeroes_the_removed_column():
    consumer = nn.Linear(4, 3)
    before = consumer.weight.detach().clone()
    merge_neurons(consumer, keep=1, remove=2)
    torch.testing.assert_close(consumer.weight[:, 1], before[:, 1] + before[:, 2])
    assert torch.all(consumer.weight[:, 2] == 0)


def test_pair_saliency_is_zero_for_duplicates_and_bounded_when_biases_cancel():
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, -1.0]])
    b = torch.tensor([0.5, 0.5, -0.5])  # b_0 + b_2 = 0: the paper's term would divide by zero
    a = torch.ones(3, 3)
    s = pair_saliency(w, b, a)
    assert s[0, 1] == 0 and s[1, 0] == 0
    assert torch.isinf(s.diagonal()).all()
    assert torch.isfinite(s[0, 2]) and s[0, 2] > s[0, 1]


def test_output_impact_grows_with_the_change():
    head = nn.Linear(4, 3)
    small = output_impact(torch.full((4,), -0.01), torch.full((4,), 0.01), [(nn.ReLU(), head)], 1.0, 0.0)
    large = output_impact(torch.full((4,), -1.0), torch.full((4,), 1.0), [(nn.ReLU(), head)], 1.0, 0.0)
    assert small < large


def test_runs_without_any_data_module():
    """Data-free: no data module, no samples; only the input shape and the input box."""
    torch.manual_seed(0)
    model = build_model("lenet5", SHAPE, 10).eval()
    method = build_method("paoding", conv_ratio=0.5, dense_ratio=0.5, step=0.25, input_shape=SHAPE)
    assert method.needs_data is False
    assert method.plan(0, 0) == []  # nothing to train when the model comes pretrained
    method.setup(model, datamodule=None)
    masks = method.finalize(model)
    # Convolutions: half of each layer's filters; dense: half of each hidden layer's neurons.
    assert int((~masks.masks["features.0.weight"]).sum()) == 3
    assert int((~masks.masks["features.3.weight"]).sum()) == 8
    assert int((~masks.masks["classifier.0.weight"]).sum()) == 60
    assert int((~masks.masks["classifier.2.weight"]).sum()) == 42
    result = surgery(model, masks, SHAPE, round_to=None)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert sum(p.numel() for p in result.model.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())
    assert method.report["dense_neurons_merged"]["classifier.0"]["merged"] == 60
    # Without a data module the input shape is required.
    with pytest.raises(ValueError, match="input_shape"):
        PAODING().setup(model, None)


def test_convolution_sampling_drops_the_lowest_l1_filters_per_coupled_group():
    torch.manual_seed(0)
    model = build_model("resnet20", SHAPE, 10, width=0.5).eval()
    with torch.no_grad():
        model.layer1[0].conv1.weight[[1, 4]] *= 1e-3  # two obviously weak filters
    method = PAODING(conv_ratio=0.25, dense_ratio=0.0, input_shape=SHAPE)
    method.setup(model, None)
    masks = method.finalize(model)
    dropped = torch.nonzero(~masks.masks["layer1.0.conv1.weight"]).flatten().tolist()
    assert {1, 4} <= set(dropped) and len(dropped) == 2  # ceil(0.25 * 8)
    # Residual stream: every writer of the stream loses the same channels.
    stream = [masks.masks[f"{n}.weight"] for n in ("conv1", "layer1.0.conv2", "layer1.2.conv2")]
    assert all(torch.equal(stream[0], s) for s in stream[1:]) and not bool(stream[0].all())
    small = surgery(model, masks, SHAPE, round_to=None).model
    assert small.conv1.out_channels == model.conv1.out_channels - 2


class ConvHead(nn.Module):
    """conv -> BN -> ReLU -> global pool -> linear: the removed channel's constant reaches a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.pool(self.relu(self.bn(self.conv(x))))))


@pytest.mark.parametrize("compensate", [True, False])
def test_a_removed_constant_channel_is_compensated_exactly(compensate):
    torch.manual_seed(0)
    model = ConvHead().eval()
    with torch.no_grad():
        model.conv.weight[2] *= 1e-4  # the lowest-L1 filter, removed at ratio 0.25
        model.bn.weight[2] = 0.0  # its BatchNorm output is the constant beta = 0.7
        model.bn.bias[2] = 0.7
    reference = copy.deepcopy(model)
    method = PAODING(conv_ratio=0.25, dense_ratio=0.0, input_shape=SHAPE, compensate=compensate)
    method.setup(model, None)
    masks = method.finalize(model)
    assert not bool(masks.masks["conv.weight"][2]) and int(masks.masks["conv.weight"].sum()) == 3
    x = torch.randn(16, *SHAPE)
    small = surgery(model, masks, SHAPE, round_to=None).model
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    if compensate:
        torch.testing.assert_close(small(x), reference(x), rtol=1e-4, atol=1e-4)
        assert method.report["conv_channels_compensated"] == 1
    else:
        assert not torch.allclose(small(x), reference(x), atol=1e-2)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_fold_bn_scores_the_filter_the_network_applies(fold_bn):
    torch.manual_seed(0)
    model = ConvHead().eval()
    with torch.no_grad():
        model.conv.weight[1] *= 10.0  # the largest raw filter ...
        model.bn.weight[1] = 1e-3  # ... silenced by its BatchNorm
    method = PAODING(conv_ratio=0.25, dense_ratio=0.0, input_shape=SHAPE, fold_bn=fold_bn)
    method.setup(model, None)
    removed = torch.nonzero(~method.finalize(model).masks["conv.weight"]).flatten().tolist()
    assert (removed == [1]) is fold_bn


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="conv_ratio"):
        PAODING(conv_ratio=1.5)
    with pytest.raises(ValueError, match="mode"):
        PAODING(mode="stochastic")
    with pytest.raises(ValueError, match="input_interval"):
        PAODING(input_interval=(1.0, -1.0))
    with pytest.raises(ValueError, match="step"):
        PAODING(step=0.0)


def test_yaml_matches_the_constructor_and_is_registered():
    assert METHODS["paoding"] is PAODING
    conf = yaml.safe_load(CONF.read_text())
    method = build_method("paoding", **conf["settings"])
    assert set(conf["space"]) <= set(method.config())
    assert normalized_interval([127.5], [127.5]) == (-1.0, 1.0)


def test_pretrain_phase_then_data_free_pruning_through_the_runner():
    from prunelib.data import build_datamodule
    from prunelib.training import TrainConfig, run_pruning

    dm = build_datamodule("digits", limit_train=256, batch_size=64)
    model = build_model("lenet5", dm.input_shape, dm.num_classes)
    method = build_method("paoding", conv_ratio=0.25, dense_ratio=0.25, step=0.25)
    result = run_pruning(model, dm, method, TrainConfig(epochs=1, finetune_epochs=0, progress=False))
    assert [h["phase"] for h in result.history] == ["pretrain"]
    assert result.cost.params_physical < result.cost.params_dense
    assert result.cost.flops_physical < result.cost.flops_dense


# ---------------------------------------------------------------------------------------------
# FGSM
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_digits():
    from prunelib.data import build_datamodule

    torch.manual_seed(0)
    dm = build_datamodule("digits", limit_train=512, batch_size=64)
    model = build_model("mlp", dm.input_shape, dm.num_classes, width=0.2)
    x, y = dm.split("train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), dm.split("val")


def test_fgsm_accuracy_is_clean_at_zero_and_lower_under_attack(trained_digits):
    model, (x, y) = trained_digits
    clean = fgsm_accuracy(model, (x, y), epsilon=0.0, batch_size=50)
    assert clean.attacked_accuracy == clean.clean_accuracy > 0.7
    assert clean.robust_fraction == 1.0 and clean.samples == x.shape[0]
    attacked = fgsm_accuracy(model, (x, y), epsilon=0.5, batch_size=50)
    assert attacked.clean_accuracy == clean.clean_accuracy
    assert attacked.attacked_accuracy < clean.clean_accuracy
    assert 0.0 <= attacked.robust_fraction < 1.0
    # A data loader gives the same figures as the tensors; no parameter gradient is left.
    loader = [(x[i:i + 40], y[i:i + 40]) for i in range(0, x.shape[0], 40)]
    assert fgsm_accuracy(model, loader, epsilon=0.5).attacked_accuracy == pytest.approx(attacked.attacked_accuracy)
    assert all(p.grad is None for p in model.parameters())
    predicted = fgsm_accuracy(model, (x, y), epsilon=0.5, label="predicted", max_samples=50)
    assert predicted.samples == 50


def test_fgsm_bad_inputs(trained_digits):
    model, (x, y) = trained_digits
    with pytest.raises(ValueError, match="label"):
        fgsm_accuracy(model, (x, y), 0.1, label="target")
    with pytest.raises(ValueError, match="epsilon"):
        fgsm_accuracy(model, (x, y), -0.1)
    with pytest.raises(ValueError, match="length"):
        fgsm_accuracy(model, (x, y[:-1]), 0.1)
    with pytest.raises(ValueError, match="no samples"):
        fgsm_accuracy(model, [], 0.1)


# ---------------------------------------------------------------------------------------------
# Impact score, boxes, dead columns, single readers, stepwise convolutions
# ---------------------------------------------------------------------------------------------
def _trained_like_lenet() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5", SHAPE, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("scale", ["relative", "log"])
def test_the_impact_score_ranks_candidates_where_the_paper_saturates(scale):
    model = _trained_like_lenet()
    method = PAODING(conv_ratio=0.0, dense_ratio=0.25, step=0.25, input_shape=SHAPE, impact_scale=scale)
    method.setup(model, None)
    from prunelib.methods.paoding import _trace_calls

    calls, x_id = _trace_calls(model, SHAPE)
    groups = __import__("prunelib.surgery", fromlist=["channel_groups"]).channel_groups(model, SHAPE)
    (state,) = method._dense_states(model, calls, groups)[:1]
    state.box = method._chain_input_box(calls, x_id, state.chain, SHAPE, torch.device("cpu"))
    pairs = [(i, i + 1) for i in range(0, 40, 2)]
    ours = method.candidate_impacts(state, 0, pairs)
    assert len(set(round(v, 9) for v in ours)) == len(pairs)  # every candidate its own score
    paper = PAODING(conv_ratio=0.0, dense_ratio=0.25, input_shape=SHAPE, impact_scale="paper", beta=0.0)
    paper.setup(model, None)
    saturated = paper.candidate_impacts(state, 0, pairs)
    assert set(saturated) == {0.5}  # alpha * sigmoid(width) = 0.5 * 1.0 for every pair: no ranking


def test_boxes_after_a_batchnorm_are_intersected_with_its_statistics():
    from tests.topologies import randomise_bn

    model = randomise_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10)))
    from prunelib.methods.paoding import _trace_calls

    calls, x_id = _trace_calls(model, SHAPE)
    widths = {}
    for sigmas in (None, 3.0):
        method = PAODING(input_shape=SHAPE, box_sigmas=sigmas)
        method.setup(model, None)
        (state,) = method._dense_states(model, calls, channel_groups_of(model))
        lo, hi = method._chain_input_box(calls, x_id, state.chain, SHAPE, torch.device("cpu"))
        widths[sigmas] = float((hi - lo).mean())
        beta = model[1].bias.detach().double().repeat_interleave(64)
        spread = model[1].weight.detach().double().abs().repeat_interleave(64)
        if sigmas is not None:  # within beta +- 3 |gamma| (then the ReLU)
            assert bool((hi <= torch.relu(beta + 3 * spread) + 1e-9).all())
    assert widths[3.0] < 0.8 * widths[None]


def channel_groups_of(model):
    from prunelib.surgery import channel_groups

    return channel_groups(model, SHAPE)


def test_pair_saliency_ignores_the_columns_of_removed_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        fc = model[4]
        fc.weight[1] = fc.weight[0]  # neurons 0 and 1 alike except on input 3 ...
        fc.bias[1] = fc.bias[0]
        fc.weight[1, 3] += 5.0
        fc.weight[3] = fc.weight[2] + 0.05  # ... neurons 2 and 3 alike everywhere, a little apart
        fc.bias[3] = fc.bias[2]
        model[0].weight[3] *= 1e-4  # input 3 comes from the lowest-L1 filter: it is removed
    method = PAODING(conv_ratio=0.25, dense_ratio=1 / 6, step=1 / 6, mode="baseline", input_shape=SHAPE,
                     compensate=False)
    method.setup(model, None)
    masks = method.finalize(model)
    assert not bool(masks.masks["0.weight"][3])
    merged = torch.nonzero(~masks.masks["4.weight"]).flatten().tolist()
    assert merged in ([0], [1])  # alike once the dead column is left out: they merge first


class SkipHead(nn.Module):
    """A dense chain whose hidden output has a second reader (a skip into the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(64, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.flat(x)))
        return self.head(self.act2(self.fc2(h)) + h)


def test_a_hidden_layer_with_a_second_reader_is_not_merged(caplog):
    torch.manual_seed(0)
    model = SkipHead().eval()
    reference = copy.deepcopy(model)
    method = PAODING(conv_ratio=0.0, dense_ratio=0.25, step=0.25, input_shape=SHAPE)
    method.setup(model, None)
    with caplog.at_level("WARNING", logger="prunelib"):
        masks = method.finalize(model)
    assert "fc1" in caplog.text and "readers besides" in caplog.text
    assert "fc1.weight" not in masks  # merging into fc2 alone would change the skip's input
    x = torch.randn(8, *SHAPE)
    torch.testing.assert_close(model(x), reference(x))  # nothing was merged anywhere


class _StepSpy(PAODING):
    def _sample_convolutions(self, model, groups, masks, ratio):
        out = super()._sample_convolutions(model, groups, masks, ratio)
        self.__dict__.setdefault("conv_counts", []).append(
            int((~masks.masks["features.0.weight"]).sum()) if "features.0.weight" in masks else 0)
        return out


def test_stepwise_convolution_mode_interleaves_conv_removal_with_the_dense_steps():
    one_shot, stepwise = _trained_like_lenet(), _trained_like_lenet()
    a = _StepSpy(conv_ratio=0.5, dense_ratio=0.5, step=0.25, input_shape=SHAPE)
    b = _StepSpy(conv_ratio=0.5, dense_ratio=0.5, step=0.25, input_shape=SHAPE, stepwise_conv=True)
    for method, model in ((a, one_shot), (b, stepwise)):
        method.setup(model, None)
        method.finalize(model)
    assert a.conv_counts == [3]  # ceil(0.5 * 6) at once
    assert b.conv_counts == [2, 3]  # ceil(0.25 * 6), then ceil(0.5 * 6)
    for method in (a, b):  # the same final counts
        assert method.report["conv_channels_removed"]["features.0"] == 3
        assert method.report["dense_neurons_merged"]["classifier.0"]["merged"] == 60
    small = surgery(stepwise, b.masks, SHAPE, round_to=None)
    assert small.max_abs_diff < 1e-4


def test_a_removed_residual_stream_channel_through_depthwise_and_concat_is_compensated():
    """Every group of a depthwise-separable network has several producers (the depthwise
    convolution is one of its feeder's group), so compensation must not be limited to
    single-producer groups: here the residual stream's channel 3 is constant in every writer
    (its BatchNorms' gamma = 0). Removing it with compensation leaves the outputs unchanged but
    for the 3x3 consumer's zero-padded border; without, every output moves."""
    from tests.topologies import SHAPE as TOPO_SHAPE
    from tests.topologies import ResidualDepthwiseConcat, randomise_bn

    torch.manual_seed(0)
    model = randomise_bn(ResidualDepthwiseConcat())
    with torch.no_grad():
        for bn in (model.bn0, model.bna, model.bnb1, model.bndw):  # channel 3 of each path: 1.5
            bn.weight[3], bn.bias[3] = 0.0, 1.5
    x = torch.randn(64, *TOPO_SHAPE)
    reference = model(x)
    errors = {}
    for compensate in (True, False):
        pruned = copy.deepcopy(model)
        method = PAODING(conv_ratio=1 / 16, dense_ratio=0.0, input_shape=TOPO_SHAPE, compensate=compensate,
                         exclude=("c",))
        method.setup(pruned, None)
        masks = method.finalize(pruned)
        assert torch.nonzero(~masks.masks["stem.weight"]).flatten().tolist() == [3]
        assert method.report["conv_channels_compensated"] == (1 if compensate else 0)
        small = surgery(pruned, masks, TOPO_SHAPE, round_to=None).model.eval()
        assert small.stem.out_channels == 15
        errors[compensate] = float((small(x) - reference).abs().mean())
    assert errors[False] > 0.05 and errors[True] < errors[False] / 4, errors


def test_a_depthwise_filter_scores_the_spread_its_batchnorm_gives_it():
    """BN-folded L1 of a depthwise filter is |w| |gamma| / sigma with sigma ~ |w| * the spread
    of its one input: the filter cancels and the score would rank the inputs' spread
    inverted. The depthwise producer scores |gamma| instead."""
    from prunelib.importance import channel_scores
    from prunelib.surgery import channel_groups
    from tests.topologies import SHAPE as TOPO_SHAPE
    from tests.topologies import ResidualDepthwiseConcat, randomise_bn

    model = randomise_bn(ResidualDepthwiseConcat())
    group = next(g for g in channel_groups(model, TOPO_SHAPE) if "dw" in g.producers)
    alone = copy.deepcopy(group)
    alone.producers = {"dw": group.producers["dw"]}
    scores = channel_scores(model, alone, "l1_bn")
    covered = group.producers["dw"] >= 0
    expected = model.bndw.weight.detach().double().abs()[group.producers["dw"][covered]]
    torch.testing.assert_close(scores[covered], expected)
