"""Local Hugging Face checkpoints: load, make small ones, train them, rebuild a KEN model.

Everything reads and writes local directories (``local_files_only``); nothing downloads.

* :func:`load_hf_model` / :func:`load_tokenizer`: a checkpoint directory (``config.json``,
  weights, ``tokenizer.json``) as a sequence classifier or a causal LM (``model=hf
  model.path=DIR``);
* :func:`train_tokenizer`: a byte-level BPE (GPT-2 style) or WordPiece (BERT style) tokenizer
  trained here with the ``tokenizers`` library, wrapped so ``AutoTokenizer`` loads it back;
* :func:`build_small_model` + :func:`save_hf_model`: a small BERT, GPT-2 or Llama built from a
  config (for tests, benchmarks and trying the pipeline);
* :func:`train_text_model`: a plain AdamW loop for causal LM, masked LM or classification;
* :func:`rebuild_ken_model`: pretrained checkpoint + KEN compact delta file -> the KEN model,
  optionally saved so ``transformers`` loads it back like any checkpoint.

``transformers`` and ``tokenizers`` are imported lazily (the ``hf`` extra).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HF_TASKS", "HFModelError", "build_small_model", "hf_task_of", "is_hf_dir", "load_hf_model",
           "load_tokenizer", "mlm_mask", "rebuild_ken_model", "save_hf_model", "train_text_model",
           "train_tokenizer"]

HF_TASKS = ("auto", "classification", "causal_lm")
_ARCHS = ("bert", "gpt2", "llama")


class HFModelError(ValueError):
    """A model directory is missing, incomplete, or of a kind the caller cannot use."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError("Hugging Face models need transformers: pip install 'prunesearch[hf]'") from exc
    transformers.logging.set_verbosity_error()  # config warnings of tiny test models are noise
    transformers.logging.disable_progress_bar()  # one bar per load or save: noise in sweeps
    return transformers


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (holds ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def hf_task_of(model_or_class: Any) -> str:
    """``"causal_lm"``, ``"classification"`` or ``"masked_lm"`` from a model (or class name)."""
    name = model_or_class if isinstance(model_or_class, str) else type(model_or_class).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    return "base"


def _check_dir(path: str | os.PathLike, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise HFModelError(f"{key}: {p} does not exist")
    if not is_hf_dir(p):
        raise HFModelError(f"{key}: {p} is not a Hugging Face model directory (no config.json); save one "
                           f"with model.save_pretrained(DIR)")
    return p


def load_tokenizer(path: str | os.PathLike, key: str = "model.path") -> Any:
    """The tokenizer saved in a model directory (``AutoTokenizer``, local files only).

    Raises:
        HFModelError: no such directory, or it holds no tokenizer files.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise HFModelError(f"{key}: {p} is not a directory")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        raise HFModelError(f"{key}: {p} holds no tokenizer (tokenizer.json); save one with "
                           f"tokenizer.save_pretrained(DIR)")
    return _transformers().AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_hf_model(path: str | os.PathLike, task: str = "auto", num_labels: int | None = None,
                  hf_class: str | None = None, dtype: str | None = None, key: str = "model.path",
                  loading_info: bool = False, trust_remote_code: bool = False) -> Any:
    """A local checkpoint as a sequence classifier or a causal LM (eval mode, on the CPU).

    Args:
        path: the model directory.
        task: ``"classification"`` (``AutoModelForSequenceClassification``), ``"causal_lm"``
            (``AutoModelForCausalLM``), or ``"auto"``: the class in ``config.architectures``.
        num_labels: classes of a classification head (a base or masked-LM checkpoint then
            gets a new, randomly initialised head).
        hf_class: an exact transformers class name (overrides ``task``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (None = as saved).
        loading_info: also return the names of the parameters the checkpoint did not hold
            (randomly initialised): ``(model, missing)``.
        trust_remote_code: run the loader file the checkpoint carries (a structured export with
            per-layer shapes, :mod:`prunelib.llm.structured_export`; give an Auto class as
            ``hf_class``, which reads the config's ``auto_map``).

    Raises:
        HFModelError: not a model directory, unknown task or class.
    """
    tf = _transformers()
    p = _check_dir(path, key)
    if task not in HF_TASKS:
        raise HFModelError(f"model.task: {task!r} is not one of {list(HF_TASKS)}")
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True, **remote)
    kwargs: dict[str, Any] = {"local_files_only": True, **remote}
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise HFModelError(f"model.dtype: {dtype!r} is not one of ['float32', 'bfloat16', 'float16']")
        kwargs["dtype"] = getattr(torch, dtype)
    if num_labels is not None:
        kwargs["num_labels"] = int(num_labels)
    if hf_class is not None:
        cls = getattr(tf, hf_class, None)
        if cls is None:
            raise HFModelError(f"{key}: transformers has no class {hf_class!r}")
    elif task == "classification":
        cls = tf.AutoModelForSequenceClassification
    elif task == "causal_lm":
        cls = tf.AutoModelForCausalLM
    else:
        archs = list(getattr(config, "architectures", None) or [])
        if not archs or getattr(tf, archs[0], None) is None:
            raise HFModelError(f"{key}: {p}/config.json names no known architecture ({archs}); "
                               f"set model.task=classification or model.task=causal_lm")
        cls = getattr(tf, archs[0])
    try:
        model, info = cls.from_pretrained(str(p), output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise HFModelError(f"{key}: cannot load {p} as {getattr(cls, '__name__', cls)}: {str(exc)[:400]}") from exc
    model.eval()
    if loading_info:
        params = {n for n, _ in model.named_parameters()}
        return model, sorted(set(info.get("missing_keys") or ()) & params)
    return model


# ----------------------------------------------------------------------------------------------
# Making small models here
# ----------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 2000,
                    lowercase: bool = True) -> Any:
    """A tokenizer trained on ``texts`` with the ``tokenizers`` library (seconds on a corpus of MBs).

    Args:
        kind: ``"bpe"``: byte-level BPE with ``<|endoftext|>`` (end, also unknown) and
            ``<pad>``, as GPT-2; ``"wordpiece"``: BERT's normaliser and pre-tokeniser with
            ``[PAD] [UNK] [CLS] [SEP] [MASK]`` and ``[CLS] ... [SEP]`` around each text.
        vocab_size: the vocabulary size the trainer aims for (tokens).
        lowercase: WordPiece only.

    Returns:
        A ``transformers`` fast tokenizer; ``save_pretrained(DIR)`` puts it beside a model.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tf = _transformers()
    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=["<|endoftext|>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                          unk_token="<|endoftext|>", pad_token="<pad>")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size),
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.train_from_iterator(texts, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tok.decoder = decoders.WordPiece()
        return tf.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                    sep_token="[SEP]", mask_token="[MASK]", do_lower_case=lowercase)
    raise ValueError(f"kind must be 'bpe' or 'wordpiece', got {kind!r}")


def build_small_model(arch: str, task: str, tokenizer: Any, num_labels: int | None = None, layers: int = 2,
                      hidden: int = 64, heads: int = 2, intermediate: int | None = None,
                      max_positions: int = 256, seed: int = 0) -> nn.Module:
    """A small, randomly initialised ``bert``, ``gpt2`` or ``llama`` model sized by the arguments.

    Args:
        task: ``"causal_lm"`` (gpt2, llama), ``"masked_lm"`` (bert) or ``"classification"``.
        tokenizer: gives the vocabulary size and the pad/end token ids.
        num_labels: classes (classification).
        layers / hidden / heads / intermediate: transformer blocks, width, attention heads, FFN
            width (default ``4 * hidden``; Llama's gated FFN uses it as is).
    """
    tf = _transformers()
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {list(_ARCHS)}, got {arch!r}")
    inter = int(intermediate or 4 * hidden)
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    ends = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    if arch == "bert":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=inter,
                               max_position_embeddings=max_positions, pad_token_id=pad)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter,
                               n_positions=max_positions, **ends)
    else:
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=inter,
                                max_position_embeddings=max_positions, tie_word_embeddings=True, **ends)
    if num_labels is not None:
        config.num_labels = int(num_labels)
    torch.manual_seed(seed)
    if task == "classification":
        model = tf.AutoModelForSequenceClassification.from_config(config)
    elif task == "causal_lm":
        if arch == "bert":
            raise ValueError("a causal LM needs arch gpt2 or llama")
        model = tf.AutoModelForCausalLM.from_config(config)
    elif task == "masked_lm":
        if arch != "bert":
            raise ValueError("a masked LM needs arch bert")
        model = tf.BertForMaskedLM(config)
    else:
        raise ValueError(f"task must be causal_lm, masked_lm or classification, got {task!r}")
    return model


def save_hf_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` of the model (safetensors) and its tokenizer into ``out_dir``, written
    atomically (:func:`prunelib.atomic.atomic_save_dir`: every weights file is opened back
    before the directory takes its name, so a full disk leaves no partial model)."""
    from prunelib.artifact import check_safetensors
    from prunelib.atomic import atomic_save_dir

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    def check(tmp: Path) -> None:
        for weights in tmp.glob("*.safetensors"):
            check_safetensors(weights)

    return atomic_save_dir(out_dir, write, check)


def mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
             special_ids: Iterable[int], generator: torch.Generator, probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``probability`` of the real, non-special tokens are predicted; of those
    80 % become ``[MASK]``, 10 % a random token, 10 % stay. Returns ``(inputs, labels)``
    (labels -100 where nothing is predicted)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == int(s)
    chosen = (torch.rand(ids.shape, generator=generator) < probability).to(ids.device)
    chosen &= attention_mask.bool() & ~special
    labels[~chosen] = -100
    roll = torch.rand(ids.shape, generator=generator).to(ids.device)
    ids[chosen & (roll < 0.8)] = int(mask_token_id)
    random_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[random_pos] = torch.randint(0, int(vocab_size), ids.shape, generator=generator).to(ids.device)[random_pos]
    return ids, labels


def train_text_model(model: nn.Module, datamodule: Any, epochs: float = 1.0, lr: float = 1e-3,
                     weight_decay: float = 0.01, objective: str = "auto", tokenizer: Any = None,
                     max_seconds: float | None = None, seed: int = 0, clip: float = 1.0,
                     progress: Callable[[str], None] | None = print, log_every: int = 50) -> dict[str, Any]:
    """Train ``model`` on a :class:`~prunelib.data.text.TextDataModule` (AdamW, linear decay).

    Args:
        epochs: passes over the training split (fractions allowed).
        objective: ``"auto"`` (the model's own: causal LM or classification), ``"mlm"``
            (masked LM; needs ``tokenizer`` for the mask token).
        max_seconds: stop early after this many wall seconds (benchmarks on a budget).

    Returns:
        ``{"steps", "seconds", "last_loss"}``.
    """
    if objective == "mlm" and (tokenizer is None or tokenizer.mask_token_id is None):
        raise ValueError("objective='mlm' needs a tokenizer with a mask token")
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(datamodule.sizes["train"] / datamodule.batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / total))
    gen = torch.Generator().manual_seed(seed)
    special = list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []
    model.train()
    start = time.perf_counter()
    step, last = 0, float("nan")
    epoch = 0
    while step < total:
        for batch in datamodule.batches("train", shuffle=True, seed=seed + epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            if objective == "mlm":
                ids, labels = mlm_mask(batch["input_ids"], batch["attention_mask"], tokenizer.mask_token_id,
                                       len(tokenizer), special, gen)
                out = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
            else:
                out = model(**batch)
            out.loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last = float(out.loss.detach())
            if progress and (step % log_every == 0 or step == total):
                progress(f"  step {step}/{total} loss {last:.4f} ({time.perf_counter() - start:.0f}s)")
            if step >= total or (max_seconds is not None and time.perf_counter() - start > max_seconds):
                break
        epoch += 1
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "last_loss": last}


# ----------------------------------------------------------------------------------------------
# KEN: the compact delta back into a transformers model
# ----------------------------------------------------------------------------------------------
def rebuild_ken_model(pretrained: str | os.PathLike, delta_file: str | os.PathLike,
                      out_dir: str | os.PathLike | None = None, tokenizer_from: str | os.PathLike | None = None) -> nn.Module:
    """The KEN model from its pretrained checkpoint directory and its compact delta file.

    The delta's metadata names the transformers class and the number of labels the KEN trial
    used (``hf_class``, ``num_labels``); the pretrained checkpoint is loaded into that class,
    the delta applied (bit-exact, fingerprint checked), and with ``out_dir`` the result is
    saved with ``save_pretrained`` (plus the tokenizer of ``tokenizer_from``, default the
    pretrained directory), so ``AutoModelFor...from_pretrained(out_dir)`` loads it.

    Raises:
        HFModelError: the delta was not made from a Hugging Face model.
        prunelib.ken_storage.KenDeltaError: the delta does not fit the pretrained checkpoint.
    """
    from prunelib.ken_storage import load_ken_delta, read_ken_metadata

    meta = read_ken_metadata(delta_file)
    hf_class = meta.get("hf_class")
    if not hf_class:
        raise HFModelError(f"{delta_file}: the KEN delta names no transformers class (hf_class); it was not "
                           f"made from a Hugging Face pair")
    model = load_hf_model(pretrained, hf_class=hf_class, num_labels=meta.get("num_labels"), key="pretrained")
    state = load_ken_delta(delta_file, model.state_dict())
    model.load_state_dict(state, strict=True)
    if out_dir is not None:
        tok_dir = Path(tokenizer_from) if tokenizer_from is not None else Path(pretrained)
        tokenizer = load_tokenizer(tok_dir, key="tokenizer") if (tok_dir / "tokenizer.json").is_file() or \
            (tok_dir / "tokenizer_config.json").is_file() else None
        save_hf_model(model, tokenizer, out_dir)
    return model.eval()
