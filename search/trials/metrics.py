"""The names of the metrics trials report, declared once.

The trial kinds (:mod:`search.trials.kinds`) say which of these each kind reports, the trials
write them under these names, the pre-flight checks objectives against them, and the
dashboard labels its axes with them. Standard library only: the driver, the dashboard and the
workers all import it.

Conventions (see DESIGN.md): accuracies are fractions in [0, 1]; losses are nats (per token for
text); FLOPs are per sample, forward pass, 1 multiply-add = 2 FLOPs; byte counts are bytes;
``*_s`` are wall seconds; ``latency_ms`` is the median wall milliseconds of one forward pass
over ``trial.latency_batch_size`` samples.

The cost figures (``flops_dense``, ``flops_effective``, ``flops_physical``, ``flops_deployed``,
``params_*``) are the fields of :class:`prunelib.flops.ModelCost` (:func:`cost_metrics`);
a method adds metrics of its own with ``reported_metrics`` on its class
(:class:`prunelib.methods.base.PruningMethod`).
"""

from __future__ import annotations

__all__ = ["COST_PREFIXES", "FLOPS_DEPLOYED", "KEN_FILE_METRICS", "KEN_METRICS", "LATENCY_MS", "LLM_METRICS",
           "SPARSITY", "STRUCTURED_METRICS", "TEST_ACC", "TEST_PPL", "TEXT_OBJECTIVES", "TIMING_METRICS", "VAL_ACC",
           "VAL_FGSM_ACC", "VAL_LOSS", "VAL_PPL", "WORK_METRICS", "cost_metrics", "split_scores"]

VAL_ACC = "val_acc"
VAL_LOSS = "val_loss"
VAL_PPL = "val_ppl"
TEST_ACC = "test_acc"
TEST_PPL = "test_ppl"
#: Fraction of zeroed entries among the Conv and Linear weights.
SPARSITY = "sparsity"
#: Median milliseconds of one forward pass (measured when an objective or ``trial.measure_latency`` asks).
LATENCY_MS = "latency_ms"
#: Accuracy under an FGSM attack of ``trial.fgsm_epsilon`` (only with that setting).
VAL_FGSM_ACC = "val_fgsm_acc"
#: The FLOPs of the artifact a trial keeps (the default FLOPs objective).
FLOPS_DEPLOYED = "flops_deployed"
#: Prefixes of the cost figures (:class:`prunelib.flops.ModelCost`): counts, shown as such.
COST_PREFIXES = ("flops_", "params_")

#: The work every trial reports: sparsity, epochs trained, wall seconds and the method's extra passes.
WORK_METRICS = ("sparsity", "epochs", "wall_s", "extra_forward_passes", "extra_backward_passes", "extra_params")
#: Seconds of the whole trial and of loading its data.
TIMING_METRICS = ("trial_wall_s", "data_load_s")
#: The compact KEN delta file (:func:`prunelib.ken_storage.save_ken_delta`): bytes and counts.
KEN_FILE_METRICS = ("ken_file_bytes", "finetuned_bytes", "ken_file_ratio", "ken_kept_values", "ken_whole_tensors")
#: A KEN trial: the two baselines of the pair, what was reverted, selection seconds, the pair's epochs.
KEN_METRICS = ("finetuned_val_acc", "pretrained_val_acc", "reverted_fraction", "reverted_fraction_selected",
               "kept_finetuned_params", "select_s", "pair_epochs") + KEN_FILE_METRICS
#: A one-shot LLM trial: the dense model's scores, block sparsity, sparse storage, pruning seconds.
LLM_METRICS = ("dense_val_loss", "dense_val_acc", "dense_val_ppl", "block_sparsity", "sparse_bytes", "dense_bytes",
               "prune_s", "calibration_tokens")
#: A structured text trial (a physically smaller model): its distillation's steps and seconds.
STRUCTURED_METRICS = ("distill_steps", "distill_s")
#: Objectives only text trials report (``val_acc``/``val_loss`` and the FLOPs are shared).
TEXT_OBJECTIVES = (VAL_PPL, TEST_PPL, "sparse_bytes", "block_sparsity")


def split_scores(splits: tuple[str, ...], scores: tuple[str, ...]) -> set[str]:
    """``{split}_{score}`` for every split and score (``val_acc``, ``test_ppl``...)."""
    return {f"{split}_{score}" for split in splits for score in scores}


def cost_metrics() -> set[str]:
    """The cost figures every trial reports: the fields of :class:`prunelib.flops.ModelCost`."""
    import dataclasses

    from prunelib.flops import ModelCost  # torch: imported when asked, not by the dashboard

    return {f.name for f in dataclasses.fields(ModelCost)}
