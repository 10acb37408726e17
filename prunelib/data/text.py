"""Text data without the internet: local files, tokenised with the model's own tokenizer.

``data=text`` reads one of

* a table of ``text,label`` records (``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``):
  sequence **classification** (labels may be names or integers; names are mapped to class
  indices in sorted order, over all splits, so every split agrees);
* plain text (``.txt`` file or a directory of them), or a table with only a text column:
  **language modelling**. Documents are the blank-line separated paragraphs of the files (or
  one record each); each split's documents are tokenised, joined with the tokenizer's end
  (``eos``/``sep``) token and cut into ``max_length``-token sequences (the remainder shorter
  than ``max_length`` is dropped).

Splits follow the image sets (:mod:`prunelib.data`): the test split is ``test_path`` when given,
else a fixed ``test_fraction`` hold-out drawn with seed 0 (it never moves with the run's seed);
validation is ``val_fraction`` of the rest drawn with ``seed`` (stratified for classification).
Decisions use validation; the test split is for the final report.

Everything lives in memory as token tensors (``input_ids``, ``attention_mask``, ``labels``);
batches are dicts of those tensors, what a Hugging Face model takes as keyword arguments. For
language modelling ``labels`` is ``input_ids`` (the model shifts them) and there is no padding.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TASKS", "TextDataError", "TextDataModule", "TextRecords", "build_text_datamodule",
           "read_text_records"]

TASKS = ("auto", "classification", "lm")
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class TextDataError(ValueError):
    """A text data file is missing, unreadable or lacks a needed column; the message names it."""


@dataclass
class TextRecords:
    """Raw records of one file: ``texts`` and, for classification, one ``labels`` entry each."""

    texts: list[str]
    labels: list[Any] | None


def _read_table(path: Path, text_column: str, label_column: str | None) -> TextRecords:
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]]
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            stripped = text.lstrip()
            if suffix == ".json" and stripped.startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            import pandas as pd

            rows = pd.read_parquet(path).to_dict(orient="records")
    except (OSError, ValueError, csv.Error) as exc:
        raise TextDataError(f"data.path: cannot read {path}: {exc}") from exc
    if not rows:
        raise TextDataError(f"data.path: {path} holds no records")
    if text_column not in rows[0]:
        raise TextDataError(f"data.text_column: {path} has no column {text_column!r} (columns: {sorted(rows[0])})")
    texts = [str(r[text_column]) for r in rows]
    labels = None
    if label_column is not None and label_column in rows[0]:
        labels = [r[label_column] for r in rows]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in labels):
            raise TextDataError(f"data.label_column: {path} has records without a {label_column!r} value")
    return TextRecords(texts, labels)


def _paragraphs(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def read_text_records(path: str | os.PathLike, text_column: str = "text",
                      label_column: str | None = "label") -> TextRecords:
    """The records of a table file, or the documents (paragraphs) of text files.

    Args:
        path: a ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet`` table, a ``.txt`` file, or
            a directory of ``.txt`` files (read in sorted order).
        text_column / label_column: table columns; a table without the label column (or
            ``label_column=None``) yields ``labels=None`` (language modelling).

    Raises:
        TextDataError: missing file, unknown format, empty file or missing text column.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise TextDataError(f"data.path: {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise TextDataError(f"data.path: the directory {p} holds no .txt files")
        docs = [d for f in files for d in _paragraphs(f.read_text(encoding="utf-8", errors="replace"))]
        if not docs:
            raise TextDataError(f"data.path: the .txt files under {p} hold no text")
        return TextRecords(docs, None)
    if p.suffix.lower() in _TABLE_SUFFIXES:
        return _read_table(p, text_column, label_column)
    if p.suffix.lower() in (".txt", ".text", ""):
        docs = _paragraphs(p.read_text(encoding="utf-8", errors="replace"))
        if not docs:
            raise TextDataError(f"data.path: {p} holds no text")
        return TextRecords(docs, None)
    raise TextDataError(f"data.path: {p} is not a table ({', '.join(_TABLE_SUFFIXES)}) nor plain text (.txt)")


def _split_indices(n: int, fraction: float, seed: int, labels: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held_out)`` indices; stratified by ``labels`` when every class allows it."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    if labels is not None:
        try:
            keep, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=np.asarray(labels))
            return np.asarray(keep), np.asarray(held)
        except ValueError:  # a class with a single record cannot be stratified
            pass
    keep, held = train_test_split(idx, test_size=fraction, random_state=seed)
    return np.asarray(keep), np.asarray(held)


class TextDataModule:
    """Tokenised train/val/test splits held in memory; batches are dicts of token tensors.

    Build it with :func:`build_text_datamodule`. Attributes:

    * ``task``: ``"classification"`` or ``"lm"``;
    * ``num_classes`` and ``label_names`` (classification; ``num_classes`` is the vocabulary
      size for ``lm``, so code that sizes an output layer still works);
    * ``max_length``: tokens per sample (per sequence of an ``lm`` split);
    * ``input_shape``: ``(max_length,)``, one sample's token ids;
    * ``sizes``: samples per split; ``tokens``: real (non-padding) tokens per split.
    """

    def __init__(self, name: str, task: str, splits: dict[str, dict[str, Tensor]], max_length: int,
                 num_classes: int, label_names: list[str] | None, batch_size: int, eval_batch_size: int,
                 seed: int, train_stream: Tensor | None = None, device: str | torch.device = "cpu") -> None:
        self.name = name
        self.task = task
        self.max_length = int(max_length)
        self.num_classes = int(num_classes)
        self.label_names = label_names
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self.input_shape: tuple[int, ...] = (self.max_length,)
        self.input_range = None
        self._splits = splits
        self._train_stream = train_stream  # lm: the train split's tokens, for random calibration windows
        self.to(device)

    # -- tensors ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the resident tensors."""
        return self._splits["train"]["input_ids"].device

    def to(self, device: str | torch.device) -> "TextDataModule":
        """Move the resident tensors to ``device``; returns ``self``."""
        self._splits = {s: {k: v.to(device) for k, v in d.items()} for s, d in self._splits.items()}
        return self

    def split(self, split: str) -> dict[str, Tensor]:
        """The whole ``{"input_ids", "attention_mask", "labels"}`` of one split."""
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected one of {list(self._splits)}")
        return self._splits[split]

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {s: int(d["input_ids"].shape[0]) for s, d in self._splits.items()}

    @property
    def tokens(self) -> dict[str, int]:
        """Real (non-padding) tokens per split."""
        return {s: int(d["attention_mask"].sum()) for s, d in self._splits.items()}

    # -- batches ----------------------------------------------------------------------------
    def batches(self, split: str, batch_size: int | None = None, shuffle: bool = False,
                seed: int | None = None, limit: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Batches (dicts of tensors) of one split; ``limit`` caps the samples used."""
        data = self.split(split)
        n = data["input_ids"].shape[0] if limit is None else min(int(limit), data["input_ids"].shape[0])
        bs = int(batch_size or (self.batch_size if split == "train" else self.eval_batch_size))
        if shuffle:
            g = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
            order = torch.randperm(data["input_ids"].shape[0], generator=g)[:n].to(self.device)
        else:
            order = None
        for i in range(0, n, bs):
            if order is None:
                yield {k: v[i:i + bs] for k, v in data.items()}
            else:
                idx = order[i:i + bs]
                yield {k: v[idx] for k, v in data.items()}

    def train_dataloader(self) -> Iterator[dict[str, Tensor]]:
        """Shuffled training batches of ``batch_size``."""
        return self.batches("train", shuffle=True)

    def val_dataloader(self) -> Iterator[dict[str, Tensor]]:
        """Validation batches of ``eval_batch_size`` in stored order."""
        return self.batches("val")

    def test_dataloader(self) -> Iterator[dict[str, Tensor]]:
        """Test batches of ``eval_batch_size`` in stored order."""
        return self.batches("test")

    def calibration_batches(self, n: int, seed: int = 0, batch_size: int = 8,
                            length: int | None = None) -> list[dict[str, Tensor]]:
        """``n`` calibration samples from the training split (for Wanda/SparseGPT), in batches.

        For ``lm`` these are windows of ``length`` (default ``max_length``) tokens starting at
        random offsets of the training token stream (as the papers draw random C4 windows);
        for classification, ``n`` random training examples with their padding masks.
        """
        if n < 1:
            raise ValueError(f"calibration samples must be >= 1, got {n}")
        g = torch.Generator().manual_seed(int(seed))
        if self.task == "lm" and self._train_stream is not None:
            stream = self._train_stream
            length = int(length or self.max_length)
            if stream.numel() <= length:
                raise ValueError(f"the training split holds {stream.numel()} tokens, fewer than one "
                                 f"calibration window of {length}")
            starts = torch.randint(0, stream.numel() - length, (n,), generator=g)
            ids = torch.stack([stream[s:s + length] for s in starts.tolist()]).to(self.device)
            data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        else:
            train = self.split("train")
            total = train["input_ids"].shape[0]
            idx = torch.randperm(total, generator=g)[:min(n, total)].to(self.device)
            data = {k: v[idx] for k, v in train.items()}
        count = data["input_ids"].shape[0]
        return [{k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, count, batch_size)]

    def example_input(self) -> dict[str, Tensor]:
        """One sample of ``max_length`` tokens (for FLOP counting: FLOPs per sequence)."""
        ids = self.split("train")["input_ids"][:1]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def __repr__(self) -> str:
        return (f"TextDataModule(name={self.name!r}, task={self.task!r}, max_length={self.max_length}, "
                f"num_classes={self.num_classes}, sizes={self.sizes}, device={str(self.device)!r})")


def _end_token(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def _lm_split(tokenizer: Any, docs: list[str], max_length: int) -> tuple[dict[str, Tensor], Tensor]:
    """Documents -> joined token stream -> ``max_length`` sequences; returns (split, stream)."""
    end = _end_token(tokenizer)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    stream_list: list[int] = []
    for ids in encoded:
        stream_list.extend(ids)
        if end is not None:
            stream_list.append(end)
    stream = torch.tensor(stream_list, dtype=torch.long)
    count = stream.numel() // max_length
    ids = stream[:count * max_length].reshape(count, max_length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, stream


def _classification_split(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> dict[str, Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long(),
            "labels": torch.tensor(labels, dtype=torch.long)}


def _check_fraction(key: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise TextDataError(f"data.{key}: {value!r} must be a fraction in (0, 1)")
    return value


def build_text_datamodule(path: str | os.PathLike, tokenizer: Any, *, task: str = "auto",
                          test_path: str | os.PathLike | None = None, text_column: str = "text",
                          label_column: str = "label", max_length: int = 128, val_fraction: float = 0.1,
                          test_fraction: float = 0.2, batch_size: int = 32, eval_batch_size: int = 64,
                          limit_train: int | None = None, limit_eval: int | None = None, seed: int = 0,
                          device: str | torch.device = "cpu", name: str = "text") -> TextDataModule:
    """Read, split and tokenise a local text data set (see the module docstring).

    Args:
        path: the data file or directory (see :func:`read_text_records`).
        tokenizer: a Hugging Face tokenizer (the model's own: :func:`prunelib.models.hf.load_tokenizer`).
        task: ``"classification"``, ``"lm"`` or ``"auto"`` (classification when the label
            column exists).
        test_path: a separate test file (same format); else a fixed hold-out (seed 0).
        max_length: tokens per sample: classification examples are truncated/padded to it, LM
            sequences are ``max_length`` tokens.
        val_fraction / test_fraction: fractions of records (documents for ``lm``).
        limit_train: keep the first N training samples (after shuffling/splitting).
        limit_eval: keep the first N validation and test samples (fast sweeps; scores stay
            comparable across trials with the same value).
        seed: picks the validation records.

    Raises:
        TextDataError: bad files, columns, fractions or a task the data cannot serve.
    """
    if task not in TASKS:
        raise TextDataError(f"data.task: {task!r} is not one of {list(TASKS)}")
    if int(max_length) < 2:
        raise TextDataError(f"data.max_length: {max_length!r} must be >= 2 tokens")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    records = read_text_records(path, text_column, label_column)
    if task == "auto":
        task = "classification" if records.labels is not None else "lm"
    if task == "classification" and records.labels is None:
        raise TextDataError(f"data.label_column: classification needs a {label_column!r} column in {path}")
    test_records = read_text_records(test_path, text_column, label_column) if test_path else None
    if task == "classification" and test_records is not None and test_records.labels is None:
        raise TextDataError(f"data.test_path: {test_path} has no {label_column!r} column")

    label_names: list[str] | None = None
    labels: list[int] | None = None
    test_labels: list[int] | None = None
    if task == "classification":
        assert records.labels is not None
        pool = list(records.labels) + (list(test_records.labels) if test_records and test_records.labels else [])
        label_names = sorted({str(v) for v in pool}, key=lambda s: (not s.lstrip("-").isdigit(),
                                                                       int(s) if s.lstrip("-").isdigit() else 0, s))
        index = {n: i for i, n in enumerate(label_names)}
        labels = [index[str(v)] for v in records.labels]
        if test_records is not None and test_records.labels is not None:
            test_labels = [index[str(v)] for v in test_records.labels]
        if len(label_names) < 2:
            raise TextDataError(f"data.label_column: {path} has a single class ({label_names}); classification needs two")

    texts = records.texts
    if test_records is None:
        rest, held = _split_indices(len(texts), test_fraction, 0, labels)
        test_texts = [texts[i] for i in held]
        test_labels = [labels[i] for i in held] if labels is not None else None
    else:
        rest = np.arange(len(texts))
        test_texts = test_records.texts
    rest_labels = [labels[i] for i in rest] if labels is not None else None
    train_pos, val_pos = _split_indices(len(rest), val_fraction, int(seed), rest_labels)
    train_idx, val_idx = rest[train_pos], rest[val_pos]
    if task == "classification" and limit_train is not None:
        train_idx = train_idx[:int(limit_train)]

    parts = {"train": ([texts[i] for i in train_idx], [labels[i] for i in train_idx] if labels else None),
             "val": ([texts[i] for i in val_idx], [labels[i] for i in val_idx] if labels else None),
             "test": (test_texts, test_labels)}
    splits: dict[str, dict[str, Tensor]] = {}
    stream = None
    for split, (t, y) in parts.items():
        if task == "classification":
            assert y is not None
            splits[split] = _classification_split(tokenizer, t, y, int(max_length))
        else:
            splits[split], s = _lm_split(tokenizer, t, int(max_length))
            if split == "train":
                stream = s
        if splits[split]["input_ids"].shape[0] == 0:
            raise TextDataError(f"data: the {split} split of {path} holds no {'sequence of ' + str(max_length) + ' tokens' if task == 'lm' else 'record'}; "
                                f"use more text, a smaller data.max_length or other fractions")
    if task == "lm" and limit_train is not None:
        splits["train"] = {k: v[:int(limit_train)] for k, v in splits["train"].items()}
    if limit_eval is not None:
        for split in ("val", "test"):
            splits[split] = {k: v[:int(limit_eval)] for k, v in splits[split].items()}
    num_classes = len(label_names) if label_names else int(len(tokenizer))
    return TextDataModule(name, task, splits, int(max_length), num_classes, label_names, int(batch_size),
                          int(eval_batch_size), int(seed), stream, device)
