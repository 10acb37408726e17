"""Orchestrator overhead per trial: plain PyTorch loop vs prunelib's Lightning runner vs a full sweep.

The same work in each column: train ``epochs`` dense, one-shot global magnitude cut to
``sparsity``, fine-tune ``finetune_epochs``, evaluate on validation and test. Columns:

* plain: a hand-written loop over resident tensors (the floor);
* runner: ``prunelib.run_pruning`` (Lightning Trainer per phase, callbacks, FLOPs counting);
* sweep: ``search.tuner.run_sweep`` with Ray Tune, Optuna and MLflow (concurrency 1, so the
  per-trial figure is wall time / trials, Ray's start-up reported apart).

Prints seconds per trial and the ratios to the plain loop, measured in this one run.

    python benchmarks/search_overhead.py --data digits --model mlp --trials 6
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prunelib import TrainConfig, build_method, run_pruning  # noqa: E402
from prunelib.data import build_datamodule  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.selection import select_masks  # noqa: E402
from prunelib.importance import magnitude_scores  # noqa: E402


def plain_trial(dm, model_name: str, epochs: int, finetune: int, sparsity: float, lr: float, seed: int) -> float:
    """One trial in plain PyTorch; returns wall seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_name, dm.input_shape, dm.num_classes)
    xtr, ytr = dm.split("train")
    bs = dm.batch_size
    masks = None

    def train(n_epochs: int) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, n_epochs))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(n_epochs):
            order = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
                if masks is not None:
                    masks.enforce(model)
            sched.step()

    train(epochs)
    masks = select_masks(model, magnitude_scores(model), sparsity)
    masks.apply(model)
    train(finetune)
    model.eval()
    with torch.no_grad():
        for split in ("val", "test"):
            x, y = dm.split(split)
            (model(x).argmax(1) == y).float().mean().item()
    return time.perf_counter() - t0


def runner_trial(dm, model_name: str, epochs: int, finetune: int, sparsity: float, lr: float, seed: int) -> float:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(model_name, dm.input_shape, dm.num_classes)
    run_pruning(model, dm, build_method("magnitude", sparsity=sparsity),
                TrainConfig(epochs=epochs, finetune_epochs=finetune, lr=lr, accelerator="cpu"),
                evaluate_test=True, seed=seed)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a sweep trial gets one CPU (trial.cpus=1); compare like with like
    dm = build_datamodule(args.data, limit_train=args.limit_train, batch_size=64 if args.data == "digits" else 128)
    common = (args.model, args.epochs, args.finetune_epochs, args.sparsity, args.lr)

    plain_trial(dm, *common, seed=0)  # warm-up: first-touch costs belong to no column
    plain = [plain_trial(dm, *common, seed=s) for s in range(args.trials)]
    print(f"plain loop  : {sum(plain) / len(plain):.3f} s/trial", flush=True)
    runner = [runner_trial(dm, *common, seed=s) for s in range(args.trials)]
    print(f"prunelib run: {sum(runner) / len(runner):.3f} s/trial", flush=True)

    from tests.conftest import compose
    from search.tuner import run_sweep
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["+method=magnitude", f"data={args.data}", f"model={args.model}",
                       f"search.n_trials={args.trials}", "search.concurrency=1", "search.search_settings=false",
                       f"method.settings.sparsity={args.sparsity}", f"trial.epochs={args.epochs}",
                       f"trial.finetune_epochs={args.finetune_epochs}", f"trial.lr={args.lr}",
                       f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
                      + ([f"data.limit_train={args.limit_train}"] if args.limit_train else []))
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_sweep(cfg, Path(tmp) / "out")
        sweep_total = time.perf_counter() - t1
        ray.shutdown()
    sweep = sweep_total / args.trials
    p, r = sum(plain) / len(plain), sum(runner) / len(runner)
    print("\n| data/model | epochs+ft | plain s/trial | prunelib runner s/trial | sweep s/trial | runner/plain | sweep/plain | ray.init s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.data}/{args.model} | {args.epochs}+{args.finetune_epochs} | {p:.3f} | {r:.3f} | {sweep:.3f} | "
          f"{r / p:.2f} | {sweep / p:.2f} | {ray_init:.1f} |")
    print("(sweep s/trial = run_sweep wall time / trials at concurrency 1: Tune scheduling, Optuna, "
          "MLflow parent/children/front logging, Lightning, Ray worker start)")


if __name__ == "__main__":
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    main()
