"""The RL step over the shipped fake backend, against updates computed by hand in float64."""

import random

import pytest
import torch

from rl_core.config import RLStepConfig
from rl_core.protocols import StepBackend, TrainingBackend
from rl_core.rl_step import rl_step
from rl_core.sample import Sample
from rl_core.testing import BigramBackend

VOCAB = 8


def scored_samples(groups: int, group_size: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        prompt = [rng.randrange(VOCAB) for _ in range(3)]
        for k in range(group_size):
            response = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            samples.append(
                Sample(
                    index=g * group_size + k, group_index=g, prompt="p", tokens=prompt + response,
                    response_length=len(response), loss_mask=[1] * len(response), reward=float(rng.randint(0, 3)),
                )
            )
    return samples


def reference_grpo_step(samples: list[Sample], group_size: int, lr: float) -> torch.Tensor:
    """One SGD step of -sum(A * log p) / tokens from the fake's initial table, in float64.

    At the first step the PPO ratio is 1, so the clipped surrogate's gradient is REINFORCE's.
    """
    table = BigramBackend(VOCAB).model.logits.detach().double().clone().requires_grad_(True)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, group_size)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    tokens = sum(s.response_length for s in samples)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, advantage in zip(samples, advantages):
        ids = torch.tensor(sample.tokens)
        n = sample.response_length
        log_probs = torch.log_softmax(table[ids[-n - 1 : -1]], dim=-1).gather(1, ids[-n:, None])
        loss = loss - advantage * log_probs.sum() / tokens
    loss.backward()
    return (table - lr * table.grad).detach()


def test_the_fake_backend_satisfies_the_backend_protocols():
    backend = BigramBackend(VOCAB)
    assert isinstance(backend, TrainingBackend) and isinstance(backend, StepBackend)


def test_one_grpo_step_equals_the_reinforce_update_computed_by_hand():
    samples = scored_samples(groups=3, group_size=4)
    config = RLStepConfig(rollout_batch_size=3, n_samples_per_prompt=4)
    policy = BigramBackend(VOCAB, optimizer="sgd")
    steps = rl_step(config, samples, policy)
    assert len(steps) == 1 and steps[0]["train/lr"] == pytest.approx(0.1)
    expected = reference_grpo_step(samples, 4, lr=0.1)
    torch.testing.assert_close(policy.model.logits.detach().double(), expected, atol=1e-5, rtol=1e-5)


def test_a_rollout_split_in_two_steps_takes_the_second_ratio_against_the_policy_before_the_first():
    samples = scored_samples(groups=2, group_size=4, seed=1)
    config = RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=4, num_steps_per_rollout=2)
    policy = BigramBackend(VOCAB)
    before = [lp.clone() for lp in policy.forward(rl_step_batch(samples))]
    steps = rl_step(config, samples, policy)
    assert len(steps) == 2
    # The second step's ppo_kl is the mean of log(pi_old / pi) over its tokens, pi_old from before step 1.
    after_first = BigramBackend(VOCAB)
    rl_step(RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=4), samples[:4], after_first)
    second = samples[4:]
    now = after_first.forward(rl_step_batch(second))
    kl = sum(float((b - n).sum()) for b, n in zip(before[4:], now)) / sum(s.response_length for s in second)
    assert steps[1]["train/ppo_kl"] == pytest.approx(kl, abs=1e-5)
    assert abs(kl) > 1e-4  # the first step moved the policy, so the ratio is no longer 1


def rl_step_batch(samples):
    from rl_core.train_batch import TrainBatch

    return TrainBatch.from_samples(samples, [[0.0] * s.response_length for s in samples])


def test_ppo_trains_the_critic_towards_the_returns_and_the_policy_from_its_values():
    samples = scored_samples(groups=2, group_size=2, seed=2)
    config = RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=2, advantage_estimator="ppo")
    policy, critic = BigramBackend(VOCAB), BigramBackend(VOCAB, head="value")
    losses = [rl_step(config, samples, policy, critic=critic)[0]["critic/value_loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    # Values start at 0, so with gamma = lambda = 1 the first returns are the rewards: the first value loss
    # is the token-mean squared reward.
    tokens = sum(s.response_length for s in samples)
    assert losses[0] == pytest.approx(sum(s.reward**2 * s.response_length for s in samples) / tokens, rel=1e-5)


def test_the_policy_sits_out_the_critic_only_rollouts():
    samples = scored_samples(groups=1, group_size=2)
    config = RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=2, advantage_estimator="ppo", num_critic_only_steps=1)
    policy, critic = BigramBackend(VOCAB), BigramBackend(VOCAB, head="value")
    initial = policy.model.logits.detach().clone()
    (metrics,) = rl_step(config, samples, policy, critic=critic, rollout_id=0)
    assert "train/loss" not in metrics and "critic/value_loss" in metrics
    assert torch.equal(policy.model.logits.detach(), initial)


def test_reward_kl_is_the_mean_token_kl_of_the_policy_before_the_step_from_its_reference():
    samples = scored_samples(groups=1, group_size=4, seed=3)
    config = RLStepConfig(
        rollout_batch_size=1, n_samples_per_prompt=4, advantage_estimator="reinforce_plus_plus",
        normalize_advantages=True, kl_coef=0.1, kl_loss_type="k1",
    )
    policy = BigramBackend(VOCAB, ref_model=True)
    first = rl_step(config, samples, policy)
    assert first[0]["train/reward_kl"] == pytest.approx(0.0, abs=1e-7)  # the policy still is its reference
    batch = rl_step_batch(samples)
    now, ref = policy.forward(batch), policy.forward(batch, "reference")
    expected = sum(float((a - b).sum()) for a, b in zip(now, ref)) / sum(s.response_length for s in samples)
    second = rl_step(config, samples, policy)
    assert second[0]["train/reward_kl"] == pytest.approx(expected, abs=1e-6) and abs(expected) > 1e-5


def test_an_empty_response_counts_in_its_group_but_is_not_trained_on():
    samples = scored_samples(groups=1, group_size=4, seed=4)
    aborted = samples[1]
    aborted.tokens, aborted.response_length, aborted.loss_mask, aborted.reward = aborted.tokens[:3], 0, [], 3.0
    config = RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=4)
    policy = BigramBackend(VOCAB, optimizer="sgd")
    (metrics,) = rl_step(config, samples, policy)
    assert metrics["rollout/untrained_samples"] == 1.0
    # The group's statistics include the aborted sample's reward 3; its own term is absent from the loss.
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    table = BigramBackend(VOCAB).model.logits.detach().double().clone().requires_grad_(True)
    tokens = sum(s.response_length for s in samples)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, advantage in zip(samples, advantages):
        if sample.response_length:
            ids, n = torch.tensor(sample.tokens), sample.response_length
            loss = loss - advantage * torch.log_softmax(table[ids[-n - 1 : -1]], -1).gather(1, ids[-n:, None]).sum() / tokens
    loss.backward()
    torch.testing.assert_close(policy.model.logits.detach().double(), (table - 0.1 * table.grad).detach(), atol=1e-5, rtol=1e-5)


def test_offloaded_fake_refuses_work_until_onloaded():
    policy = BigramBackend(VOCAB)
    samples = scored_samples(groups=1, group_size=2)
    before = policy.forward(rl_step_batch(samples))
    policy.offload()
    with pytest.raises(RuntimeError, match="onload"):
        policy.forward(rl_step_batch(samples))
    policy.onload()
    for a, b in zip(before, policy.forward(rl_step_batch(samples))):
        assert torch.equal(a, b)


def test_tool_tokens_of_a_multi_turn_sample_take_no_part_in_the_update():
    samples = scored_samples(groups=1, group_size=2, seed=5)
    for sample in samples:
        sample.append_response_tokens(tokens=[3, 4], trainable=False)  # a tool's answer, then one more policy token
        sample.append_response_tokens(tokens=[5], log_probs=[-1.0])
    config = RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=2)
    policy = BigramBackend(VOCAB, optimizer="sgd")
    rl_step(config, samples, policy)
    # Reference: REINFORCE over the loss-mask tokens only; the tool's tokens still sit in the context.
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    table = BigramBackend(VOCAB).model.logits.detach().double().clone().requires_grad_(True)
    tokens = sum(sum(s.loss_mask) for s in samples)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, advantage in zip(samples, advantages):
        ids, n = torch.tensor(sample.tokens), sample.response_length
        picked = torch.log_softmax(table[ids[-n - 1 : -1]], -1).gather(1, ids[-n:, None])[:, 0]
        loss = loss - advantage * (picked * torch.tensor(sample.loss_mask, dtype=torch.float64)).sum() / tokens
    loss.backward()
    torch.testing.assert_close(policy.model.logits.detach().double(), (table - 0.1 * table.grad).detach(), atol=1e-5, rtol=1e-5)


def test_removed_samples_count_in_their_group_and_post_processed_rewards_replace_the_normalisation():
    samples = scored_samples(groups=1, group_size=4, seed=6)
    samples[2].remove_sample = True
    custom = [0.5, -0.25, 3.0, -0.25]  # what a --custom-reward-post-process-path function returned
    config = RLStepConfig(rollout_batch_size=1, n_samples_per_prompt=4)
    policy = BigramBackend(VOCAB, optimizer="sgd")
    (metrics,) = rl_step(config, samples, policy, normalized_rewards=custom)
    assert metrics["rollout/untrained_samples"] == 1.0
    table = BigramBackend(VOCAB).model.logits.detach().double().clone().requires_grad_(True)
    kept = [(s, a) for s, a in zip(samples, custom) if not s.remove_sample]
    tokens = sum(s.response_length for s, _ in kept)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, advantage in kept:  # the advantages are the post-processed rewards as given
        ids, n = torch.tensor(sample.tokens), sample.response_length
        loss = loss - advantage * torch.log_softmax(table[ids[-n - 1 : -1]], -1).gather(1, ids[-n:, None]).sum() / tokens
    loss.backward()
    torch.testing.assert_close(policy.model.logits.detach().double(), (table - 0.1 * table.grad).detach(), atol=1e-5, rtol=1e-5)


def test_sft_loss_steps_equal_the_negative_log_likelihood_update_computed_by_hand():
    samples = scored_samples(groups=2, group_size=2, seed=5)
    samples[0].loss_mask = [0] + [1] * (samples[0].response_length - 1)  # a masked token takes no gradient
    for sample in samples:
        sample.reward = None  # SFT data has no reward; the step must not read it
    config = RLStepConfig(rollout_batch_size=2, n_samples_per_prompt=2, loss_type="sft_loss")
    policy = BigramBackend(VOCAB, optimizer="sgd")
    (metrics,) = rl_step(config, samples, policy)

    table = BigramBackend(VOCAB).model.logits.detach().double().clone().requires_grad_(True)
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    for sample in samples:
        ids, n = torch.tensor(sample.tokens), sample.response_length
        mask = torch.tensor(sample.effective_loss_mask(), dtype=torch.float64)
        log_probs = torch.log_softmax(table[ids[-n - 1 : -1]], dim=-1).gather(1, ids[-n:, None])[:, 0]
        total, tokens = total - (mask * log_probs).sum(), tokens + int(mask.sum())
    (total / tokens).backward()
    assert metrics["train/sft_loss"] == pytest.approx(float(total.detach() / tokens), rel=1e-5)
    torch.testing.assert_close(policy.model.logits.detach().double(), (table - 0.1 * table.grad).detach(), atol=1e-6, rtol=1e-5)


def test_sft_loss_refuses_flags_of_the_policy_loss_it_does_not_compute():
    with pytest.raises(ValueError, match="--use-kl-loss, --kl-loss-coef: shape advantages or the policy loss"):
        RLStepConfig(loss_type="sft_loss", use_kl_loss=True, kl_loss_coef=0.1)
    with pytest.raises(ValueError, match="--advantage-estimator"):
        RLStepConfig(loss_type="sft_loss", advantage_estimator="ppo")
