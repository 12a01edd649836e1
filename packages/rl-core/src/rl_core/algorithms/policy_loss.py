"""The clipped policy-gradient loss with KL and entropy terms, and its split-invariant aggregation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rl_core.algorithms.kl import KLType, approx_kl

LossAggregation = Literal["token_mean", "sample_mean", "constant"]


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise PPO clipped surrogate (to minimise) and a 0/1 tensor marking clipped tokens.

    ratio = exp(log_probs - old_log_probs), clipped to [1 - eps_clip, 1 + eps_clip_high]. With
    `eps_clip_c` (dual clip, Ye et al. 2020) negative-advantage tokens are bounded by -c * A.
    """
    ratio = (log_probs - old_log_probs).exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clip_fraction = (clipped > unclipped).float()
    if eps_clip_c is not None:
        dual = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, dual, loss)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, in float32."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


@dataclass(frozen=True)
class LossDenominators:
    """Global sizes of the batch a micro-batch belongs to, so that summing micro-batch losses gives the
    same gradient however the global batch is split (micro-batches, data-parallel ranks)."""

    num_tokens: float
    """Loss-mask tokens in the whole global batch."""
    num_samples: float
    """Samples in the whole global batch."""


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation,
    denominators: LossDenominators,
    constant: float = 1.0,
) -> torch.Tensor:
    """This micro-batch's share of the global-batch reduction of token `values` [B, T] under `mask`.

    token_mean: sum / global tokens. sample_mean: sum of per-sample masked means / global samples.
    constant: sum / `constant` (Dr. GRPO's length-unbiased form when `constant` is the max length).
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / max(denominators.num_tokens, 1.0)
    if mode == "sample_mean":
        per_sample = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        return per_sample.sum() / max(denominators.num_samples, 1.0)
    if mode == "constant":
        return (values * mask).sum() / constant
    raise ValueError(f"unknown loss aggregation {mode!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    eps_clip: float = 0.2
    eps_clip_high: float = 0.2
    eps_clip_c: float | None = None
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: KLType = "low_var_kl"
    entropy_coef: float = 0.0
    aggregation: LossAggregation = "token_mean"
    aggregation_constant: float = 1.0


def policy_loss(
    config: PolicyLossConfig,
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    denominators: LossDenominators,
    ref_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = pg - entropy_coef * entropy + kl_loss_coef * kl, each aggregated the same way.

    All token tensors are [B, T] over response positions; `mask` is 0 on padding and masked tokens.
    Returns the loss (this micro-batch's share) and detached metrics aggregated the same way.
    """
    agg = lambda v: aggregate(v, mask, config.aggregation, denominators, config.aggregation_constant)  # noqa: E731
    pg, clipped = ppo_clip_loss(log_probs, old_log_probs, advantages, config.eps_clip, config.eps_clip_high, config.eps_clip_c)
    loss = agg(pg)
    metrics = {
        "pg_loss": loss.detach(),
        "pg_clipfrac": agg(clipped).detach(),
        "ppo_kl": agg((old_log_probs - log_probs).detach()),
    }
    if entropy is not None:
        entropy_term = agg(entropy)
        metrics["entropy"] = entropy_term.detach()
        if config.entropy_coef:
            loss = loss - config.entropy_coef * entropy_term
    if ref_log_probs is not None:
        kl_term = agg(approx_kl(log_probs, ref_log_probs, config.kl_loss_type))
        metrics["kl_loss"] = kl_term.detach()
        if config.use_kl_loss:
            loss = loss + config.kl_loss_coef * kl_term
    metrics["loss"] = loss.detach()
    return loss, metrics
