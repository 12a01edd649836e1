"""Advantage estimators, named in a registry that `--advantage-estimator` selects."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch


class AdvantageEstimator(Protocol):
    def __call__(
        self, rewards: torch.Tensor, group_size: int, response_lengths: Sequence[int], *, std_normalize: bool
    ) -> list[torch.Tensor]:
        """Per-token advantages (one 1-D tensor per sample) from per-sample scalar rewards."""
        ...


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    def wrap(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def group_normalized_rewards(
    rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's reward shaping: subtract each prompt group's mean and, unless disabled, divide by the
    group's unbiased std plus `eps`. Samples of one group are contiguous."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.flatten()


@register_advantage_estimator("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, response_lengths: Sequence[int], *, std_normalize: bool = True
) -> list[torch.Tensor]:
    """GRPO: the group-normalised reward, broadcast over every response token."""
    normalized = group_normalized_rewards(rewards, group_size, std_normalize=std_normalize)
    return [torch.full((length,), float(value)) for value, length in zip(normalized.tolist(), response_lengths)]


def compute_advantages(
    estimator: str,
    rewards: Sequence[float],
    group_size: int,
    response_lengths: Sequence[int],
    *,
    std_normalize: bool = True,
) -> list[torch.Tensor]:
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"--advantage-estimator {estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(torch.tensor(list(rewards), dtype=torch.float32), group_size, response_lengths, std_normalize=std_normalize)
