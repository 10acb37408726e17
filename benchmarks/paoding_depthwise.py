"""PAODING on a depthwise-separable CNN with BatchNorm, a residual add and a channel concat,
before and after the fix of issue 29 (Fashion-MNIST, several seeds).

The model (:class:`DepthwiseResidualConcat`) is what a user writes: a stem, a depthwise-separable
block added to its input (residual), two strided depthwise-separable branches concatenated, a
second residual block on the concatenation, global pooling and a small dense head; every
convolution has a BatchNorm after it, ReLUs are modules (``inplace=True``).

Per seed:

1. train the dense model as a sweep trial's PAODING pre-training does (SGD, momentum 0.9,
   Nesterov, lr 0.05 on a cosine schedule, weight decay 5e-4, ``--epochs``) on the first
   ``--limit-train`` samples of the training split;
2. for each code version, in its own process (``--worker``), prune a copy of that dense model
   with PAODING's defaults at each ratio (``conv_ratio = dense_ratio``, no fine-tuning, no data
   read), cut it (:func:`prunelib.surgery.surgery`) and measure on the validation split:
   accuracy, the share of samples given the most frequent predicted class, the classes predicted
   at all, physical FLOPs.

Code versions: ``before`` is ``prunelib`` at ``--before`` (a commit; ``git archive`` of it into
a temporary directory), ``after`` is this checkout's. Both run the same worker function, on
the same saved dense weights and the same split, so only the library differs.

Usage::

    python benchmarks/paoding_depthwise.py                    # 3 seeds, about 12 min on 2 cores
    python benchmarks/paoding_depthwise.py --seeds 0 --epochs 1 --limit-train 2000 --ratios 0.25   # smoke

Writes the raw rows to ``benchmarks/results/paoding_depthwise_<date>.json.gz`` (``--out``) and
prints the markdown table of RESULTS.md (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from rows import run_meta, write_rows  # noqa: E402

#: The last commit before the fix (issue 29's branch point).
BEFORE = "35f58f3"


def depthwise_separable(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (MobileNet's block)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DepthwiseResidualConcat(nn.Module):
    """stem -> x + ds(x) -> cat(ds_left(x), ds_right(x)) (stride 2) -> y + ds(y) -> pool -> MLP head.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        width: channels of the stem and of each concatenated branch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.block1 = depthwise_separable(width, width)
        self.left = depthwise_separable(width, width, 2)
        self.right = depthwise_separable(width, width, 2)
        self.block3 = depthwise_separable(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width, 64), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        x = self.stem(x)
        x = x + self.block1(x)
        x = torch.cat([self.left(x), self.right(x)], 1)
        x = x + self.block3(x)
        return self.head(self.pool(x))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs (the trial's pre-training)")
    p.add_argument("--limit-train", type=int, default=12000, help="training samples used")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--before", default=BEFORE, help="commit whose prunelib is 'before'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="raw rows (.json.gz); default benchmarks/results/")
    # Worker mode (one code version, one seed): internal.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def datamodule(args: argparse.Namespace, seed: int) -> Any:
    from prunelib.data import build_datamodule

    return build_datamodule("fashion_mnist", limit_train=args.limit_train, seed=seed)


def train_dense(model: nn.Module, dm: Any, epochs: int) -> nn.Module:
    """SGD as a trial's pre-training (the built-in classifier's optimizer and cosine schedule)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = max(1, epochs * len(dm.train_dataloader()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        model.train()
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def measure(model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """Validation accuracy, the most frequent predicted class's share and the classes predicted."""
    model.eval()
    preds, labels = [], []
    for x, y in batches:
        preds.append(model(x).argmax(1))
        labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    counts = torch.bincount(p, minlength=10)
    return {"val_acc": float((p == y).float().mean()), "top_class_share": float(counts.max()) / len(p),
            "classes_predicted": int((counts > 0).sum())}


def worker(args: argparse.Namespace) -> None:
    """Prune the saved dense model at every ratio with the ``prunelib`` on ``sys.path``."""
    import copy

    import prunelib
    from prunelib.flops import count_flops
    from prunelib.methods.paoding import PAODING
    from prunelib.surgery import surgery

    torch.set_num_threads(args.threads)
    dm = datamodule(args, args.seed)
    shape = tuple(dm.input_shape)
    dense = DepthwiseResidualConcat(shape[0], dm.num_classes, args.width)
    dense.load_state_dict(torch.load(args.state, weights_only=True))
    batches = list(dm.val_dataloader())
    rows = [{"ratio": 0.0, **measure(dense, batches), "flops": count_flops(dense, shape), "seconds": 0.0}]
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        method = PAODING(conv_ratio=ratio, dense_ratio=ratio, pretrain=False)
        method.setup(model, dm)
        masks = method.finalize(model)
        small = surgery(model, masks, shape, round_to=None, verify=False).model
        seconds = time.perf_counter() - t0
        rows.append({"ratio": ratio, **measure(small, batches), "flops": count_flops(small, shape),
                     "seconds": seconds, "compensated": method.report.get("conv_channels_compensated")})
    args.rows.write_text(json.dumps({"prunelib": str(Path(prunelib.__file__).resolve().parent), "rows": rows}))


def export_before(commit: str, into: Path) -> str:
    """``prunelib`` at ``commit`` extracted under ``into``; returns the full commit hash."""
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", commit], check=True, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", full, "prunelib"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return full


def run_worker(code_dir: Path, state: Path, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--state", str(state), "--seed", str(seed),
           "--rows", str(out), "--limit-train", str(args.limit_train), "--width", str(args.width),
           "--threads", str(args.threads), "--ratios", *[str(r) for r in args.ratios]]
    subprocess.run(cmd, check=True, env=env, cwd=str(code_dir))
    result = json.loads(out.read_text())
    # The library that ran must be the one asked for (an installed copy must not win).
    assert Path(result["prunelib"]).parent == code_dir.resolve(), result["prunelib"]
    return result


def mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f} %"


def table(rows: list[dict[str, Any]], ratios: list[float]) -> str:
    lines = ["| channels/neurons removed | version | val acc | top class share | classes predicted (min) "
             "| phys FLOPs (of dense) |", "|---|---|---|---|---|---|"]
    dense = [r for r in rows if r["ratio"] == 0.0 and r["version"] == "after"]
    lines.append(f"| 0 (dense) | - | {mean_std([r['val_acc'] for r in dense])} | "
                 f"{mean_std([r['top_class_share'] for r in dense])} | {min(r['classes_predicted'] for r in dense)} "
                 "| 1.000 |")
    for ratio in ratios:
        for version in ("before", "after"):
            sel = [r for r in rows if r["ratio"] == ratio and r["version"] == version]
            flops = sum(r["flops"] / r["dense_flops"] for r in sel) / len(sel)
            lines.append(f"| {ratio:.0%} | {version} | {mean_std([r['val_acc'] for r in sel])} | "
                         f"{mean_std([r['top_class_share'] for r in sel])} | "
                         f"{min(r['classes_predicted'] for r in sel)} | {flops:.3f} |")
    return "\n".join(lines)


def results_table(doc: dict[str, Any]) -> str:
    """RESULTS.md's table from the committed rows file (``benchmarks/results_md.py``)."""
    return table(doc["rows"], doc["meta"]["ratios"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    after_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                                  text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "prunelib"], check=True,
                                capture_output=True, text=True).stdout.strip())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="paoding-depthwise-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "before").mkdir()
        before_commit = export_before(args.before, tmp_dir / "before")
        for seed in args.seeds:
            torch.manual_seed(seed)
            dm = datamodule(args, seed)
            t0 = time.perf_counter()
            dense = train_dense(DepthwiseResidualConcat(dm.input_shape[0], dm.num_classes, args.width), dm, args.epochs)
            train_s = time.perf_counter() - t0
            state = tmp_dir / f"dense-{seed}.pt"
            torch.save(dense.state_dict(), state)
            for version, code in (("before", tmp_dir / "before"), ("after", REPO)):
                result = run_worker(code, state, seed, args, tmp_dir / f"{version}-{seed}.json")
                dense_flops = result["rows"][0]["flops"]
                for r in result["rows"]:
                    rows.append({**r, "version": version, "seed": seed, "dense_flops": dense_flops,
                                 "train_s": train_s})
                    print(f"seed {seed} {version:6s} ratio {r['ratio']:.2f}: val_acc {r['val_acc']:.4f} "
                          f"top class {r['top_class_share']:.3f} classes {r['classes_predicted']} "
                          f"flops {r['flops'] / dense_flops:.3f}", flush=True)
    meta = run_meta("paoding_depthwise.py", argv,
                    machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU",
                    before_commit=before_commit,
                    after_commit=after_commit + (" (+ uncommitted prunelib)" if dirty else ""),
                    threads=args.threads, seeds=args.seeds, epochs=args.epochs, limit_train=args.limit_train,
                    width=args.width, ratios=args.ratios, seconds=time.perf_counter() - start)
    out = write_rows(args.out or REPO / "benchmarks" / "results" / f"paoding_depthwise_{meta['date']}.json.gz",
                     {"meta": meta, "rows": rows})
    print(f"\n{json.dumps(meta, indent=1)}\n\n{table(rows, args.ratios)}\n\nraw rows: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
