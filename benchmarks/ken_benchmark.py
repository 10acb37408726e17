"""KEN benchmark: (a) accuracy against reverted fraction on Fashion-MNIST, (b) selection speed.

(a) Quality. A (pretrained, fine-tuned) pair is made with the sweep's own code
(:func:`search.trials.ken.get_pair`): an MLP (LeNet-300-100) pretrained on classes 0-4, then fine-tuned
on all 10 classes. KEN (default ``layers="no_head"``) is applied at several per-row fractions and
per-row counts; each KEN model's validation and test accuracy is reported with its reverted
fraction (entries reset to pretrained / all parameters) and its compact delta file size,
against the full fine-tuned model (the paper's claim: equal or better accuracy with at least
25 % of the parameters reverted) and the pretrained model. Two controls: the same per-row count
kept at *random* positions (does the KDE choice matter?), and ``layers="all"`` (the reference's
head handling: the head's reverted entries go back to a head trained on other classes).

(b) Speed. The matrices of a BERT-base-sized model (12 layers x (4 x 768x768, 3072x768,
768x3072) + 30522x768 word, 512x768 position and 2x768 token-type embeddings = 108.8M values;
N(0, 0.04^2) random values) are selected with ``k`` per row by the C extension (new) and by
the torch path (old, the fallback and GPU code), which must give identical positions, and by a
per-row Python loop (scikit-learn KDE + greedy ``np.delete`` matching, as in the authors'
code) timed on a sample of rows of each shape and extrapolated linearly to all rows; the
sampled rows' positions are compared with the fastest backend's.

Usage::

    python benchmarks/ken_benchmark.py                         # both parts
    python benchmarks/ken_benchmark.py --part quality --data-limit 20000 --epochs 3
    python benchmarks/ken_benchmark.py --part speed --k 64 --loop-rows 40
    python benchmarks/ken_benchmark.py --part speed --k 64 256 --rows benchmarks/results/ken_speed_DATE.json.gz

``--rows`` writes the raw figures (``quality``: one row per variant; ``speed``: one row per k,
seconds per backend and per row width, unrounded) with the command, commit, machine and date;
:func:`table_quality`, :func:`table_speed` and :func:`table_backends` render RESULTS.md's tables.

The test split is only reported, never used for a decision.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunelib.data import build_datamodule  # noqa: E402
from prunelib.ken_storage import save_ken_delta  # noqa: E402
from prunelib.methods.ken import KEN, apply_ken, kde_select_rows, selected_parameter_names  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.training import evaluate  # noqa: E402
from rows import run_meta, settings_of, write_rows  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------
# (a) quality
# ------------------------------------------------------------------------------------------------
def random_rows_masks(finetuned: torch.nn.Module, names: list[str], counts: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Keep the same number of entries per row as KEN did, at random positions (a control)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(finetuned.named_parameters())
    out = {}
    for name in names:
        p = params[name]
        rows = p.reshape(1, -1) if p.dim() == 1 else p.reshape(p.shape[0], -1)
        k = counts[name]
        order = torch.rand(rows.shape, generator=g).argsort(dim=1)
        keep = torch.zeros(rows.shape, dtype=torch.bool)
        keep.scatter_(1, order[:, :k], True)
        out[name] = keep.reshape(p.shape)
    return out


def quality(args: argparse.Namespace) -> list[dict]:
    from search.settings import TrialSettings
    from search.trials.ken import get_pair
    from prunelib.methods.ken import PairPlan

    say(f"(a) quality: {args.data}, mlp, limit_train={args.data_limit}, {args.epochs}+{args.epochs} epochs")
    dm = build_datamodule(args.data, limit_train=args.data_limit, batch_size=128, seed=args.seed)
    say(f"    data: {dm.sizes}")
    torch.manual_seed(args.seed)
    model = build_model("mlp", tuple(dm.input_shape), dm.num_classes)
    trial_cfg = TrialSettings.from_dict({"epochs": args.epochs, "lr": 0.05, "optimizer": "sgd", "seed": args.seed})
    cache = args.cache or tempfile.mkdtemp(prefix="ken_pair_")
    t0 = time.perf_counter()
    pre, ft, info = get_pair(model, dm, PairPlan(pretrain_classes=0.5, cache_dir=cache),
                             {"name": args.data, "limit_train": args.data_limit}, {"name": "mlp"}, trial_cfg)
    say(f"    pair: {'cached' if info['cached'] else 'made'} in {time.perf_counter() - t0:.1f}s "
        f"(pretrained on classes {info['pretrain_classes']})")
    val, test = dm.val_dataloader(), dm.test_dataloader()
    rows = []

    def record(label: str, net: torch.nn.Module, reverted: float, file_ratio: float | None, select_s: float | None) -> None:
        r = {"variant": label, "reverted": reverted, "val": evaluate(net, val)["acc"],
             "test": evaluate(net, test)["acc"], "file_ratio": file_ratio, "select_s": select_s}
        rows.append(r)
        say(f"    {label:<34} reverted {reverted:6.1%}  val {r['val']:.4f}  test {r['test']:.4f}"
            + (f"  delta file {file_ratio:.3f} of full" if file_ratio is not None else "")
            + (f"  select {select_s:.2f}s" if select_s is not None else ""))

    record("fine-tuned (full)", ft, 0.0, None, None)
    record("pretrained (classes 0-4 only)", pre, 1.0, None, None)
    variants = [("per_row_fraction", f, "no_head") for f in args.fractions]
    variants += [("per_row_count", k, "no_head") for k in args.counts]
    variants += [("per_row_fraction", 0.5, "all")]
    for mode, value, layers in variants:
        ken_model = copy.deepcopy(ft)
        settings = {"k_mode": mode, "layers": layers}
        settings["keep_fraction" if mode == "per_row_fraction" else "k"] = value
        ken = KEN(**settings)
        ken.set_pretrained(pre)
        t = time.perf_counter()
        masks = ken.finalize(ken_model)
        select_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            delta = save_ken_delta(Path(tmp) / "d.safetensors", pre, ken_model, masks.masks, finetuned=ft)
        label = (f"KEN keep {value:.0%}/row" if mode == "per_row_fraction" else f"KEN k={value}/row") + \
            (f", layers={layers} (head reverted too)" if layers != "no_head" else "")
        record(label, ken_model, ken.report["reverted_fraction"], delta.ratio, select_s)
        if layers == "no_head" and value in (args.fractions[len(args.fractions) // 2], args.counts[0]):
            names = selected_parameter_names(ft, layers)
            counts = {n: int(masks.masks[n].reshape(masks.masks[n].shape[0] if masks.masks[n].dim() > 1 else 1, -1)[0].sum())
                      for n in names}
            control = copy.deepcopy(ft)
            rmasks = random_rows_masks(ft, names, counts, args.seed)
            apply_ken(control, pre, rmasks)
            reverted = sum(int((~m).sum()) for m in rmasks.values()) / sum(p.numel() for p in ft.parameters())
            same = f"same k/row as {value:.0%}" if mode == "per_row_fraction" else f"k={value}/row"
            record(f"control: random positions, {same}", control, reverted, None, None)
    return rows


# ------------------------------------------------------------------------------------------------
# (b) speed
# ------------------------------------------------------------------------------------------------
def bert_base_shapes() -> list[tuple[str, tuple[int, int]]]:
    """The 2-D weights of BERT-base (embeddings, 12 encoder layers): 108.9M values."""
    shapes = [("embeddings.word", (30522, 768)), ("embeddings.position", (512, 768)),
              ("embeddings.token_type", (2, 768))]
    for layer in range(12):
        for part in ("query", "key", "value", "attention.output"):
            shapes.append((f"layer{layer}.{part}", (768, 768)))
        shapes.append((f"layer{layer}.intermediate", (3072, 768)))
        shapes.append((f"layer{layer}.output", (768, 3072)))
    return shapes


def loop_select_row(row: np.ndarray, k: int) -> np.ndarray:
    """The authors' per-row procedure (scikit-learn KDE, greedy ``np.delete``), for timing."""
    from sklearn.neighbors import KernelDensity

    n = row.size
    h = abs(1.06 * np.std(row) * np.power(n, -1 / 5))
    grid = np.linspace(row.min(), row.max(), k)
    dens = [round(v) for v in np.exp(KernelDensity(kernel="gaussian", bandwidth=h).fit(row.reshape(-1, 1))
                                     .score_samples(grid[:, None]))]
    order = [i for level in range(max(dens), -1, -1) for i, d in enumerate(dens) if d == level]
    pool, index, chosen = row.copy(), np.arange(n), []
    for gi in order:
        j = int(np.abs(pool - grid[gi]).argmin())
        chosen.append(index[j])
        pool, index = np.delete(pool, j), np.delete(index, j)
    keep = np.zeros(n, dtype=bool)
    keep[chosen] = True
    return keep


def speed(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """Selection seconds of ``k`` per row on BERT-base shapes per backend, and the per-row loop's (extrapolated)."""
    from prunelib.methods.ken import native_available

    shapes = bert_base_shapes()
    total = sum(r * c for _, (r, c) in shapes)
    load = os.getloadavg()[0]
    say(f"(b) speed: {len(shapes)} matrices, {total / 1e6:.1f}M values, k={k} per row, "
        f"{torch.get_num_threads()} torch threads, load average {load:.1f}")
    g = torch.Generator().manual_seed(args.seed)
    tensors = {name: torch.randn(shape, generator=g) * 0.04 for name, shape in shapes}
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors.values():
        groups.setdefault(t.shape[1], []).append(t)
    by_width = {w: torch.cat(group) for w, group in groups.items()}  # rows of one length: one batch
    del groups
    del tensors
    backends = [b for b in args.backends if b != "native" or native_available()]
    if "native" in args.backends and "native" not in backends:
        say("    the C extension prunelib._ken_native is not built: new (native) not measured")
    masks: dict[str, dict[int, torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    width_seconds: dict[str, dict[str, float]] = {}  # backend -> row width (a JSON key) -> seconds
    for backend in backends:
        label = {"native": "new (C extension)", "torch": "old (torch path)"}.get(backend, backend)
        t0 = time.perf_counter()
        masks[backend] = {}
        width_seconds[backend] = {}
        for width, rows in by_width.items():
            tw = time.perf_counter()
            masks[backend][width] = kde_select_rows(rows, k, backend=backend)
            width_seconds[backend][str(width)] = time.perf_counter() - tw
            say(f"    {label}: {rows.shape[0]} rows of {width}: {width_seconds[backend][str(width)]:.1f}s")
        seconds[backend] = time.perf_counter() - t0
        kept = sum(int(m.sum()) for m in masks[backend].values())
        say(f"    {label} total: {seconds[backend]:.1f}s ({kept / total:.2%} kept)")
    same = differing = None
    if "native" in seconds and "torch" in seconds:
        same = all(torch.equal(masks["native"][w], masks["torch"][w]) for w in by_width)
        differing = sum(int((masks["native"][w] != masks["torch"][w]).any(dim=1).sum()) for w in by_width)
        say(f"    old / new: {seconds['torch']:.1f}s / {seconds['native']:.1f}s = "
            f"{seconds['torch'] / seconds['native']:.1f}x; positions identical on all "
            f"{sum(r.shape[0] for r in by_width.values())} rows: {same} ({differing} rows differ)")
    fastest = min(seconds, key=seconds.get) if seconds else None
    loop_total = 0.0
    sample_rows = sample_equal = 0
    loop_ms: dict[str, float] = {}  # row width -> milliseconds per row of the per-row loop
    for width, rows in by_width.items():
        pick = torch.randperm(rows.shape[0], generator=g)[:args.loop_rows]
        sample = rows[pick].numpy()
        tl = time.perf_counter()
        for i, r in enumerate(sample):
            keep = loop_select_row(r, k)
            if fastest is not None:
                sample_rows += 1
                sample_equal += int(np.array_equal(keep, masks[fastest][width][pick[i]].numpy()))
        per_row = (time.perf_counter() - tl) / len(sample)
        loop_ms[str(width)] = 1e3 * per_row
        loop_total += per_row * rows.shape[0]
        say(f"    per-row loop: {per_row * 1e3:.1f} ms/row of {width} ({len(sample)} rows timed) -> "
            f"{per_row * rows.shape[0]:.0f}s for {rows.shape[0]} rows")
    say(f"    per-row loop total (extrapolated): {loop_total:.0f}s = {loop_total / 3600:.2f} h"
        + (f"; speed-up of {fastest} {loop_total / seconds[fastest]:.1f}x; same positions as the "
           f"per-row loop on {sample_equal} of {sample_rows} sampled rows" if fastest else ""))
    kept = {b: sum(int(m.sum()) for m in masks[b].values()) / total for b in masks}
    return {"values": total, "k": k, "rows": sum(r.shape[0] for r in by_width.values()),
            "row_counts": {str(w): r.shape[0] for w, r in by_width.items()}, "kept": kept.get(fastest),
            "seconds": seconds, "width_seconds": width_seconds, "backends_identical": same,
            "rows_differing": differing, "fastest": fastest, "loop_s": loop_total, "loop_ms_per_row": loop_ms,
            "loop_rows_timed": args.loop_rows, "sample_equal": sample_equal, "sample_rows": sample_rows,
            "load_average": load, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------
# tables (RESULTS.md's, rendered from the rows; benchmarks/results_md.py calls these)
# ------------------------------------------------------------------------------------------------
#: Issue 19's targets for the selection on BERT-base shapes, seconds, by k.
TARGET_S = {64: 8.0, 256: 20.0}


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def table_quality(doc: dict[str, Any]) -> str:
    """Table (a): accuracy, reverted fraction, delta file size and selection time per variant."""
    lines = ["| variant | reverted | val acc | test acc | delta file / full | select s |", "|---|---|---|---|---|---|"]
    for r in doc["quality"]:
        lines.append(f"| {r['variant']} | {r['reverted']:.1%} | {r['val']:.2%} | {r['test']:.2%} | "
                     + ("-" if r["file_ratio"] is None else f"{r['file_ratio']:.3f}") + " | "
                     + ("-" if r["select_s"] is None else f"{r['select_s']:.2f}") + " |")
    return "\n".join(lines)


def _widths(seconds: dict[str, float]) -> str:
    return ", ".join(f"{w}-wide {s:.1f} s" for w, s in seconds.items())


def table_speed(doc: dict[str, Any]) -> str:
    """Table (b): the fastest backend against the per-row loop (extrapolated), per k."""
    lines = ["| k per row | kept | vectorised (measured) | per-row loop (extrapolated) | speed-up | load average at start |",
             "|---|---|---|---|---|---|"]
    for r in doc["speed"]:
        fast = r["fastest"]
        loop = f"{r['loop_s']:,.0f} s" + (f" = {r['loop_s'] / 3600:.2f} h" if r["loop_s"] >= 3600 else "")
        per_row = " / ".join(f"{ms:.1f}" for ms in r["loop_ms_per_row"].values())
        lines.append(f"| {r['k']} | {_percent(r['kept'], 1)} | {r['seconds'][fast]:.1f} s "
                     f"({_widths(r['width_seconds'][fast])}) | {loop} ({per_row} ms per row) | "
                     f"{r['loop_s'] / r['seconds'][fast]:.0f}x | {r['load_average']:.1f} |")
    return "\n".join(lines)


def table_backends(doc: dict[str, Any]) -> str:
    """Issue 19's table: the C extension against the torch path in the same run, the target, the positions."""
    lines = ["| k per row | kept | new (C extension) | torch path (same run) | target | positions |",
             "|---|---|---|---|---|---|"]
    for r in doc["speed"]:
        new, old = r["seconds"].get("native"), r["seconds"].get("torch")
        target = TARGET_S.get(r["k"])
        new_cell = "not built" if new is None else f"**{new:.1f} s** ({_widths(r['width_seconds']['native'])})"
        old_cell = "-" if old is None else f"{old:.1f} s" + (f" ({old / new:.1f}x)" if new else "")
        target_cell = "-" if target is None or new is None else \
            f"<= {target:g} s: {'met' if new <= target else 'NOT met'}"
        same = ("" if r["backends_identical"] is None else
                f"new {'=' if r['backends_identical'] else '!='} torch path on all {r['rows']:,} rows"
                + ("" if r["backends_identical"] else f" ({r['rows_differing']} differ)") + "; ")
        lines.append(f"| {r['k']} | {_percent(r['kept'])} | {new_cell} | {old_cell} | {target_cell} | "
                     f"{same}= per-row reference on {r['sample_equal']} of {r['sample_rows']} sampled rows |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["quality", "speed", "both"], default="both")
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-limit", type=int, default=20000, help="training samples (validation/test are whole)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the pretrain run and of the fine-tune run")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 50], help="per-row counts (<= 100, the shortest row)")
    parser.add_argument("--k", type=int, nargs="+", default=[64], help="per-row counts of the speed part (one run each)")
    parser.add_argument("--loop-rows", type=int, default=30, help="rows per shape timed with the per-row loop")
    parser.add_argument("--backends", nargs="+", default=["native", "torch"], choices=["native", "torch"],
                        help="selection backends timed (native: the C extension, new; torch: the torch path, old)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="pair cache directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=Path, default=None,
                        help="also write the raw figures (.json.gz with command, commit, machine, date) here: what "
                             "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    say(f"KEN benchmark on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads")
    start = time.perf_counter()
    doc: dict[str, Any] = {"quality": quality(args) if args.part in ("quality", "both") else [],
                           "speed": [speed(args, k) for k in args.k] if args.part in ("speed", "both") else []}
    if doc["quality"]:
        say("\n" + table_quality(doc))
    if doc["speed"]:
        say("\n" + table_speed(doc) + "\n\n" + table_backends(doc))
    if args.rows:
        meta = run_meta("ken_benchmark.py", argv, settings_of(args), seconds=time.perf_counter() - start)
        say(f"raw rows written to {write_rows(args.rows, {'meta': meta, **doc})}")
    say(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
