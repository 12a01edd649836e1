"""Routing policies: pick the engine for the next request from the engines' outstanding counts."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class RoutingPolicy(Protocol):
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


POLICIES = {"round_robin": RoundRobinPolicy, "least_outstanding": LeastOutstandingPolicy}


def make_policy(policy: str | RoutingPolicy) -> RoutingPolicy:
    """A policy by name (`round_robin`, `least_outstanding`), or an instance passed through."""
    if isinstance(policy, str):
        try:
            return POLICIES[policy]()
        except KeyError:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {sorted(POLICIES)}") from None
    if not isinstance(policy, RoutingPolicy):
        raise TypeError(f"policy must be a name or have a choose(outstanding) method, got {policy!r}")
    return policy
