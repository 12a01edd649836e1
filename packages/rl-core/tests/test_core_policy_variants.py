import math

import pytest
import torch

from rl_core.algorithms.advantages import compute_advantages
from rl_core.algorithms.kl import approx_kl
from rl_core.algorithms.off_policy import importance_weights, off_policy_sequence_mask
from rl_core.algorithms.policy_loss import LossDenominators, PolicyLossConfig, policy_loss
from rl_core.algorithms.value_loss import clipped_value_loss, value_loss

ONE_SAMPLE = LossDenominators(num_tokens=2, num_samples=1)


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_gspo_clips_the_geometric_mean_ratio_of_the_sequence():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = leaf([[math.log(1.5), math.log(0.5), 5.0]])  # the third token is masked out of the mean
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = policy_loss(PolicyLossConfig(pg_loss_type="gspo"), log_probs=lp, old_log_probs=old,
                          advantages=torch.ones(1, 3, dtype=torch.float64), mask=mask, denominators=ONE_SAMPLE)
    s = math.sqrt(1.5 * 0.5)  # exp(mean log-ratio) = 0.866, inside [0.8, 1.2]
    assert loss.item() == pytest.approx(-s)
    assert m["pg_clipfrac"].item() == 0.0
    assert m["ppo_kl"].item() == pytest.approx(-math.log(s))
    loss.backward()
    # d(-s)/d lp_j = -s / |y| for each of the two tokens in the mean, nothing for the masked one
    assert lp.grad[0].tolist() == pytest.approx([-s / 2, -s / 2, 0.0])


def test_gspo_gives_no_gradient_once_the_sequence_ratio_is_clipped():
    lp = leaf([[math.log(1.5), math.log(1.5)]])
    loss, m = policy_loss(PolicyLossConfig(pg_loss_type="gspo"), log_probs=lp, old_log_probs=torch.zeros(1, 2, dtype=torch.float64),
                          advantages=torch.ones(1, 2, dtype=torch.float64), mask=torch.ones(1, 2), denominators=ONE_SAMPLE)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2)
    assert m["pg_clipfrac"].item() == 1.0
    assert lp.grad.abs().max().item() == 0.0


def test_cispo_clips_the_weight_but_keeps_the_gradient_through_log_probs():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = leaf([[math.log(2.0), math.log(0.9)]])
    adv = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(pg_loss_type="cispo", eps_clip=1.0, eps_clip_high=0.5)  # weights in [0, 1.5]
    loss, m = policy_loss(cfg, log_probs=lp, old_log_probs=old, advantages=adv, mask=torch.ones(1, 2), denominators=ONE_SAMPLE)
    weights = [1.5, 0.9]
    expected = -(weights[0] * 1.0 * math.log(2.0) + weights[1] * -2.0 * math.log(0.9)) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["pg_clipfrac"].item() == 0.5
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.5 * 1.0 / 2, -0.9 * -2.0 / 2])  # clipped token still learns


def test_truncated_importance_weights_clamp_the_old_to_rollout_ratio():
    old = torch.log(torch.tensor([[3.0, 0.5, 1.0]]))
    rollout = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights, ratio = importance_weights(old, rollout, mask, low=0.0, high=2.0)
    assert weights[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert ratio[0].tolist() == pytest.approx([3.0, 0.5, 1.0])  # masked token: ratio 1 whatever it holds


def test_masked_importance_weights_zero_tokens_outside_the_bounds():
    old = torch.log(torch.tensor([[3.0, 0.5, 1.5]]))
    weights, _ = importance_weights(old, torch.zeros(1, 3), torch.ones(1, 3), low=0.6, high=2.0, mode="mask")
    assert weights[0].tolist() == pytest.approx([0.0, 0.0, 1.5])


def test_tis_reweights_the_token_losses_and_reports_mismatch_metrics():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = leaf([[0.0, 0.0]])
    rollout = torch.log(torch.tensor([[1 / 3, 2.0]], dtype=torch.float64))  # pi_old / pi_rollout = [3, 0.5]
    cfg = PolicyLossConfig(use_tis=True, tis_clip=2.0, tis_clip_low=0.0)
    loss, m = policy_loss(cfg, log_probs=lp, old_log_probs=old, advantages=torch.ones(1, 2, dtype=torch.float64),
                          mask=torch.ones(1, 2), denominators=ONE_SAMPLE, rollout_log_probs=rollout)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert m["tis"].item() == pytest.approx((3.0 + 0.5) / 2)
    assert m["tis_clipfrac"].item() == pytest.approx(0.5)
    assert m["tis_abs"].item() == pytest.approx((2.0 + 0.5) / 2)
    assert m["train_rollout_logprob_abs_diff"].item() == pytest.approx((math.log(3) + math.log(2)) / 2)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -0.25])


def test_mismatch_metrics_without_tis_leave_the_loss_alone():
    lp = torch.zeros(1, 2)
    kwargs = dict(log_probs=lp, old_log_probs=lp, advantages=torch.ones(1, 2), mask=torch.ones(1, 2), denominators=ONE_SAMPLE)
    plain, _ = policy_loss(PolicyLossConfig(), **kwargs)
    with_metrics, m = policy_loss(PolicyLossConfig(), rollout_log_probs=torch.full((1, 2), -1.0), **kwargs)
    assert with_metrics.item() == plain.item()
    assert m["tis"].item() == pytest.approx(math.e)


def test_tis_without_rollout_log_probs_is_refused():
    lp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        policy_loss(PolicyLossConfig(use_tis=True), log_probs=lp, old_log_probs=lp, advantages=lp, mask=torch.ones(1, 1),
                    denominators=LossDenominators(1, 1))


def test_opsm_drops_only_negative_advantage_sequences_that_drifted_past_delta():
    old = torch.zeros(3, 2)
    lp = torch.tensor([[-0.3, -0.1], [-0.3, -0.1], [-0.01, 0.0]])  # sequence KLs 0.2, 0.2, 0.005
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    keep = off_policy_sequence_mask(lp, old, adv, torch.ones(3, 2), delta=0.1)
    assert keep.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_opsm_masks_the_policy_loss_and_counts_the_dropped_share():
    old = torch.zeros(2, 2, dtype=torch.float64)
    lp = leaf([[-0.3, -0.1], [0.0, 0.0]])
    adv = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    cfg = PolicyLossConfig(use_opsm=True, opsm_delta=0.1)
    loss, m = policy_loss(cfg, log_probs=lp, old_log_probs=old, advantages=adv, mask=torch.ones(2, 2),
                          denominators=LossDenominators(4, 2))
    assert loss.item() == pytest.approx((1.0 + 1.0) / 4)  # only the on-policy sequence: ratio 1, -A = 1
    assert m["opsm_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert lp.grad[0].abs().max().item() == 0.0


def test_unbiased_kl_weights_the_kl_loss_by_the_policy_ratio():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = lp - torch.tensor([[0.1, -0.2]])
    ref = lp - 0.3
    cfg = PolicyLossConfig(use_kl_loss=True, kl_loss_coef=1.0, kl_loss_type="k1", use_unbiased_kl=True)
    _, m = policy_loss(cfg, log_probs=lp, old_log_probs=old, advantages=torch.zeros(1, 2), mask=torch.ones(1, 2),
                       denominators=ONE_SAMPLE, ref_log_probs=ref)
    assert m["kl_loss"].item() == pytest.approx((math.exp(0.1) * 0.3 + math.exp(-0.2) * 0.3) / 2, rel=1e-6)
    # low_var_kl clamps after the reweighting, as slime does: k3 = 16 here, 0.5 * 16 = 8 (not 0.5 * 10)
    weighted = approx_kl(torch.zeros(1), torch.full((1,), -17.0), "low_var_kl", importance_ratio=torch.full((1,), 0.5))
    assert weighted.item() == pytest.approx(8.0)


def test_value_loss_takes_the_worse_of_the_clipped_and_unclipped_errors():
    values = leaf([1.0, 0.5, 0.0])
    old = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    returns = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    tokens, clipped = clipped_value_loss(values, old, returns, value_clip=0.2)
    # token 0: clipped V = 0.7 -> max(0.49, 1.0) = 1.0; token 1: no move -> 0.25; token 2: clipped V = 0.3 -> max(0.49, 1.0)
    assert tokens.tolist() == pytest.approx([1.0, 0.25, 1.0])
    assert clipped.tolist() == [1.0, 0.0, 1.0]
    loss, m = value_loss(values=values[None], old_values=old[None], returns=returns[None], mask=torch.ones(1, 3),
                         denominators=LossDenominators(3, 1), value_clip=0.2)
    assert loss.item() == pytest.approx(2.25 / 3)
    assert m["value_clipfrac"].item() == pytest.approx(2 / 3)


def test_value_loss_stops_the_gradient_when_the_clipped_error_dominates():
    values = leaf([0.8])
    loss, _ = value_loss(values=values[None], old_values=torch.tensor([[0.5]], dtype=torch.float64),
                         returns=torch.tensor([[0.0]], dtype=torch.float64), mask=torch.ones(1, 1),
                         denominators=LossDenominators(1, 1), value_clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.64)  # unclipped (0.8)^2 > clipped (0.7)^2
    assert values.grad.item() == pytest.approx(1.6)


def test_dr_grpo_is_centred_advantages_with_a_constant_loss_divisor():
    adv = compute_advantages("grpo", [1.0, 0.0], 2, [2, 1], std_normalize=False)
    assert [a.tolist() for a in adv] == [[0.5, 0.5], [-0.5]]
    advantages = torch.tensor([[0.5, 0.5], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    lp = torch.zeros(2, 2)
    cfg = PolicyLossConfig(aggregation="constant", aggregation_constant=8.0)  # e.g. the max response length
    loss, _ = policy_loss(cfg, log_probs=lp, old_log_probs=lp, advantages=advantages, mask=mask, denominators=LossDenominators(3, 2))
    assert loss.item() == pytest.approx(-(0.5 + 0.5 - 0.5) / 8.0)
