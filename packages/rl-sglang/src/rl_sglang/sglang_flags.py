"""Checks on `--sglang-X` settings before anything starts, against the pinned SGLang's flag list.

SGLang's parser allows abbreviations, so a stale name can be taken as a prefix of a newer one or
be refused as ambiguous only once the engine process starts (0.5.23 split `--cuda-graph-bs` into
`-decode` / `-prefill`). Names are checked exactly here, with a did-you-mean.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from rl_sglang.api_fixture import launch_server_flags, sglang_api

# Set by the launcher itself: a user value would be overridden or duplicated. (`host` is the launcher's
# argument too, but a user's --sglang-host chooses the address engines bind, as in SGLang.)
LAUNCHER_OWNED = ("model_path", "port")

# slime's router flags (slime/utils/arguments.py at 624b824a: `add_router_arguments` and the
# SGLang-router group); `--router-*` names come from sgl-router's RouterArgs with slime's prefix.
SLIME_ROUTER_FLAGS = (
    "--use-slime-router",
    "--slime-router-middleware-paths",
    "--slime-router-timeout",
    "--slime-router-max-connections",
    "--slime-router-health-check-failure-threshold",
    "--sglang-router-ip",
    "--sglang-router-port",
    "--sglang-router-request-timeout-secs",
)

ROUTER_MESSAGE = (
    "this framework starts no SGLang model gateway (sgl-router) or slime router: rl-router, a ZMQ "
    "router inside the rollout process, spreads /generate over the engines. Use --router-policy "
    "(round_robin, least_outstanding, cache_aware), --router-middleware-paths for slime-style "
    "middleware, and --use-fault-tolerance with --rollout-health-check-interval / "
    "--rollout-health-check-timeout for health checks and retries; drop this flag"
)


def is_slime_router_flag(flag: str) -> bool:
    """`--use-slime-router`, `--slime-router-*`, `--sglang-router-*` (slime's router settings)."""
    name = flag.split("=", 1)[0]
    return name in SLIME_ROUTER_FLAGS or name.startswith(("--slime-router-", "--sglang-router-"))


def router_flag_refusal(flag: str) -> str:
    """The message that refuses one of slime's router flags."""
    return f"{flag.split('=', 1)[0]}: {ROUTER_MESSAGE}"


def check_sglang_args(args: Mapping[str, Any]) -> None:
    """Raise ValueError naming `--sglang-X` when X is not a flag of the pinned `sglang.launch_server`
    (exactly, no abbreviations), is set by the launcher, is a router setting, or gets the wrong
    kind of value (a value for a switch, several values for a one-value flag)."""
    flags = launch_server_flags()
    version = sglang_api()["sglang_version"]
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        ours = "--sglang-" + flag.removeprefix("--")
        if str(key).replace("-", "_").startswith("router_"):
            raise ValueError(f"{ours}: {ROUTER_MESSAGE}")
        if str(key).replace("-", "_") in LAUNCHER_OWNED:
            raise ValueError(f"{ours}: the launcher sets {flag} itself; drop this flag")
        spec = flags.get(flag)
        if spec is None:
            close = difflib.get_close_matches(flag, list(flags), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--sglang-' + c.removeprefix('--') for c in close)}?" if close else ""
            raise ValueError(f"{ours}: sglang=={version} launch_server has no flag {flag}{hint}")
        _check_value(ours, spec, value)


def _check_value(ours: str, spec: dict[str, Any], value: Any) -> None:
    takes = spec["takes"]
    if takes == "none":
        if value is not True and value is not False and value is not None:
            raise ValueError(f"{ours} is a switch in SGLang; give it no value (got {value!r})")
        return
    if value is True:
        raise ValueError(f"{ours} needs a value")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if takes == "one" and len(values) != 1:
        raise ValueError(f"{ours} takes one value in SGLang, got {len(values)}: {value!r}")
    for item in values:
        if spec["type"] == "int" and not _parses(int, item):
            raise ValueError(f"{ours} takes an integer, got {item!r}")
        if spec["type"] == "float" and not _parses(float, item):
            raise ValueError(f"{ours} takes a number, got {item!r}")
        if spec["choices"] is not None and item not in spec["choices"] and str(item) not in map(str, spec["choices"]):
            raise ValueError(f"{ours} must be one of {spec['choices']}, got {item!r}")


def _parses(kind: type, item: Any) -> bool:
    if isinstance(item, bool):
        return False
    try:
        kind(str(item))
    except ValueError:
        return False
    return True
