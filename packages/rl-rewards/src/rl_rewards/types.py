"""The shapes a reward function sees and returns; they match rl-core's `RewardInput` Protocol by shape."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, NotRequired, TypedDict, Union

RewardValue = Union[float, dict[str, float]]
"""A scalar reward, or named reward components (the hub's `reward_key` picks the scalar)."""

Grader = Callable[..., Union[RewardValue, Awaitable[RewardValue]]]
"""Sync or async callable `(*, prompt, response, label, metadata) -> float | dict[str, float]`."""


class RewardInput(TypedDict):
    """What a reward function sees of one sample."""

    prompt: str
    response: str
    label: Any
    metadata: dict[str, Any]
    sample: NotRequired[Any]
    """The whole sample, for reward functions in slime's signature (reward_func(args, sample))."""
