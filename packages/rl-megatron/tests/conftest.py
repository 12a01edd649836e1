"""Tiny Qwen2 (GQA, q/k/v bias, untied) and Llama (no bias, tied) models built locally, nothing downloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6)


def _randomized(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Every weight random (norm scales too), so a swapped or transposed tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture
def qwen2_model() -> PreTrainedModel:
    config = Qwen2Config(
        **_TINY, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False
    )
    return _randomized(Qwen2ForCausalLM._from_config(config, attn_implementation="eager"), seed=0)


@pytest.fixture
def llama_model() -> PreTrainedModel:
    config = LlamaConfig(
        **_TINY, num_attention_heads=4, num_key_value_heads=4, rope_theta=5e5, tie_word_embeddings=True
    )
    return _randomized(LlamaForCausalLM._from_config(config, attn_implementation="eager"), seed=1)
