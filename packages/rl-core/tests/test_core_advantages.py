import math
import random

import pytest
import torch

from rl_core.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageInputs,
    compute_advantages,
    estimate_advantages,
)
from rl_core.algorithms.returns import generalized_advantage_estimation, reverse_discounted_cumsum
from rl_core.algorithms.whitening import masked_whiten, whiten_advantages


def naive_reverse_discounted(row, discount):
    out, running = [0.0] * len(row), 0.0
    for t in reversed(range(len(row))):
        running = row[t] + discount * running
        out[t] = running
    return out


def naive_gae(rewards, values, gamma, lambd):
    """slime's `get_advantages_and_returns` loop, written out."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lambd * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_every_slime_estimator_is_registered():
    expected = {"grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"}
    assert expected <= set(ADVANTAGE_ESTIMATORS)


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.97, 1.0])
def test_chunked_discounted_sum_matches_the_token_by_token_recursion(discount):
    torch.manual_seed(0)
    x = torch.randn(3, 300, dtype=torch.float64)  # 300 tokens: three chunks of 128, the last one partial
    got = reverse_discounted_cumsum(x, discount)
    for row in range(3):
        assert got[row].tolist() == pytest.approx(naive_reverse_discounted(x[row].tolist(), discount), rel=1e-9, abs=1e-9)


def test_long_responses_with_strong_discount_neither_overflow_nor_underflow():
    x = torch.zeros(1, 5000, dtype=torch.float64)
    x[0, -1] = 1.0
    got = reverse_discounted_cumsum(x, 0.5)
    assert torch.isfinite(got).all()
    assert got[0, -3:].tolist() == [0.25, 0.5, 1.0]
    assert got[0, 0].item() == 0.0  # 0.5**4999 underflows to 0 in float64, as it should


def test_grpo_without_rewards_normalization_uses_raw_rewards():
    adv = compute_advantages("grpo", [3.0, 1.0], 2, [2, 1], rewards_normalization=False)
    assert [a.tolist() for a in adv] == [[3.0, 3.0], [1.0]]


def test_gspo_and_cispo_share_grpos_group_normalised_advantage():
    rewards, lengths = [1.0, 0.0, 0.0, 1.0], [2, 3, 1, 2]
    grpo = compute_advantages("grpo", rewards, 2, lengths)
    for name in ("gspo", "cispo"):
        other = compute_advantages(name, rewards, 2, lengths)
        assert [a.tolist() for a in other] == [a.tolist() for a in grpo]


def test_reinforce_plus_plus_discounts_kl_penalised_token_rewards():
    # k1 KL = log_probs - ref = [0.2, -0.4, 0.6]; token rewards = -0.1 * KL, plus the reward 1 on the last token:
    # [-0.02, 0.04, 0.94]; G2 = 0.94, G1 = 0.04 + 0.5 * 0.94 = 0.51, G0 = -0.02 + 0.5 * 0.51 = 0.235.
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = lp - torch.tensor([0.2, -0.4, 0.6])
    out = estimate_advantages(
        AdvantageConfig("reinforce_plus_plus", gamma=0.5, kl_coef=0.1),
        AdvantageInputs([1.0], 1, [3], log_probs=[lp], ref_log_probs=[ref]),
    )
    assert out.advantages[0].tolist() == pytest.approx([0.235, 0.51, 0.94], rel=1e-6)
    assert out.returns[0].tolist() == pytest.approx([0.235, 0.51, 0.94], rel=1e-6)


def test_reinforce_plus_plus_gives_the_reward_to_the_last_policy_token_and_no_kl_to_tool_tokens():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = lp - torch.tensor([0.2, -0.4, 0.6])
    out = estimate_advantages(
        AdvantageConfig("reinforce_plus_plus", gamma=0.5, kl_coef=0.1),
        AdvantageInputs([1.0], 1, [3], loss_masks=[torch.tensor([1, 1, 0])], log_probs=[lp], ref_log_probs=[ref]),
    )
    # token rewards [-0.02, 0.04 + 1, 0]: G = [-0.02 + 0.5 * 1.04, 1.04, 0]
    assert out.advantages[0].tolist() == pytest.approx([0.5, 1.04, 0.0], rel=1e-6)


def test_reinforce_plus_plus_baseline_centres_in_the_group_and_subtracts_token_kl():
    lp = [torch.tensor([-1.0, -2.0]), torch.tensor([-1.0])]
    ref = [lp[0] - torch.tensor([0.2, -0.4]), lp[1]]
    out = estimate_advantages(
        AdvantageConfig("reinforce_plus_plus_baseline", kl_coef=0.1, gamma=0.5),
        AdvantageInputs([1.0, 0.0], 2, [2, 1], log_probs=lp, ref_log_probs=ref),
    )
    # (r - mean) = [0.5, -0.5], never divided by the std, never discounted
    assert out.advantages[0].tolist() == pytest.approx([0.48, 0.54], rel=1e-6)
    assert out.advantages[1].tolist() == pytest.approx([-0.5])


def test_ppo_gae_matches_a_hand_computed_two_token_case():
    # token rewards [0, 1]; delta1 = 1 - 0.6 = 0.4, delta0 = 0.9 * 0.6 - 0.5 = 0.04
    # A1 = 0.4, A0 = 0.04 + 0.9 * 0.8 * 0.4 = 0.328; returns = A + V
    out = estimate_advantages(
        AdvantageConfig("ppo", gamma=0.9, lambd=0.8), AdvantageInputs([1.0], 1, [2], values=[torch.tensor([0.5, 0.6])])
    )
    assert out.advantages[0].tolist() == pytest.approx([0.328, 0.4], rel=1e-6)
    assert out.returns[0].tolist() == pytest.approx([0.828, 1.0], rel=1e-6)


def test_ppo_gae_on_ragged_batches_matches_slimes_per_sample_loop():
    torch.manual_seed(3)
    lengths = [5, 1, 9]
    values = [torch.randn(n, dtype=torch.float64) for n in lengths]
    log_probs = [torch.randn(n, dtype=torch.float64) for n in lengths]
    ref = [lp + 0.1 * torch.randn(n, dtype=torch.float64) for lp, n in zip(log_probs, lengths)]
    rewards = [0.3, -1.0, 2.0]
    out = estimate_advantages(
        AdvantageConfig("ppo", gamma=0.95, lambd=0.7, kl_coef=0.05),
        AdvantageInputs(rewards, 1, lengths, log_probs=log_probs, ref_log_probs=ref, values=values),
    )
    for i in range(len(lengths)):
        token_rewards = (-0.05 * (log_probs[i] - ref[i])).tolist()
        token_rewards[-1] += rewards[i]
        adv, ret = naive_gae(token_rewards, values[i].tolist(), 0.95, 0.7)
        assert out.advantages[i].tolist() == pytest.approx(adv, rel=1e-5, abs=1e-6)
        assert out.returns[i].tolist() == pytest.approx(ret, rel=1e-5, abs=1e-6)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64)
    adv, ret = generalized_advantage_estimation(rewards, values, 0.9, 1.0)
    assert ret[0].tolist() == pytest.approx([0.81, 0.9, 1.0])
    assert adv[0].tolist() == pytest.approx([0.61, 0.5, 0.4])


def test_ppo_without_critic_values_is_refused():
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("ppo", [1.0], 1, [2])


def test_reward_kl_is_refused_by_estimators_that_would_ignore_it():
    with pytest.raises(ValueError, match="kl_coef"):
        compute_advantages("grpo", [1.0, 0.0], 2, [1, 1], kl_coef=0.1)


def test_reward_kl_without_log_probs_is_refused():
    with pytest.raises(ValueError, match="ref_log_probs"):
        compute_advantages("reinforce_plus_plus", [1.0], 1, [2], kl_coef=0.1)


def test_a_fully_masked_sample_has_nowhere_to_put_its_reward():
    with pytest.raises(ValueError, match="sample 0: the loss mask is all zeros"):
        compute_advantages("reinforce_plus_plus", [1.0], 1, [2], loss_masks=[torch.zeros(2)])


def test_mismatched_lengths_name_the_sample_and_the_field():
    with pytest.raises(ValueError, match="sample 1: values has 3 entries, response_length is 2"):
        AdvantageInputs([1.0, 1.0], 1, [1, 2], values=[torch.zeros(1), torch.zeros(3)])


def test_whitening_uses_masked_mean_and_unbiased_std():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = masked_whiten(values, mask)
    scale = 1 / math.sqrt(1.0 + 1e-8)  # mean 2, unbiased variance 1 over the three masked-in entries
    assert out.tolist() == pytest.approx([-scale, 0.0, scale, 98 * scale], rel=1e-6)


def test_whitening_without_mean_shift_only_scales():
    out = masked_whiten(torch.tensor([1.0, 3.0]), torch.ones(2), shift_mean=False)
    assert out.tolist() == pytest.approx([1 / math.sqrt(2), 3 / math.sqrt(2)], rel=1e-6)


def test_whitening_an_empty_selection_is_refused():
    with pytest.raises(ValueError, match="selects no token"):
        masked_whiten(torch.ones(2), torch.zeros(2))


def test_normalize_advantages_whitens_reinforce_plus_plus_over_the_batch():
    raw = compute_advantages("reinforce_plus_plus", [1.0, 0.0, 2.0], 1, [2, 1, 3], gamma=0.9)
    out = compute_advantages("reinforce_plus_plus", [1.0, 0.0, 2.0], 1, [2, 1, 3], gamma=0.9, normalize_advantages=True)
    flat = torch.cat(raw).double()
    expected = ((flat - flat.mean()) / flat.std()).tolist()
    assert torch.cat(out).tolist() == pytest.approx(expected, rel=1e-5)
    assert [a.numel() for a in out] == [2, 1, 3]


def test_ragged_whitening_keeps_each_samples_length():
    parts = whiten_advantages([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.ones(2), torch.ones(1)])
    assert [p.tolist() for p in parts] == [pytest.approx([-1.0, 0.0], abs=1e-6), pytest.approx([1.0], rel=1e-6)]


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "cispo"])
@pytest.mark.parametrize("group_size", [2, 3, 4, 5, 8, 16, 64])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage_whatever_the_value(estimator, group_size):
    values = [1 / 3, 0.7, 2.7, 0.1, -0.3, 1e-7, 123.456, 2 / 3, 0.2 + 0.1, torch.tensor(0.7).item()]
    rewards = [v for v in values for _ in range(group_size)]
    advantages = compute_advantages(estimator, rewards, group_size, [2] * len(rewards))
    assert all(float(a.abs().max()) == 0.0 for a in advantages)


@pytest.mark.parametrize("group_size", [2, 4, 7])
def test_group_advantages_of_unequal_rewards_match_a_float64_computation(group_size):
    rng = random.Random(group_size)
    groups = [[0.7] * group_size] + [[rng.choice([0.0, 1 / 3, 0.7, 1.0, 2.7]) for _ in range(group_size)] for _ in range(5)]
    flat_rewards = [r for g in groups for r in g]
    got = [a[0].item() for a in compute_advantages("grpo", flat_rewards, group_size, [1] * len(flat_rewards))]
    expected = []
    for g in groups:  # Python floats (float64), the textbook formula
        mean = sum(g) / len(g)
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / (len(g) - 1))
        expected += [0.0 if max(g) == min(g) else (r - mean) / (std + 1e-6) for r in g]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert got[:group_size] == [0.0] * group_size
