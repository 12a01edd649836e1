"""Corrections for training on samples the current policy did not generate.

Two mismatches exist: the engine's numerics differ from the trainer's (rollout log-probs vs the trainer's
old log-probs of the same weights), and the policy moves during the steps of one rollout (old vs current
log-probs). Truncated importance sampling handles the first, off-policy sequence masking the second.
All tensors are [B, T] over response tokens; `mask` is 1 on trained tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

TISMode = Literal["truncate", "mask"]


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] masked mean of each row of a [B, T] tensor (an all-masked row gives 0)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def importance_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    low: float,
    high: float,
    mode: TISMode = "truncate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached token weights for --use-tis and the raw ratios: (weights, ratio).

    ratio = pi_old / pi_rollout = exp(old_log_probs - rollout_log_probs) (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). `truncate` clamps it to
    [low, high] (slime's `vanilla_tis_function`); `mask` keeps it inside [low, high] and zeroes it outside
    (slime's `icepop_function`, after IcePop). The ratio is 1 on masked-out tokens, whatever they hold.
    """
    diff = _at_least_float32(old_log_probs.detach()) - _at_least_float32(rollout_log_probs.detach())
    log_ratio = torch.where(mask > 0, diff, 0.0)
    ratio = log_ratio.exp()
    if mode == "truncate":
        weights = ratio.clamp(low, high)
    elif mode == "mask":
        weights = torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))
    else:
        raise ValueError(f"unknown tis mode {mode!r}; expected 'truncate' or 'mask'")
    return weights, ratio


def off_policy_sequence_mask(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
) -> torch.Tensor:
    """Detached 0/1 keep-mask of --use-opsm (DeepSeek-V3.2 report, 2025): a token is dropped when
    its advantage is negative and its sequence's KL from the old policy, the masked mean of
    old_log_probs - log_probs, exceeds `delta`. Such sequences are both off-policy and punished, the
    updates most likely to destabilise training."""
    seq_kl = sequence_mean(_at_least_float32(old_log_probs.detach()) - _at_least_float32(log_probs.detach()), mask)
    drop = (advantages < 0) & (seq_kl[:, None] > delta)
    return (~drop).to(log_probs.dtype)
