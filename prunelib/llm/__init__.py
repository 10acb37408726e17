"""One-shot LLM pruning: magnitude, Wanda, SparseGPT; unstructured and N:M; uniform and OWL; block by block.

* :mod:`prunelib.llm.sparsity`: the per-layer math (scores, masks, SparseGPT's OBS update, OWL);
* :mod:`prunelib.llm.blocks`: finding blocks and linear layers, capturing calibration inputs;
* :mod:`prunelib.llm.oneshot`: :func:`prune_model`, the block-by-block driver;
* :mod:`prunelib.llm.methods`: ``llm_magnitude``, ``wanda``, ``sparsegpt`` as protocol methods;
* :mod:`prunelib.llm.evaluate`: perplexity, next-token and classification accuracy;
* :mod:`prunelib.llm.report`: FLOPs per sequence and sparse-export bytes;
* :mod:`prunelib.llm.structured`: structured pruning (FFN channels, heads/KV groups, hidden
  size, blocks) into a physically smaller model; :mod:`prunelib.llm.structured_export` saves
  it as a checkpoint ``transformers`` loads (and ONNX); :mod:`prunelib.llm.structured_method`
  is ``llm_structured``.

Nothing here imports transformers: any module with a ModuleList of blocks works.
"""

from prunelib.llm.evaluate import evaluate_classifier, evaluate_lm, evaluate_text
from prunelib.llm.oneshot import LLM_DISTRIBUTIONS, LLM_SCORES, OneShotResult, OneShotSettings, prune_model
from prunelib.llm.report import sparse_storage_bytes, text_model_cost
from prunelib.llm.structured import StructuredResult, StructuredSettings, prune_structured
from prunelib.llm.structured_export import StructuredExport, export_onnx_structured, save_structured
from prunelib.llm.sparsity import (
    NMPattern,
    owl_block_sparsities,
    parse_pattern,
    prune_mask_from_scores,
    sparsegpt_prune,
    wanda_scores,
)

__all__ = ["LLM_DISTRIBUTIONS", "LLM_SCORES", "NMPattern", "OneShotResult", "OneShotSettings", "evaluate_classifier",
           "evaluate_lm", "evaluate_text", "owl_block_sparsities", "parse_pattern", "prune_mask_from_scores",
           "prune_model", "sparse_storage_bytes", "sparsegpt_prune", "text_model_cost", "wanda_scores",
           "StructuredExport", "StructuredResult", "StructuredSettings", "export_onnx_structured", "prune_structured",
           "save_structured"]
