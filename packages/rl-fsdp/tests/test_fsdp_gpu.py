"""The FSDP backend on CUDA in bf16: packed token-budget micro-batches agree with padded ones, compiled
layers (with no graph break) and log-probs with eager ones, each packed-attention kernel and its gradients
with a float32 per-sample reference, and the train-step bench runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.micro_batches import make_micro_batch
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig
from rl_fsdp.packed_attention import packed_samples

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


@pytest.mark.parametrize("flags", [dict(max_tokens_per_gpu=24), dict(max_tokens_per_gpu=24, gradient_checkpointing=True),
                                   dict(micro_batch_size=2, gradient_checkpointing=True)])
def test_compiled_layers_and_log_probs_agree_with_eager_ones(tied_dir, make_batch, flags):
    batch = make_batch(6, seed=4)
    eager = step_and_log_probs(tied_dir, batch, torch_compile=False, **flags)
    counters.clear()
    compiled = step_and_log_probs(tied_dir, batch, torch_compile=True, **flags)
    # Packed attention is an op inside the compiled layers' graphs, not a break out of them.
    assert not counters["graph_break"], dict(counters["graph_break"])
    for want, got in zip(eager[0] + eager[2], compiled[0] + compiled[2]):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    for key in ("loss", "entropy", "grad_norm"):
        assert compiled[1][key] == pytest.approx(eager[1][key], rel=0.05, abs=1e-3), key


@pytest.mark.parametrize("lengths", [[37, 37, 37, 37], [37, 37, 80, 5, 64], [96, 13]])
def test_packed_attention_kernels_and_their_gradients_equal_a_float32_per_sample_reference(lengths):
    torch.manual_seed(0)
    tokens = sum(lengths)
    q, k, v = (torch.randn(1, h, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    weights = torch.randn(1, tokens, 8, 64, device="cuda")
    with packed_samples(packed_row(lengths, "cuda")):
        got = torch.ops.rl_fsdp.packed_attention(q, k, v, None, None)
        got_grads = torch.autograd.grad((got.float() * weights).sum(), (q, k, v))
    reference = [t.detach().float().requires_grad_() for t in (q, k, v)]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    want = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t[:, :, s:e] for t in reference), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        for s, e in zip(bounds, bounds[1:])
    ], dim=1)
    want_grads = torch.autograd.grad((want * weights).sum(), reference)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    for g, w in zip(got_grads, want_grads):  # within 2% of the largest gradient (bf16 has 8 significant bits)
        torch.testing.assert_close(g.float(), w, atol=0.02 * w.abs().max().item(), rtol=0)


def packed_row(lengths: list[int], device: str):
    """A packed micro-batch of samples of these lengths (what opens their layout)."""
    batch = TrainBatch(tokens=[[1] * n for n in lengths], response_lengths=[1] * len(lengths),
                       loss_masks=[[1]] * len(lengths), advantages=[[0.0]] * len(lengths))
    return make_micro_batch(batch, list(range(len(lengths))), torch.device(device), pack=True)


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this install")
def test_the_train_step_bench_runs_every_phase_at_a_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "1", "--out", str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    for phase in ("hf_baseline", "fsdp_default", "fsdp_eager", "fsdp_chunked", "fsdp_recompute", "fsdp_varied", "fsdp_mbs8",
                  "fsdp_mbs1"):
        assert result[phase]["tokens_per_s"] > 0 and result[phase]["peak_gib"] > 0, phase
