"""Structured pruning of transformers (prunelib.llm.structured): GQA groups kept whole, shapes and
configs after width/depth/hidden pruning, FLAP bias compensation, ShortGPT block influence,
distillation, the bad inputs, and the export round trip in a fresh process (stock and
trust_remote_code checkpoints, ONNX). Tiny randomly initialised models built from configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

from prunelib.llm.structured import (  # noqa: E402
    StructuredSettings,
    block_parts,
    logit_kl,
    prune_structured,
)
from prunelib.llm.structured_export import export_onnx_structured, save_structured  # noqa: E402
from prunelib.methods import METHODS, build_method  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, SEQ = 96, 16


def tiny(arch: str, layers: int = 3, seed: int = 0) -> nn.Module:
    """A tiny random model; a larger init spread than the default so logits are not flat."""
    torch.manual_seed(seed)
    if arch == "llama8":  # 8 query heads over 4 KV heads, hidden 64
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                                          num_attention_heads=8, num_key_value_heads=4, intermediate_size=64,
                                          max_position_embeddings=64, initializer_range=0.1)
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "llama":  # GQA: 4 query heads share 2 KV heads
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                          max_position_embeddings=64, tie_word_embeddings=True,
                                          initializer_range=0.1)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_inner=64,
                                         n_positions=64, initializer_range=0.1)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                         num_labels=3, initializer_range=0.1)
        model = transformers.BertForSequenceClassification(config)
    return model.eval()


def calibration(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, -3:] = 0  # some padding: excluded from every statistic
        out.append({"input_ids": torch.randint(0, VOCAB, (2, SEQ), generator=g), "attention_mask": mask})
    return out


def blocks_of(model: nn.Module) -> nn.ModuleList:
    from prunelib.llm.blocks import find_blocks

    return find_blocks(model)[1]


@torch.no_grad()
def logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([model(**b).logits for b in batches])


@torch.no_grad()
def lm_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    return float(sum(model(**b, labels=b["input_ids"]).loss for b in batches) / len(batches))


# ------------------------------------------------------------------------------------------------
# GQA groups and equivalence with masking
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["activation", "fluctuation", "magnitude"])
def test_gqa_kv_groups_are_kept_whole_and_the_cut_model_equals_the_masked_dense_one(importance):
    dense = tiny("llama")
    model = tiny("llama")
    batches = calibration()
    result = prune_structured(model, batches, StructuredSettings(head_sparsity=0.5, ffn_sparsity=0.25,
                                                                 importance=importance))
    assert result.heads_kept == [2, 2, 2] and result.kv_heads_kept == [1, 1, 1]
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert model.config.head_dim == 8
    hd, g = 8, 2
    masked = tiny("llama")
    for cut, orig, ref in zip(blocks_of(model), blocks_of(dense), blocks_of(masked)):
        k_cut, k_orig = cut.self_attn.k_proj.weight, orig.self_attn.k_proj.weight
        kept_kv = [h for h in range(2) if any(torch.equal(k_cut[j * hd:(j + 1) * hd], k_orig[h * hd:(h + 1) * hd])
                                               for j in range(k_cut.shape[0] // hd))]
        assert len(kept_kv) == 1
        kv = kept_kv[0]
        # the query heads kept are exactly the group of the kept KV head, in order
        q_rows = torch.cat([orig.self_attn.q_proj.weight[h * hd:(h + 1) * hd] for h in range(kv * g, kv * g + g)])
        assert torch.equal(cut.self_attn.q_proj.weight, q_rows)
        assert torch.equal(cut.self_attn.v_proj.weight, orig.self_attn.v_proj.weight[kv * hd:(kv + 1) * hd])
        # the masked reference: removed heads' and FFN channels' output columns zeroed
        removed_q = [h for h in range(4) if h // g != kv]
        with torch.no_grad():
            for h in removed_q:
                ref.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            kept_ch = [j for j in range(64) if any(torch.equal(orig.mlp.down_proj.weight[:, j], cut.mlp.down_proj.weight[:, c])
                                                    for c in range(cut.mlp.down_proj.weight.shape[1]))]
            assert len(kept_ch) == 48
            dead = [j for j in range(64) if j not in kept_ch]
            ref.mlp.down_proj.weight[:, dead] = 0
    assert torch.allclose(logits(model, batches), logits(masked, batches), atol=1e-5)


def test_keep_heads_must_be_a_whole_number_of_gqa_groups():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"^keep_heads: 3 query heads is not a whole number of GQA groups"):
        prune_structured(model, calibration(), StructuredSettings(keep_heads=3))
    result = prune_structured(model, calibration(), StructuredSettings(keep_heads=2))
    assert result.heads_kept == [2, 2, 2] and result.kv_heads_kept == [1, 1, 1]


# ------------------------------------------------------------------------------------------------
# Shapes and configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_width_depth_hidden_leave_consistent_shapes_and_configs(arch):
    model = tiny(arch, layers=4)
    batches = calibration()
    dense_params = sum(p.numel() for p in model.parameters())
    result = prune_structured(model, batches, StructuredSettings(ffn_sparsity=0.5, head_sparsity=0.5,
                                                                 hidden_sparsity=0.25, depth_sparsity=0.25))
    cfg = model.config
    assert cfg.num_hidden_layers == 3 == len(blocks_of(model)) and len(result.removed_blocks) == 1
    assert cfg.hidden_size == 24 == result.hidden_kept
    assert result.ffn_kept == [32] * 3 and result.heads_kept == [2] * 3
    assert (cfg.n_inner if arch == "gpt2" else cfg.intermediate_size) == 32
    for i, block in enumerate(blocks_of(model)):
        parts = block_parts(block)
        assert parts.ffn_channels == 32 and parts.heads == 2
        assert all(m.layer_idx == i for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int))
        for norm in parts.norms:
            assert norm.weight.shape == (24,)
    emb = model.get_input_embeddings()
    assert emb.weight.shape == (VOCAB, 24)
    if arch != "bert":
        assert model.get_output_embeddings().weight is emb.weight  # tied weights stay tied
    out = logits(model, batches)
    assert torch.isfinite(out).all()
    assert result.params_after == sum(p.numel() for p in model.parameters()) < dense_params
    assert 0 < result.pruned_sparsity < 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_small_pruning_keeps_the_loss_close_to_the_dense_and_more_pruning_moves_it_further(arch):
    batches = calibration()
    dense = lm_loss(tiny(arch), batches)
    losses = {}
    for fraction in (0.1, 0.6):
        model = tiny(arch)
        prune_structured(model, batches, StructuredSettings(ffn_sparsity=fraction, importance="fluctuation",
                                                            bias_compensation=True))
        losses[fraction] = lm_loss(model, batches)
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses.values()))
    assert abs(losses[0.1] - dense) < 0.02 * dense
    assert abs(losses[0.1] - dense) < abs(losses[0.6] - dense)


# ------------------------------------------------------------------------------------------------
# FLAP bias compensation, OWL and per-layer allocation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_bias_compensation_reduces_the_output_error(arch):
    batches = calibration()
    dense = logits(tiny(arch), batches)
    errors = {}
    for compensate in (False, True):
        model = tiny(arch)
        prune_structured(model, batches, StructuredSettings(ffn_sparsity=0.5, head_sparsity=0.5,
                                                            importance="fluctuation", bias_compensation=compensate))
        errors[compensate] = float(((logits(model, batches) - dense) ** 2).mean())
        if arch == "llama":  # a bias was added where Llama had none, and the config says so
            assert model.config.mlp_bias is compensate and model.config.attention_bias is compensate
            assert (blocks_of(model)[0].mlp.down_proj.bias is not None) is compensate
    assert errors[True] < 0.9 * errors[False]


def test_owl_and_per_layer_allocation_give_per_block_widths_with_the_target_mean():
    batches = calibration()
    model = tiny("llama", layers=4)
    owl = prune_structured(model, batches, StructuredSettings(ffn_sparsity=0.5, allocation="owl", owl_lambda=0.2))
    assert len(owl.outlier_ratios) == 4 and len(set(owl.ffn_kept)) > 1
    assert abs(sum(owl.ffn_fractions) / 4 - 0.5) < 1e-6
    model = tiny("llama", layers=4)
    per = prune_structured(model, batches, StructuredSettings(allocation="per_layer", ffn_fractions=[0.0, 0.25, 0.5, 0.75],
                                                              head_fractions=[0.0, 0.5, 0.5, 0.0]))
    assert per.ffn_kept == [64, 48, 32, 16] and per.kv_heads_kept == [2, 1, 1, 2] and not per.uniform
    assert torch.isfinite(logits(model, batches)).all()


# ------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------
def test_block_influence_removes_the_block_closest_to_identity():
    batches = calibration()
    model = tiny("llama", layers=4)
    with torch.no_grad():  # block 2 writes nothing into the residual stream: exactly the identity
        blocks_of(model)[2].self_attn.o_proj.weight.mul_(0.001)
        blocks_of(model)[2].mlp.down_proj.weight.mul_(0.001)
    before = logits(model, batches)
    result = prune_structured(model, batches, StructuredSettings(depth_sparsity=0.25))
    assert min(range(4), key=lambda i: result.block_influence[i]) == 2
    assert result.removed_blocks == [2] and model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in blocks_of(model)] == [0, 1, 2]
    assert torch.allclose(logits(model, batches), before, atol=2e-2)  # removing a near-identity block changes little
    out = model.generate(batches[0]["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)  # KV cache indices work
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------
def test_distillation_lowers_the_kl_to_the_dense_model_and_reports_its_cost():
    batches = calibration()
    dense = tiny("llama")
    model = tiny("llama")
    result = prune_structured(model, batches, StructuredSettings(ffn_sparsity=0.6, head_sparsity=0.5, distill_steps=30,
                                                                 distill_lr=3e-3))
    d = result.distill
    assert d is not None and d.steps == 30 and d.backward_passes == 30 and d.forward_passes >= 60 and d.seconds > 0
    assert d.kl_after < 0.7 * d.kl_before
    assert abs(logit_kl(model, dense, batches) - d.kl_after) < 1e-4


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line naming the setting
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors_naming_the_setting():
    batches = calibration()
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"^model: Sequential is not a transformer"):
        prune_structured(mlp, batches, StructuredSettings(ffn_sparsity=0.5))
    stacked = nn.Module()
    stacked.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(3)])
    with pytest.raises(ValueError, match=r"^model: the blocks at 'layers' .* are not Llama-family, GPT-2 or BERT"):
        prune_structured(stacked, batches, StructuredSettings(ffn_sparsity=0.5))
    with pytest.raises(ValueError, match=r"^blocks_path: LlamaForCausalLM has no module 'model.blocks'"):
        prune_structured(tiny("llama"), batches, StructuredSettings(ffn_sparsity=0.5, blocks_path="model.blocks"))
    with pytest.raises(ValueError, match=r"^depth_sparsity: 0.9 of 3 blocks removes all 3"):
        prune_structured(tiny("llama"), batches, StructuredSettings(depth_sparsity=0.9))
    with pytest.raises(ValueError, match=r"^ffn_fractions: 2 fractions given, the model has 3 blocks"):
        prune_structured(tiny("gpt2"), batches, StructuredSettings(allocation="per_layer", ffn_fractions=[0.1, 0.2]))
    with pytest.raises(ValueError, match=r"^importance: .* needs calibration batches"):
        prune_structured(tiny("gpt2"), None, StructuredSettings(ffn_sparsity=0.5))
    for kwargs, key in (({"ffn_sparsity": 1.0}, "ffn_sparsity"), ({"depth_sparsity": -0.1}, "depth_sparsity"),
                        ({"importance": "taylor"}, "importance"), ({"allocation": "global"}, "allocation"),
                        ({"allocation": "per_layer"}, "allocation"), ({"ffn_fractions": [0.5]}, "ffn_fractions"),
                        ({"allocation": "per_layer", "ffn_fractions": [0.5, 1.5]}, r"ffn_fractions\[1\]"),
                        ({"keep_heads": 0}, "keep_heads"), ({"round_to": 0}, "round_to"),
                        ({"distill_steps": -1}, "distill_steps")):
        with pytest.raises(ValueError, match=rf"^{key}: ") as info:
            build_method("llm_structured", **kwargs)  # checked when the method is built
        assert "\n" not in str(info.value)


def test_magnitude_width_pruning_needs_no_data():
    model = tiny("bert")
    result = prune_structured(model, None, StructuredSettings(ffn_sparsity=0.5, head_sparsity=0.5,
                                                              importance="magnitude"))
    assert result.ffn_kept == [32] * 3 and result.calibration_tokens == 0
    assert torch.isfinite(logits(model, calibration(1))).all()


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------
class _Calibration:
    """What the method reads of a TextDataModule: calibration windows and one example sequence."""

    def calibration_batches(self, n, seed=0, batch_size=8, length=None):
        return calibration(n=max(1, n // 2), seed=seed)

    def example_input(self):
        return {"input_ids": calibration(1)[0]["input_ids"][:1], "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


def test_method_reports_physical_params_and_flops_of_the_smaller_model(tmp_path):
    assert METHODS["llm_structured"].model_kinds == ("hf",)
    dense = tiny("llama")
    method = build_method("llm_structured", ffn_sparsity=0.5, head_sparsity=0.5, depth_sparsity=0.34, calib_samples=8)
    model = tiny("llama")
    dm = _Calibration()
    method.setup(model, dm)
    masks = method.finalize(model)
    assert len(masks) == 0 and masks.metadata["structured"]["removed_blocks"]
    cost = method.result.cost
    dense_cost = method.cost_of(dense, dm.example_input())
    assert cost.params_deployed == cost.params_physical == sum(p.numel() for p in model.parameters())
    assert cost.flops_deployed == cost.flops_physical < 0.75 * dense_cost.flops_physical
    assert method.cost.extra_forward_passes > 0
    export = method.export(model, tmp_path / "m")
    assert export.format == "stock" and (export.path / "config.json").is_file()


# ------------------------------------------------------------------------------------------------
# Export: the round trip in a fresh process, and ONNX
# ------------------------------------------------------------------------------------------------
CASES = {  # name -> (arch, settings); uniform ones load as stock checkpoints
    # 6 query heads of 8 kept (3 of 4 KV groups): LlamaConfig refuses hidden 64 % 6 heads, so even
    # a uniform model needs the per-module shapes
    "llama_oddheads": ("llama8", dict(head_sparsity=0.25, ffn_sparsity=0.25)),
    "llama_uniform": ("llama", dict(ffn_sparsity=0.5, head_sparsity=0.5, hidden_sparsity=0.25, depth_sparsity=0.34,
                                    importance="fluctuation", bias_compensation=True)),
    "llama_hetero": ("llama", dict(allocation="per_layer", ffn_fractions=[0.1, 0.5, 0.7], head_fractions=[0.0, 0.5, 0.0],
                                   importance="fluctuation", bias_compensation=True)),
    "gpt2_uniform": ("gpt2", dict(ffn_sparsity=0.5, depth_sparsity=0.34)),
    "gpt2_hetero": ("gpt2", dict(allocation="per_layer", ffn_fractions=[0.1, 0.5, 0.7], head_fractions=[0.0, 0.5, 0.25],
                                 hidden_sparsity=0.25)),
    "bert_uniform": ("bert", dict(ffn_sparsity=0.5, depth_sparsity=0.34)),
    "bert_hetero": ("bert", dict(allocation="per_layer", ffn_fractions=[0.1, 0.5, 0.7], head_fractions=[0.0, 0.5, 0.25],
                                 importance="fluctuation", bias_compensation=True)),
}


def test_exported_checkpoints_load_in_a_fresh_process_without_prunesearch(tmp_path):
    batches = calibration()
    probe = calibration(2, seed=7)
    expected = {}
    for name, (arch, kwargs) in CASES.items():
        model = tiny(arch)
        prune_structured(model, batches, StructuredSettings(**kwargs))
        export = save_structured(model, tmp_path / name)
        assert export.format == ("stock" if name.endswith("uniform") else "remote_code"), name
        if name == "llama_oddheads":
            assert blocks_of(model)[0].self_attn.q_proj.weight.shape == (48, 64) and model.config.num_attention_heads == 8
        expected[name] = {"auto": export.auto_class, "remote": export.format == "remote_code"}
        torch.save({"logits": logits(model, probe)}, tmp_path / f"{name}.pt")
    torch.save(probe, tmp_path / "probe.pt")
    (tmp_path / "cases.json").write_text(json.dumps(expected))
    script = textwrap.dedent(f"""
        import json, sys, torch, transformers
        root = {str(tmp_path)!r}
        probe = torch.load(root + "/probe.pt")
        out = {{}}
        for name, case in json.load(open(root + "/cases.json")).items():
            cls = getattr(transformers, case["auto"])
            model = cls.from_pretrained(root + "/" + name, trust_remote_code=case["remote"], local_files_only=True).eval()
            if case["remote"]:  # without trust_remote_code the stock class refuses the shapes
                try:
                    cls.from_pretrained(root + "/" + name, local_files_only=True)
                    out[name + "_stock_loads"] = True
                except Exception:
                    out[name + "_stock_loads"] = False
            with torch.no_grad():
                got = torch.cat([model(**b).logits for b in probe])
            want = torch.load(root + "/" + name + ".pt")["logits"]
            out[name] = float((got - want).abs().max())
        out["prunelib_imported"] = any(m.split(".")[0] in ("prunelib", "search") for m in sys.modules)
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("prunelib_imported") is False
    for name in CASES:
        assert out[name] <= 1e-5, (name, out[name])
        if not name.endswith("uniform"):
            assert out[name + "_stock_loads"] is False, name


def test_onnx_export_of_a_pruned_model_matches_torch(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported graph")
    model = tiny("llama")
    batches = calibration()
    prune_structured(model, batches, StructuredSettings(allocation="per_layer", ffn_fractions=[0.1, 0.5, 0.7],
                                                        head_fractions=[0.0, 0.5, 0.0]))
    path = export_onnx_structured(model, tmp_path / "m.onnx", batches[0]["input_ids"], batches[0]["attention_mask"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = calibration(1, seed=9)[0]
    ids, mask = probe["input_ids"][:, :10], probe["attention_mask"][:, :10]  # another length than exported with
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)
