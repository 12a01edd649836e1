"""rl-train's micro-batching and recomputation flags as the backend configs receive them."""

from __future__ import annotations

import pytest


def test_with_no_micro_batch_flag_fsdp_trains_on_token_budget_micro_batches(config):
    policy = config().backend_config("policy")
    assert policy.use_dynamic_batch_size and policy.max_tokens_per_gpu == 16384
    assert policy.log_probs_max_tokens_per_gpu == 16384
    fixed = config(micro_batch_size=4, advantage_estimator="ppo").backend_config("critic")
    assert not fixed.use_dynamic_batch_size and fixed.micro_batch_size == 4
    tuned = config(max_tokens_per_gpu=4096, balance_data=True, log_probs_chunk_size=1024).backend_config("policy")
    assert (tuned.max_tokens_per_gpu, tuned.log_probs_max_tokens_per_gpu, tuned.balance_data, tuned.log_probs_chunk_size) == (
        4096, 4096, True, 1024)


def test_contradicting_micro_batch_flags_are_refused_in_flag_names_before_anything_starts(config):
    with pytest.raises(ValueError, match="--micro-batch-size and --use-dynamic-batch-size are both set"):
        config(micro_batch_size=2, use_dynamic_batch_size=True)
    with pytest.raises(ValueError, match="--max-tokens-per-gpu set but --use-dynamic-batch-size is off"):
        config(micro_batch_size=2, max_tokens_per_gpu=100)


def test_recompute_granularity_full_is_activation_checkpointing_on_fsdp_and_selective_is_refused(config):
    assert config(recompute_granularity="full").backend_config("policy").gradient_checkpointing
    assert not config().backend_config("policy").gradient_checkpointing
    with pytest.raises(ValueError, match="selective recomputation of core attention is megatron's"):
        config(recompute_granularity="selective")
    with pytest.raises(ValueError, match="--recompute-method: megatron-core flag"):
        config(recompute_granularity="full", recompute_method="uniform")


def test_megatron_refuses_dynamic_batch_size_saying_why_and_keeps_its_micro_batch_size(config):
    with pytest.raises(ValueError, match="padded to one shape for the pipeline schedule"):
        config(train_backend="megatron", use_dynamic_batch_size=True).backend_config("policy")
    policy = config(train_backend="megatron", micro_batch_size=2).backend_config("policy")
    assert not policy.use_dynamic_batch_size and policy.micro_batch_size == 2
