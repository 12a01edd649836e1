"""Discounted sums over response tokens (REINFORCE++ returns, PPO's GAE), vectorised over the batch.

Ragged per-sample tensors are padded with zeros at the end: a zero after the last token adds nothing to
a reverse discounted sum, and a zero value there is exactly GAE's "V after the last token is 0".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def pad_right(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, max length] with each 1-D tensor left-aligned and zeros after it."""
    if not tensors:
        return torch.zeros(0, 0, dtype=dtype)
    return torch.nn.utils.rnn.pad_sequence([t.to(dtype) for t in tensors], batch_first=True)


def unpad(matrix: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return [matrix[i, :length].clone() for i, length in enumerate(lengths)]


def reverse_discounted_cumsum(values: torch.Tensor, discount: float, chunk_size: int = 128) -> torch.Tensor:
    """y[:, t] = sum over k >= t of discount**(k - t) * values[:, k], for a [B, T] tensor.

    A chunked scan (the scheme of slime's `chunked_gae`): inside each chunk one matmul with the
    upper-triangular matrix of discount powers, across chunks a carried sum, so T / chunk_size sequential
    steps instead of T. No discount**-t rescaling, which would overflow on long responses.
    """
    if values.ndim != 2:
        raise ValueError(f"expected a [B, T] tensor, got shape {tuple(values.shape)}")
    batch, length = values.shape
    if length == 0:
        return values.clone()
    pad = (-length) % chunk_size
    chunks = F.pad(values, (0, pad)).view(batch, -1, chunk_size)
    offsets = torch.arange(chunk_size, device=values.device)
    distance = offsets[None, :] - offsets[:, None]  # [i, j] = j - i
    base = torch.tensor(discount, dtype=values.dtype, device=values.device)
    # powers[i, j] = discount**(j - i) for j >= i: the weight of x[j] in y[i] within a chunk.
    powers = torch.where(distance >= 0, base.pow(distance.clamp(min=0).to(values.dtype)), torch.zeros((), dtype=values.dtype))
    local = chunks @ powers.T
    # y[i] also gets discount**(chunk_size - i) times y at the start of the next chunk.
    carry_weight = base.pow((chunk_size - offsets).to(values.dtype))
    out = torch.empty_like(local)
    carry = torch.zeros(batch, dtype=values.dtype, device=values.device)
    for c in range(local.shape[1] - 1, -1, -1):
        out[:, c] = local[:, c] + carry[:, None] * carry_weight
        carry = out[:, c, 0]
    return out.view(batch, -1)[:, :length]


def discounted_returns(token_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over a [B, T] tensor of token rewards (zeros after each response)."""
    return reverse_discounted_cumsum(token_rewards, gamma)


def generalized_advantage_estimation(
    token_rewards: torch.Tensor, values: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, arXiv:1506.02438) over [B, T] rewards and critic values.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last token; A_t = sum_k (gamma*lambd)^k
    delta_{t+k}; returns R_t = A_t + V_t are the critic's targets. Returns (advantages, returns).
    """
    if token_rewards.shape != values.shape:
        raise ValueError(f"token rewards {tuple(token_rewards.shape)} and values {tuple(values.shape)} differ in shape")
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = token_rewards + gamma * next_values - values
    advantages = reverse_discounted_cumsum(deltas, gamma * lambd)
    return advantages, advantages + values
