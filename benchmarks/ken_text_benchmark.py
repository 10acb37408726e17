"""KEN on a small BERT pair made here: accuracy against the reverted fraction, against random
positions and against the largest fine-tuning deltas at the same count per row.

The pair: a BERT (WordPiece tokenizer trained here) is *pretrained* with masked-LM on the whole
fortunes corpus (Debian's ``fortunes`` package), then *fine-tuned* (3 seeds) to classify fortunes
of six categories: a pretrain task and a different fine-tune task, both run here. For each
fine-tuned model and each keep fraction, the entries of every non-head tensor not kept revert to
the pretrained values (the head and the pooler, which masked-LM pretraining does not train,
stay fine-tuned), choosing the kept entries by

* ``ken``: KEN's kernel-density selection (``prunelib.methods.ken``, ``per_row_fraction``);
* ``random``: the same number of entries per row at random positions;
* ``delta``: the same number per row with the largest ``|fine-tuned - pretrained|``.

    flock /tmp/prunesearch-cpu.lock .venv/bin/python benchmarks/ken_text_benchmark.py
    .venv/bin/python benchmarks/ken_text_benchmark.py --seeds 0 --pretrain-epochs 0.1 --finetune-epochs 0.3  # smoke

Prints a Markdown table (test accuracy mean ± std over seeds) and writes ``--out`` (JSON);
``--rows PATH.json.gz`` writes the same rows with the command, commit, machine and date, from
which :func:`results_table` renders RESULTS.md's table (``benchmarks/results_md.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunelib.data.corpora import write_fortunes_corpus
from prunelib.data.text import build_text_datamodule
from prunelib.llm import evaluate_text
from prunelib.methods.ken import KEN, apply_ken, ken_report
from prunelib.models.hf import build_small_model, load_hf_model, save_hf_model, train_text_model, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import run_meta, settings_of, write_rows  # noqa: E402

CATEGORIES = ["computers", "definitions", "people", "songs-poems", "politics", "work"]
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


def same_count_masks(ken_masks: dict[str, torch.Tensor], pre: dict[str, torch.Tensor], ft: dict[str, torch.Tensor],
                     rule: str, seed: int) -> dict[str, torch.Tensor]:
    """Masks keeping, in every row, as many entries as KEN kept there: at random or by |delta|."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, keep in ken_masks.items():
        rows = keep.reshape(1, -1) if keep.dim() <= 1 else keep.reshape(keep.shape[0], -1)
        counts = rows.sum(dim=1)
        if rule == "random":
            score = torch.rand(rows.shape, generator=g)
        else:
            delta = (ft[name] - pre[name]).abs()
            score = delta.reshape(rows.shape)
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        new = torch.zeros_like(rows)
        ranks = torch.arange(rows.shape[1])[None, :].expand_as(rows)
        new.scatter_(1, order, ranks < counts[:, None])
        out[name] = new.reshape(keep.shape)
    return out


def results_table(doc: dict[str, Any]) -> str:
    """Test accuracy (mean ± std over seeds, %) per kept fraction for KEN, random and largest-delta positions."""
    rows = doc["rows"]

    def stat(rule: str, fraction: float) -> str:
        values = [r["test_acc"] for r in rows if r["rule"] == rule and r["keep_fraction"] == fraction]
        if not values:
            return ""
        mean = statistics.mean(values)
        return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{100 * mean:.2f}"

    lines = ["| kept per row | reverted (of all params) | KEN test acc % | random | largest delta |", "|---|---|---|---|---|",
             f"| fine-tuned (none reverted) | 0 | {stat('finetuned', 1.0)} | | |"]
    for fraction in sorted({r["keep_fraction"] for r in rows if r["rule"] == "ken"}):
        reverted = statistics.mean(r["reverted_fraction"] for r in rows if r["rule"] == "ken" and r["keep_fraction"] == fraction)
        lines.append(f"| {fraction:.2f} | {reverted:.3f} | {stat('ken', fraction)} | {stat('random', fraction)} | "
                     f"{stat('delta', fraction)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-epochs", type=float, default=3.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/prunesearch-ken-text")
    parser.add_argument("--out", default="/tmp/prunesearch-ken-text/results.json")
    parser.add_argument("--rows", type=Path, default=None,
                        help="also write the raw rows (.json.gz with command, commit, machine, date) here: what "
                             "RESULTS.md's table is generated from (benchmarks/results_md.py)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    everything = write_fortunes_corpus(work / "all")
    task = write_fortunes_corpus(work / "task", CATEGORIES)
    docs = everything["txt"].read_text().split("\n\n")
    tok = train_tokenizer(docs, "wordpiece", args.vocab)
    lm = build_text_datamodule(everything["txt"], tok, max_length=args.max_length, batch_size=32)
    cls = build_text_datamodule(task["jsonl"], tok, max_length=args.max_length, batch_size=16)
    print(f"pretraining data {lm.sizes} x {args.max_length} tokens; task {cls.label_names} {cls.sizes}", flush=True)
    pre_dir = work / "pretrained"
    base = build_small_model("bert", "masked_lm", tok, layers=args.layers, hidden=args.hidden, heads=args.heads,
                             max_positions=args.max_length)
    t0 = time.perf_counter()
    train_text_model(base, lm, epochs=args.pretrain_epochs, lr=2e-3, objective="mlm", tokenizer=tok, log_every=200)
    save_hf_model(base, tok, pre_dir)
    print(f"masked-LM pretraining: {time.perf_counter() - t0:.0f}s", flush=True)
    rows: list[dict] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        ft = load_hf_model(pre_dir, task="classification", num_labels=cls.num_classes)
        t0 = time.perf_counter()
        train_text_model(ft, cls, epochs=args.finetune_epochs, lr=1e-3, seed=seed, log_every=200)
        pre, untrained = load_hf_model(pre_dir, hf_class=type(ft).__name__, num_labels=cls.num_classes,
                                       loading_info=True)
        dense = {s: evaluate_text(ft, cls, s)["acc"] for s in ("val", "test")}
        print(f"seed {seed}: fine-tuned in {time.perf_counter() - t0:.0f}s: val {dense['val']:.4f} test "
              f"{dense['test']:.4f}; kept whole (not in the pretrained checkpoint): {untrained}", flush=True)
        rows.append({"seed": seed, "rule": "finetuned", "keep_fraction": 1.0, "reverted_fraction": 0.0,
                     "val_acc": dense["val"], "test_acc": dense["test"]})
        pre_state = {n: p.detach().clone() for n, p in pre.named_parameters()}
        ft_state = {n: p.detach().clone() for n, p in ft.named_parameters()}
        for fraction in FRACTIONS:
            ken = KEN(keep_fraction=fraction)
            ken.set_untrained(untrained)
            ken.set_pretrained(pre)
            model = copy.deepcopy(ft)
            masks = ken.finalize(model).masks
            for rule in ("ken", "random", "delta"):
                if rule != "ken":
                    model = copy.deepcopy(ft)
                    chosen = same_count_masks(masks, pre_state, ft_state, rule, seed)
                    apply_ken(model, pre, chosen)
                else:
                    chosen = masks
                report = ken_report(chosen, model)
                acc = {s: evaluate_text(model, cls, s)["acc"] for s in ("val", "test")}
                rows.append({"seed": seed, "rule": rule, "keep_fraction": fraction,
                             "reverted_fraction": report["reverted_fraction"], "val_acc": acc["val"],
                             "test_acc": acc["test"]})
                print(f"seed {seed}: keep {fraction:.2f} {rule:<6} reverted {report['reverted_fraction']:.3f} "
                      f"val {acc['val']:.4f} test {acc['test']:.4f}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": settings_of(args, ()), "rows": rows}, indent=1))

    doc = {"meta": run_meta("ken_text_benchmark.py", settings=settings_of(args),
                            seconds=time.perf_counter() - start), "rows": rows}
    print("\n" + results_table(doc))
    if args.rows:
        print(f"raw rows written to {write_rows(args.rows, doc)}")


if __name__ == "__main__":
    main()
