"""`build_reward`: what the apps call with `--rm-type` / `--custom-rm-path`."""

from __future__ import annotations

from typing import Any

from rl_rewards.custom_loading import load_custom_reward
from rl_rewards.hub import RewardHub
from rl_rewards.registry import RewardRegistry, default_registry


def build_reward(
    rm_type: str | None,
    custom_rm_path: str | None,
    *,
    registry: RewardRegistry | None = None,
    **hub_kwargs: Any,
) -> RewardHub:
    """A hub around the registered reward `rm_type` or the custom function at `custom_rm_path` (exactly one)."""
    if (rm_type is None) == (custom_rm_path is None):
        raise ValueError(
            "give exactly one of --rm-type and --custom-rm-path "
            f"(got rm_type={rm_type!r}, custom_rm_path={custom_rm_path!r})"
        )
    if rm_type is not None:
        grader = (registry or default_registry).create(rm_type)
    else:
        grader = load_custom_reward(custom_rm_path)
    return RewardHub(grader, **hub_kwargs)
