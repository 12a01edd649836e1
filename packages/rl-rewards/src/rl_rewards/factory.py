"""`build_reward`: what the apps call with `--rm-type` / `--custom-rm-path` / `--rm-url`."""

from __future__ import annotations

from typing import Any

from rl_rewards.custom_loading import load_custom_reward
from rl_rewards.hub import RewardHub
from rl_rewards.isolated_grader import IsolatedGrader
from rl_rewards.registry import RewardRegistry, default_registry
from rl_rewards.slime_signature import GroupRewardHub, SlimeSignatureGrader, takes_slime_signature

_CUSTOM_ISOLATION_OPTIONS = {"workers", "memory_mb", "timeout_s", "startup_timeout_s"}


def _custom_grader(custom_rm_path: str, options: dict[str, Any], slime_args: Any) -> Any:
    """The custom function itself, or (with `isolate=True`) a worker pool that loads it in each worker; a
    function in slime's signature is called with `slime_args` and each item's sample."""
    isolate = options.pop("isolate", False)
    function = load_custom_reward(custom_rm_path)
    if takes_slime_signature(function):
        if isolate:
            raise ValueError(f"--custom-rm-path {custom_rm_path}: a slime-signature reward(args, sample) cannot run isolated")
        return SlimeSignatureGrader(function, slime_args)
    unknown = set(options) - (_CUSTOM_ISOLATION_OPTIONS if isolate else set())
    if unknown:
        raise ValueError(
            f"--custom-rm-path takes only isolate={{True}} and {sorted(_CUSTOM_ISOLATION_OPTIONS)} as grader "
            f"options; got {sorted(unknown)}"
        )
    if isolate:
        return IsolatedGrader(custom_rm_path, **options)
    return function


def build_reward(
    rm_type: str | None,
    custom_rm_path: str | None,
    *,
    registry: RewardRegistry | None = None,
    rm_url: str | None = None,
    grader_options: dict[str, Any] | None = None,
    slime_args: Any = None,
    group_rm: bool = False,
    **hub_kwargs: Any,
) -> RewardHub | GroupRewardHub:
    """A hub around the registered reward `rm_type` or the custom function at `custom_rm_path` (exactly one).

    `grader_options` go to the grader's factory (e.g. `{"isolate": True}` for `math`, sandbox limits for
    `code`); `rm_url` is the endpoint of `--rm-type remote`; `slime_args` is what a custom function in
    slime's signature `reward_func(args, sample)` gets as `args`. The remaining keywords configure the hub.
    """
    if group_rm:
        if custom_rm_path is None:
            raise ValueError("--group-rm scores whole groups with a --custom-rm-path function; give --custom-rm-path")
        return GroupRewardHub(load_custom_reward(custom_rm_path), slime_args, error_reward=hub_kwargs.get("error_reward", 0.0))
    if (rm_type is None) == (custom_rm_path is None):
        raise ValueError(
            "give exactly one of --rm-type and --custom-rm-path "
            f"(got rm_type={rm_type!r}, custom_rm_path={custom_rm_path!r})"
        )
    options = dict(grader_options or {})
    if rm_url is not None:
        if rm_type != "remote":
            raise ValueError(f"--rm-url is only used with --rm-type remote (got rm_type={rm_type!r})")
        options["url"] = rm_url
    if rm_type is not None:
        grader = (registry or default_registry).create(rm_type, **options)
    else:
        assert custom_rm_path is not None  # exactly one of the two, checked above
        grader = _custom_grader(custom_rm_path, options, slime_args)
    return RewardHub(grader, **hub_kwargs)
