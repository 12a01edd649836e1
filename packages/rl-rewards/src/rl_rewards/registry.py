"""Name -> grader factory, so `--rm-type NAME` can pick a reward; the built-ins are registered here."""

from __future__ import annotations

from typing import Any, Callable

from rl_rewards.math_grader import math_reward
from rl_rewards.text_graders import exact_match_reward, f1_reward, multiple_choice_reward
from rl_rewards.types import Grader

GraderFactory = Callable[..., Grader]
"""Builds a grader from keyword options (the built-ins take none)."""


class RewardRegistry:
    """Grader factories by name."""

    def __init__(self) -> None:
        self._factories: dict[str, GraderFactory] = {}

    def register(self, name: str) -> Callable[[GraderFactory], GraderFactory]:
        """Decorator that registers a grader factory under `name`; a name can be taken only once."""

        def decorator(factory: GraderFactory) -> GraderFactory:
            if name in self._factories:
                raise ValueError(f"reward {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def create(self, name: str, **options: Any) -> Grader:
        """The grader registered as `name`, built with `options`."""
        if name not in self._factories:
            raise ValueError(f"unknown reward type {name!r}; registered: {', '.join(self.names())}")
        return self._factories[name](**options)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories


default_registry = RewardRegistry()
"""The registry `build_reward` reads; holds `exact_match`, `math`, `f1` and `multiple_choice`."""
register = default_registry.register

for _name, _grader in (
    ("exact_match", exact_match_reward),
    ("math", math_reward),
    ("f1", f1_reward),
    ("multiple_choice", multiple_choice_reward),
):
    register(_name)(lambda grader=_grader: grader)
