"""The policy-gradient loss (PPO, GSPO or CISPO surrogate) with off-policy corrections, KL and entropy
terms, and its split-invariant aggregation. Formulas and sources: docs/algorithms.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rl_core.algorithms.kl import KLType, approx_kl
from rl_core.algorithms.off_policy import TISMode, importance_weights, off_policy_sequence_mask, sequence_mean

LossAggregation = Literal["token_mean", "sample_mean", "constant"]
PolicyLossType = Literal["ppo", "gspo", "cispo"]


def _marks(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0/1 floats at least as wide as float32 and as `like`, so metric sums are as exact as the loss's."""
    return flags.to(torch.promote_types(like.dtype, torch.float32))


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017) to minimise, token-wise, from log(pi / pi_old), and a
    0/1 tensor marking tokens where the clipped branch won.

    loss = max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A). With `eps_clip_c` (dual clip, Ye et al.
    2020, arXiv:1912.09729) negative-advantage tokens are bounded by -c A.
    """
    ratio = log_ratio.exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    clip_fraction = _marks(clipped > unclipped, loss)
    if eps_clip_c is not None:
        dual = torch.minimum(loss, -eps_clip_c * advantages)
        loss = torch.where(advantages < 0, dual, loss)
    return loss, clip_fraction


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise PPO clipped surrogate and clipped-token marks, ratio = exp(log_probs - old_log_probs)."""
    return clipped_surrogate(log_probs - old_log_probs, advantages, eps_clip, eps_clip_high, eps_clip_c)


def gspo_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log importance ratio (Zheng et al. 2025, arXiv:2507.18071), on every token.

    log s_i = mean over the response's loss-mask tokens of (log_probs - old_log_probs), expanded to [B, T];
    the gradient flows through every token's log-prob in the mean.
    """
    return sequence_mean(log_probs - old_log_probs, mask)[:, None].expand_as(log_probs)


def cispo_loss(
    log_probs: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv:2506.13585): -sg(clip(r, 1 - eps_clip, 1 + eps_clip_high)) A log pi.

    The weight is clipped under stop-gradient, so clipped tokens still get a gradient (through log pi);
    canonical CISPO has no lower bound (eps_clip >= 1). Returns (loss, 0/1 clipped-token marks).
    """
    ratio = log_ratio.exp()
    weight = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    return -weight.detach() * advantages * log_probs, _marks(weight != ratio, ratio)


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
    use_unbiased_kl: bool = False
    """Weight the KL loss by pi / pi_old (--use-unbiased-kl)."""
    entropy_coef: float = 0.0
    aggregation: LossAggregation = "token_mean"
    aggregation_constant: float = 1.0
    pg_loss_type: PolicyLossType = "ppo"
    """Surrogate: ppo (token ratios), gspo (sequence ratio), cispo (clipped weight x log-prob)."""
    use_tis: bool = False
    """Weight token losses by pi_old / pi_rollout (truncated importance sampling)."""
    tis_clip: float = 2.0
    """Upper bound of the importance weight."""
    tis_clip_low: float = 0.0
    """Lower bound of the importance weight."""
    tis_mode: TISMode = "truncate"
    """truncate: clamp weights into [tis_clip_low, tis_clip]; mask: zero weights outside it."""
    use_opsm: bool = False
    """Drop negative-advantage tokens of sequences whose KL from the old policy exceeds opsm_delta."""
    opsm_delta: float = 1e-4


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
    rollout_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = pg - entropy_coef * entropy + kl_loss_coef * kl, each aggregated the same way.

    All token tensors are [B, T] over response positions, whole samples per row (GSPO and OPSM take
    per-sequence means); `mask` is 0 on padding and masked tokens. `old_log_probs` is the policy the
    ratio is taken against; `rollout_log_probs`, the engine's, drive truncated importance sampling and the
    train/rollout mismatch metrics. Returns the loss (this micro-batch's share) and detached metrics
    aggregated the same way, so that summing them over micro-batches and ranks gives global-batch values.
    """
    agg = lambda v: aggregate(v, mask, config.aggregation, denominators, config.aggregation_constant)  # noqa: E731
    if config.pg_loss_type == "gspo":
        log_ratio = gspo_log_ratio(log_probs, old_log_probs, mask)
    else:
        log_ratio = log_probs - old_log_probs
    if config.pg_loss_type == "cispo":
        pg, clipped = cispo_loss(log_probs, log_ratio, advantages, config.eps_clip, config.eps_clip_high)
    else:
        pg, clipped = clipped_surrogate(log_ratio, advantages, config.eps_clip, config.eps_clip_high, config.eps_clip_c)
    metrics: dict[str, torch.Tensor] = {}

    if config.use_opsm:
        keep = off_policy_sequence_mask(log_probs, old_log_probs, advantages, mask, config.opsm_delta)
        pg = pg * keep
        metrics["opsm_clipfrac"] = agg(1.0 - keep).detach()

    if rollout_log_probs is not None:
        weights, tis_ratio = importance_weights(
            old_log_probs, rollout_log_probs, mask, low=config.tis_clip_low, high=config.tis_clip, mode=config.tis_mode
        )
        if config.use_tis:
            pg = pg * weights
        # As slime: measured on every trained token, before any weight is zeroed.
        metrics["tis"] = agg(tis_ratio)
        metrics["tis_clipfrac"] = agg(_marks(weights != tis_ratio, tis_ratio))
        metrics["tis_abs"] = agg((tis_ratio - 1.0).abs())
        metrics["ois"] = agg(log_ratio.detach().exp())
        abs_diff = torch.where(mask > 0, (log_probs.detach() - rollout_log_probs).abs(), 0.0)
        metrics["train_rollout_logprob_abs_diff"] = agg(abs_diff)
    elif config.use_tis:
        raise ValueError("use_tis is set but no rollout_log_probs were given to policy_loss")

    loss = agg(pg)
    metrics["pg_loss"] = loss.detach()
    metrics["pg_clipfrac"] = agg(clipped).detach()
    metrics["ppo_kl"] = agg(-log_ratio.detach())
    if entropy is not None:
        entropy_term = agg(entropy)
        metrics["entropy"] = entropy_term.detach()
        if config.entropy_coef:
            loss = loss - config.entropy_coef * entropy_term
    if ref_log_probs is not None:
        ratio = (log_probs - old_log_probs).exp() if config.use_unbiased_kl else None
        kl_term = agg(approx_kl(log_probs, ref_log_probs, config.kl_loss_type, importance_ratio=ratio))
        metrics["kl_loss"] = kl_term.detach()
        if config.use_kl_loss:
            loss = loss + config.kl_loss_coef * kl_term
    metrics["loss"] = loss.detach()
    return loss, metrics
