"""The `remote` reward: a reward model behind an HTTP endpoint, called with batches of samples.

Wire format (JSON): POST `{"items": [{"prompt", "response", "label", "metadata"}, ...]}` to `url`; the
reply is `{"rewards": [r0, r1, ...]}`, one float (or dict of named floats) per item, in order.

The hub calls a grader per item; this one gathers the items that arrive together into batches of up to
`batch_size` (waiting at most `max_wait_s` for a batch to fill) and posts each batch once. Each attempt
has `timeout_s`; connection failures, timeouts, 429 and 5xx are retried `max_retries` times with
exponential backoff (`backoff_s`, doubled each time); other 4xx fail at once. The hub's `timeout_s` must
cover the retries. HTTP runs on urllib in a worker thread, so the package needs no HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from rl_rewards.types import RewardValue

_RETRIED_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class RemoteRewardError(RuntimeError):
    """The endpoint failed for good (retries exhausted, a non-retried status, or a malformed reply)."""


class _Retryable(Exception):
    pass


class RemoteRewardModel:
    """Async grader that posts micro-batches to `url`; `stats` counts `requests`, `retries` and `failures`."""

    def __init__(
        self,
        *,
        url: str,
        batch_size: int = 32,
        max_wait_s: float = 0.01,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        if batch_size < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0 or max_wait_s < 0:
            raise ValueError(
                "remote reward: need batch_size >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0, "
                f"max_wait_s >= 0 (got {batch_size}, {max_retries}, {timeout_s}, {backoff_s}, {max_wait_s})"
            )
        self.url = url
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> RewardValue:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (e.g. each score_batch_sync): start afresh
            self._loop, self._pending, self._flush_handle = loop, [], None
        future: asyncio.Future = loop.create_future()
        self._pending.append(({"prompt": prompt, "response": response, "label": label, "metadata": metadata}, future))
        if len(self._pending) >= self.batch_size:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = [(item, future) for item, future in self._pending if not future.done()]
        self._pending = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._settle(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _settle(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            rewards = await self.post_batch([item for item, _ in batch])
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), reward in zip(batch, rewards):
            if not future.done():
                future.set_result(reward)

    async def post_batch(self, items: list[dict[str, Any]]) -> list[RewardValue]:
        """Rewards for `items` from one request, retried with exponential backoff."""
        body = json.dumps({"items": items}).encode()
        for attempt in range(self.max_retries + 1):
            self.stats["requests"] += 1
            try:
                reply = await asyncio.wait_for(asyncio.to_thread(self._post, body), self.timeout_s + 1.0)
                return self._rewards(reply, len(items))
            except (_Retryable, asyncio.TimeoutError) as error:
                if attempt == self.max_retries:
                    self.stats["failures"] += 1
                    raise RemoteRewardError(
                        f"remote reward {self.url}: gave up after {attempt + 1} attempts: {error or 'timed out'}"
                    ) from error
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff_s * 2**attempt)
            except RemoteRewardError:
                self.stats["failures"] += 1
                raise
        raise AssertionError("unreachable: the loop returns or raises")

    def _post(self, body: bytes) -> Any:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode("utf-8", errors="replace")
            if error.code in _RETRIED_STATUSES:
                raise _Retryable(f"HTTP {error.code}: {detail}") from error
            raise RemoteRewardError(f"remote reward {self.url}: HTTP {error.code}: {detail}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from error
        try:
            return json.loads(payload)
        except json.JSONDecodeError as error:
            raise RemoteRewardError(f"remote reward {self.url}: reply is not JSON: {payload[:100]!r}") from error

    def _rewards(self, reply: Any, count: int) -> list[RewardValue]:
        rewards = reply.get("rewards") if isinstance(reply, dict) else None
        if not isinstance(rewards, list) or len(rewards) != count:
            raise RemoteRewardError(
                f"remote reward {self.url}: reply needs 'rewards', a list of {count}; got {str(reply)[:200]}"
            )
        return rewards
