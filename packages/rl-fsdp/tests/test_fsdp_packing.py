"""Token-budget micro-batches packed without padding, and chunked log-probs, against the padded,
unchunked path and against plain per-sample Hugging Face forwards."""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_core.algorithms.policy_loss import PolicyLossConfig
from rl_core.losses import PolicyLoss
from rl_core.micro_batches import make_micro_batch
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig
from rl_fsdp.log_probs import chunked_log_probs, model_inputs
from rl_fsdp.packed_attention import packed_samples, use_packed_attention

WORKER = Path(__file__).with_name("_fsdp_worker.py")
LINEAR_ADAM = dict(lr=0.5, adam_eps=1.0, param_dtype="float32")
# Entropy bonus and KL loss on, so every output the loss reads goes through the packed and chunked path.
LOSS = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)


def equal_length_runs(batch: TrainBatch) -> TrainBatch:
    """`batch` with its samples 1-3 cut to sample 1's length: runs of one length (batched into one SDPA
    call) beside lengths that differ."""
    length = len(batch.tokens[1])
    tokens = [t if i not in (2, 3) else (t * length)[:length] for i, t in enumerate(batch.tokens)]
    responses = [min(r, len(t) - 1) for r, t in zip(batch.response_lengths, tokens)]
    return TrainBatch(tokens=tokens, response_lengths=responses, loss_masks=[m[:r] for m, r in zip(batch.loss_masks, responses)],
                      advantages=[a[:r] for a, r in zip(batch.advantages, responses)])


@pytest.mark.parametrize("runs", [False, True])
def test_packed_forward_in_float64_equals_each_sample_run_alone(tied_dir, make_batch, runs):
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float64)
    use_packed_attention(model)
    batch = make_batch(5, seed=5)
    batch = equal_length_runs(batch) if runs else batch
    mb = make_micro_batch(batch, list(range(5)), torch.device("cpu"), pack=True)
    assert mb.input_ids.shape == (1, sum(len(t) for t in batch.tokens))
    with packed_samples(mb):
        packed = model(**model_inputs(mb)).logits[0]
    start = 0
    for tokens in batch.tokens:
        alone = model(input_ids=torch.tensor([tokens])).logits[0]
        torch.testing.assert_close(packed[start : start + len(tokens)], alone, atol=1e-12, rtol=0)
        start += len(tokens)


def test_a_forward_of_another_micro_batch_inside_an_open_packed_layout_is_refused(tied_dir, make_batch):
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float64)
    use_packed_attention(model)
    batch = make_batch(3, seed=2)
    mb = make_micro_batch(batch, [0, 1, 2], torch.device("cpu"), pack=True)
    other = make_micro_batch(batch, [0, 1], torch.device("cpu"), pack=True)
    with packed_samples(mb), pytest.raises(RuntimeError, match="open packed layout"):
        model(**model_inputs(other))


def test_chunked_log_probs_entropy_and_gradients_equal_the_unchunked_ones():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).double()
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 50, (11,))
    weights = torch.randn(11, dtype=torch.float64)
    results = []
    for chunk_size in (-1, 4):
        head.zero_grad()
        hidden.grad = None
        log_probs, entropy = chunked_log_probs(head, hidden, tokens, 0.7, with_entropy=True, entropy_grad=True, chunk_size=chunk_size)
        ((log_probs * weights).sum() + entropy.sum()).backward()
        results.append((log_probs.detach(), entropy.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    plain = torch.log_softmax(head(hidden.detach()) / 0.7, dim=-1)
    torch.testing.assert_close(results[0][0], plain.gather(-1, tokens[:, None])[:, 0], atol=1e-12, rtol=0)
    for unchunked, chunked in zip(*results):
        torch.testing.assert_close(chunked, unchunked, atol=1e-12, rtol=0)


def one_step(model_dir, batch, loss, **overrides):
    backend = FSDPBackend(FSDPConfig(model_path=model_dir, ref_model=True, **(LINEAR_ADAM | overrides)))
    try:
        log_probs = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss(loss))
        weights = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    return log_probs, metrics, weights


@pytest.mark.parametrize("aggregation", ["token_mean", "sample_mean"])
def test_packed_chunked_balanced_step_equals_the_padded_one(tied_dir, make_batch, aggregation):
    batch = make_batch(6, seed=11)
    loss = dataclasses.replace(LOSS, aggregation=aggregation)
    padded = one_step(tied_dir, batch, loss, micro_batch_size=2)
    # A 20-token budget packs the 6 samples (6-12 tokens) into several micro-batches of 1-3 samples; the
    # backward pass recomputes each layer's packed attention.
    packed = one_step(tied_dir, batch, loss, use_dynamic_batch_size=True, max_tokens_per_gpu=20,
                      log_probs_max_tokens_per_gpu=30, balance_data=True, log_probs_chunk_size=3,
                      gradient_checkpointing=True)
    for want, got in zip(padded[0], packed[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for key in ("loss", "pg_loss", "entropy", "kl_loss", "grad_norm"):
        assert packed[1][key] == pytest.approx(padded[1][key], rel=1e-5, abs=1e-7), key
    for name, want in padded[2].items():
        torch.testing.assert_close(packed[2][name], want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_ranks_packed_and_balanced_give_the_one_rank_padded_update(run_two_ranks, tied_dir, make_batch):
    batch = make_batch(5, seed=7, rollout_log_probs=True)
    config = dict(model_path=str(tied_dir), ref_model=True, **LINEAR_ADAM)
    packed = config | dict(use_dynamic_batch_size=True, max_tokens_per_gpu=16, balance_data=True, log_probs_chunk_size=4)
    result, weights = run_two_ranks(WORKER, packed | {"loss": dataclasses.asdict(LOSS), "use_rollout_logprobs": True}, batch)
    backend = FSDPBackend(FSDPConfig(**config, micro_batch_size=2))
    try:
        log_probs = backend.forward(batch)
        metrics = backend.train_step(batch, PolicyLoss(LOSS, use_rollout_logprobs=True))
        expected = {name: t.cpu().clone() for name, t in backend.weights()}
    finally:
        backend.close()
    for got, want in zip(result["log_probs"], log_probs):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)
    for key in ("loss", "pg_loss", "entropy", "kl_loss", "grad_norm", "train_rollout_logprob_abs_diff"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
    for name, want in expected.items():
        torch.testing.assert_close(weights[name], want, atol=1e-5, rtol=0)
