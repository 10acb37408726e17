"""RL-Pruner vs uniform L1 channel pruning at the same physical FLOPs, same KD fine-tune.

On a Fashion-MNIST subset with ``vgg_small`` (width ``--width``), per seed:

1. train the dense model (SGD, ``--epochs``) once: both pruners start from it;
2. ``rl``: :class:`prunelib.methods.RLPruner` (the library defaults, ``pretrain=False``) searches
   the per-group channel-removal distribution on validation batches toward ``--sparsity`` of
   the prunable channels, then fine-tunes ``--finetune-epochs`` with knowledge distillation from
   the dense model;
3. ``uniform``: the same fraction ``f`` of every channel group is removed (lowest filter L1),
   ``f`` chosen on a 0.001 grid so that its physical FLOPs are the closest to the RL model's
   (channel granularity leaves a small gap; both figures are reported), then the same KD
   fine-tune (same epochs, learning rate, teacher, temperature and weight);
4. report validation and test accuracy (test for this report only), physical FLOPs and
   parameters (after :func:`prunelib.surgery.surgery`), and CPU seconds of prune + fine-tune.

Usage::

    python benchmarks/rl_pruner_benchmark.py                        # about 6 min, 1 thread
    python benchmarks/rl_pruner_benchmark.py --seeds 0 --sparsities 0.5 --data-limit 2000   # smoke
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prunelib.data import build_datamodule  # noqa: E402
from prunelib.masks import MaskSet  # noqa: E402
from prunelib.methods.rl_pruner import RLPruner  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.training import TrainConfig, evaluate, run_pruning  # noqa: E402


class UniformChannelPruning(RLPruner):
    """The baseline: the same fraction of every prunable group's channels (lowest L1), the
    fraction chosen so the physical FLOPs per sample are closest to ``target_flops``; the KD
    fine-tune is RL-Pruner's (this class only replaces the search)."""

    def __init__(self, target_flops: int, **settings: Any) -> None:
        super().__init__(**settings)
        self.target_flops = int(target_flops)
        self.fraction = 0.0

    @torch.no_grad()
    def prune(self, model: nn.Module) -> MaskSet:
        self._prepare(model)
        best: tuple[float, float, list[int]] | None = None
        for step in range(0, 1000):
            fraction = step / 1000
            removed = [min(int(round(fraction * g.size)), g.size - self.min_channels) for g in self._groups]
            flops, _ = self.estimated_cost(model, removed)
            gap = abs(flops - self.target_flops)
            if best is None or gap < best[0]:
                best = (gap, fraction, removed)
        assert best is not None
        _, self.fraction, removed = best
        self._distribution_history = []
        masks = self.channel_masks(model, removed)
        masks.apply(model)
        self.report = {"groups": self.group_names, "removed": removed, "fraction": self.fraction}
        self.masks = masks
        self._work = None
        return masks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier of vgg_small")
    p.add_argument("--data-limit", type=int, default=5000, help="training samples used")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2, help="KD fine-tune epochs (both pruners)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5],
                   help="fraction of prunable channels RL-Pruner removes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def train_dense(model: nn.Module, dm: Any, epochs: int, lr: float = 0.05) -> nn.Module:
    """Plain SGD + cosine training of the dense model every pruner starts from."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
        val = evaluate(model, dm.val_dataloader())
        print(f"  dense epoch {epoch + 1}/{epochs}: val_acc {val['acc']:.4f} ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    return model


def run_one(label: str, dense: nn.Module, dm: Any, method: RLPruner, finetune_epochs: int) -> dict[str, Any]:
    """Prune a copy of ``dense`` with ``method`` and KD-fine-tune it; measure it."""
    model = copy.deepcopy(dense)
    config = TrainConfig(epochs=0, finetune_epochs=finetune_epochs, lr=0.05, finetune_lr=0.01,
                         accelerator="cpu")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run_pruning(model, dm, method, config, evaluate_test=True, seed=0)
    row = {"label": label, "val_acc": result.val_acc, "test_acc": result.test_acc,
           "flops": result.cost.flops_physical, "flops_dense": result.cost.flops_dense,
           "params": result.cost.params_physical, "params_dense": result.cost.params_dense,
           "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0,
           "extra_forward_passes": result.extra_forward_passes, "removed": method.report.get("removed")}
    print(f"  {label:<8} test {row['test_acc']:.4f} val {row['val_acc']:.4f} FLOPs {row['flops']:,} "
          f"params {row['params']:,} removed {row['removed']} cpu {row['cpu_s']:.1f}s", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        dm = build_datamodule("fashion_mnist", limit_train=args.data_limit, batch_size=128, seed=seed)
        print(f"seed {seed}: fashion_mnist {dm.sizes}", flush=True)
        torch.manual_seed(seed)
        dense = train_dense(build_model("vgg_small", dm.input_shape, dm.num_classes, width=args.width), dm,
                            args.epochs)
        dense_test = evaluate(dense, dm.test_dataloader())["acc"]
        print(f"  dense test_acc {dense_test:.4f}", flush=True)
        for sparsity in args.sparsities:
            rl = RLPruner(sparsity=sparsity, pretrain=False, seed=seed)
            rl_row = run_one("rl", dense, dm, rl, args.finetune_epochs)
            uniform = UniformChannelPruning(target_flops=rl_row["flops"], pretrain=False, seed=seed)
            uni_row = run_one("uniform", dense, dm, uniform, args.finetune_epochs)
            uni_row["fraction"] = uniform.fraction
            for row in (rl_row, uni_row):
                row.update(seed=seed, sparsity=sparsity, dense_test=dense_test)
            rows.extend([rl_row, uni_row])
    print()
    print("| seed | RL sparsity | method | test acc | val acc | physical FLOPs (of dense) | params | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" (f={r['fraction']:.3f})" if "fraction" in r else ""
        print(f"| {r['seed']} | {r['sparsity']:.1f} | {r['label']}{extra} | {r['test_acc']:.2%} | {r['val_acc']:.2%} "
              f"| {r['flops']:,} ({r['flops'] / r['flops_dense']:.3f}) | {r['params']:,} | {r['cpu_s']:.1f} |")
    for sparsity in args.sparsities:
        pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2]) if a["sparsity"] == sparsity]
        diff = sum(a["test_acc"] - b["test_acc"] for a, b in pairs) / len(pairs)
        print(f"sparsity {sparsity}: mean test-accuracy difference rl - uniform = {diff * 100:+.2f} points "
              f"over {len(pairs)} seed(s)")
    print(f"total {time.perf_counter() - start:.0f}s; command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
