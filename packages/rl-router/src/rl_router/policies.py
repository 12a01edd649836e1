"""Routing policies: pick the engine for the next request from the engines' outstanding counts."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class RoutingPolicy(Protocol):
    """Optional extras the router uses when present: `choose_for(payload, outstanding)` to route by
    content, `observe(payload, response, engine)` to learn where a request was served, `snapshot()`."""

    def choose(self, outstanding: Mapping[str, int]) -> str:
        """Return one key of `outstanding` (engine name -> in-flight requests); it is never empty."""
        ...


class RoundRobinPolicy:
    """Engines in turn, in the order they were added."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, outstanding: Mapping[str, int]) -> str:
        names = list(outstanding)
        name = names[self._turn % len(names)]
        self._turn += 1
        return name


class LeastOutstandingPolicy:
    """The engine with the fewest in-flight requests; ties go round-robin so idle engines share load."""

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, outstanding: Mapping[str, int]) -> str:
        names = list(outstanding)
        start = self._turn % len(names)
        rotated = names[start:] + names[:start]
        self._turn += 1
        return min(rotated, key=lambda name: outstanding[name])


POLICY_NAMES = ("cache_aware", "least_outstanding", "round_robin")


def make_policy(policy: str | RoutingPolicy) -> RoutingPolicy:
    """A policy by name (`round_robin`, `least_outstanding`, `cache_aware` with its defaults), or an
    instance passed through."""
    if isinstance(policy, str):
        if policy == "round_robin":
            return RoundRobinPolicy()
        if policy == "least_outstanding":
            return LeastOutstandingPolicy()
        if policy == "cache_aware":
            from rl_router.cache_aware import CacheAwarePolicy  # it builds on this module

            return CacheAwarePolicy()
        raise ValueError(f"unknown routing policy {policy!r}; choose one of {sorted(POLICY_NAMES)}")
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"policy must be a name or have a choose(outstanding) method, got {policy!r}")
    return policy
