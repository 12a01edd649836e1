"""The Megatron backend on one CUDA GPU in bf16: compiled decoder layers and log-prob parts agree with the
eager ones (forward, one train step with an entropy bonus, the forward after it), chunked log-probs with
unchunked ones, and the train-step bench runs every phase at a tiny size. In this process, one backend
after another (each owns and closes its one-rank NCCL group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.train_batch import TrainBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BENCH = Path(__file__).resolve().parents[3] / "bench" / "train" / "bench_megatron.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny tied Qwen3 as config.json only: the backend random-inits it from its seed."""
    directory = tmp_path_factory.mktemp("qwen3")
    Qwen3Config(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, tie_word_embeddings=True).save_pretrained(directory)
    return directory


def _batch() -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = [(12, 20), (8, 30), (16, 9), (5, 27), (10, 14), (20, 22)]  # (prompt, response)
    tokens = [torch.randint(0, 1000, (p + r,), generator=gen).tolist() for p, r in lengths]
    advantages = torch.randn(len(lengths), generator=gen).tolist()
    return TrainBatch(tokens=tokens, response_lengths=[r for _, r in lengths], loss_masks=[[1] * r for _, r in lengths],
                      advantages=[[a] * r for a, (_, r) in zip(advantages, lengths)])


def _forward_step_forward(model_dir: Path, device: str = "cuda", **flags) -> tuple[list[torch.Tensor], dict[str, float], list[torch.Tensor]]:
    from rl_megatron import MegatronConfig, build_backend

    dtype = "bfloat16" if device == "cuda" else "float32"
    backend = build_backend(MegatronConfig(model_path=model_dir, device=device, param_dtype=dtype, optimizer="sgd", lr=0.3,
                                           micro_batch_size=2, **flags))
    try:
        batch = _batch()
        before = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss(PolicyLossConfig(entropy_coef=0.01)))
        after = backend.forward(batch)
    finally:
        backend.close()
    return before, metrics, after


@pytest.fixture(scope="module")
def eager(model_dir):
    return _forward_step_forward(model_dir, torch_compile=False)


@pytest.mark.parametrize("flags", [dict(torch_compile=True), dict(log_probs_chunk_size=7), dict(torch_compile=True, recompute_granularity="full")])
def test_compiled_and_chunked_log_probs_and_step_agree_with_the_eager_unchunked_ones(model_dir, eager, flags):
    other = _forward_step_forward(model_dir, **{"torch_compile": False, **flags})
    for want, got in zip(eager[0] + eager[2], other[0] + other[2], strict=True):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    moved = max(float((a - b).abs().max()) for a, b in zip(eager[0], eager[2]))
    assert moved > 0.05, "the step must move the log-probs beyond the tolerance, else 'after' checks nothing"
    for key in ("loss", "entropy", "grad_norm"):
        assert other[1][key] == pytest.approx(eager[1][key], rel=0.05, abs=1e-3), key


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this install")
def test_the_train_step_bench_runs_every_phase_at_a_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "1", "--out", str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    for phase in ("hf_baseline", "megatron_mbs8", "megatron_mbs4", "megatron_mbs8_chunked", "megatron_mbs8_eager"):
        assert result[phase]["tokens_per_s"] > 0 and result[phase]["peak_gib"] > 0, phase
