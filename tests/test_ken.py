"""KEN: vectorised selection against a slow per-row reference, reverting, compact storage,
pictures, the head default, bad input, the cached pair and the trial path, a tiny Hugging Face BERT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunelib.ken_storage import KenDeltaError, load_ken_delta, save_ken_delta, state_dict_bytes
from prunelib.methods import METHODS, build_method
from prunelib.methods.ken import (KEN, KENError, head_parameter_names, kde_select_rows, ken_masks, native_available,
                                  selected_parameter_names)
from prunelib.models import build_model


# ------------------------------------------------------------------------------------------------
# A slow reference: the authors' per-row procedure (scikit-learn KDE, greedy np.delete matching),
# keeping by position. Fixed: their `np.delete(lst, ...)` names an undefined variable.
# ------------------------------------------------------------------------------------------------
def reference_row(row: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import KernelDensity

    a = row.astype(np.float32)
    n = a.size
    h = abs(1.06 * np.std(a) * np.power(n, -1 / 5))
    grid = np.linspace(a.min(), a.max(), k)
    if h > 0:
        kde = KernelDensity(kernel="gaussian", bandwidth=h).fit(a.reshape(-1, 1))
        dens = [round(v) for v in np.exp(kde.score_samples(grid[:, None]))]
    else:
        dens = [0] * k  # scikit-learn refuses a zero bandwidth: every grid point ties
    order = sorted(range(k), key=lambda i: -dens[i])  # by density, descending; ties keep grid order (stable)
    pool_values, pool_index = a.copy(), np.arange(n)
    chosen = []
    for gi in order:
        j = int(np.abs(pool_values - grid[gi]).argmin())
        chosen.append(int(pool_index[j]))
        pool_values, pool_index = np.delete(pool_values, j), np.delete(pool_index, j)
    keep = np.zeros(n, dtype=bool)
    keep[chosen] = True
    return keep


BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native_available(), reason="prunelib._ken_native is not built (pip install -e . builds it)"))]


def _hard_rows(rows: int, n: int, scale: float, seed: int) -> np.ndarray:
    """Random rows with the cases that break naive code: repeated values, a heavy tail, a small
    far cluster (whose density the recurrence must not underflow), -0.0 beside 0.0, a constant row."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, scale, (rows, n)).astype(np.float32)
    x[0, :4] = x[0, 10]  # repeated values: ties must go to the smaller index, as argmin does
    x[1, -3:] *= 8  # a heavy tail
    if rows > 2:
        x[2] = rng.normal(0.0, scale / 40, n)
        x[2, rng.choice(n, max(2, n // 60), replace=False)] = scale * 12  # a small cluster far from the rest
    if rows > 3:
        x[3, ::5], x[3, 1::5] = -0.0, 0.0
    if rows > 4:
        x[4] = 0.25 * scale  # constant row: zero bandwidth, the first k entries
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, n, scale", [(6, 40, 0.04), (5, 128, 0.002), (3, 257, 1.5), (5, 61, 0.01)])
def test_selection_matches_the_slow_reference_for_several_k(rows, n, scale, backend):
    x = _hard_rows(rows, n, scale, seed=n)
    for k in sorted({1, 2, 7, n // 4, n // 2, n - 1, n}):
        got = kde_select_rows(torch.from_numpy(x), k, backend=backend).numpy()
        want = np.stack([reference_row(r, k) for r in x])
        assert (got.sum(axis=1) == k).all()
        assert (got == want).all(), f"k={k}: rows {np.nonzero((got != want).any(axis=1))[0]} differ"


def test_float32_densities_and_constant_rows_match_the_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 0.05, (5, 96)).astype(np.float32)
    x[4] = 0.25  # constant row: zero bandwidth, the first k entries
    for k in (5, 48):
        got = kde_select_rows(torch.from_numpy(x), k, kde_dtype=torch.float32).numpy()
        want = np.stack([reference_row(r, k) for r in x])
        assert (got == want).all()
    assert kde_select_rows(torch.from_numpy(x[4:]), 3).numpy()[0, :3].all()


def _exact_densities(row: np.ndarray, grid: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import KernelDensity

    x = row.astype(np.float64)
    h = abs(1.06 * x.std() * x.size ** -0.2)
    return np.round(np.exp(KernelDensity(kernel="gaussian", bandwidth=h).fit(x[:, None]).score_samples(grid[:, None])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_densities_of_a_small_far_cluster_are_not_lost(backend):
    """A row whose grid spans 15-25 bandwidths: the recurrence's first factor for the far values
    underflows unless the grid is cut (native) or the row takes the direct sum (torch)."""
    from prunelib.methods.ken import _densities, _grid

    rng = np.random.default_rng(0)
    for n, m, far in ((3072, 21, 0.1), (3072, 30, 0.05), (768, 3, 0.02)):
        x = rng.normal(0, 0.001, (1, n)).astype(np.float32)
        x[0, rng.choice(n, m, replace=False)] = far + rng.normal(0, 0.001, m)
        rows = torch.from_numpy(x)
        for k in (64, 256):
            grid = _grid(rows.double().min(1).values, rows.double().max(1).values, k)
            if backend == "torch":
                got = _densities(rows, grid, torch.float64, 1 << 24)[0].numpy()
            else:
                from prunelib import _ken_native

                mask, dens = torch.empty(1, n, dtype=torch.bool), torch.empty(1, k, dtype=torch.float64)
                _ken_native.select(rows.data_ptr(), 0, 1, n, k, mask.data_ptr(), dens.data_ptr())
                got = dens[0].numpy()
            want = _exact_densities(x[0], grid[0].numpy())
            assert want[-k // 8:].max() >= 1  # the far cluster has a density that counts
            assert (got == want).all(), f"n={n} k={k}: grid points {np.nonzero(got != want)[0]} differ"


@pytest.mark.skipif(not native_available(), reason="prunelib._ken_native is not built")
def test_native_equals_torch_on_many_rows_dtypes_and_threads():
    g = torch.Generator().manual_seed(1)
    for n, k in ((768, 64), (768, 256), (129, 1), (129, 129), (300, 77)):
        x = torch.randn(400, n, generator=g) * 0.04
        x[:8] = torch.from_numpy(_hard_rows(8, n, 0.04, seed=n))
        x[8:20] = (x[8:20] * 64).round() / 64  # many exact ties
        want = kde_select_rows(x, k, backend="torch")
        assert torch.equal(kde_select_rows(x, k, backend="native"), want)
        assert torch.equal(kde_select_rows(x.double(), k, backend="native"), kde_select_rows(x.double(), k, backend="torch"))
        half = x.half()
        assert torch.equal(kde_select_rows(half, k, backend="native"), kde_select_rows(half, k, backend="torch"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kde_select_rows(x, k)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, want)


def test_without_the_extension_the_torch_path_runs_and_says_so(monkeypatch, caplog):
    import prunelib.methods.ken as ken_module

    x = torch.from_numpy(_hard_rows(5, 64, 0.04, seed=5))
    want = kde_select_rows(x, 9, backend="torch")
    monkeypatch.setattr(ken_module, "_ken_native", None)
    monkeypatch.setattr(ken_module, "_warned_no_native", False)
    with caplog.at_level("WARNING", logger="prunelib.methods.ken"):
        assert torch.equal(kde_select_rows(x, 9), want)
        assert torch.equal(kde_select_rows(x, 9), want)
    warnings = [r for r in caplog.records if "torch path" in r.getMessage()]
    assert len(warnings) == 1 and "pip install -e ." in warnings[0].getMessage()
    with pytest.raises(KENError, match="backend='native' cannot run: the extension"):
        kde_select_rows(x, 9, backend="native")
    with pytest.raises(KENError, match="backend must be one of"):
        kde_select_rows(x, 9, backend="numba")


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    pre = build_model("mlp", (1, 8, 8), 10, hidden=(48, 24))
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pre, ft


def test_finalize_reverts_exactly_the_unkept_entries_and_keeps_the_head():
    pre, ft = _pair()
    original = copy.deepcopy(ft)
    ken = build_method("ken", keep_fraction=0.3)
    assert isinstance(ken, KEN) and METHODS["ken"] is KEN and ken.plan(10, 2) == []
    ken.set_pretrained(pre)
    masks = ken.finalize(ft)
    heads = head_parameter_names(ft)
    assert heads == {"net.5.weight", "net.5.bias"}
    params, pre_p, orig_p = dict(ft.named_parameters()), dict(pre.named_parameters()), dict(original.named_parameters())
    for name in heads:  # the default never resets the head (the reference's pitfall)
        assert name not in masks and torch.equal(params[name], orig_p[name])
    for name in masks.names():
        keep = masks.masks[name]
        assert torch.equal(params[name][keep], orig_p[name][keep])
        assert torch.equal(params[name][~keep], pre_p[name][~keep])
        rows = keep.reshape(keep.shape[0], -1) if keep.dim() > 1 else keep.reshape(1, -1)
        assert (rows.sum(dim=1) == -(-rows.shape[1] * 3 // 10)).all()  # ceil(0.3 * n) per row
    assert "not zero" in masks.metadata["semantics"]
    n_params = sum(p.numel() for p in ft.parameters())
    reverted = sum(int((~m).sum()) for m in masks.masks.values())
    assert ken.report["reverted_fraction"] == pytest.approx(reverted / n_params)
    assert 0.5 < ken.report["reverted_fraction"] < 0.75


def test_layers_all_includes_the_head_and_attention_needs_attention_modules():
    pre, ft = _pair()
    assert "net.5.weight" in selected_parameter_names(ft, "all")
    ken = KEN(k_mode="per_row_count", k=8, layers="all")
    ken.set_pretrained(pre)
    masks = ken.finalize(copy.deepcopy(ft))
    assert "net.5.weight" in masks and int((~masks.masks["net.5.weight"]).sum()) == 10 * (24 - 8)
    ken = KEN(layers="attention")
    ken.set_pretrained(pre)
    with pytest.raises(KENError, match="no attention modules"):
        ken.finalize(copy.deepcopy(ft))


def test_bad_input_gives_clear_errors():
    pre, ft = _pair()
    other = build_model("mlp", (1, 8, 8), 10, hidden=(40, 24))
    ken = KEN(keep_fraction=0.5)
    with pytest.raises(KENError, match="set_pretrained"):
        ken.finalize(ft)
    ken.set_pretrained(other)
    with pytest.raises(KENError, match="architectures differ"):
        ken.finalize(ft)
    ken = KEN(k_mode="per_row_count", k=60)  # rows: net.1.weight 64 values, net.1.bias 48 (one row)
    ken.set_pretrained(pre)
    with pytest.raises(KENError, match=r"k=60 is larger than the rows of 'net.1.bias' \(48 values\)"):
        ken.finalize(copy.deepcopy(ft))
    with pytest.raises(KENError, match="k=100 is larger than the rows"):
        ken_masks(pre, ft, ["net.1.weight"], k_mode="per_row_count", k=100)
    with pytest.raises(KENError, match="out of range"):
        kde_select_rows(torch.randn(2, 5), 6)
    with pytest.raises(KENError, match="NaN"):
        kde_select_rows(torch.tensor([[0.0, float("nan"), 1.0]]), 2)
    with pytest.raises(ValueError, match="keep_fraction"):
        KEN(keep_fraction=1.5)
    with pytest.raises(ValueError, match="both"):
        KEN(pretrained="a.pt")


def test_compact_file_rebuilds_the_ken_model_exactly_and_is_smaller(tmp_path):
    pre, ft = _pair(1)
    full_ft = copy.deepcopy(ft)
    for fraction, encoding in ((0.4, "bits"), (0.01, "indices")):
        ken_model = copy.deepcopy(ft)
        ken = KEN(keep_fraction=fraction)
        ken.set_pretrained(pre)
        masks = ken.finalize(ken_model)
        report = save_ken_delta(tmp_path / f"delta{fraction}.safetensors", pre, ken_model, masks.masks,
                                finetuned=full_ft, note="test")
        assert report.finetuned_bytes == state_dict_bytes(full_ft)
        assert report.file_bytes == report.path.stat().st_size and report.ratio < 1.0
        rebuilt = load_ken_delta(report.path, pre)
        expected = ken_model.state_dict()
        assert set(rebuilt) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(rebuilt[name], tensor), name
        fresh = copy.deepcopy(pre)
        fresh.load_state_dict(rebuilt)
        x = torch.randn(4, 1, 8, 8)
        assert torch.equal(fresh(x), ken_model(x))
        from prunelib.ken_storage import read_ken_metadata

        assert read_ken_metadata(report.path)["entries"]["net.1.weight"]["encoding"] == encoding
    wrong_pre, _ = _pair(2)
    with pytest.raises(KenDeltaError, match="different pretrained model"):
        load_ken_delta(report.path, wrong_pre)


def test_pictures_are_written_and_not_blank(tmp_path):
    from matplotlib.image import imread

    from prunelib.ken_viz import ken_pictures

    pre, ft = _pair()
    state = {k: v.clone() for k, v in ft.state_dict().items()}
    ken = KEN(keep_fraction=0.25)
    ken.set_pretrained(pre)
    masks = ken.finalize(ft)
    big = {"big.weight": torch.rand(700, 40) < 0.3}  # above max_side: drawn as block fractions
    paths = ken_pictures({**masks.masks, **big}, {**state, "big.weight": torch.randn(700, 40)}, tmp_path / "viz")
    assert [p.name for p in paths] == ["ken_heatmaps.png", "ken_kept_fraction.png"]
    for p in paths:
        assert p.stat().st_size > 10_000
        image = imread(str(p))
        assert image.ndim == 3 and image.shape[0] > 200 and float(image[..., :3].std()) > 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_selection_on_the_gpu_equals_the_cpu():
    x = torch.randn(300, 200) * 0.04
    assert torch.equal(kde_select_rows(x.cuda(), 60).cpu(), kde_select_rows(x, 60))


# ------------------------------------------------------------------------------------------------
# search: the made pair (cached), state-dict checkpoints, the trial path
# ------------------------------------------------------------------------------------------------
def _context(tmp_path, extra: list[str] | None = None, hidden: str = "[32,16]"):
    from search.config import build_search_space
    from search.trial import TrialContext
    from tests.conftest import compose

    cfg = compose(["+method=ken", "trial.epochs=2", "data.limit_train=300", f"+model.hidden={hidden}",
                   f"method.settings.pair_cache_dir={tmp_path / 'cache'}", *(extra or [])])
    return cfg, TrialContext(data=cfg["data"], model=cfg["model"], trial=cfg["trial"],
                             space=build_search_space(cfg), objectives=[("val_acc", "max"), ("flops_effective", "min")])


def test_trial_makes_the_pair_once_then_loads_it(tmp_path):
    from search.trial import run_trial

    _, ctx = _context(tmp_path)
    first = run_trial({"method": "ken", "ken.keep_fraction": 0.3, "ken.layers": "no_head"}, ctx,
                      trial_id="a", trial_dir=tmp_path / "a")
    second = run_trial({"method": "ken", "ken.keep_fraction": 0.8, "ken.layers": "all"}, ctx,
                       trial_id="b", trial_dir=tmp_path / "b")
    assert not first["pair_cached"] and second["pair_cached"] and first["pair_epochs"] == 4
    assert first["finetuned_val_acc"] == second["finetuned_val_acc"]  # the same pair
    for row in (first, second):
        assert row["flops_effective"] == row["flops_dense"] and row["epochs"] == 0
        assert row["flops_deployed"] == row["flops_effective"] and row["artifact"] == "masked"
        assert 0.0 < row["reverted_fraction"] < 1.0 and row["ken_file_bytes"] > 0
        assert (tmp_path / row["trial_id"] / "ken_viz" / "ken_heatmaps.png").is_file()
    assert first["reverted_fraction"] > second["reverted_fraction"]
    # 30 % kept: values (4 B) of 30 % plus 1 bit per entry, against 4 B per entry
    assert first["ken_file_ratio"] < 0.6 < second["ken_file_ratio"]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_trial_accepts_two_state_dict_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from search.pair import PairError
    from search.trial import run_trial

    pre, ft = _pair()  # the configured model: mlp hidden (48, 24) on digits
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(tmp_path / "pre.safetensors"))
    torch.save(ft.state_dict(), tmp_path / "ft.pt")
    _, ctx = _context(tmp_path, hidden="[48,24]", extra=[f"method.pretrained={tmp_path / 'pre.safetensors'}",
                                 f"method.finetuned={tmp_path / 'ft.pt'}"])
    row = run_trial({"method": "ken", "ken.keep_fraction": 0.5, "ken.layers": "no_head"}, ctx, trial_id="c",
                    trial_dir=tmp_path / "c")
    assert row["pair_epochs"] == 0 and 0.3 < row["reverted_fraction"] < 0.6
    _, ctx = _context(tmp_path, [f"method.pretrained={tmp_path / 'pre.safetensors'}",
                                 f"method.finetuned={tmp_path / 'ft.pt'}"])  # hidden [32, 16]: wrong model
    with pytest.raises(PairError, match="does not fit"):
        run_trial({"method": "ken", "ken.keep_fraction": 0.5, "ken.layers": "no_head"}, ctx, trial_id="d",
                  trial_dir=tmp_path / "d")


def test_ken_config_parses_and_searches_fraction_and_layers():
    from search.space import SearchSpace, load_method_configs

    cfg = load_method_configs()["ken"]
    space = SearchSpace({"ken": cfg}, pinned=True)
    assert set(space.distributions("ken")) == {"ken.keep_fraction", "ken.layers"}
    KEN(**cfg["settings"])  # every setting is a constructor argument


def test_a_plain_models_classifier_stack_is_not_taken_for_a_hugging_face_head():
    # LeNet-5 names its whole dense stack "classifier", like a Hugging Face head: only its last
    # Linear is the head; the hidden dense layers are KEN's (they hold most of the weights).
    from prunelib.models import build_model

    model = build_model("lenet5", (1, 28, 28), 10)
    assert head_parameter_names(model) == {"classifier.4.weight", "classifier.4.bias"}
    selected = selected_parameter_names(model, "no_head")
    assert "classifier.0.weight" in selected and "classifier.2.weight" in selected


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints (optional `hf` extra): a tiny random BERT, nothing downloaded
# ------------------------------------------------------------------------------------------------
def test_tiny_bert_checkpoints_keep_the_random_head_out(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
    from search.pair import load_checkpoint_pair

    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    base = transformers.BertModel(config)
    base.save_pretrained(tmp_path / "base")  # a pretrained checkpoint has no task head
    tuned = transformers.BertForSequenceClassification(config)
    tuned.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "tuned")

    pre, ft = load_checkpoint_pair(tmp_path / "base", tmp_path / "tuned")
    assert type(pre).__name__ == "BertForSequenceClassification" == type(ft).__name__
    assert not torch.equal(pre.classifier.weight, ft.classifier.weight)  # the base got a random head
    finetuned = copy.deepcopy(ft)
    ken = KEN(keep_fraction=0.25)
    ken.set_pretrained(pre)
    masks = ken.finalize(ft)
    assert "classifier.weight" not in masks and torch.equal(ft.classifier.weight, finetuned.classifier.weight)
    assert "bert.embeddings.word_embeddings.weight" in masks
    report = save_ken_delta(tmp_path / "bert.safetensors", pre, ft, masks.masks, finetuned=finetuned)
    rebuilt = load_ken_delta(report.path, pre)
    for name, tensor in ft.state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name

    attention = KEN(k_mode="per_row_count", k=4, layers="attention")
    attention.set_pretrained(pre)
    att_masks = attention.finalize(copy.deepcopy(finetuned))
    assert att_masks.names() and all(".attention." in n for n in att_masks.names())
    assert any(n.endswith("attention.self.query.weight") for n in att_masks.names())


def test_heatmaps_colour_kept_entries_with_their_fine_tuned_values(monkeypatch, tmp_path):
    """The reference KEN_viz swapped its two matrices and coloured kept positions with the
    pretrained values; here a kept entry shows its fine-tuned value and a reverted one is blank."""
    import numpy as np

    import prunelib.ken_viz as ken_viz

    figures = []
    make = ken_viz._figure
    monkeypatch.setattr(ken_viz, "_figure", lambda w, h: figures.append(make(w, h)) or figures[-1])
    torch.manual_seed(0)
    pretrained = torch.randn(6, 5)
    finetuned = -pretrained + 0.5  # every entry differs from its pretrained value
    keep = torch.rand(6, 5) < 0.5
    ken_viz.plot_kept_heatmaps({"w": keep}, {"w": finetuned}, tmp_path / "h.png")
    shown = np.ma.filled(figures[0].axes[0].images[0].get_array().astype(float), np.nan)
    assert np.allclose(shown[keep.numpy()], finetuned[keep].numpy())
    assert np.isnan(shown[~keep.numpy()]).all()
