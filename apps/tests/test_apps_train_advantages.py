"""The RL step's advantages on fixed forward-pass outputs, configured as rl-train configures them: the reward
KL (--kl-coef) and the critic's values (ppo) reach the estimator. No Ray: the trainers' outputs are given."""

import pytest
import torch

from rl_apps.train_config import TrainConfig
from rl_core.rl_step import rollout_advantages
from rl_core.sample import Sample


def train_config(**overrides):
    return TrainConfig(hf_checkpoint="model", prompt_data="train.jsonl", rm_type="math", rollout_batch_size=1,
                       n_samples_per_prompt=2, **overrides)


SAMPLES = [
    Sample(tokens=[1, 2, 3, 4, 5], response_length=3, reward=1.0),
    Sample(tokens=[1, 2, 6, 7], response_length=2, reward=0.0, loss_mask=[1, 0]),
]
LOG_PROBS = [torch.tensor(r) for r in [[-1.0, -2.0, -0.5], [-0.3, -0.7]]]
REF_LOG_PROBS = [torch.tensor(r) for r in [[-1.2, -1.6, -1.1], [-0.4, -0.2]]]


def test_kl_coef_subtracts_the_discounted_token_kl_from_reinforce_plus_plus_returns():
    kl = dict(advantage_estimator="reinforce_plus_plus", normalize_advantages=True, kl_loss_type="k1", gamma=0.5)
    with_kl = rollout_advantages(train_config(kl_coef=0.1, **kl), SAMPLES, log_probs=LOG_PROBS, ref_log_probs=REF_LOG_PROBS)
    without = rollout_advantages(train_config(**kl), SAMPLES)
    # Independent computation: token rewards -0.1 * (log pi - log pi_ref) on loss-mask tokens, the reward on
    # the last loss-mask token, then G_t = r_t + 0.5 G_{t+1}.
    expected = []
    for sample, lp, ref in zip(SAMPLES, LOG_PROBS, REF_LOG_PROBS):
        mask = sample.effective_loss_mask()
        rewards = [-0.1 * (a - b) * m for a, b, m in zip(lp.tolist(), ref.tolist(), mask)]
        rewards[max(i for i, m in enumerate(mask) if m)] += sample.reward
        returns, carry = [], 0.0
        for r in reversed(rewards):
            carry = r + 0.5 * carry
            returns.insert(0, carry)
        expected.append(returns)
    for got, want in zip(with_kl.returns, expected):
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(with_kl.advantages, without.advantages))


def test_ppo_returns_are_gae_advantages_plus_the_critics_values():
    values = [[0.2, 0.4, 0.6], [0.1, -0.1]]
    config = train_config(advantage_estimator="ppo", gamma=0.9, lambd=0.8)
    out = rollout_advantages(config, SAMPLES, values=[torch.tensor(v) for v in values])
    for adv, ret, v in zip(out.advantages, out.returns, values):
        assert ret.tolist() == pytest.approx((adv + torch.tensor(v)).tolist(), rel=1e-6)
    # Last token of sample 0: delta = r - V = 1 - 0.6 (no value after the last token).
    assert out.advantages[0][-1].item() == pytest.approx(0.4, rel=1e-6)


def test_kl_coef_and_ppo_are_accepted_and_the_critic_lr_defaults_to_lr():
    config = train_config(advantage_estimator="ppo", kl_coef=0.01, lr=3e-4)
    assert config.use_critic and config.critic_lr == 3e-4
    assert train_config(advantage_estimator="ppo", critic_lr=1e-5).critic_lr == 1e-5


@pytest.mark.parametrize("flag", [{"critic_lr": 1e-5}, {"num_critic_only_steps": 1}])
def test_critic_flags_without_a_critic_are_refused_naming_the_flag(flag):
    with pytest.raises(ValueError, match=f"{next(iter(flag))} is set but advantage_estimator 'grpo' trains no critic"):
        train_config(**flag)


def test_samples_older_than_the_staleness_bound_are_not_trained_and_counted():
    from rl_apps.loop import drop_stale

    samples = [Sample(weight_versions=["default"]), Sample(weight_versions=["3", "5"]), Sample(weight_versions=["4"]),
               Sample(weight_version="6")]
    assert drop_stale(samples, version=6, max_staleness=2) == 2.0
    assert [s.remove_sample for s in samples] == [True, True, False, False]


def test_partial_rollout_needs_over_sampling_to_have_something_to_abort():
    with pytest.raises(ValueError, match="--partial-rollout .* --over-sampling-batch-size larger than 1"):
        train_config(partial_rollout=True)
    assert train_config(partial_rollout=True, over_sampling_batch_size=2, mask_offpolicy_in_partial_rollout=True).partial_rollout
