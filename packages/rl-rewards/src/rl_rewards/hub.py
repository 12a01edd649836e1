"""Scores batches with one grader: bounded concurrency, per-item timeouts, and counted failures.

Sync graders run on daemon threads, one per item in flight: CPU-heavy sympy never blocks the event loop,
and a grader that never returns is abandoned at its timeout without keeping the process from exiting
(a `ThreadPoolExecutor` would join it at shutdown).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from typing import Any, Callable, Sequence

from rl_rewards.types import Grader, RewardInput

_MAX_RECORDED_ERRORS = 32
_MAX_MESSAGE_CHARS = 300


class RewardValueError(ValueError):
    """A grader returned something that is not a usable scalar reward."""


class _AbandonedThreads:
    """Counts grader threads still running after their item timed out, so the hub can cap them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0


def _run_on_daemon_thread(call: Callable[[], Any], abandoned: _AbandonedThreads) -> asyncio.Future:
    """Run `call` on a daemon thread; if the returned future is cancelled first, count the thread as abandoned
    until it finishes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    state = {"finished": False, "abandoned": False}

    def settle(outcome: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(outcome)
        else:
            future.set_exception(error)

    def on_cancel(done: asyncio.Future) -> None:
        if not done.cancelled():
            return
        with abandoned.lock:
            if not state["finished"]:
                state["abandoned"] = True
                abandoned.count += 1

    def worker() -> None:
        try:
            outcome, error = call(), None
        except BaseException as raised:  # handed to the awaiting coroutine, not swallowed
            outcome, error = None, raised
        with abandoned.lock:
            state["finished"] = True
            if state["abandoned"]:
                abandoned.count -= 1
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the loop closed while this grader was running; nobody is waiting
            pass

    future.add_done_callback(on_cancel)
    threading.Thread(target=worker, name="rl-rewards-grader", daemon=True).start()
    return future


def _is_async_grader(grader: Grader) -> bool:
    return inspect.iscoroutinefunction(grader) or inspect.iscoroutinefunction(getattr(grader, "__call__", None))  # noqa: B004 - the method, not callability


class RewardHub:
    """Runs one grader over batches of `RewardInput`; never raises for one bad item.

    A raising grader, a timed-out one, or one whose return value is unusable gives `error_reward`
    and is counted in `stats` (`scored`, `errors`, `timeouts`); `last_failed` lists the latest batch's
    failed item indices and `last_errors` describes (the first 32 of) them; `last_components` keeps each item's dict when the grader returns named
    components. Timed-out sync graders keep running on their abandoned threads; once
    `max_abandoned_threads` of them are still running, new items fail at once instead of starting more.
    """

    def __init__(
        self,
        grader: Grader,
        *,
        concurrency: int = 32,
        timeout_s: float = 10.0,
        error_reward: float = 0.0,
        reward_key: str | None = None,
        max_abandoned_threads: int = 64,
    ) -> None:
        if not callable(grader):
            raise TypeError(f"grader must be callable, got {type(grader).__name__}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_abandoned_threads < 1:
            raise ValueError(f"max_abandoned_threads must be at least 1, got {max_abandoned_threads}")
        self.grader = grader
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.error_reward = float(error_reward)
        self.reward_key = reward_key
        self.max_abandoned_threads = max_abandoned_threads
        self.last_components: list[dict[str, Any] | None] = []
        self._abandoned = _AbandonedThreads()
        self.stats: dict[str, int] = {"scored": 0, "errors": 0, "timeouts": 0}
        self.last_errors: list[str] = []
        self.last_failed: list[int] = []
        self._is_async = _is_async_grader(grader)

    def with_reward_key(self, reward_key: str | None) -> RewardHub:
        """A hub over the same grader (one worker pool, one remote client) and settings that picks `reward_key`
        from the grader's dicts: evaluation may report another component than the one trained on."""
        if reward_key == self.reward_key:
            return self
        return RewardHub(
            self.grader,
            concurrency=self.concurrency,
            timeout_s=self.timeout_s,
            error_reward=self.error_reward,
            reward_key=reward_key,
            max_abandoned_threads=self.max_abandoned_threads,
        )

    def _scalar(self, value: Any) -> float:
        if isinstance(value, dict):
            if self.reward_key is None:
                raise RewardValueError(
                    f"grader returned a dict with keys {sorted(value)}; set reward_key to pick one"
                )
            if self.reward_key not in value:
                raise RewardValueError(
                    f"reward_key {self.reward_key!r} not in the grader's dict; available keys: {sorted(value)}"
                )
            value = value[self.reward_key]
        if not isinstance(value, numbers.Real):
            raise RewardValueError(f"grader returned {type(value).__name__} {str(value)[:80]!r}, not a number")
        reward = float(value)
        if not math.isfinite(reward):
            raise RewardValueError(f"grader returned non-finite reward {reward}")
        return reward

    async def _grade(self, item: RewardInput) -> Any:
        arguments = {
            "prompt": item["prompt"],
            "response": item["response"],
            "label": item["label"],
            "metadata": item.get("metadata") or {},
        }
        if getattr(self.grader, "wants_sample", False):
            arguments["sample"] = item.get("sample")
        if self._is_async:
            value = self.grader(**arguments)
            return await value if inspect.isawaitable(value) else value
        if self._abandoned.count >= self.max_abandoned_threads:
            raise RuntimeError(
                f"{self._abandoned.count} timed-out grader threads are still running "
                f"(max_abandoned_threads={self.max_abandoned_threads}); not starting another"
            )
        outcome = await _run_on_daemon_thread(lambda: self.grader(**arguments), self._abandoned)
        return await outcome if inspect.isawaitable(outcome) else outcome

    def _record_failure(self, index: int, message: str) -> None:
        self.last_failed.append(index)
        if len(self.last_errors) < _MAX_RECORDED_ERRORS:
            self.last_errors.append(f"item {index}: {message}"[:_MAX_MESSAGE_CHARS])

    @property
    def abandoned_threads(self) -> int:
        """Grader threads that timed out and are still running."""
        return self._abandoned.count

    async def _score_one(self, index: int, item: RewardInput, semaphore: asyncio.Semaphore) -> float:
        async with semaphore:
            try:
                value = await asyncio.wait_for(self._grade(item), self.timeout_s)
                if isinstance(value, dict):
                    self.last_components[index] = dict(value)
                reward = self._scalar(value)
            except asyncio.TimeoutError:
                self.stats["timeouts"] += 1
                self._record_failure(index, f"timed out after {self.timeout_s}s")
                return self.error_reward
            except Exception as error:
                self.stats["errors"] += 1
                self._record_failure(index, f"{type(error).__name__}: {error}")
                return self.error_reward
        self.stats["scored"] += 1
        return reward

    async def score_batch(self, items: Sequence[RewardInput]) -> list[float]:
        """One scalar reward per item, in order."""
        self.last_errors = []
        self.last_failed = []
        self.last_components = [None] * len(items)
        semaphore = asyncio.Semaphore(self.concurrency)
        return list(
            await asyncio.gather(*(self._score_one(index, item, semaphore) for index, item in enumerate(items)))
        )

    def score_batch_sync(self, items: Sequence[RewardInput]) -> list[float]:
        """`score_batch` for callers without an event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.score_batch(items))
        raise RuntimeError("score_batch_sync was called inside a running event loop; await score_batch instead")
