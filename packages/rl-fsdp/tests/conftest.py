"""Tiny Hugging Face models on disk and random TrainBatches for the FSDP backend tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from rl_core.train_batch import TrainBatch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 64


def tiny_config(tied: bool):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    if tied:
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def save_tiny_model(directory: Path, tied: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(tied)).save_pretrained(directory)
    return directory


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "llama", tied=False)


@pytest.fixture
def tied_dir(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "qwen2_tied", tied=True)


def random_batch(n: int, seed: int = 0, rollout_log_probs: bool = False) -> TrainBatch:
    """Samples of mixed prompt/response lengths, some masked tokens, one advantage per sample."""
    rng = random.Random(seed)
    tokens, lengths, masks, advantages, rollout = [], [], [], [], []
    for _ in range(n):
        prompt, response = rng.randint(2, 6), rng.randint(2, 6)
        tokens.append([rng.randrange(VOCAB) for _ in range(prompt + response)])
        lengths.append(response)
        masks.append([0 if rng.random() < 0.2 else 1 for _ in range(response)])
        advantages.append([rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5)] * response)
        rollout.append([-rng.uniform(5.5, 7.0) for _ in range(response)])
    return TrainBatch(
        tokens=tokens,
        response_lengths=lengths,
        loss_masks=masks,
        advantages=advantages,
        rollout_log_probs=rollout if rollout_log_probs else None,
    )


@pytest.fixture
def make_batch():
    return random_batch
