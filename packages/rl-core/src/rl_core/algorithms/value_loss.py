"""PPO's clipped value loss for the critic (`--value-clip`), aggregated like the policy loss."""

from __future__ import annotations

import torch

from rl_core.algorithms.policy_loss import LossAggregation, LossDenominators, aggregate


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise max((V_clip - R)^2, (V - R)^2) with V_clip = V_old + clip(V - V_old, -c, c), and 0/1
    marks of tokens whose value moved more than c.

    As slime's `value_loss_function` (after OpenAI baselines' ppo2, without its 0.5 factor): the clipped
    branch stops the critic from moving far from its rollout-time values in one update.
    """
    delta = values - old_values
    clipped = old_values + delta.clamp(-value_clip, value_clip)
    loss = torch.maximum((clipped - returns).pow(2), (values - returns).pow(2))
    return loss, (delta.abs() > value_clip).float()


def value_loss(
    *,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    denominators: LossDenominators,
    value_clip: float = 0.2,
    aggregation: LossAggregation = "token_mean",
    aggregation_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's loss share of this micro-batch ([B, T] tensors over response tokens) and metrics."""
    tokens, clipped = clipped_value_loss(values, old_values, returns, value_clip)
    agg = lambda v: aggregate(v, mask, aggregation, denominators, aggregation_constant)  # noqa: E731
    loss = agg(tokens)
    return loss, {"value_loss": loss.detach(), "value_clipfrac": agg(clipped).detach()}
