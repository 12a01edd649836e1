"""Worker process of `IsolatedGrader`: one grader, JSON lines in and out, under an address-space limit.

Run as `python -m rl_rewards.isolated_worker SPEC_JSON`, where the spec holds `target`
(`module:function` or `file.py:function`), `factory_options` (None: the target is the grader; a dict: the
target is a factory called with it) and `memory_bytes`. Reads one request per line
(`{"prompt", "response", "label", "metadata"}`), writes one reply per line (`{"value": ...}` or
`{"error": "..."}`), and exits when stdin closes, i.e. when its parent is gone.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import resource
import sys
from typing import Any, Awaitable


def _load(spec: dict[str, Any]) -> Any:
    from rl_rewards.custom_loading import load_custom_reward

    target = load_custom_reward(spec["target"])
    options = spec.get("factory_options")
    return target if options is None else target(**options)


def _call(grader: Any, request: dict[str, Any]) -> Any:
    value = grader(
        prompt=request.get("prompt", ""),
        response=request.get("response", ""),
        label=request.get("label"),
        metadata=request.get("metadata") or {},
    )
    return asyncio.run(_awaited(value)) if inspect.isawaitable(value) else value


async def _awaited(value: Awaitable[Any]) -> Any:
    """asyncio.run takes only coroutines; a grader may return any awaitable."""
    return await value


def _protocol_stream() -> Any:
    """Replies go to a private copy of fd 1; fd 1 itself is pointed at stderr so grader prints cannot corrupt them."""
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _reply(stream: Any, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def main() -> None:
    spec = json.loads(sys.argv[1])
    memory = int(spec["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    protocol = _protocol_stream()
    grader = _load(spec)
    _reply(protocol, {"ready": True})
    for line in sys.stdin:
        try:
            value = _call(grader, json.loads(line))
            reply = {"value": value}
            json.dumps(reply)
        except MemoryError:
            reply = {"error": f"MemoryError: the grader exceeded the worker's {memory // 2**20} MiB limit"}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {error}"[:500]}
        _reply(protocol, reply)


if __name__ == "__main__":
    main()
