import math

import pytest
import torch

from rl_core.algorithms.advantages import compute_advantages, group_normalized_rewards
from rl_core.algorithms.kl import approx_kl
from rl_core.algorithms.policy_loss import (
    LossDenominators,
    PolicyLossConfig,
    aggregate,
    entropy_from_logits,
    policy_loss,
    ppo_clip_loss,
)


def test_kl_estimators_match_hand_computed_values():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    d = [0.5, -1.0]
    assert approx_kl(lp, ref, "k1").tolist() == pytest.approx(d)
    assert approx_kl(lp, ref, "k2").tolist() == pytest.approx([x * x / 2 for x in d])
    k3 = [math.exp(-x) - 1 + x for x in d]
    assert approx_kl(lp, ref, "k3").tolist() == pytest.approx(k3)
    assert approx_kl(torch.tensor([0.0]), torch.tensor([-30.0]), "low_var_kl").item() == 10.0


def test_k3_is_an_unbiased_estimate_of_the_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    true_kl = (p * (p / q).log()).sum()
    tokens = torch.multinomial(p, 200_000, replacement=True)
    estimate = approx_kl(p.log()[tokens], q.log()[tokens], "k3").double().mean()
    assert estimate.item() == pytest.approx(true_kl.item(), rel=0.05)


def test_grpo_normalizes_each_group_by_its_mean_and_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    out = group_normalized_rewards(rewards, 4)
    g = [1.0, 0.0, 0.0, 0.0]
    mean = sum(g) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 3)
    assert out[:4].tolist() == pytest.approx([(x - mean) / (std + 1e-6) for x in g], rel=1e-5)
    assert out[4:].tolist() == [0.0] * 4  # equal rewards carry no signal


def test_grpo_without_std_normalization_only_centres():
    out = group_normalized_rewards(torch.tensor([3.0, 1.0]), 2, std_normalize=False)
    assert out.tolist() == [1.0, -1.0]


def test_grpo_advantages_are_broadcast_over_each_response():
    adv = compute_advantages("grpo", [1.0, 0.0], 2, [3, 1])
    assert [a.shape[0] for a in adv] == [3, 1]
    assert adv[0].tolist() == pytest.approx([adv[0][0].item()] * 3)
    assert adv[0][0].item() > 0 > adv[1][0].item()


def test_unknown_estimator_names_the_flag():
    with pytest.raises(ValueError, match="--advantage-estimator"):
        compute_advantages("nope", [1.0], 1, [1])


def test_ppo_clip_matches_hand_cases():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = ppo_clip_loss(new, old, adv, 0.2, 0.3)
    # ratio 1.5, A>0: clipped to 1.3 -> -1.3; ratio 0.5, A>0: min(0.5, 0.8)=0.5 -> -0.5
    # ratio 1.1, A<0: -(-1.1)=1.1 ; ratio 0.5, A<0: max(0.5, 0.8) -> 0.8
    assert loss.tolist() == pytest.approx([-1.3, -0.5, 1.1, 0.8], rel=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_dual_clip_bounds_negative_advantage_losses():
    loss, _ = ppo_clip_loss(torch.log(torch.tensor([10.0])), torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.2, eps_clip_c=3.0)
    assert loss.item() == pytest.approx(3.0)


def test_entropy_of_uniform_logits_is_log_vocab():
    assert entropy_from_logits(torch.zeros(2, 7)).tolist() == pytest.approx([math.log(7)] * 2)


@pytest.mark.parametrize("mode", ["token_mean", "sample_mean", "constant"])
def test_aggregation_does_not_depend_on_how_the_batch_is_split(mode):
    torch.manual_seed(1)
    values = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    den = LossDenominators(num_tokens=mask.sum().item(), num_samples=6)
    whole = aggregate(values, mask, mode, den, constant=7.0)
    parts = sum(aggregate(values[i : i + 2], mask[i : i + 2], mode, den, constant=7.0) for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    if mode == "token_mean":
        assert whole.item() == pytest.approx((values * mask).sum().item() / mask.sum().item())
    if mode == "sample_mean":
        per = [(values[i] * mask[i]).sum() / mask[i].sum() for i in range(6)]
        assert whole.item() == pytest.approx(sum(per).item() / 6)


def test_policy_loss_adds_kl_and_subtracts_entropy():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    mask = torch.ones(1, 2)
    den = LossDenominators(num_tokens=2, num_samples=1)
    cfg = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", entropy_coef=0.1)
    ent = torch.tensor([[1.0, 3.0]])
    ref = lp - 0.2
    loss, m = policy_loss(cfg, log_probs=lp, old_log_probs=lp, advantages=torch.ones(1, 2), mask=mask,
                          denominators=den, ref_log_probs=ref, entropy=ent)
    assert m["pg_loss"].item() == pytest.approx(-1.0)
    assert m["kl_loss"].item() == pytest.approx(0.2)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-1.0 - 0.1 * 2.0 + 0.5 * 0.2)


def test_policy_gradient_pushes_up_positive_advantage_tokens():
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    lp = torch.log_softmax(logits, -1)[..., 0]
    loss, _ = policy_loss(PolicyLossConfig(), log_probs=lp, old_log_probs=lp.detach(), advantages=torch.ones(1, 1),
                          mask=torch.ones(1, 1), denominators=LossDenominators(1, 1))
    loss.backward()
    assert logits.grad[0, 0, 0] < 0  # gradient descent raises the logit of the rewarded token
