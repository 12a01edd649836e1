"""The engine's batched sampler against the distributions it claims to draw from (float64 references)."""

from __future__ import annotations

import torch

from rl_sglang.embedded.sampling import SamplingBatch, SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.5, 0.3, -1.0, 0.9, -0.2])
DRAWS = 40000


def _draw(params: SamplingParams, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    logits = LOGITS.repeat(DRAWS, 1)
    return sample(logits, SamplingBatch([params] * DRAWS, logits.device), torch.Generator().manual_seed(seed))


def _frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=len(LOGITS)).double() / len(tokens)


def test_sampling_at_a_temperature_draws_from_the_tempered_softmax_and_reports_its_logprob():
    tokens, logprobs = _draw(SamplingParams(temperature=0.7))
    expected = torch.softmax(LOGITS.double() / 0.7, dim=-1)
    assert (_frequencies(tokens) - expected).abs().max() < 0.01  # ~4 standard errors at 40k draws
    assert torch.allclose(logprobs.double(), expected.log()[tokens], atol=1e-6)


def test_top_k_and_top_p_draw_only_from_the_kept_tokens_renormalised():
    probs = torch.softmax(LOGITS.double(), dim=-1)
    order = probs.argsort(descending=True)
    tokens, logprobs = _draw(SamplingParams(top_k=3))
    kept = torch.zeros_like(probs)
    kept[order[:3]] = probs[order[:3]]
    assert (_frequencies(tokens) - kept / kept.sum()).abs().max() < 0.01
    assert torch.allclose(logprobs.double(), probs.log()[tokens], atol=1e-6)  # before truncation, as SGLang returns it
    tokens, _ = _draw(SamplingParams(top_p=0.6))
    mass_before = probs[order].cumsum(0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[mass_before < 0.6]] = probs[order[mass_before < 0.6]]
    assert (_frequencies(tokens) - kept / kept.sum()).abs().max() < 0.01


def test_greedy_rows_take_the_argmax_with_the_temperature_one_logprob_beside_sampled_rows():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=1)]
    tokens, logprobs = sample(logits, SamplingBatch(params, logits.device), torch.Generator().manual_seed(0))
    assert tokens.tolist() == [0, len(LOGITS) - 1]
    assert abs(logprobs[0].item() - torch.log_softmax(LOGITS.double(), -1)[0].item()) < 1e-6
    assert abs(logprobs[1].item() - torch.log_softmax(LOGITS.flip(0).double() / 0.5, -1)[-1].item()) < 1e-6
