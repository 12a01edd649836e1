"""Name -> grader factory, so `--rm-type NAME` can pick a reward; the built-ins are registered here."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from rl_rewards.code_grader import CodeGrader
from rl_rewards.custom_loading import load_custom_reward
from rl_rewards.ifeval_grader import IfEvalGrader
from rl_rewards.isolated_grader import IsolatedGrader
from rl_rewards.remote_reward import RemoteRewardModel
from rl_rewards.text_graders import exact_match_reward, f1_reward, multiple_choice_reward
from rl_rewards.types import Grader

GraderFactory = Callable[..., Grader]
"""Builds a grader from keyword options (`--rm-type`'s settings, e.g. sandbox limits or `isolate=True`)."""


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
        """The grader registered as `name`, built with `options` (an option it does not take is named)."""
        if name not in self._factories:
            raise ValueError(f"unknown reward type {name!r}; registered: {', '.join(self.names())}")
        factory = self._factories[name]
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as error:
            raise ValueError(f"reward {name!r} does not take options {sorted(options)}: {error}") from error
        except ValueError:  # no signature to check (a builtin); let the call itself complain
            pass
        return factory(**options)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def takes_option(self, name: str, option: str) -> bool:
        """Whether the grader registered as `name` accepts the keyword `option` (False for unknown names)."""
        factory = self._factories.get(name)
        if factory is None:
            return False
        try:
            parameters = inspect.signature(factory).parameters
        except ValueError:  # no signature to read (a builtin)
            return False
        return option in parameters

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def isolatable(target: str, *, takes_options: bool) -> GraderFactory:
    """Factory for the grader at `target` that, given `isolate=True`, runs it in a memory-limited worker pool.

    `takes_options`: the target is a factory (a class) built with the remaining options; otherwise it is
    the grader itself and takes none. `workers`, `memory_mb`, `timeout_s` and `startup_timeout_s` size the
    pool and are only accepted with `isolate=True`.
    """

    def factory(
        *,
        isolate: bool = False,
        workers: int | None = None,
        memory_mb: int | None = None,
        timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
        **options: Any,
    ) -> Grader:
        pool: dict[str, Any] = {
            key: value
            for key, value in (
                ("workers", workers),
                ("memory_mb", memory_mb),
                ("timeout_s", timeout_s),
                ("startup_timeout_s", startup_timeout_s),
            )
            if value is not None
        }
        if options and not takes_options:
            raise ValueError(f"{target} takes no options besides isolate and the pool's; got {sorted(options)}")
        if pool and not isolate:
            raise ValueError(f"{sorted(pool)} size the worker pool and need isolate=True")
        if isolate:
            return IsolatedGrader(target, factory_options=options if takes_options else None, **pool)
        loaded = load_custom_reward(target)
        return loaded(**options) if takes_options else loaded

    return factory


default_registry = RewardRegistry()
"""The registry `build_reward` reads; holds the built-in graders registered below."""
register = default_registry.register

for _name, _grader in (
    ("exact_match", exact_match_reward),
    ("f1", f1_reward),
    ("multiple_choice", multiple_choice_reward),
):
    register(_name)(lambda grader=_grader: grader)
register("math")(isolatable("rl_rewards.math_grader:math_reward", takes_options=False))
register("dapo")(isolatable("rl_rewards.dapo_grader:DapoGrader", takes_options=True))
register("deepscaler")(isolatable("rl_rewards.deepscaler_grader:DeepScaleRGrader", takes_options=True))
register("code")(CodeGrader)
register("ifeval")(IfEvalGrader)
register("remote")(RemoteRewardModel)
