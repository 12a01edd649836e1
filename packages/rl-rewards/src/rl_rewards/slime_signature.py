"""Reward functions written for slime: `async def reward_func(args, sample, **kwargs) -> float | dict`.

They read the whole sample (prompt, response, label, metadata, tokens, ...) and the run's arguments, so
the hub hands them the sample itself; rl-rewards does not need to know the sample's type.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable


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
