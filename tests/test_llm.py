"""LLM one-shot pruning (magnitude, Wanda, SparseGPT; N:M; OWL), data=text, model=hf and KEN on
Hugging Face pairs: the math against small direct implementations, block-by-block calibration on
tiny GPT-2 / Llama / BERT models trained here for seconds, trials and a 2-trial sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

from prunelib.data.corpora import FORTUNES_ROOT, write_fortunes_corpus  # noqa: E402
from prunelib.data.text import TextDataError, build_text_datamodule  # noqa: E402
from prunelib.llm import OneShotSettings, prune_model  # noqa: E402
from prunelib.llm.blocks import block_linears, find_blocks  # noqa: E402
from prunelib.llm.sparsity import (  # noqa: E402
    NMPattern,
    owl_block_sparsities,
    parse_pattern,
    prune_mask_from_scores,
    sparsegpt_prune,
    wanda_scores,
)
from prunelib.models.hf import (  # noqa: E402
    build_small_model,
    load_hf_model,
    load_tokenizer,
    save_hf_model,
    train_text_model,
    train_tokenizer,
)
from tests.conftest import compose  # noqa: E402

needs_fortunes = pytest.mark.skipif(not FORTUNES_ROOT.is_dir(),
                                    reason="Debian's fortunes package is not installed (apt-get install fortunes)")
CATEGORIES = ["computers", "definitions", "people", "songs-poems"]


# ------------------------------------------------------------------------------------------------
# Small direct implementations of the papers' math (slow loops, float64)
# ------------------------------------------------------------------------------------------------
def direct_wanda_mask(w: np.ndarray, x: np.ndarray, sparsity: float) -> np.ndarray:
    """Per output row, prune the floor(in * s) smallest |W_ij| * ||X_j||_2 (x: [tokens, in])."""
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))
    keep = np.ones_like(w, dtype=bool)
    k = int(w.shape[1] * sparsity)
    for i in range(w.shape[0]):
        metric = np.abs(w[i].astype(np.float64)) * norms
        keep[i, np.argsort(metric, kind="stable")[:k]] = False
    return keep


def direct_sparsegpt(w: np.ndarray, x: np.ndarray, sparsity: float, blocksize: int, nm: tuple[int, int] | None,
                     percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """OBS column by column with the explicit inverse Hessian of the remaining columns (no Cholesky,
    no lazy batching): after column j, H^-1 of the columns right of j by one Gaussian elimination step."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    h = 2.0 * x.T.astype(np.float64) @ x.astype(np.float64) / x.shape[0]
    h += percdamp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.inv(h)
    # d_j = [H_F^-1]_jj with F = {j, j+1, ...}: the OBS denominators, known before any update
    d, tmp = np.zeros(cols), hinv.copy()
    for j in range(cols):
        d[j] = tmp[j, j]
        tmp = tmp - np.outer(tmp[:, j], tmp[j, :]) / tmp[j, j]
    prune = np.zeros_like(w, dtype=bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            block = slice(j, min(j + blocksize, cols))
            score = (w[:, block] ** 2 / d[block][None, :]).reshape(-1)
            k = int(score.size * sparsity)
            flat = np.zeros(score.size, dtype=bool)
            flat[np.argsort(score, kind="stable")[:k]] = True
            prune[:, block] = flat.reshape(rows, -1)
        if nm is not None and j % nm[1] == 0:
            group = slice(j, j + nm[1])
            score = w[:, group] ** 2 / d[group][None, :]
            for r in range(rows):
                prune[r, j + np.argsort(score[r], kind="stable")[: nm[1] - nm[0]]] = True
        q = np.where(prune[:, j], 0.0, w[:, j])
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= np.outer(err, hinv[j, j:])
        w[:, j] = q
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w, ~prune


def _layer_problem(seed: int = 0, rows: int = 24, cols: int = 32, tokens: int = 400):
    """A weight and correlated inputs with a few large features (LLM-like outliers)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)
    x[:, :3] *= 6.0
    w = torch.randn(rows, cols, generator=g) * 0.1
    return w, x


def test_wanda_and_nm_masks_match_the_direct_rule():
    w, x = _layer_problem()
    sq_mean = (x.double() ** 2).mean(dim=0)
    for s in (0.3, 0.5, 0.7):
        got = prune_mask_from_scores(wanda_scores(w, sq_mean), s, group="row").numpy()
        assert (got == direct_wanda_mask(w.numpy(), x.numpy(), s)).all()
        assert (got.sum(axis=1) == w.shape[1] - int(w.shape[1] * s)).all()
    layer = prune_mask_from_scores(w.abs(), 0.5, group="layer")
    assert int((~layer).sum()) == w.numel() // 2 and bool((w.abs()[~layer].max() <= w.abs()[layer].min()))
    for pattern in ("2:4", "4:8", "1:4"):
        nm = parse_pattern(pattern)
        keep = prune_mask_from_scores(wanda_scores(w, sq_mean), 0.0, nm)
        groups = keep.reshape(w.shape[0], -1, nm.m)
        assert (groups.sum(dim=2) == nm.n).all()
        scores = wanda_scores(w, sq_mean).reshape(w.shape[0], -1, nm.m)
        assert (scores[groups].reshape(w.shape[0], -1, nm.n).min(dim=2).values
                >= scores[~groups].reshape(w.shape[0], -1, nm.m - nm.n).max(dim=2).values).all()
    assert parse_pattern("unstructured") is None and NMPattern(2, 4).sparsity == 0.5
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="not a multiple"):
        prune_mask_from_scores(torch.ones(2, 6), 0.0, NMPattern(2, 4))


@pytest.mark.parametrize("pattern, blocksize", [(None, 8), (None, 32), ((2, 4), 16), ((4, 8), 8)])
def test_sparsegpt_matches_a_direct_obs_implementation(pattern, blocksize):
    w, x = _layer_problem(1)
    h = 2.0 * x.t() @ x / x.shape[0]
    nm = NMPattern(*pattern) if pattern else None
    result = sparsegpt_prune(w, h, 0.5, nm, blocksize=blocksize)
    want_w, want_keep = direct_sparsegpt(w.numpy(), x.numpy(), 0.5, blocksize, pattern)
    assert (result.keep.numpy() == want_keep).all()
    assert np.allclose(result.weight.numpy(), want_w, rtol=1e-3, atol=1e-4)
    assert bool((result.weight[~result.keep] == 0).all()) and float((~result.keep).float().mean()) == 0.5


def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude_and_wanda():
    for seed in range(3):
        w, x = _layer_problem(seed)
        dense = x @ w.t()
        h = 2.0 * x.t() @ x / x.shape[0]

        def error(weight: torch.Tensor) -> float:
            return float(((x @ weight.t() - dense) ** 2).sum())

        for nm in (None, NMPattern(2, 4)):
            mag = w * prune_mask_from_scores(w.abs(), 0.5, nm, group="layer")
            wanda = w * prune_mask_from_scores(wanda_scores(w, (x ** 2).mean(0)), 0.5, nm)
            sgpt = sparsegpt_prune(w, h, 0.5, nm, blocksize=16).weight
            assert error(sgpt) < error(wanda) < error(mag), (seed, nm)


def test_owl_sparsities_follow_the_outlier_ratio_and_keep_the_mean():
    ratios = [0.01, 0.03, 0.02, 0.05]
    got = owl_block_sparsities(ratios, 0.6, 0.08)
    assert sum(got) / len(got) == pytest.approx(0.6)
    mean_shift = 0.16 * (0 + 0.5 + 0.25 + 1) / 4  # ratios rescaled to [0, 2 lambda], then centred
    assert got[3] == pytest.approx(0.6 - (0.16 - mean_shift)) and min(got) == got[3] and max(got) == got[0]
    assert max(got) - min(got) == pytest.approx(0.16)
    assert owl_block_sparsities([0.02] * 3, 0.5, 0.08) == [0.5] * 3
    with pytest.raises(ValueError, match="owl"):
        OneShotSettings(pattern="2:4", distribution="owl")


# ------------------------------------------------------------------------------------------------
# data=text
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    words = [f"w{i}" for i in range(60)]
    return train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(60)], "wordpiece", 200)


def _records(n: int = 120) -> list[dict[str, str]]:
    labels = ["alpha", "beta", "gamma"]
    return [{"text": f"w{i % 60} w{(i * 7) % 60} w{(i * 3) % 60} sample {i}", "label": labels[i % 3]} for i in range(n)]


def test_text_tables_read_alike_and_split_like_the_image_sets(tmp_path, word_tokenizer):
    import pandas as pd

    records = _records()
    pd.DataFrame(records).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pd.DataFrame(records).to_parquet(tmp_path / "d.parquet")
    modules = [build_text_datamodule(tmp_path / f"d.{ext}", word_tokenizer, max_length=16, seed=0, batch_size=16)
               for ext in ("csv", "jsonl", "parquet")]
    for dm in modules:
        assert dm.task == "classification" and dm.label_names == ["alpha", "beta", "gamma"]
        assert dm.sizes == modules[0].sizes and dm.sizes["test"] == 24  # fixed 20 % hold-out
        for split in ("train", "val", "test"):
            assert torch.equal(dm.split(split)["input_ids"], modules[0].split(split)["input_ids"])
    other = build_text_datamodule(tmp_path / "d.csv", word_tokenizer, max_length=16, seed=1)
    assert torch.equal(other.split("test")["input_ids"], modules[0].split("test")["input_ids"])
    assert not torch.equal(other.split("val")["input_ids"], modules[0].split("val")["input_ids"])
    assert set(other.split("val")["labels"].tolist()) == {0, 1, 2}  # stratified
    batch = next(modules[0].batches("train"))
    assert batch["input_ids"].shape == (16, 16) and batch["attention_mask"].dtype == torch.long
    (tmp_path / "lm.txt").write_text("\n\n".join(r["text"] for r in records))
    lm = build_text_datamodule(tmp_path / "lm.txt", word_tokenizer, max_length=8, limit_eval=3)
    assert lm.task == "lm" and lm.sizes["val"] == 3 and lm.split("train")["input_ids"].shape[1] == 8
    calib = lm.calibration_batches(5, seed=0, batch_size=2)
    assert [b["input_ids"].shape for b in calib] == [(2, 8), (2, 8), (1, 8)]
    (tmp_path / "one.csv").write_text("text,label\nhello,a\nworld,a\n")
    for path, match in ((tmp_path / "nope.csv", "data.path"), (tmp_path / "one.csv", "single class")):
        with pytest.raises(TextDataError, match=match):
            build_text_datamodule(path, word_tokenizer)
    with pytest.raises(TextDataError, match="data.text_column"):
        build_text_datamodule(tmp_path / "d.csv", word_tokenizer, text_column="body")


# ------------------------------------------------------------------------------------------------
# Tiny models trained here for seconds on the fortunes corpus
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not FORTUNES_ROOT.is_dir():
        pytest.skip("Debian's fortunes package is not installed (apt-get install fortunes)")
    return write_fortunes_corpus(tmp_path_factory.mktemp("corpus"), CATEGORIES, max_chars=300)


@pytest.fixture(scope="module")
def lm_dirs(corpus, tmp_path_factory):
    """A 2-layer GPT-2 (HF Conv1D layers) and a 2-layer Llama (nn.Linear) trained for ~2 s each."""
    root = tmp_path_factory.mktemp("lm")
    tok = train_tokenizer(corpus["txt"].read_text().split("\n\n"), "bpe", 400)
    dm = build_text_datamodule(corpus["txt"], tok, max_length=32, batch_size=16, limit_train=480, limit_eval=32)
    dirs = {}
    for arch in ("gpt2", "llama"):
        model = build_small_model(arch, "causal_lm", tok, layers=2, hidden=32, heads=2, max_positions=64)
        train_text_model(model, dm, epochs=1, lr=5e-3, progress=None)
        dirs[arch] = save_hf_model(model, tok, root / arch)
    return dirs, corpus["txt"]


@pytest.fixture(scope="module")
def bert_pair(corpus, tmp_path_factory):
    """A 2-layer BERT pretrained with masked LM on the corpus, then fine-tuned to classify categories."""
    root = tmp_path_factory.mktemp("bert")
    tok = train_tokenizer(corpus["txt"].read_text().split("\n\n"), "wordpiece", 400)
    lm = build_text_datamodule(corpus["txt"], tok, max_length=32, batch_size=16, limit_train=320)
    pre = build_small_model("bert", "masked_lm", tok, layers=2, hidden=32, heads=2, max_positions=64)
    train_text_model(pre, lm, epochs=1, lr=5e-3, objective="mlm", tokenizer=tok, progress=None)
    save_hf_model(pre, tok, root / "pretrained")
    cls = build_text_datamodule(corpus["jsonl"], tok, max_length=32, batch_size=16, limit_train=640, limit_eval=64)
    ft = load_hf_model(root / "pretrained", task="classification", num_labels=cls.num_classes)
    train_text_model(ft, cls, epochs=1, lr=3e-3, progress=None)
    save_hf_model(ft, tok, root / "finetuned")
    return root / "pretrained", root / "finetuned", corpus["jsonl"]


def _layer_inputs(model, names, batches):
    """Inputs of the named linear modules on a normal forward pass of ``model``: [tokens, in]."""
    store = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def test_wanda_block_by_block_equals_the_direct_rule_on_each_blocks_real_inputs(lm_dirs):
    """Sequential calibration: block 1 is scored on the inputs the *pruned* block 0 gives it."""
    dirs, txt = lm_dirs
    tok = load_tokenizer(dirs["gpt2"])
    dm = build_text_datamodule(txt, tok, max_length=32)
    batches = dm.calibration_batches(8, seed=0, batch_size=4)
    dense = load_hf_model(dirs["gpt2"])
    model = load_hf_model(dirs["gpt2"])
    result = prune_model(model, batches, OneShotSettings("wanda", 0.5))
    path, blocks = find_blocks(model)
    assert path == "transformer.h"
    views = {i: block_linears(dense.transformer.h[i], f"{path}.{i}") for i in range(2)}
    # block 0 sees the dense embeddings; block 1 the pruned block 0 with block 1 still dense
    probe = load_hf_model(dirs["gpt2"])
    probe.transformer.h[0].load_state_dict(model.transformer.h[0].state_dict())
    for i, source in ((0, dense), (1, probe)):
        names = [v.param_name[: -len(".weight")] for v in views[i]]
        inputs = _layer_inputs(source, names, batches)
        for view in views[i]:
            w = view.weight  # [out, in]: GPT-2's Conv1D transposed
            want = direct_wanda_mask(w.numpy(), inputs[view.param_name[: -len(".weight")]].numpy(), 0.5)
            got = result.masks.masks[view.param_name]
            assert got.shape == view.module.weight.shape  # stored in the parameter's own layout ([in, out])
            assert (got.t().numpy() == want).all(), view.param_name
    params = dict(model.named_parameters())
    for name, keep in result.masks.masks.items():
        assert bool((params[name][~keep] == 0).all())
    assert result.pruned_sparsity == 0.5 and result.calibration_tokens == 8 * 32


def test_every_method_and_pattern_prunes_llama_and_bert_and_keeps_heads_dense(lm_dirs, bert_pair, tmp_path):
    from prunelib.llm import evaluate_text, sparse_storage_bytes, text_model_cost
    from prunelib.masks import MaskSet

    dirs, txt = lm_dirs
    tok = load_tokenizer(dirs["llama"])
    dm = build_text_datamodule(txt, tok, max_length=32, limit_eval=32)
    batches = dm.calibration_batches(8, seed=0, batch_size=4)
    dense = load_hf_model(dirs["llama"])
    dense_cost = text_model_cost(dense, dm.example_input())
    dense_ppl = evaluate_text(dense, dm)["ppl"]
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern, dist in (("unstructured", "uniform"), ("unstructured", "owl"), ("2:4", "uniform")):
            model = load_hf_model(dirs["llama"])
            result = prune_model(model, batches, OneShotSettings(method, 0.5, pattern, dist, owl_lambda=0.1))
            assert len(result.masks) == 14 and all(".layers." in n for n in result.masks.names())
            assert torch.equal(model.lm_head.weight, dense.lm_head.weight)  # embeddings / head untouched
            if dist == "owl":
                assert len(result.outlier_ratios) == 2 and result.block_sparsity[0] != result.block_sparsity[1]
            assert abs(result.pruned_sparsity - 0.5) < 0.02  # floor(in * s) per row of 32 inputs
            ppl[(method, pattern, dist)] = evaluate_text(model, dm)["ppl"]
            assert math.isfinite(ppl[(method, pattern, dist)])
    cost = text_model_cost(model, dm.example_input(), result.masks)
    assert cost.flops_dense == dense_cost.flops_dense and cost.flops_effective < dense_cost.flops_dense
    # attention products are counted too (eager attention while counting)
    linear = sum(2 * 32 * p.numel() for n, p in dense.named_parameters() if n.endswith("proj.weight") or "lm_head" in n)
    assert dense_cost.flops_dense > linear
    assert sparse_storage_bytes(model, result.masks, NMPattern(2, 4)) < sum(p.numel() * 4 for p in model.parameters())
    saved = result.masks.save(tmp_path / "m.safetensors", model)
    assert set(MaskSet.load(saved, model).names()) == set(result.masks.names())
    # a model trained for seconds is near its unigram perplexity: orderings are the benchmark's job
    assert all(p != dense_ppl for p in ppl.values())

    pre_dir, ft_dir, jsonl = bert_pair
    btok = load_tokenizer(ft_dir)
    cls = build_text_datamodule(jsonl, btok, max_length=32)
    bert = load_hf_model(ft_dir)
    calib = cls.calibration_batches(8, seed=0, batch_size=4)
    real = sum(int(b["attention_mask"].sum()) for b in calib)
    assert real < 8 * 32  # padded examples
    result = prune_model(bert, calib, OneShotSettings("sparsegpt", 0.5, "4:8"))
    assert result.calibration_tokens == real  # padding is not calibration data
    assert "classifier.weight" not in result.masks and "bert.pooler.dense.weight" not in result.masks
    assert 0.0 <= evaluate_text(bert, cls)["acc"] <= 1.0


def test_blocks_visit_the_work_device_one_at_a_time(lm_dirs, monkeypatch):
    """The offload path: the model stays home, each block is moved to the work device and back."""
    import contextlib

    import prunelib.llm.oneshot as oneshot

    dirs, txt = lm_dirs
    tok = load_tokenizer(dirs["llama"])
    batches = build_text_datamodule(txt, tok, max_length=32).calibration_batches(4, batch_size=2)
    visits, inside = [], []
    real = oneshot._on_device

    @contextlib.contextmanager
    def recording(block, device, home):
        assert not inside, "two blocks on the device at once"
        inside.append(block)
        visits.append((id(block), str(device), str(home)))
        with real(block, device, home):
            yield
        inside.pop()

    monkeypatch.setattr(oneshot, "_on_device", recording)
    model = load_hf_model(dirs["llama"])
    reference = load_hf_model(dirs["llama"])
    prune_model(model, batches, OneShotSettings("sparsegpt", 0.5, distribution="owl"), device="cpu")
    blocks = [id(b) for b in model.model.layers]
    assert [v[0] for v in visits] == blocks + blocks  # OWL's dense pass, then the pruning pass
    monkeypatch.setattr(oneshot, "_on_device", real)
    prune_model(reference, batches, OneShotSettings("sparsegpt", 0.5, distribution="owl"))
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Trials and the sweep
# ------------------------------------------------------------------------------------------------
def _ctx(overrides: list[str]):
    from search.config import build_search_space, validate_config
    from search.trial import TrialContext

    cfg = compose(overrides)
    validate_config(cfg)
    return TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"], space=build_search_space(cfg),
                        objectives=[("val_ppl", "min"), ("flops_effective", "min")])


def test_llm_trial_reports_perplexity_flops_and_bytes(lm_dirs, tmp_path):
    from prunelib.masks import MaskSet
    from search.trial import run_trial

    dirs, txt = lm_dirs
    ctx = _ctx(["model=hf", f"model.path={dirs['gpt2']}", "data=text", f"data.path={txt}", "data.max_length=32",
                "data.limit_eval=32", "+method=wanda", "method.settings.calib_samples=8"])
    rows = [run_trial({"method": "wanda", "wanda.pattern": p, **({"wanda.sparsity": 0.6} if p == "unstructured" else {})},
                      ctx, trial_id=f"t{i}", trial_dir=tmp_path / f"t{i}") for i, p in enumerate(("2:4", "unstructured"))]
    for row in rows:
        assert row["dense_val_ppl"] > 1 and row["val_ppl"] != row["dense_val_ppl"] and 0 <= row["val_acc"] <= 1
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["flops_effective"] < row["flops_dense"] and row["sparse_bytes"] < row["dense_bytes"]
        assert row["flops_deployed"] == row["flops_effective"] and row["artifact"] == "masked"  # masks only
        assert 0 < row["sparsity"] < row["block_sparsity"] and "test_ppl" in row
        masks = MaskSet.load(row["masks_path"])
        assert masks.metadata["method"] == "wanda" and len(masks) == 8
    assert rows[0]["block_sparsity"] == 0.5 and rows[1]["block_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert rows[1]["flops_effective"] < rows[0]["flops_effective"]


def test_a_text_trial_builds_the_method_class_its_config_names(lm_dirs, tmp_path):
    """A user's ``_target_`` is honoured by text trials as by every other kind (it was not: issue 25)."""
    from search.trial import run_trial
    from tests.user_code import RecordingWanda

    dirs, txt = lm_dirs
    ctx = _ctx(["model=hf", f"model.path={dirs['gpt2']}", "data=text", f"data.path={txt}", "data.max_length=32",
                "data.limit_eval=16", "+method=wanda", "+method._target_=tests.user_code.RecordingWanda",
                "method.settings.calib_samples=4", "trial.evaluate_test=false"])
    before = RecordingWanda.setups
    row = run_trial({"method": "wanda"}, ctx, trial_id="target", trial_dir=tmp_path / "t")
    assert RecordingWanda.setups == before + 1 and row["method"] == "wanda" and row["val_ppl"] > 1


def test_ken_trial_on_a_hugging_face_pair_rebuilds_with_transformers(bert_pair, tmp_path):
    import transformers

    from prunelib.models.hf import rebuild_ken_model
    from search.trial import run_trial

    pre_dir, ft_dir, jsonl = bert_pair
    ctx = _ctx(["model=hf", "data=text", f"data.path={jsonl}", "data.max_length=32", "data.limit_eval=64",
                "+method=ken", f"pair.pretrained={pre_dir}", f"pair.finetuned={ft_dir}"])
    row = run_trial({"method": "ken", "ken.keep_fraction": 0.4, "ken.layers": "no_head"}, ctx, trial_id="k",
                    trial_dir=tmp_path / "k")
    assert 0.4 < row["reverted_fraction"] < 0.7 and row["ken_file_ratio"] < 0.7
    assert row["finetuned_val_acc"] > 0.3 and 0 <= row["val_acc"] <= 1 and "test_acc" in row
    assert row["flops_effective"] == row["flops_dense"]
    assert (tmp_path / "k" / "ken_viz" / "ken_heatmaps.png").is_file()
    model = rebuild_ken_model(pre_dir, row["ken_delta_path"], tmp_path / "rebuilt", tokenizer_from=ft_dir)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rebuilt", local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rebuilt", local_files_only=True)
    batch = tok(["a fortune about computers", "-- a famous person"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    ft = load_hf_model(ft_dir)
    differs = sum(int((a != b).sum()) for a, b in zip(loaded.parameters(), ft.parameters()))
    assert differs > 0.3 * sum(p.numel() for p in ft.parameters())  # reverted entries hold pretrained values


def test_text_sweep_config_errors_name_the_key(lm_dirs, corpus):
    from search.config import validate_config
    from search.llm_trial import check_text_data
    from search.space import ConfigError

    dirs, txt = lm_dirs
    good = ["model=hf", f"model.path={dirs['gpt2']}", "data=text", f"data.path={txt}"]
    for overrides, key in ((["data=text", f"data.path={txt}"], "model.name"),
                           (["model=hf", f"model.path={dirs['gpt2']}"], "data.name"),
                           (["model=hf", f"model.path={dirs['gpt2']}", "data=text"], "data.path"),
                           ([*good, "data.max_length=1"], "data.max_length"),
                           ([*good, "+method=bingo"], "method"),
                           (["model=hf", "data=text", f"data.path={txt}", "+method=ken"], "pair.pretrained"),
                           ([*good, "+method=wanda", "method.settings.pattern=3:2"], "method[wanda].settings")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            validate_config(compose(overrides))
    with pytest.raises(ConfigError, match="text trials only"):
        validate_config(compose(["search.objectives=[{metric: val_ppl, mode: min}]"]))
    with pytest.raises(ConfigError, match=r"search.objectives\[0\].metric: val_ppl needs language-modelling"):
        check_text_data(compose(["model=hf", f"model.path={dirs['gpt2']}", "data=text", f"data.path={corpus['jsonl']}",
                                 "search.objectives=[{metric: val_ppl, mode: min}]"]))
    check_text_data(compose(good))
    from search.config import method_configs

    # Every method that prunes Hugging Face models (llm_structured since issue 27); KEN is run pinned.
    assert set(method_configs(compose(good))) == {"llm_magnitude", "wanda", "sparsegpt", "llm_structured"}
    assert not {"llm_magnitude", "wanda", "sparsegpt", "llm_structured"} & set(method_configs(compose([])))


@pytest.mark.slow
def test_two_trial_sweep_over_sparsegpt_on_a_tiny_lm(lm_dirs, tmp_path, ray_local):
    from search.tuner import run_sweep

    dirs, txt = lm_dirs
    cfg = compose(["model=hf", f"model.path={dirs['llama']}", "data=text", f"data.path={txt}", "data.max_length=32",
                   "data.limit_eval=32", "+method=sparsegpt", "method.settings.calib_samples=8",
                   "search.n_trials=2", "search.concurrency=1", "search.objectives=[{metric: val_ppl, mode: min}, "
                   "{metric: flops_effective, mode: min}]", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    result = run_sweep(cfg, tmp_path / "out")
    assert len(result.rows) == 2 and all(r["status"] == "ok" for r in result.rows)
    assert all(r["val_ppl"] > 1 and r["flops_effective"] < r["flops_dense"] for r in result.rows)
    assert len(result.front) >= 1 and (tmp_path / "out" / "front" / "front.csv").is_file()
    assert Path(result.rows[0]["masks_path"]).is_file()


def test_ken_trial_on_a_causal_lm_pair_reports_perplexity(lm_dirs, tmp_path):
    from search.trial import run_trial

    dirs, txt = lm_dirs
    tuned = load_hf_model(dirs["gpt2"])
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_hf_model(tuned, load_tokenizer(dirs["gpt2"]), tmp_path / "tuned")
    ctx = _ctx(["model=hf", "data=text", f"data.path={txt}", "data.max_length=32", "data.limit_eval=16",
                "+method=ken", f"pair.pretrained={dirs['gpt2']}", f"pair.finetuned={tmp_path / 'tuned'}"])
    row = run_trial({"method": "ken", "ken.keep_fraction": 0.5, "ken.layers": "no_head"}, ctx, trial_id="g",
                    trial_dir=tmp_path / "g")
    assert row["val_ppl"] > 1 and row["finetuned_val_ppl"] > 1 and row["pretrained_val_ppl"] > 1
    assert 0.3 < row["reverted_fraction"] < 0.6 and row["ken_file_bytes"] < row["finetuned_bytes"]


@pytest.mark.parametrize("name", ["llm_magnitude", "wanda", "sparsegpt"])
def test_an_llm_method_hands_every_shared_setting_to_the_block_pruner(name):
    """The method's settings reach prune_model's OneShotSettings by field name (SparseGPT's column
    block and damping included), so a setting cannot be declared and then silently dropped."""
    from dataclasses import fields

    from prunelib.methods import build_method

    given = {"sparsity": 0.3, "pattern": "unstructured", "distribution": "owl", "owl_m": 3.0, "owl_lambda": 0.05,
             "group": "layer", "sequential": False, "blocks_path": "model.layers"}
    if name == "sparsegpt":
        given.update(blocksize=32, percdamp=0.05)
    method = build_method(name, **given)
    assert method.oneshot.method == method.score
    for key, value in given.items():
        assert getattr(method.oneshot, key) == value, key
    shared = {f.name for f in fields(type(method.settings))} & {f.name for f in fields(OneShotSettings)}
    assert shared == set(given)
    with pytest.raises(ValueError, match="blocksize"):
        build_method("sparsegpt", blocksize=0)
