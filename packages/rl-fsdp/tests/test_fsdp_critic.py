import dataclasses
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from rl_core.losses import ValueLoss
from rl_core.train_batch import TrainBatch
from rl_fsdp import FSDPBackend, FSDPConfig

WORKER = Path(__file__).with_name("_fsdp_critic_worker.py")
# Adam's first step is g / (|g| + eps) with a large eps: proportional to the gradient, so a mis-scaled
# gradient (wrong denominator, averaging over ranks instead of summing) shows in the weights.
LINEAR_ADAM = dict(lr=0.5, adam_eps=1.0, param_dtype="float32")


def with_targets(batch: TrainBatch, seed: int) -> TrainBatch:
    """The batch with random returns and rollout-time values a little off the critic's (so clipping bites)."""
    rng = random.Random(seed)
    returns = [[rng.uniform(-1.0, 1.0) for _ in range(n)] for n in batch.response_lengths]
    values = [[rng.uniform(-0.3, 0.3) for _ in range(n)] for n in batch.response_lengths]
    return dataclasses.replace(batch, returns=returns, values=values)


def make_critic(value_clip: float = 0.2, aggregation: str = "token_mean", **config) -> tuple[FSDPBackend, ValueLoss]:
    """A value-head backend and the value loss it trains on."""
    return FSDPBackend(FSDPConfig(head="value", **config)), ValueLoss(value_clip=value_clip, aggregation=aggregation)


def weights_of(critic: FSDPBackend) -> dict[str, torch.Tensor]:
    return {name: t.cpu().clone() for name, t in critic.weights()}


def test_values_cover_each_response_token_and_match_a_plain_forward_of_the_same_weights(llama_dir, make_batch):
    batch = with_targets(make_batch(5, seed=1), seed=1)
    critic, loss = make_critic(model_path=llama_dir, param_dtype="float32", micro_batch_size=2, lr=1e-2)
    try:
        initial = critic.forward(batch)
        critic.train_step(batch, loss)  # the head starts at zero, so this step moves only the head
        got = critic.forward(batch)
        head = {n: t for n, t in weights_of(critic).items() if n.startswith("value_head.")}
    finally:
        critic.close()
    assert [v.shape for v in initial] == [torch.Size([n]) for n in batch.response_lengths]
    assert all(v.dtype == torch.float32 and not v.any() for v in initial)
    body = AutoModel.from_pretrained(llama_dir, dtype=torch.float64).eval()
    weight, bias = head["value_head.weight"].double(), head["value_head.bias"].double()
    assert weight.abs().max() > 1e-4
    with torch.no_grad():
        for tokens, n, g in zip(batch.tokens, batch.response_lengths, got):
            hidden = body(torch.tensor([tokens])).last_hidden_state[0]
            # Token t's value is the state before it: the position whose logits predict it.
            expected = (hidden[-n - 1 : -1] @ weight.T + bias)[:, 0]
            torch.testing.assert_close(g.double(), expected, atol=1e-5, rtol=1e-5)


def test_value_loss_falls_towards_the_returns_over_a_few_steps(llama_dir, make_batch):
    batch = with_targets(make_batch(4, seed=2), seed=2)
    critic, loss = make_critic(model_path=llama_dir, param_dtype="float32", micro_batch_size=2, lr=1e-2)
    losses = []
    try:
        for _ in range(8):
            old = critic.forward(batch)  # as PPO does: values at "rollout time" are the old values
            step = dataclasses.replace(batch, values=[v.tolist() for v in old])
            metrics = critic.train_step(step, loss)
            losses.append(metrics["value_loss"])
            assert 0.0 <= metrics["value_clipfrac"] <= 1.0 and metrics["grad_norm"] > 0
    finally:
        critic.close()
    # With old = current values the clip never bites at evaluation: the loss is the masked MSE.
    mask = [torch.tensor(m, dtype=torch.float32) for m in batch.loss_masks]
    mse = sum(((torch.tensor(r) ** 2) * m).sum() for r, m in zip(batch.returns, mask)) / sum(m.sum() for m in mask)
    assert losses[0] == pytest.approx(float(mse), rel=1e-5)  # zero head: every value is 0
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("aggregation", ["token_mean", "sample_mean"])
def test_micro_batch_size_one_and_packed_token_budget_micro_batches_give_the_same_update(llama_dir, make_batch, aggregation):
    batch = with_targets(make_batch(6, seed=3), seed=3)
    results = []
    for batching in (dict(micro_batch_size=1), dict(max_tokens_per_gpu=20, balance_data=True)):
        critic, loss = make_critic(model_path=llama_dir, value_clip=0.1, aggregation=aggregation, **batching, **LINEAR_ADAM)
        try:
            before = weights_of(critic)
            # Two steps: the first moves only the zero-initialised head, the second the body too.
            metrics = [critic.train_step(batch, loss) for _ in range(2)]
            results.append((before, weights_of(critic), metrics, critic.forward(batch)))
        finally:
            critic.close()
    (before, small, small_metrics, small_values), (_, large, large_metrics, large_values) = results
    for s, big in zip(small_values, large_values):
        torch.testing.assert_close(s, big, atol=1e-5, rtol=0)
    assert max((small[n] - before[n]).abs().max().item() for n in before if not n.startswith("value_head")) > 1e-3
    for name in small:
        torch.testing.assert_close(small[name], large[name], atol=1e-5, rtol=0)
    for s, big in zip(small_metrics, large_metrics):
        for key in ("value_loss", "value_clipfrac", "grad_norm"):
            assert s[key] == pytest.approx(big[key], rel=1e-5, abs=1e-7), key
    assert 0.0 < small_metrics[1]["value_clipfrac"] < 1.0


def test_a_batch_without_returns_is_refused_naming_the_field(llama_dir, make_batch):
    critic, loss = make_critic(model_path=llama_dir, param_dtype="float32")
    try:
        with pytest.raises(ValueError, match="ValueLoss needs old_values, returns"):
            critic.train_step(make_batch(2), loss)
    finally:
        critic.close()


@pytest.mark.slow
def test_two_ranks_give_the_same_critic_update_as_one(run_two_ranks, tied_dir, make_batch):
    config = dict(model_path=str(tied_dir), micro_batch_size=2, value_clip=0.1, **LINEAR_ADAM)
    batch = with_targets(make_batch(5, seed=4), seed=4)  # 5 samples: one rank runs a filler micro-batch
    result, weights = run_two_ranks(WORKER, config, batch)

    critic, loss = make_critic(**config)
    try:
        metrics = [critic.train_step(batch, loss) for _ in range(2)]
        values = critic.forward(batch)
        expected = weights_of(critic)
    finally:
        critic.close()
    assert sorted(weights) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-5, rtol=0)
    for got, want in zip(result["values"], values):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)
    for got, want in zip(result["metrics"], metrics):
        for key in ("value_loss", "value_clipfrac", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
