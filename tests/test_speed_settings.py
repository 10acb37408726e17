"""Optional trial speed settings (channels-last, torch.compile, CUDA graphs): off by default,
they run on CPU where they can, and leave the results unchanged where they claim to."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from prunelib.data import build_datamodule
from prunelib.methods import build_method
from prunelib.models import build_model
from prunelib.training import TrainConfig, _speed_settings, run_pruning
from search.config import ConfigError, build_search_space, validate_config
from search.trial import TrialContext, run_trial
from tests.conftest import compose

GRAPHS_SEEN: list[int] = []


def _counting_eager(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""
    GRAPHS_SEEN.append(len(gm.graph.nodes))
    return gm.forward


torch._dynamo.register_backend(name="prunesearch_counting_eager")(_counting_eager)


def _train(model_name: str, **settings) -> tuple[nn.Module, float]:
    dm = build_datamodule("digits", batch_size=64, limit_train=256, seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, dm.input_shape, dm.num_classes, width=0.5)
    config = TrainConfig(epochs=1, finetune_epochs=0, accelerator="cpu", **settings)
    result = run_pruning(model, dm, build_method("magnitude", sparsity=0.5), config, seed=0)
    return model, result.val_acc


def _max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_speed_settings_are_off_by_default():
    config = TrainConfig()
    assert (config.channels_last, config.compile, config.cuda_graphs) == (False, False, False)
    trial = compose([])["trial"]
    assert (trial["channels_last"], trial["compile"], trial["cuda_graphs"]) == (False, False, False)


def test_channels_last_trains_the_same_model_and_hands_back_the_default_layout():
    base, base_acc = _train("lenet5")
    fast, fast_acc = _train("lenet5", channels_last=True)
    # NHWC convolution kernels sum in another order: equal up to float32 rounding after 4 steps.
    assert _max_param_diff(base, fast) < 1e-4
    assert abs(base_acc - fast_acc) <= 1 / 144  # at most one validation sample flips
    conv = fast.features[3].weight  # 6 input channels: the two layouts differ
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_holds_only_while_training():
    model = build_model("lenet5", (1, 8, 8), 10)
    conv = model.features[3].weight
    with _speed_settings(model, TrainConfig(channels_last=True, accelerator="cpu")):
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.is_contiguous()


def test_compile_goes_through_torch_compile_and_gives_the_same_weights():
    GRAPHS_SEEN.clear()
    base, base_acc = _train("lenet5")
    compiled, compiled_acc = _train("lenet5", compile=True, compile_backend="prunesearch_counting_eager")
    assert GRAPHS_SEEN, "the training forward never went through torch.compile"
    assert _max_param_diff(base, compiled) < 1e-5
    assert compiled_acc == base_acc
    assert "forward" not in vars(compiled)  # the returned model is a plain module again


def test_a_copy_taken_while_compiled_runs_its_own_weights():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    config = TrainConfig(compile=True, compile_backend="prunesearch_counting_eager", accelerator="cpu")
    with _speed_settings(model, config):
        before = model(x)
        clone = copy.deepcopy(model)  # what a method may do mid-training (a teacher, a candidate)
        with torch.no_grad():
            clone[0].weight.zero_()
            clone[0].bias.zero_()
        assert torch.allclose(model(x), before)
        assert not torch.allclose(clone(x), before)
    assert "forward" not in vars(model)


def test_cuda_graphs_on_cpu_is_ignored_with_a_warning():
    base, base_acc = _train("mlp")
    with pytest.warns(UserWarning, match="cuda_graphs: ignored"):
        graphs, graphs_acc = _train("mlp", cuda_graphs=True)
    assert _max_param_diff(base, graphs) == 0.0 and graphs_acc == base_acc


def test_bad_speed_settings_fail_in_one_line_naming_the_key():
    with pytest.raises(ValueError, match="channels_last must be true or false"):
        TrainConfig(channels_last="yes")
    with pytest.raises(ConfigError, match=r"^trial\.cuda_graphs with compile needs compile_backend 'inductor'"):
        validate_config(compose(["trial.compile=true", "trial.cuda_graphs=true", "trial.compile_backend=aot_eager"]))


def test_trial_config_reaches_the_runner(tmp_path):
    GRAPHS_SEEN.clear()
    cfg = compose(["+method=magnitude", "trial.epochs=1", "trial.finetune_epochs=0", "data.limit_train=128",
                   "trial.compile=true", "trial.compile_backend=prunesearch_counting_eager",
                   "trial.channels_last=true", "trial.evaluate_test=false"])
    validate_config(cfg)
    ctx = TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                       objectives=[("val_acc", "max")])
    row = run_trial({"method": "magnitude"}, ctx, trial_id="speed", trial_dir=tmp_path)
    assert GRAPHS_SEEN and 0.0 <= row["val_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler (none on PATH)")
def test_inductor_compile_on_cpu_gives_the_same_weights():
    # The real compiler, on the smallest model: its generated kernels reorder float sums.
    base, base_acc = _train("mlp")
    compiled, compiled_acc = _train("mlp", compile=True)
    assert _max_param_diff(base, compiled) < 1e-4
    assert abs(base_acc - compiled_acc) <= 1 / 144
