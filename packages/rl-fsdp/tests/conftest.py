"""Tiny Hugging Face models on disk and random TrainBatches for the FSDP backend tests."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rl_core.train_batch import TrainBatch

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


TWO_RANK_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_two_ranks(tmp_path):
    """Runs `worker` as two gloo ranks on loopback over (config, batch); returns rank 0's result.json and weights."""

    def run(worker: Path, config: dict, batch: TrainBatch) -> tuple[dict, dict]:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"config": config, "batch": dataclasses.asdict(batch), "out": str(tmp_path)}))
        env = os.environ | {
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            "OMP_NUM_THREADS": "1",
        }
        procs = [
            subprocess.Popen([sys.executable, str(worker), str(spec)], env=env | {"RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
            for rank in range(2)
        ]
        try:
            errors = [p.communicate(timeout=TWO_RANK_TIMEOUT_S)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for rank, (p, err) in enumerate(zip(procs, errors)):
            assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{err[-3000:]}"
        return json.loads((tmp_path / "result.json").read_text()), load_file(tmp_path / "weights.safetensors")

    return run
