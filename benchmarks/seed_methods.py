"""Seed methods against magnitude, random and IMP at the same per-layer distribution and budget.

Every model is LeNet-5 on the full Fashion-MNIST training split (54,000 train / 6,000 val /
10,000 test), SGD-Nesterov lr 0.05 with a cosine per phase, batch 128, 1 torch thread per worker;
accuracy is measured on the artifact a user gets (:func:`prunelib.flops.deployable`: the surgered
model for structured masks, the masked model otherwise), FLOPs and parameters on that artifact
(physical when surgered, effective when masked). Several seeds; tables give mean +- std.

Part ``unstructured`` (weight sparsity 50 / 80 %; every run trains 4 epochs in all):
  dense (4 epochs) | magnitude, ``uniform`` and ``global`` (3 + 1 fine-tune) | random at
  initialisation (uniform, the sparse network trains the 4 epochs) | IMP (3 rounds + final, 1 epoch each, learning-rate rewinding,
  uniform) | BINGO ``variant=paper`` (training batches, batch accuracy, reset to init, every
  step; 3 + 1) | BINGO ``variant=extended`` (the library default: validation batches, loss,
  reset to zero; 3 + 1) | BINGO extended with ``allocation=damage`` (3 + 1) | GaP (3 groups x 1
  round x 1 epoch + 1 fine-tune, uniform).
  Then PAODING, data-free on that seed's dense model (``conv_ratio = dense_ratio`` 25 / 50 %):
  the extended variant (the default) without and with + 1 fine-tune epoch, and the paper's
  variant (no fine-tune, which it refuses) in a table of its own; each against channel L1 and
  random channels removing the same channels per coupled group from the same dense model (IMP
  needs training: not applicable to a data-free method).

Part ``structured``:
  polarization at 50 / 80 % weight sparsity (3 + 1), ``variant=extended`` (the default: top-k
  projection of the gates under a ramped budget) and ``variant=paper`` (the target reached
  through the losses alone; it reports the sparsity it reached), each in a table of its own | RL-Pruner at 50 % of the channels (2
  pretrain + a KD recovery epoch after steps 1 and 2 + 1 distilled fine-tune = 5 epochs). Each
  against channel baselines that remove the *same number of channels from every coupled group*
  (so the physical FLOPs match exactly) with the same epochs: channel L1 (dense, cut, fine-tune),
  random channels, channel IMP (iterative L1 cuts with retraining, the method's step schedule),
  and channel L1 at a *uniform* fraction of every group chosen so its physical FLOPs come
  closest to the method's (the learned allocation against none).

Part ``ken``: a (pretrained on classes 0-4, fine-tuned on all) LeNet-5 pair per seed
(:func:`search.trials.ken.get_pair`, 3 + 3 epochs), KEN at 25 / 50 / 75 % kept per row against the
same per-row counts kept at random positions and by the largest fine-tuning delta ``|ft - pre|``.

Usage::

    python benchmarks/seed_methods.py --jobs 2 --out /tmp/seed_methods.md        # everything
    python benchmarks/seed_methods.py --parts structured --seeds 0 --data-limit 3000 --epochs 1  # smoke

The test split is only reported, never used for a decision.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prunelib import TrainConfig, build_method, run_pruning  # noqa: E402
from prunelib.data import build_datamodule  # noqa: E402
from prunelib.flops import deployable, pruned_cost  # noqa: E402
from prunelib.importance import channel_scores  # noqa: E402
from prunelib.masks import MaskSet  # noqa: E402
from prunelib.methods.base import MethodSettings, Phase, PruningMethod, set_field  # noqa: E402
from prunelib.models import build_model  # noqa: E402
from prunelib.surgery import channel_groups, complete_channel_masks  # noqa: E402
from prunelib.training import evaluate  # noqa: E402

PARTS = ("unstructured", "structured", "ken")


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Channel baselines: the same channels per coupled group, chosen by L1 or at random
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelCutSettings(MethodSettings):
    """``counts``: ``((group root, channels to remove), ...)``; ``criterion``: ``l1`` | ``random``;
    ``round_epochs``: epochs of each training round before a cut (one entry per cut; the last
    cut is followed by the fine-tune); ``input_shape``: one sample's shape."""

    counts: tuple[tuple[str, int], ...] = ()
    criterion: str = "l1"
    round_epochs: tuple[int, ...] = (3,)
    seed: int = 0
    input_shape: tuple[int, ...] = (1, 28, 28)

    def __post_init__(self) -> None:
        set_field(self, "counts", tuple((str(r), int(c)) for r, c in self.counts))
        set_field(self, "round_epochs", tuple(int(e) for e in self.round_epochs))


class ChannelCut(PruningMethod):
    """Benchmark baseline: remove ``counts`` channels of each coupled group, the lowest-scored
    first (scores recomputed on the current model at every cut; removed channels stay removed).
    One round = train, cut, fine-tune; several = channel IMP (cut ``r / R`` of every count after
    round ``r``, each round restarting the learning-rate schedule), then the fine-tune."""

    name = "channel_cut"
    needs_data = False
    Settings = ChannelCutSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._groups: list[Any] = []
        self._order: dict[str, torch.Tensor] = {}
        self._done: dict[str, int] = {}

    def plan(self, epochs: int, finetune_epochs: int) -> list[Phase]:
        phases = [Phase(f"round{r + 1}", e, prunes=False) for r, e in enumerate(self.round_epochs)]
        if finetune_epochs > 0:
            phases.append(Phase("finetune", finetune_epochs, prunes=False, recovers=True))
        return phases

    def setup(self, model: nn.Module, datamodule: Any | None = None) -> None:
        self._groups = [g for g in channel_groups(model, self.input_shape) if g.root in dict(self.counts)]

    def cut(self, model: nn.Module, fraction: float) -> MaskSet:
        counts = dict(self.counts)
        gen = torch.Generator().manual_seed(self.seed + len(self._done))
        modules = dict(model.named_modules())
        masks = MaskSet()
        for group in self._groups:
            want = int(round(fraction * counts[group.root]))
            scores = channel_scores(model, group, self.criterion, generator=gen)
            done = self._done.get(group.root, 0)
            if done:
                scores[self._order[group.root][:done]] = -math.inf
            order = torch.argsort(scores, stable=True)
            self._order[group.root], self._done[group.root] = order, want
            for producer, index in group.producers.items():
                key = f"{producer}.weight"
                keep = masks.masks[key].clone() if key in masks else torch.ones(
                    modules[producer].weight.shape[0], dtype=torch.bool)
                picked = index[order[:want]]
                keep[picked[picked >= 0]] = False
                masks.set(key, keep, "channel")
        masks = complete_channel_masks(model, masks, self.input_shape)
        masks.apply(model)
        self.masks = masks
        return masks

    def on_phase_end(self, model: nn.Module, phase: Phase, index: int) -> None:
        if phase.name.startswith("round"):
            self.cut(model, (index + 1) / len(self.round_epochs))

    def finalize(self, model: nn.Module) -> MaskSet:
        if self.masks is None:
            self.cut(model, 1.0)
        return super().finalize(model)


def removed_per_group(art: Any) -> dict[str, int]:
    """Channels the surgery removed from each coupled group (by group root)."""
    return {root: len(idx) for root, idx in art.surgery.removed.items()} if art.surgery else {}


def uniform_counts(model: nn.Module, shape: tuple[int, ...], target_flops: int) -> tuple[dict[str, int], float]:
    """The same fraction of every prunable group (at least one channel kept), chosen on a 0.005
    grid so the physical FLOPs come closest to ``target_flops``; returns (counts, fraction)."""
    groups = [g for g in channel_groups(model, shape) if g.prunable and g.producers]
    best: tuple[float, dict[str, int], float] | None = None
    for step in range(0, 200):
        f = step * 0.005
        counts = {g.root: min(int(round(f * g.size)), g.size - 1) for g in groups}
        removed = {g.root: torch.arange(g.size) < counts[g.root] for g in groups}
        flops, _ = pruned_cost(model, shape, groups, removed)
        gap = abs(flops - target_flops)
        if best is None or gap < best[0]:
            best = (gap, counts, f)
    assert best is not None
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# One run, measured on its artifact
# ---------------------------------------------------------------------------------------------
def measure(model: nn.Module, masks: MaskSet | None, dm: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    art = deployable(model, masks, shape, round_to=None)
    return {"val": evaluate(art.model, dm.val_dataloader())["acc"],
            "test": evaluate(art.model, dm.test_dataloader())["acc"],
            "flops": art.flops, "flops_dense": art.cost.flops_dense, "params": art.params,
            "params_dense": art.cost.params_dense, "kind": art.kind, "art": art}


def train_run(dm: Any, seed: int, method: PruningMethod, epochs: int, finetune: int,
              model: nn.Module | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    if model is None:
        torch.manual_seed(seed)  # the same initialisation for every method of a seed
        model = build_model("lenet5", dm.input_shape, dm.num_classes)
    cpu0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = run_pruning(model, dm, method, TrainConfig(epochs=epochs, finetune_epochs=finetune), seed=seed)
    m = measure(model, result.masks, dm, tuple(dm.input_shape))
    m.update({"sparsity": result.sparsity, "epochs": result.epochs, "extra_fwd": result.extra_forward_passes,
              "cpu_s": time.process_time() - cpu0})
    return model, result, m


class Recorder:
    """Collects rows and prints one progress line per run."""

    def __init__(self, part: str, seed: int) -> None:
        self.part, self.seed, self.rows, self.t0 = part, seed, [], time.perf_counter()

    def add(self, table: str, method: str, m: dict[str, Any]) -> None:
        row = {"part": self.part, "table": table, "method": method, "seed": self.seed,
               **{k: v for k, v in m.items() if k != "art"}}
        self.rows.append(row)
        say(f"[{self.part} seed {self.seed} +{(time.perf_counter() - self.t0) / 60:.1f} min] {table:<22} "
            f"{method:<34} test {m['test']:.4f} val {m['val']:.4f} "
            + (f"sparsity {m['sparsity']:.4f} " if "sparsity" in m else "")
            + f"FLOPs {m['flops'] / m['flops_dense']:.3f} params {m['params'] / m['params_dense']:.3f} ({m['kind']})"
            + (f" {m['epochs']} ep {m['cpu_s']:.0f} CPU s" if "epochs" in m else ""))


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------
def part_unstructured(args: argparse.Namespace, seed: int) -> list[dict]:
    dm = data(args)
    rec = Recorder("unstructured", seed)
    e, f = args.epochs, args.finetune
    dense_model, _, m = train_run(dm, seed, build_method("magnitude", sparsity=0.0), e + f, 0)
    rec.add("dense", "dense", m)
    for s in args.sparsities:
        table = f"weights @ {s:.0%}"
        runs = [("magnitude (uniform)", build_method("magnitude", sparsity=s, distribution="uniform"), e, f),
                ("magnitude (global)", build_method("magnitude", sparsity=s, distribution="global"), e, f),
                ("random at init (uniform)", build_method("random", sparsity=s, seed=seed), e, f),
                ("IMP (uniform, lr rewind)", build_method("imp", sparsity=s, distribution="uniform", rounds=e,
                                                          rewind="lr"), 1, 0),
                ("BINGO (paper)", build_method("bingo", sparsity=s, seed=seed, variant="paper"), e, f),
                ("BINGO (extended: the default)", build_method("bingo", sparsity=s, seed=seed), e, f),
                ("BINGO (allocation=damage)", build_method("bingo", sparsity=s, allocation="damage", seed=seed), e, f),
                ("GaP (3x1x1, uniform)", build_method("gap", sparsity=s, num_partitions=3, rounds=1,
                                                      epochs_per_step=max(1, e // 3)), e, f)]
        for label, method, epochs, finetune in runs:
            _, _, m = train_run(dm, seed, method, epochs, finetune)
            rec.add(table, label, m)
    shape = tuple(dm.input_shape)
    for r in args.paoding_ratios:
        table = f"paoding @ {r:.0%}"
        for ft in (0, 1):
            suffix = " + 1 ft" if ft else " (data-free)"
            model = copy.deepcopy(dense_model)
            method = build_method("paoding", conv_ratio=r, dense_ratio=r, pretrain=False, finetune=bool(ft))
            _, result, m = train_run(dm, seed, method, 0, ft, model=model)
            rec.add(table, "PAODING (extended: the default)" + suffix, m)
            channel_baselines(rec, dm, seed, table, dense_model, m_art(model, result, shape), ft, suffix)
        # The paper's variant (data-free, no fine-tuning: it refuses one) in a table of its own, since
        # it removes other channels than the extended one; its baselines cut the same counts.
        table = f"paoding paper @ {r:.0%}"
        model = copy.deepcopy(dense_model)
        method = build_method("paoding", conv_ratio=r, dense_ratio=r, pretrain=False, variant="paper")
        _, result, m = train_run(dm, seed, method, 0, 0, model=model)
        rec.add(table, "PAODING (paper) (data-free)", m)
        channel_baselines(rec, dm, seed, table, dense_model, m_art(model, result, shape), 0, " (data-free)")
    return rec.rows


def channel_baselines(rec: Recorder, dm: Any, seed: int, table: str, dense_model: nn.Module, art: Any, ft: int,
                      suffix: str) -> None:
    """Channel L1 and random channels removing the counts ``art``'s surgery removed per coupled
    group, from the same dense model, with the same fine-tune epochs."""
    counts = tuple(removed_per_group(art).items())
    shape = tuple(dm.input_shape)
    for criterion in ("l1", "random"):
        base = ChannelCut(counts=counts, criterion=criterion, round_epochs=(0,), seed=seed, input_shape=shape)
        _, _, mb = train_run(dm, seed, base, 0, ft, model=copy.deepcopy(dense_model))
        rec.add(table, f"channel {'L1' if criterion == 'l1' else 'random'}{suffix}", mb)


def m_art(model: nn.Module, result: Any, shape: tuple[int, ...]) -> Any:
    return deployable(model, result.masks, shape, round_to=None, verify=False)


def structured_baselines(rec: Recorder, dm: Any, seed: int, table: str, counts: dict[str, int],
                         target_flops: int, first_round: int, rounds: int, finetune: int) -> None:
    """Channel L1 / random / IMP at the method's per-group counts, and uniform L1 at matched FLOPs."""
    shape = tuple(dm.input_shape)
    total = first_round + rounds - 1
    pairs = tuple(counts.items())
    for label, criterion, schedule in (("channel L1 (same counts)", "l1", (total,)),
                                       ("channel random (same counts)", "random", (total,)),
                                       ("channel IMP (same counts)", "l1", (first_round,) + (1,) * (rounds - 1))):
        base = ChannelCut(counts=pairs, criterion=criterion, round_epochs=schedule, seed=seed, input_shape=shape)
        _, _, m = train_run(dm, seed, base, 0, finetune)
        rec.add(table, label, m)
    torch.manual_seed(seed)
    probe = build_model("lenet5", dm.input_shape, dm.num_classes)
    uniform, fraction = uniform_counts(probe, shape, target_flops)
    base = ChannelCut(counts=tuple(uniform.items()), criterion="l1", round_epochs=(total,), seed=seed, input_shape=shape)
    _, _, m = train_run(dm, seed, base, 0, finetune)
    m["uniform_fraction"] = fraction
    rec.add(table, "channel L1 uniform (closest FLOPs)", m)


def part_structured(args: argparse.Namespace, seed: int) -> list[dict]:
    dm = data(args)
    rec = Recorder("structured", seed)
    e, f = args.epochs, args.finetune
    shape = tuple(dm.input_shape)
    for s in args.sparsities:
        for variant, label in (("extended", "polarization (extended: the default)"), ("paper", "polarization (paper)")):
            table = f"polarization @ {s:.0%}" + (" paper" if variant == "paper" else "")
            model, result, m = train_run(dm, seed, build_method("polarization", sparsity=s, variant=variant), e, f)
            rec.add(table, label, m)
            counts = removed_per_group(m_art(model, result, shape))
            structured_baselines(rec, dm, seed, table, counts, m["flops"], first_round=e - 2 if e > 2 else 1,
                                 rounds=3 if e > 2 else 1, finetune=f)
    for s in args.rl_sparsities:
        table = f"rl_pruner @ {s:.0%} channels"
        pretrain = max(1, e - 1)
        method = build_method("rl_pruner", sparsity=s, seed=seed)
        model, result, m = train_run(dm, seed, method, pretrain, f)
        rec.add(table, "RL-Pruner", m)
        counts = removed_per_group(m_art(model, result, shape))
        structured_baselines(rec, dm, seed, table, counts, m["flops"], first_round=pretrain,
                             rounds=method.prune_steps, finetune=f)
    return rec.rows


def part_ken(args: argparse.Namespace, seed: int) -> list[dict]:
    from ken_benchmark import random_rows_masks
    from prunelib.methods.ken import KEN, PairPlan, apply_ken, selected_parameter_names
    from search.settings import TrialSettings
    from search.trials.ken import get_pair

    dm = data(args)
    rec = Recorder("ken", seed)
    torch.manual_seed(seed)
    model = build_model("lenet5", dm.input_shape, dm.num_classes)
    cache = tempfile.mkdtemp(prefix="ken_pair_")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pre, ft, _ = get_pair(model, dm, PairPlan(pretrain_classes=0.5, cache_dir=cache),
                              {"name": "fashion_mnist", "limit_train": args.data_limit}, {"name": "lenet5"},
                              TrialSettings.from_dict({"epochs": args.epochs, "lr": 0.05, "optimizer": "sgd",
                                                       "seed": seed}))
    shape = tuple(dm.input_shape)
    total = sum(p.numel() for p in ft.parameters())

    def record(table: str, label: str, net: nn.Module, reverted: float) -> None:
        m = measure(net, None, dm, shape)
        m["reverted"] = reverted
        rec.add(table, label, m)

    record("ken pair", "fine-tuned (full)", ft, 0.0)
    record("ken pair", "pretrained (classes 0-4)", pre, 1.0)
    names = selected_parameter_names(ft, "no_head")
    for frac in args.ken_fractions:
        table = f"ken keep {frac:.0%}/row"
        net = copy.deepcopy(ft)
        ken = KEN(k_mode="per_row_fraction", keep_fraction=frac)
        ken.set_pretrained(pre)
        masks = ken.finalize(net)
        record(table, "KEN", net, ken.report["reverted_fraction"])
        counts = {n: int(masks.masks[n].reshape(masks.masks[n].shape[0] if masks.masks[n].dim() > 1 else 1, -1)[0].sum())
                  for n in names}
        pre_params, ft_params = dict(pre.named_parameters()), dict(ft.named_parameters())
        controls = {"random positions": random_rows_masks(ft, names, counts, seed)}
        delta = {}
        for n in names:  # the largest fine-tuning deltas of each row, the same count per row
            d = (ft_params[n] - pre_params[n]).detach().abs()
            rows = d.reshape(1, -1) if d.dim() == 1 else d.reshape(d.shape[0], -1)
            keep = torch.zeros_like(rows, dtype=torch.bool)
            keep.scatter_(1, rows.argsort(dim=1, descending=True)[:, :counts[n]], True)
            delta[n] = keep.reshape(d.shape)
        controls["largest |ft - pre|"] = delta
        for label, cmasks in controls.items():
            control = copy.deepcopy(ft)
            apply_ken(control, pre, cmasks)
            reverted = sum(int((~m).sum()) for m in cmasks.values()) / total
            record(table, label, control, reverted)
    return rec.rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
_DATA: dict[str, Any] = {}


def data(args: argparse.Namespace) -> Any:
    key = str(args.data_limit)
    if key not in _DATA:
        _DATA[key] = build_datamodule("fashion_mnist", batch_size=128, seed=0, limit_train=args.data_limit)
    return _DATA[key]


def run_task(args: argparse.Namespace, part: str, seed: int) -> list[dict]:
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("prunelib").setLevel(logging.ERROR)
    fn = {"unstructured": part_unstructured, "structured": part_structured, "ken": part_ken}[part]
    return fn(args, seed)


def summarise(rows: list[dict]) -> str:
    """Markdown tables: mean +- std over seeds per (table, method)."""
    order: dict[str, list[str]] = {}
    for r in rows:
        order.setdefault(r["table"], [])
        if r["method"] not in order[r["table"]]:
            order[r["table"]].append(r["method"])
    out = []
    for table, methods in order.items():
        out.append(f"\n**{table}**\n")
        ken = table.startswith("ken")
        # Structured rows: the artifact's physical FLOPs/params are the figures to compare (the
        # masks' weight sparsity counts consumer inputs for some methods, not for others).
        surgered = all(r["kind"] == "surgered" for r in rows if r["table"] == table)
        third = "reverted | " if ken else ("" if surgered else "sparsity | ")
        head = ("| method | seeds | test acc | val acc | " + third
                + "FLOPs (of dense) | params (of dense) | artifact | epochs | extra fwd | CPU s "
                + f"| test acc - {methods[0]} (paired by seed, points) |")
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        first = {r["seed"]: r["test"] for r in rows if r["table"] == table and r["method"] == methods[0]}
        for method in methods:
            sel = [r for r in rows if r["table"] == table and r["method"] == method]
            diffs = [100 * (r["test"] - first[r["seed"]]) for r in sel if r["seed"] in first]
            paired = ("-" if method == methods[0] or not diffs else
                      f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.2f}")

            def ms(key: str, scale: float = 100.0, digits: int = 2) -> str:
                vals = [float(r[key]) * scale for r in sel if key in r]
                if not vals:
                    return "-"
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"

            flops = [r["flops"] / r["flops_dense"] for r in sel]
            params = [r["params"] / r["params_dense"] for r in sel]
            if any("uniform_fraction" in r for r in sel):
                method = f"{method}, f = " + "/".join(f"{r['uniform_fraction']:.3f}" for r in sel)
            out.append(
                f"| {method} | {len(sel)} | {ms('test')} % | {ms('val')} % | "
                + (f"{ms('reverted', 100, 1)} % | " if ken else ("" if surgered else f"{ms('sparsity', 100, 1)} % | "))
                + f"{statistics.mean(flops):.3f} | {statistics.mean(params):.3f} | {sel[0]['kind']} | "
                + (f"{int(sel[0]['epochs'])} | {int(statistics.mean(r['extra_fwd'] for r in sel))} | "
                   f"{statistics.mean(r['cpu_s'] for r in sel):.0f} |" if "epochs" in sel[0] else "- | - | - |")
                + f" {paired} |")
    return "\n".join(out)


def results_table(doc: dict[str, Any]) -> str:
    """RESULTS.md's tables from a rows file written with ``--rows`` (``benchmarks/results_md.py``)."""
    return summarise(doc["rows"])


def table_paper_vs_extended(doc: dict[str, Any]) -> str:
    """Each seed method's paper variant against its extended variant, paired by seed: test
    accuracy (points, paper minus extended), physical/effective FLOPs and parameters (fractions of
    dense) and extra forward passes of each, from a rows file (``benchmarks/results_md.py``).

    A paper row is one whose method names ``(paper)``; its extended twin has
    ``(extended: the default)`` in its place, in the same table without the word ``paper``.
    """
    rows = doc["rows"]

    def pick(table: str, method: str) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["table"] == table and r["method"] == method}

    def mean_std(values: list[float], sign: str = "") -> str:
        return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

    head = ("| method | table | seeds | paper test acc | extended test acc | paper - extended (paired, points) "
            "| FLOPs paper / extended | params paper / extended | extra fwd paper / extended |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if "(paper)" not in r["method"] or (r["table"], r["method"]) in seen:
            continue
        seen.add((r["table"], r["method"]))
        paper = pick(r["table"], r["method"])
        extended = pick(r["table"].replace(" paper", ""), r["method"].replace("(paper)", "(extended: the default)"))
        seeds = sorted(set(paper) & set(extended))
        if not seeds:
            continue

        def ratio(side: dict[int, dict], key: str) -> float:
            return statistics.mean(side[s][key] / side[s][f"{key}_dense"] for s in seeds)

        diffs = [100 * (paper[s]["test"] - extended[s]["test"]) for s in seeds]
        out.append(
            f"| {r['method'].replace(' (paper)', '')} | {r['table'].replace(' paper', '')} | {len(seeds)} "
            f"| {mean_std([100 * paper[s]['test'] for s in seeds])} % "
            f"| {mean_std([100 * extended[s]['test'] for s in seeds])} % | {mean_std(diffs, '+')} "
            f"| {ratio(paper, 'flops'):.3f} / {ratio(extended, 'flops'):.3f} "
            f"| {ratio(paper, 'params'):.3f} / {ratio(extended, 'params'):.3f} "
            f"| {statistics.mean(paper[s]['extra_fwd'] for s in seeds):.0f} / "
            f"{statistics.mean(extended[s]['extra_fwd'] for s in seeds):.0f} |")
    return "\n".join(out)


def write_rows(path: Path, rows: list[dict], command: str, args: argparse.Namespace, seconds: float,
               failed: list[str] | None = None) -> None:
    """The run's raw rows with its provenance, gzipped JSON (``benchmarks/rows.py``); rewritten as
    each task ends, so ``meta.failed`` names the tasks that failed and a partial run keeps what
    it finished."""
    from rows import run_meta, settings_of
    from rows import write_rows as write_doc

    meta = run_meta("seed_methods.py", settings=settings_of(args),
                    machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"{args.jobs} worker(s) x {args.threads} thread(s)",
                    seconds=round(seconds, 1))
    write_doc(path, {"meta": {**meta, "command": command, "failed": list(failed or [])}, "rows": rows})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3, help="training epochs before a cut (E)")
    p.add_argument("--finetune", type=int, default=1, help="fine-tune epochs after a cut (F)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--rl-sparsities", type=float, nargs="+", default=[0.5], help="fractions of channels")
    p.add_argument("--paoding-ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--ken-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--data-limit", type=int, default=None, help="first N training samples (None: all)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one task = one part x seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default=None, help="also write the Markdown tables here")
    p.add_argument("--rows", type=Path, default=None,
                   help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                        "RESULTS.md's tables are generated from (benchmarks/results_md.py)")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["benchmarks/seed_methods.py", *argv]))
    say(f"command: {command}")
    say(f"torch {torch.__version__}, {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"{args.jobs} worker(s) x {args.threads} thread(s)")
    tasks = [(part, seed) for part in args.parts for seed in args.seeds]
    say(f"plan: {len(tasks)} tasks ({', '.join(f'{p} seed {s}' for p, s in tasks)})")
    t0 = time.perf_counter()
    rows: list[dict] = []
    failed: list[str] = []

    def finished(part: str, seed: int, task_rows: list[dict] | None, error: BaseException | None) -> None:
        # Each task's rows are kept as soon as it ends (written to --rows too): a task that fails
        # later, or an interrupted run, loses only its own rows.
        if error is not None:
            failed.append(f"{part} seed {seed}: {type(error).__name__}: {error}")
            say(f"FAILED: {part} seed {seed}: {type(error).__name__}: {error}")
        else:
            rows.extend(task_rows or [])
            say(f"done: {part} seed {seed} ({(time.perf_counter() - t0) / 60:.1f} min elapsed)")
        if args.rows:
            write_rows(args.rows, rows, command, args, time.perf_counter() - t0, failed)

    if args.jobs <= 1:
        for part, seed in tasks:
            try:
                finished(part, seed, run_task(args, part, seed), None)
            except Exception as exc:  # noqa: BLE001 - reported, the other tasks go on
                finished(part, seed, None, exc)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_task, args, part, seed): (part, seed) for part, seed in tasks}
            for fut in as_completed(futures):
                part, seed = futures[fut]
                error = fut.exception()
                finished(part, seed, None if error else fut.result(), error)
    rows.sort(key=lambda r: (PARTS.index(r["part"]), r["seed"]))
    text = summarise(rows)
    say(text)
    total = time.perf_counter() - t0
    say(f"\ntotal wall time: {total:.0f}s ({total / 60:.1f} min)")
    if args.rows:
        write_rows(args.rows, rows, command, args, total, failed)
        say(f"raw rows written to {args.rows}")
    if args.out:
        Path(args.out).write_text(f"command: {command}\n\n{text}\n\ntotal wall time: {total / 60:.1f} min\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
        say(f"tables written to {args.out} (rows: {Path(args.out).with_suffix('.json')})")
    if failed:
        say(f"{len(failed)} task(s) failed: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
