"""Reward functions written for slime: `async def reward_func(args, sample, **kwargs) -> float | dict`.

They read the whole sample (prompt, response, label, metadata, tokens, ...) and the run's arguments, so
the hub hands them the sample itself; rl-rewards does not need to know the sample's type.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence


def takes_slime_signature(function: Callable[..., Any]) -> bool:
    """True for `reward_func(args, sample, ...)`: its first two parameters are named as slime names them."""
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return parameters[:2] == ["args", "sample"]


class SlimeSignatureGrader:
    """A slime reward function as a hub grader: called with (args, sample) for each item's sample."""

    def __init__(self, function: Callable[..., Any], args: Any) -> None:
        self.function = function
        self.args = args
        self.wants_sample = True

    async def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any], sample: Any = None) -> Any:
        if sample is None:
            raise ValueError("a slime-signature reward function needs the sample; the caller sent prompt and response only")
        outcome = self.function(self.args, sample)
        return await outcome if inspect.isawaitable(outcome) else outcome


class GroupRewardHub:
    """slime's `--group-rm`: the reward function scores a whole prompt group at once,
    `reward_func(args, samples) -> list[float]`, e.g. to rank the samples against each other.

    Items arrive in group order, each carrying its sample; consecutive items with the same
    `sample.group_index` form a group. A group whose call fails gives `error_reward` to each of its items
    and reports them in `last_failed` / `last_errors`, as the per-sample hub does.
    """

    def __init__(self, function: Callable[..., Any], args: Any, *, error_reward: float = 0.0) -> None:
        self.function = function
        self.args = args
        self.error_reward = error_reward
        self.stats: dict[str, int] = {"scored": 0, "errors": 0, "timeouts": 0}
        self.last_failed: list[int] = []
        self.last_errors: list[str] = []

    def with_reward_key(self, reward_key: str | None) -> GroupRewardHub:
        return self

    async def score_batch(self, items: Sequence[Any]) -> list[float]:
        import asyncio

        groups: list[list[int]] = []
        for index, item in enumerate(items):
            key = getattr(item.get("sample"), "group_index", None)
            if groups and key is not None and key == getattr(items[groups[-1][0]].get("sample"), "group_index", None):
                groups[-1].append(index)
            else:
                groups.append([index])
        self.last_failed, self.last_errors = [], []
        rewards = [self.error_reward] * len(items)
        outcomes = await asyncio.gather(*(self._score_group([items[i]["sample"] for i in g]) for g in groups),
                                        return_exceptions=True)
        for group, outcome in zip(groups, outcomes):
            if isinstance(outcome, BaseException):
                self.stats["errors"] += len(group)
                self.last_failed += group
                self.last_errors.append(f"item {group[0]}: {type(outcome).__name__}: {outcome}"[:300])
                continue
            for index, reward in zip(group, outcome):
                rewards[index] = reward
            self.stats["scored"] += len(group)
        return rewards

    async def _score_group(self, samples: list[Any]) -> list[float]:
        outcome = self.function(self.args, samples)
        values = await outcome if inspect.isawaitable(outcome) else outcome
        rewards = [float(v) for v in values]
        if len(rewards) != len(samples):
            raise ValueError(f"the group reward function returned {len(rewards)} rewards for {len(samples)} samples")
        return rewards
