"""The FSDP backend on CUDA in bf16: packed token-budget micro-batches agree with padded ones, compiled
layers and log-probs with eager ones, each packed-attention kernel with a float32 per-sample reference,
and the train-step bench runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_fsdp import FSDPBackend, FSDPConfig, packed_attention
from rl_fsdp.packed_attention import PackedLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BENCH = Path(__file__).resolve().parents[3] / "bench" / "train" / "bench_fsdp.py"


def test_packed_bf16_log_probs_and_step_agree_with_padded_ones_on_cuda(tied_dir, make_batch):
    batch = make_batch(6, seed=3)
    results = []
    for flags in (dict(micro_batch_size=3), dict(max_tokens_per_gpu=24, log_probs_chunk_size=5, gradient_checkpointing=True)):
        backend = FSDPBackend(FSDPConfig(model_path=tied_dir, device="cuda", param_dtype="bfloat16", lr=1e-3, **flags))
        try:
            log_probs = backend.forward(batch)
            metrics = backend.train_step(batch, PolicyLoss(PolicyLossConfig(entropy_coef=0.01)))
        finally:
            backend.close()
        results.append((log_probs, metrics))
    (padded, padded_metrics), (packed, packed_metrics) = results
    for want, got in zip(padded, packed):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    for key in ("loss", "entropy", "grad_norm"):
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], rel=0.05, abs=1e-3), key


def step_and_log_probs(model_dir, batch, **flags):
    # SGD: an update proportional to the gradient, so bf16 rounding differences stay small after the step
    # (Adam's first step is about lr * sign(gradient), which flips wherever a gradient is near zero).
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, device="cuda", param_dtype="bfloat16", optimizer="sgd",
                                     lr=0.5, **flags))
    try:
        log_probs = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss(PolicyLossConfig(entropy_coef=0.01)))
        after = backend.forward(batch)
    finally:
        backend.close()
    return log_probs, metrics, after


@pytest.mark.parametrize("flags", [dict(max_tokens_per_gpu=24), dict(micro_batch_size=2, gradient_checkpointing=True)])
def test_compiled_layers_and_log_probs_agree_with_eager_ones(tied_dir, make_batch, flags):
    batch = make_batch(6, seed=4)
    eager = step_and_log_probs(tied_dir, batch, torch_compile=False, **flags)
    compiled = step_and_log_probs(tied_dir, batch, torch_compile=True, **flags)
    for want, got in zip(eager[0] + eager[2], compiled[0] + compiled[2]):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    for key in ("loss", "entropy", "grad_norm"):
        assert compiled[1][key] == pytest.approx(eager[1][key], rel=0.05, abs=1e-3), key


@pytest.mark.parametrize("lengths", [[37, 37, 37, 37], [37, 37, 80, 5, 64], [96, 13]])
def test_packed_attention_kernels_equal_a_float32_per_sample_reference(lengths):
    torch.manual_seed(0)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    layout = PackedLayout(tuple(bounds), torch.tensor(bounds, dtype=torch.int32, device="cuda"), max(lengths))
    q, k, v = (torch.randn(h, bounds[-1], 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    got = packed_attention._attend(q, k, v, layout, 0.0, None)
    want = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[None, :, s:e].float(), k[None, :, s:e].float(), v[None, :, s:e].float(), is_causal=True, enable_gqa=True
        )[0].transpose(0, 1)
        for s, e in zip(bounds, bounds[1:])
    ])
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this install")
def test_the_train_step_bench_runs_every_phase_at_a_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "1", "--out", str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    for phase in ("hf_baseline", "fsdp_default", "fsdp_eager", "fsdp_chunked", "fsdp_recompute", "fsdp_varied", "fsdp_mbs8",
                  "fsdp_mbs1"):
        assert result[phase]["tokens_per_s"] > 0 and result[phase]["peak_gib"] > 0, phase
