"""PAODING vs Torch-Pruning's L1 magnitude pruner: data-free channel pruning, physically removed.

For each model (default ``vgg_small``, ``resnet20``, plus ``lenet5``, whose two hidden dense
layers exercise PAODING's neuron merging) on a Fashion-MNIST subset:

1. train the dense model briefly (Adam, ``--epochs``) on the training subset;
2. at each ratio (fraction of channels removed per layer / coupled group, default 25 % and
   50 %), prune a copy **without any data** and without fine-tuning:
   - ``paoding (paper)``: :class:`prunelib.methods.PAODING` with ``variant="paper"`` (conv: raw
     filter L1 per weight; dense: the paper's impact score and pair bound, pairs i < j merged j
     into i, step 0.025), then :func:`prunelib.surgery.surgery`;
   - ``paoding ext -fold_bn -comp``: ``variant="extended"`` (relative impact scale, bounded bias
     term, tight pair bound, both merge orientations, step 0.05, interval boxes from the trunk
     and BatchNorm) without its two conv extensions;
   - ``paoding ext +fold_bn``: filters also scored with their BatchNorm folded in;
   - ``paoding ext (defaults)``: also the removed conv channels' expected activation folded into
     their consumers (the library's extended defaults);
   - ``tp-l1``: Torch-Pruning's ``MagnitudePruner`` with ``MagnitudeImportance(p=1)``, the same
     per-layer ratio, the classifier's outputs ignored;
3. report parameter, physical-FLOPs and model-size reduction (bytes of the saved safetensors
   state dict), test accuracy and FGSM accuracy (``--epsilon`` in normalised input units) and
   their retention (pruned / dense), and the CPU latency speed-up of the exported ONNX model
   (onnxruntime, batch ``--latency-batch``) and of the eager PyTorch model.

Usage::

    python benchmarks/paoding_benchmark.py                       # about 10 min, 1 thread
    python benchmarks/paoding_benchmark.py --models lenet5 --epochs 1 --data-limit 2000   # smoke
    python benchmarks/paoding_benchmark.py --rows benchmarks/results/paoding_benchmark_DATE.json.gz

``--rows`` writes one row per model and method (raw counts, accuracies and latencies, unrounded)
with the command, commit, machine and date; :func:`results_table` renders RESULTS.md's table.

Only the test split is used (for the report); no decision reads any data.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelib.data import build_datamodule
from prunelib.flops import count_flops
from prunelib.methods.paoding import PAODING, normalized_interval
from prunelib.models import build_model
from prunelib.robustness import fgsm_accuracy
from prunelib.surgery import export_onnx, surgery

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import run_meta, settings_of, write_rows  # noqa: E402

#: (row label, PAODING settings): the paper variant, then the extended variant with its conv
#: extensions switched on one at a time.
PAODING_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("paoding (paper)", {"variant": "paper"}),
    ("paoding ext -fold_bn -comp", {"variant": "extended", "compensate": False, "fold_bn": False}),
    ("paoding ext +fold_bn", {"variant": "extended", "compensate": False, "fold_bn": True}),
    ("paoding ext (defaults)", {"variant": "extended"}),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg_small", "resnet20", "lenet5"])
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier of vgg_small/resnet20")
    p.add_argument("--data-limit", type=int, default=5000, help="training samples used")
    p.add_argument("--eval-samples", type=int, default=2000, help="test samples for accuracy/FGSM")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--epsilon", type=float, default=0.1, help="FGSM size, normalised input units")
    p.add_argument("--latency-batch", type=int, default=1024)
    p.add_argument("--latency-repeats", type=int, default=7, help="timed runs; the median is kept")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--rows", type=Path, default=None,
                   help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                        "RESULTS.md's table is generated from (benchmarks/results_md.py)")
    return p.parse_args(argv)


def train_dense(model: nn.Module, dm: Any, epochs: int) -> nn.Module:
    """Plain Adam training (the 'pretrained' model every pruner starts from)."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        loader = dm.train_dataloader()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        print(f"    epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors (what ships)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return os.path.getsize(path)


@torch.no_grad()
def torch_latency_ms(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    model.eval()
    x = torch.randn(batch, *shape)
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def onnx_latency_ms(model: nn.Module, shape: tuple[int, ...], batch: int, repeats: int,
                    threads: int) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", shape)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *shape).numpy()
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def tp_l1_prune(model: nn.Module, shape: tuple[int, ...], ratio: float, round_to: int | None = None) -> nn.Module:
    """Torch-Pruning's L1 magnitude pruner (MagnitudeImportance p=1), per-layer ratio, no data.

    ``round_to``: keep a multiple of this many channels per layer (Torch-Pruning's own option).
    """
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    example = torch.zeros(1, *shape, device=next(pruned.parameters()).device)
    pruner = tp.pruner.MagnitudePruner(pruned, example,
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[classifier], round_to=round_to)
    pruner.step()
    return pruned.eval()


def measure(model: nn.Module, shape: tuple[int, ...], test: tuple[torch.Tensor, torch.Tensor],
            args: argparse.Namespace) -> dict[str, float]:
    fg = fgsm_accuracy(model, test, epsilon=args.epsilon, batch_size=500)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": count_flops(model, shape),
            "bytes": state_bytes(model), "acc": fg.clean_accuracy, "fgsm": fg.attacked_accuracy,
            "onnx_ms": onnx_latency_ms(model, shape, args.latency_batch, args.latency_repeats, args.threads),
            "torch_ms": torch_latency_ms(model, shape, args.latency_batch, args.latency_repeats)}


def row(m: dict[str, Any], dense: dict[str, Any]) -> str:
    """One line of the table: a pruned model's figures against its dense model's."""
    if m["method"] == "dense":
        return (f"| {m['model']} | dense | 0% | - | - | - | {m['acc']:.2%} | 1.000 | {m['fgsm']:.2%} "
                f"| 1.000 | 1.00x ({m['onnx_ms']:.0f} ms) | 1.00x ({m['torch_ms']:.0f} ms) |")
    return (f"| {m['model']} | {m['method']} | {m['ratio']:.0%} | {1 - m['params'] / dense['params']:.1%} "
            f"| {1 - m['flops'] / dense['flops']:.1%} | {1 - m['bytes'] / dense['bytes']:.1%} "
            f"| {m['acc']:.2%} | {m['acc'] / dense['acc']:.3f} | {m['fgsm']:.2%} "
            f"| {m['fgsm'] / dense['fgsm'] if dense['fgsm'] else float('nan'):.3f} "
            f"| {dense['onnx_ms'] / m['onnx_ms']:.2f}x | {dense['torch_ms'] / m['torch_ms']:.2f}x |")


HEADER = ("| model | method | channels removed | params cut | phys FLOPs cut | size cut | test acc "
          "| acc retained | FGSM acc | FGSM retained | ONNX speed-up | torch speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """RESULTS.md's table: every row against the dense row of its model."""
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    return HEADER + "\n" + "\n".join(row(r, dense[r["model"]]) for r in rows)


def results_table(doc: dict[str, Any]) -> str:
    """RESULTS.md's table from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return markdown_table(doc["rows"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"no GPU used (CPU latency only)", flush=True)
    dm = build_datamodule("fashion_mnist", limit_train=args.data_limit, batch_size=128, seed=args.seed)
    shape = tuple(dm.input_shape)
    x_test, y_test = dm.split("test")
    test = (x_test[: args.eval_samples], y_test[: args.eval_samples])
    interval = normalized_interval(dm.mean, dm.std, (0.0, 255.0))
    print(f"fashion_mnist: {dm.sizes} (train limited to {args.data_limit}); input box {interval}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        torch.manual_seed(args.seed)
        width = 1.0 if name == "lenet5" else args.width
        print(f"[{name}] width {width}: training dense for {args.epochs} epochs", flush=True)
        dense_model = train_dense(build_model(name, shape, dm.num_classes, width=width), dm, args.epochs)
        dense = measure(dense_model, shape, test, args)
        print(f"[{name}] dense: acc {dense['acc']:.4f} fgsm {dense['fgsm']:.4f} params {dense['params']} "
              f"onnx {dense['onnx_ms']:.1f} ms torch {dense['torch_ms']:.1f} ms", flush=True)
        dense = {"model": name, "method": "dense", "ratio": 0.0, "width": width, **dense}
        rows.append(dense)
        for ratio in args.ratios:
            for label, variant_settings in PAODING_VARIANTS:
                t0 = time.perf_counter()
                pruned = copy.deepcopy(dense_model)
                method = PAODING(conv_ratio=ratio, dense_ratio=ratio, mode="impact", input_interval=interval,
                                 input_shape=shape, pretrain=False, **variant_settings)
                method.setup(pruned, datamodule=None)  # data-free: no data module at all
                masks = method.finalize(pruned)
                result = surgery(pruned, masks, shape, round_to=None)
                prune_s = time.perf_counter() - t0
                rows.append({"model": name, "method": label, "ratio": ratio, "width": width,
                             **measure(result.model, shape, test, args), "prune_s": prune_s,
                             "surgery_max_abs_diff": result.max_abs_diff})
                print(f"[{name}] {label} {ratio:.0%} ({prune_s:.1f}s to prune, surgery diff "
                      f"{result.max_abs_diff:.1e}): {row(rows[-1], dense)}", flush=True)
            t0 = time.perf_counter()
            baseline = tp_l1_prune(dense_model, shape, ratio)
            prune_s = time.perf_counter() - t0
            rows.append({"model": name, "method": "tp-l1", "ratio": ratio, "width": width,
                         **measure(baseline, shape, test, args), "prune_s": prune_s})
            print(f"[{name}] tp-l1 {ratio:.0%} ({prune_s:.1f}s to prune): {row(rows[-1], dense)}", flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    print(f"\ncommand: {' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1]] + sys.argv)}")
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.out is not None:
        args.out.write_text(table + "\n")
    if args.rows is not None:
        meta = run_meta("paoding_benchmark.py", argv, settings_of(args), seconds=time.perf_counter() - start)
        print(f"raw rows written to {write_rows(args.rows, {'meta': meta, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
