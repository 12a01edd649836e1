"""The one-kernel sampler (`fused_sampling`): which batches take it, and its draws and log-probs against
float64 references (on CPU through the Triton interpreter, on a GPU at the real vocabulary size)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rl_sglang.embedded import fused_sampling
from rl_sglang.embedded.sampling import SamplingBatch, SamplingParams, fused_sampler_applies, sample

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(*params: SamplingParams) -> SamplingBatch:
    return SamplingBatch(list(params), torch.device("cpu"))


def test_the_fused_sampler_serves_cuda_batches_with_temperatures_only_and_leaves_truncation_to_pytorch():
    tempered, greedy = SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)
    assert fused_sampler_applies(CUDA, _batch(tempered, greedy))
    assert fused_sampler_applies(CUDA, _batch(greedy, SamplingParams(temperature=0.0, top_p=0.5)))  # greedy: top-p is moot
    assert not fused_sampler_applies(CUDA, _batch(tempered, SamplingParams(top_p=0.9)))
    assert not fused_sampler_applies(CUDA, _batch(tempered, SamplingParams(top_k=5)))
    assert not fused_sampler_applies(torch.device("cpu"), _batch(tempered))


def test_the_fused_kernel_in_the_triton_interpreter_reports_the_tempered_logprob_and_greedy_argmax(tmp_path):
    # A fresh interpreter (TRITON_INTERPRET is read when Triton's own kernels are built) that loads only
    # the module, not the engine package around it.
    script = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("fused_sampling", {fused_sampling.__file__!r})
fs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fs)
torch.manual_seed(0)
logits = torch.randn(8, 100) * 3  # two loop steps of 4 chunks of 16, the second one partial
temps = torch.tensor([1.0, 0.5, 1.0, 2.0] * 2)
sampled = torch.tensor([False, True, True, True] * 2)
tokens, logprobs = fs.fused_sample(logits, temps, sampled, torch.Generator().manual_seed(5), chunk=16)
again, _ = fs.fused_sample(logits, temps, sampled, torch.Generator().manual_seed(5), chunk=16)
greedy, greedy_logprobs = fs.fused_sample(logits, temps, None, torch.Generator(), chunk=16)
torch.save(dict(logits=logits, temps=temps, sampled=sampled, tokens=tokens, logprobs=logprobs, again=again,
                greedy=greedy, greedy_logprobs=greedy_logprobs), {str(tmp_path / "out.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    logits, tokens, greedy, sampled = got["logits"], got["tokens"], got["greedy"], got["sampled"]
    reference = torch.log_softmax(logits.double() / got["temps"][:, None].double(), dim=-1)
    assert torch.allclose(got["logprobs"].double(), reference.gather(1, tokens[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(got["greedy_logprobs"].double(), reference.gather(1, greedy[:, None])[:, 0], atol=1e-5)
    assert torch.equal(tokens, got["again"])  # the same generator state, the same draws
    assert torch.equal(tokens[~sampled], logits.argmax(-1)[~sampled])
    assert torch.equal(greedy, logits.argmax(-1))
    assert (tokens[sampled] != logits.argmax(-1)[sampled]).any()  # the tempered rows do draw
@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_fused_sampler_matches_log_softmax_argmax_and_the_tempered_distribution():
    from rl_sglang.embedded.fused_sampling import fused_sample

    torch.manual_seed(0)
    logits = (torch.randn(64, 151_936, device=CUDA) * 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=t) for t in (0.0, 0.6, 1.0, 1.7)] * 16
    batch = SamplingBatch(params, CUDA)
    tokens, logprobs = sample(logits, batch, torch.Generator(CUDA).manual_seed(1))
    reference = torch.log_softmax(logits.float() / batch.temperatures[:, None], dim=-1)
    assert (logprobs - reference.gather(1, tokens[:, None])[:, 0]).abs().max().item() < 1e-5
    greedy = ~batch.sampled
    assert torch.equal(tokens[greedy], logits.float().argmax(-1)[greedy])
    again, _ = sample(logits, batch, torch.Generator(CUDA).manual_seed(1))
    assert torch.equal(tokens, again)
    all_greedy = SamplingBatch([SamplingParams(temperature=0.0)] * 64, CUDA)
    assert torch.equal(sample(logits, all_greedy, torch.Generator(CUDA))[0], logits.float().argmax(-1))

    small = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9, -0.2], device=CUDA)
    draws = 200_000
    t = torch.full((draws,), 0.7, device=CUDA)
    drawn, _ = fused_sample(small.repeat(draws, 1), t, torch.ones(draws, dtype=torch.bool, device=CUDA), torch.Generator(CUDA).manual_seed(2))
    expected = torch.softmax(small.double() / 0.7, dim=-1) * draws
    counts = torch.bincount(drawn, minlength=6).double()
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 30.0  # 5 degrees of freedom: P(chi2 > 30) is about 1.5e-5


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_a_top_p_batch_takes_the_pytorch_path(monkeypatch):
    import rl_sglang.embedded.fused_sampling as fused

    def refuse(*args, **kwargs):
        raise AssertionError("the fused sampler cannot truncate")

    monkeypatch.setattr(fused, "fused_sample", refuse)
    logits = torch.tensor([[3.0, 2.9, -5.0, -6.0]], device=CUDA).repeat(256, 1)
    tokens, _ = sample(logits, SamplingBatch([SamplingParams(top_p=0.5)] * 256, CUDA), torch.Generator(CUDA).manual_seed(0))
    assert set(tokens.tolist()) == {0}  # top-p 0.5 keeps only the first token (p 0.52; the second has p 0.48)
    with pytest.raises(AssertionError, match="cannot truncate"):
        sample(logits, SamplingBatch([SamplingParams(temperature=1.0)] * 256, CUDA), torch.Generator(CUDA))
