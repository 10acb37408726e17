"""FLOPs and parameter counts against hand counts (1 multiply-add = 2 FLOPs, per sample)."""

import torch
from torch import nn

from prunelib.flops import count_flops, count_params, layer_flops, model_cost
from prunelib.masks import MaskSet


def test_linear_hand_count():
    assert count_flops(nn.Linear(100, 10), (100,)) == 2 * 100 * 10


def test_conv2d_hand_count():
    # 8 filters of 3x3x3 over a 30x30 output map (32x32 input, no padding).
    assert count_flops(nn.Conv2d(3, 8, 3), (3, 32, 32)) == 2 * 8 * 30 * 30 * 3 * 3 * 3


def test_mlp_hand_count():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100),
                        nn.ReLU(), nn.Linear(100, 10))
    assert count_flops(mlp, (1, 28, 28)) == 2 * (784 * 300 + 300 * 100 + 100 * 10)
    dense, effective = count_params(mlp)
    assert dense == effective == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def test_lenet5_hand_count():
    conv1 = 6 * 28 * 28 * 1 * 5 * 5
    conv2 = 16 * 10 * 10 * 6 * 5 * 5
    fcs = 400 * 120 + 120 * 84 + 84 * 10
    total, per_layer = layer_flops(lenet5(), (1, 28, 28))
    assert total == 2 * (conv1 + conv2 + fcs)
    assert per_layer == {"0": 2 * conv1, "3": 2 * conv2, "7": 2 * 400 * 120,
                         "9": 2 * 120 * 84, "11": 2 * 84 * 10}


def test_effective_flops_scale_with_layer_density():
    net = lenet5()
    masks = MaskSet.ones_like(net)
    masks.masks["3.weight"].view(-1)[: masks.masks["3.weight"].numel() // 2] = False  # half of conv2
    masks.masks["7.weight"][:] = False  # all of fc1
    cost = model_cost(net, (1, 28, 28), masks)
    conv2 = 2 * 16 * 10 * 10 * 6 * 5 * 5
    assert cost.flops_dense == count_flops(net, (1, 28, 28))
    assert cost.flops_effective == cost.flops_dense - conv2 // 2 - 2 * 400 * 120
    assert cost.flops_physical == cost.flops_dense  # no surgery: physical = dense
    assert cost.params_effective == cost.params_dense - 16 * 6 * 25 // 2 - 400 * 120


def test_physical_flops_come_from_the_smaller_model():
    big = nn.Sequential(nn.Linear(100, 20), nn.ReLU(), nn.Linear(20, 10))
    small = nn.Sequential(nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 10))
    cost = model_cost(big, (100,), physical_model=small)
    assert cost.flops_dense == 2 * (100 * 20 + 20 * 10)
    assert cost.flops_physical == 2 * (100 * 8 + 8 * 10)
    assert cost.params_physical == 100 * 8 + 8 + 8 * 10 + 10


def test_counting_leaves_train_mode_and_hooks_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 2))
    net.train()
    count_flops(net, (1, 8, 8))
    assert net.training
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(net[1].running_mean, torch.zeros(2))
