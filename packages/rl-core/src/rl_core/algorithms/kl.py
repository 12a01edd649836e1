"""Per-token estimators of KL(policy || reference) from log-probs of the sampled tokens.

Schulman's k1/k2/k3 (http://joschu.net/blog/kl-approx.html), as slime names them; `low_var_kl` is k3
clamped to [-10, 10] for stability.
"""

from __future__ import annotations

from typing import Literal

import torch

KLType = Literal["k1", "k2", "k3", "low_var_kl"]
KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl")


def approx_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    kl_type: KLType,
    *,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-wise KL estimate; same shape as the inputs, computed in float32 or wider.

    `importance_ratio` (pi / pi_old, --use-unbiased-kl, after DeepSeek-V3.2) reweights the estimate of
    tokens sampled from pi_old; as in slime the low_var_kl clamp comes after the reweighting.
    """
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kl_type == "k1":
        kl = log_ratio
    elif kl_type == "k2":
        kl = log_ratio.pow(2) / 2.0
    elif kl_type in ("k3", "low_var_kl"):
        # k3 = r - 1 - log r with r = p_ref / p: unbiased and always >= 0.
        neg = -log_ratio
        kl = neg.exp() - 1.0 - neg
    else:
        raise ValueError(f"unknown kl type {kl_type!r}; expected one of {KL_TYPES}")
    if importance_ratio is not None:
        kl = importance_ratio * kl
    return kl.clamp(-10.0, 10.0) if kl_type == "low_var_kl" else kl
