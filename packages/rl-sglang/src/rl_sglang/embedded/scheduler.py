"""`Scheduler`: queues `/generate` requests, batches what is waiting, and steps the batch token by
token on the model thread while the event loop stays free for /health, /abort_request and weights.

A batch is formed from the queue when the previous one has drained (no joining mid-batch); rows
leave it as soon as they finish, and their KV-cache rows are dropped with them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from rl_sglang.embedded.model_runner import BatchState, ModelRunner
from rl_sglang.embedded.sampling import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Request:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    future: asyncio.Future[dict[str, Any]]
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.future.done()


class Scheduler:
    def __init__(self, runner: ModelRunner, max_running_requests: int):
        self.runner = runner
        self.max_running_requests = max_running_requests
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-sglang-model")
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._state: BatchState | None = None
        self._stepping = False
        self._by_rid: dict[str, Request] = {}
        self._holds: set[str] = set()
        self._not_held = asyncio.Event()
        self._not_held.set()
        self._work = asyncio.Event()
        self._batch_empty = asyncio.Event()
        self._batch_empty.set()
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="rl-sglang-scheduler")

    async def stop(self) -> None:
        self.abort(None)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread, i.e. strictly between two generation steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, rid: str, input_ids: list[int], params: SamplingParams, return_logprob: bool) -> Request:
        if rid in self._by_rid:
            raise ValueError(f"rid {rid!r} is already in flight")
        request = Request(rid, input_ids, params, return_logprob, asyncio.get_running_loop().create_future())
        self._by_rid[rid] = request
        request.future.add_done_callback(lambda _: self._by_rid.pop(rid, None))
        if params.max_new_tokens == 0:
            self._finish(request, {"type": "length", "length": 0})
        else:
            self._waiting.append(request)
            self._work.set()
        return request

    def abort(self, rid: str | None) -> int:
        """Finish `rid` (or everything when None) with finish_reason abort and its partial output."""
        targets = list(self._by_rid.values()) if rid is None else [r for r in (self._by_rid.get(rid),) if r]
        for request in targets:
            self._finish(request, {"type": "abort", "message": "Abort in waiting queue" if not request.output_ids else "Abort request"})
        self._waiting = deque(r for r in self._waiting if not r.done)
        if not self._stepping:
            self._drop_batch_if_drained()
        return len(targets)

    # ---- holding (pause / release) ------------------------------------------------------------

    @property
    def holds(self) -> frozenset[str]:
        return frozenset(self._holds)

    def hold(self, reason: str) -> None:
        self._holds.add(reason)
        self._not_held.clear()

    def unhold(self, reason: str) -> None:
        self._holds.discard(reason)
        if not self._holds:
            self._not_held.set()

    async def drop_running_batch(self) -> None:
        """Abort the running batch's requests and wait until its KV cache is gone."""
        for request in self._running:
            if not request.done:
                self._finish(request, {"type": "abort", "message": "Abort to release memory"})
        if not self._stepping:
            self._drop_batch_if_drained()
        await self._batch_empty.wait()

    # ---- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._not_held.wait()
            if not self._running:
                if not self._waiting:
                    self._work.clear()
                    await self._work.wait()
                    continue
                await self._step(prefill=True)
            else:
                await self._step(prefill=False)

    async def _step(self, *, prefill: bool) -> None:
        self._stepping = True
        try:
            if prefill:
                count = min(self.max_running_requests, len(self._waiting))
                self._running = [self._waiting.popleft() for _ in range(count)]
                self._batch_empty.clear()
                prompts = [r.input_ids for r in self._running]
                params = [r.params for r in self._running]
                self._state, tokens, logprobs = await self.on_model_thread(self.runner.prefill, prompts, params)
            else:
                keep = [i for i, r in enumerate(self._running) if not r.done]
                self._running = [self._running[i] for i in keep]
                params = [r.params for r in self._running]
                tokens, logprobs = await self.on_model_thread(self.runner.decode, self._state, keep, params)
            self._absorb(tokens, logprobs)
        except Exception as exc:  # a failed forward fails its batch, not the server
            logger.exception("generation step failed")
            for request in self._running:
                if not request.done:
                    request.future.set_exception(exc)
            self._running = []
        finally:
            self._stepping = False
            self._drop_batch_if_drained()

    def _absorb(self, tokens: list[int], logprobs: list[float]) -> None:
        for request, token, logprob in zip(self._running, tokens, logprobs):
            if request.done:  # aborted while the step ran
                continue
            request.output_ids.append(token)
            request.output_logprobs.append(logprob)
            params = request.params
            room = self.runner.context_length - len(request.input_ids)
            if not params.ignore_eos and token in self.runner.eos_token_ids:
                self._finish(request, {"type": "stop", "matched": token})
            elif token in params.stop_token_ids:
                self._finish(request, {"type": "stop", "matched": token})
            elif len(request.output_ids) >= min(params.max_new_tokens, room):
                self._finish(request, {"type": "length", "length": len(request.output_ids)})

    def _drop_batch_if_drained(self) -> None:
        if all(r.done for r in self._running):
            self._running = []
            self._state = None
            self._batch_empty.set()

    def _finish(self, request: Request, finish_reason: dict[str, Any]) -> None:
        if request.done:
            return
        params = request.params
        meta_info: dict[str, Any] = {
            "id": request.rid,
            "finish_reason": finish_reason,
            "prompt_tokens": len(request.input_ids),
            "completion_tokens": len(request.output_ids),
            "cached_tokens": 0,
            "weight_version": self.runner.weight_version,
            "e2e_latency": time.monotonic() - request.created_at,
        }
        if request.return_logprob:
            meta_info["output_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(request.output_logprobs, request.output_ids)
            ]
        request.future.set_result(
            {
                "text": self.runner.decode_text(request.output_ids, params.skip_special_tokens),
                "output_ids": list(request.output_ids),
                "meta_info": meta_info,
            }
        )
