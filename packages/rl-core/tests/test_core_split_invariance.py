"""The gradient of a global batch must not depend on how it is cut into micro-batches (or ranks)."""

import pytest
import torch

from rl_core.algorithms.policy_loss import LossDenominators, PolicyLossConfig, entropy_from_logits, policy_loss
from rl_core.algorithms.value_loss import value_loss

B, T, V = 6, 5, 7
SPLITS = [(0, 2), (2, 3), (3, 6)]  # uneven micro-batches


def batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    with torch.no_grad():
        base = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = base + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return tokens, mask, logits, old, rollout, ref, adv


def gradient(config, rows_list):
    tokens, mask, logits, old, rollout, ref, adv = batch()
    logits = logits.clone().requires_grad_()
    den = LossDenominators(num_tokens=mask.sum().item(), num_samples=B)
    metrics_total: dict[str, float] = {}
    for start, end in rows_list:
        rows = slice(start, end)
        lg = logits[rows]
        lp = torch.log_softmax(lg, -1).gather(-1, tokens[rows][..., None])[..., 0]
        loss, metrics = policy_loss(config, log_probs=lp, old_log_probs=old[rows], advantages=adv[rows], mask=mask[rows],
                                    denominators=den, ref_log_probs=ref[rows], entropy=entropy_from_logits(lg),
                                    rollout_log_probs=rollout[rows])
        loss.backward()
        for k, v in metrics.items():
            metrics_total[k] = metrics_total.get(k, 0.0) + v.item()
    return logits.grad, metrics_total


@pytest.mark.parametrize("aggregation", ["token_mean", "sample_mean", "constant"])
@pytest.mark.parametrize("pg_loss_type", ["ppo", "gspo", "cispo"])
def test_policy_gradient_and_metrics_are_the_same_for_any_micro_batch_split(aggregation, pg_loss_type):
    config = PolicyLossConfig(
        pg_loss_type=pg_loss_type, aggregation=aggregation, aggregation_constant=11.0, eps_clip_c=3.0,
        use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01, use_tis=True, tis_clip=1.5, tis_clip_low=0.5,
        use_opsm=True, opsm_delta=0.05,
    )
    whole_grad, whole_metrics = gradient(config, [(0, B)])
    split_grad, split_metrics = gradient(config, SPLITS)
    assert whole_grad.abs().sum() > 0
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-10, atol=1e-12)
    # entropy and KL are computed in float32 by design, so their sums agree to float32 rounding
    assert split_metrics == pytest.approx(whole_metrics, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("aggregation", ["token_mean", "sample_mean", "constant"])
def test_value_gradient_is_the_same_for_any_micro_batch_split(aggregation):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old, returns = values + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    den = LossDenominators(mask.sum().item(), B)
    grads = []
    for splits in ([(0, B)], SPLITS):
        v = values.clone().requires_grad_()
        for start, end in splits:
            loss, _ = value_loss(values=v[start:end], old_values=old[start:end], returns=returns[start:end], mask=mask[start:end],
                                 denominators=den, value_clip=0.2, aggregation=aggregation, aggregation_constant=9.0)
            loss.backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
