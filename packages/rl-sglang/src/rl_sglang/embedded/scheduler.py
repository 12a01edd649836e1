"""`Scheduler`: continuous batching over the engine's KV pool. Every iteration it admits waiting
requests (as far as request rows and KV slots allow), runs one prefill step over the prompts still
being prefilled (at most `chunked_prefill_size` tokens, so a long prompt is prefilled in chunks
between decode steps), then one decode step over every request that has its prompt in the cache.
Requests join at the next iteration and leave as soon as they finish, freeing their slots.

Model work runs on one model thread, strictly one step at a time; the event loop stays free for
/health, /abort_request and weight updates. All bookkeeping (slots, rows, prefix cache) happens on
the event loop. Decode steps may overlap it (SGLang's overlap schedule; `EngineOptions.overlap_schedule`
says where it is on): step k+1 is queued on the model
thread, its input tokens taken there from step k's output, before the loop processes step k's
results (stop checks, answers), so that work hides behind the forward. A request that a stop token
ends at step k is found one step late; its token of step k+1 is dropped. One that reaches its
length is left out of steps beyond it, so it costs no extra step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Any, Callable, TypeVar

import torch

from rl_sglang.embedded.kv_cache import KVPool
from rl_sglang.embedded.model_runner import ModelRunner
from rl_sglang.embedded.prefix_cache import PrefixCache, PrefixEntry
from rl_sglang.embedded.sampling import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
STATS_EVERY_S = 5.0


@dataclass(eq=False)
class Request:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    future: asyncio.Future[dict[str, Any]]
    limit: int = 0  # most output tokens: max_new_tokens within the context length
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)
    row: int | None = None  # its request-to-token table row while admitted
    kv_len: int = 0  # tokens whose K/V are in the pool
    shared: int = 0  # leading tokens owned by a prefix-cache entry
    cached_tokens: int = 0
    entry: PrefixEntry | None = None
    filling: bool = False  # it prefills `entry` for the requests with the same prompt
    table_pending: bool = False  # the shared slots are not yet in the device table
    need: int = 0  # slots reserved at admission: its new prompt tokens and its most output tokens
    stops: frozenset[int] = frozenset()  # tokens that end it (EOS unless ignore_eos, and stop_token_ids)
    finished: bool = False  # set with the future's result (or its cancellation): cheap to test per step
    busy: int = 0  # queued steps that include it: its row and slots stay until they are collected

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class DecodeStep:
    """A decode step queued on the model thread; `tokens` is set there when it is done, for the next
    step's inputs."""

    batch: list[Request]
    result: asyncio.Future[tuple[list[int], list[float]]] | None = None
    tokens: list[int] | None = None


@dataclass
class SchedulerCounters:
    """Cumulative figures since start (served in /server_info's `internal_states`): two snapshots around a
    rollout say how many forward passes it took and where the engine's time went."""

    requests: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    step_s: float = 0.0  # prefill and decode steps, the scheduler's bookkeeping for them included
    model_s: float = 0.0  # of which on the model thread (forward, sampling, the wait for the device)
    answer_s: float = 0.0  # of which building finished requests' answers (text, ids, log-probs)
    idle_s: float = 0.0  # waiting for requests (or for KV slots)
    respond_s: float = 0.0  # the server serialising /generate answers to JSON (on the event loop, outside steps)
    last_submit_monotonic_s: float = 0.0  # time.monotonic() of the latest request's arrival
    last_finish_monotonic_s: float = 0.0  # time.monotonic() of the latest answer's completion

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


class Scheduler:
    def __init__(self, runner: ModelRunner, max_running_requests: int):
        self.runner = runner
        self.max_running_requests = max_running_requests
        self.chunk_tokens = runner.options.chunked_prefill_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-sglang-model")
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Request] = []
        self._reserved = 0  # slots admitted requests may still take
        self._depth = 2 if runner.options.overlap_schedule(runner.device.type) else 1  # decode steps queued at once
        self._queued: deque[DecodeStep] = deque()  # decode steps on the model thread, oldest first
        self._last_batch: list[Request] = []  # the requests of the latest decode step queued, in order
        self._batch_key = 0  # bumped whenever a decode step's batch differs from the one before
        self._ended: list[Request] = []  # finished since the last reap
        self._weight_generation = runner.weight_generation
        self._by_rid: dict[str, Request] = {}
        self._holds: set[str] = set()
        self._not_held = asyncio.Event()
        self._not_held.set()
        self._work = asyncio.Event()
        self._batch_empty = asyncio.Event()
        self._batch_empty.set()
        self._task: asyncio.Task[None] | None = None
        self.counters = SchedulerCounters()
        self._idle_since: float | None = None
        self._logged = SchedulerCounters()
        self._logged_at = time.monotonic()

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
        await self.on_model_thread(self.runner.close)
        self._executor.shutdown(wait=True)

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread, i.e. strictly between two generation steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _model_step(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue a generation step on the model thread now (await the future for its result), its time
        there counted in `model_s`."""

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.counters.model_s += time.perf_counter() - started

        return asyncio.get_running_loop().run_in_executor(self._executor, timed)

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, rid: str, input_ids: list[int], params: SamplingParams, return_logprob: bool) -> Request:
        if rid in self._by_rid:
            raise ValueError(f"rid {rid!r} is already in flight")
        request = Request(rid, input_ids, params, return_logprob, asyncio.get_running_loop().create_future())
        request.limit = min(params.max_new_tokens, self.runner.context_length - len(input_ids))
        request.stops = params.stop_token_ids | (frozenset() if params.ignore_eos else self.runner.eos_token_ids)
        self._by_rid[rid] = request
        self.counters.requests += 1
        self.counters.last_submit_monotonic_s = request.created_at
        request.future.add_done_callback(lambda _: self._forget(request))
        if params.max_new_tokens == 0:
            self._finish(request, {"type": "length", "length": 0})
        else:
            self._waiting.append(request)
            self._work.set()
        return request

    def _forget(self, request: Request) -> None:
        request.finished = True
        self._ended.append(request)  # also reached when its future is cancelled, not finished here
        if self._by_rid.get(request.rid) is request:
            del self._by_rid[request.rid]

    def abort(self, rid: str | None) -> int:
        """Finish `rid` (or everything when None) with finish_reason abort and its partial output;
        its KV slots are freed by the loop once no step is using them."""
        targets = list(self._by_rid.values()) if rid is None else [r for r in (self._by_rid.get(rid),) if r]
        for request in targets:
            self._finish(request, {"type": "abort", "message": "Abort in waiting queue" if not request.output_ids else "Abort request"})
        self._waiting = deque(r for r in self._waiting if not r.done)
        self._reap()
        return len(targets)

    def flush_cache(self) -> None:
        """Forget every cached prompt prefix (slots in use are freed when their last user ends)."""
        if self.runner.prefix_cache is not None:
            self.runner.prefix_cache.flush()

    @property
    def running_count(self) -> int:
        return len(self._prefilling) + len(self._decoding)

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
        """Abort the admitted requests and wait until their KV slots are back in the pool."""
        for request in self._prefilling + self._decoding:
            if not request.done:
                self._finish(request, {"type": "abort", "message": "Abort to release memory"})
        self._reap()
        await self._batch_empty.wait()

    # ---- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if self._holds:  # steps already queued finish before generation is held
                started = time.perf_counter()
                while self._queued:
                    await self._run(self._collect_decode)
                self.counters.step_s += time.perf_counter() - started
            await self._not_held.wait()
            self._admit()
            if not self._prefilling and not self._decoding:
                self._work.clear()
                if not self._waiting:
                    await self._wait_for_work()
                else:  # nothing fits until something else changes (an abort, a resume)
                    await self._wait_for_work(0.05)
                continue
            started, steps = time.perf_counter(), self.counters.prefill_steps + self.counters.decode_steps
            if self._prefilling:
                await self._run(self._prefill_step)
            await self._run(self._queue_decodes)
            if self._queued:
                await self._run(self._collect_decode)
            self.counters.step_s += time.perf_counter() - started
            if steps == self.counters.prefill_steps + self.counters.decode_steps:
                await asyncio.sleep(0)  # only ended requests left: let their done callbacks run, then reap them
                self._reap()
            self._log_stats()

    def counters_now(self) -> dict[str, float]:
        """`counters`, the idle time of a wait still under way included (a snapshot between two rollouts
        must not hand the first rollout's tail of idling to the next)."""
        now = self.counters.as_dict()
        if self._idle_since is not None:
            now["idle_s"] += time.perf_counter() - self._idle_since
        return now

    async def _wait_for_work(self, timeout_s: float | None = None) -> None:
        started = self._idle_since = time.perf_counter()
        try:
            await asyncio.wait_for(self._work.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self.counters.idle_s += time.perf_counter() - started
            self._idle_since = None

    async def _run(self, step: Callable[[], Any]) -> None:
        try:
            await step()
        except Exception as exc:  # a failed forward fails its requests, not the server
            logger.exception("generation step failed")
            for request in self._prefilling + self._decoding:
                if not request.done:
                    request.finished = True
                    request.future.set_exception(exc)
                    self._ended.append(request)
        finally:
            self._reap()

    def _admit(self) -> None:
        pool, cache = self.runner.pool, self.runner.prefix_cache
        if pool is None or cache is None:  # released: nothing is admitted until the resume
            return
        if self.runner.weight_generation != self._weight_generation:  # cached prefixes hold old K/V
            cache.flush()
            self._weight_generation = self.runner.weight_generation
        deferred: list[Request] = []
        while self._waiting and self.running_count < self.max_running_requests:
            request = self._waiting.popleft()
            if request.done:
                continue
            entry = cache.lookup(request.input_ids)
            if entry is not None and not entry.ready:  # its first request is prefilling it right now
                deferred.append(request)
                continue
            shared = entry.tokens if entry is not None else 0
            need = len(request.input_ids) - shared + request.limit
            if need + shared > pool.tokens:
                self._finish(request, {"type": "abort", "message": f"needs {need + shared} KV slots; the pool has {pool.tokens} (--max-total-tokens / --mem-fraction-static)"})
                continue
            pinned = shared if entry is not None and entry.refs == 0 else 0
            if need > pool.allocator.available + cache.evictable_tokens - pinned - self._reserved:
                self._waiting.appendleft(request)  # first come, first served: wait for slots
                break
            request.row = pool.take_row()
            if entry is not None:
                cache.acquire(entry)
                request.entry, request.shared, request.kv_len = entry, shared, shared
                request.cached_tokens = shared
                request.table_pending = True
                pool.assign(torch.full((shared,), request.row), torch.arange(shared), _ready_slots(entry))
                self.counters.cached_tokens += shared
            else:
                request.entry = cache.open(request.input_ids)
                request.filling = request.entry is not None
            request.need = need
            self._reserved += need
            self._prefilling.append(request)
        self._waiting.extendleft(reversed(deferred))

    def _kv(self) -> tuple[KVPool, PrefixCache]:
        """The KV pool and the prefix cache, which exist while any request is admitted (the memory is
        released only with generation held and no request running)."""
        pool, cache = self.runner.pool, self.runner.prefix_cache
        if pool is None or cache is None:
            raise RuntimeError("the KV pool is released while requests run")
        return pool, cache

    def _alloc(self, count: int) -> torch.Tensor:
        pool, cache = self._kv()
        if pool.allocator.available < count:
            cache.evict(count)
        return pool.allocator.alloc(count)

    async def _prefill_step(self) -> None:
        pool, cache = self._kv()
        budget, batch = self.chunk_tokens, []
        for request in self._prefilling:
            if budget <= 0:
                break
            if request.finished:
                continue
            take = min(len(request.input_ids) - request.kv_len, budget)
            batch.append((request, take))
            budget -= take
        if not batch:
            return
        slots = self._alloc(sum(take for _, take in batch))
        rows = [r.row for r, _ in batch]
        prefix_lens = [r.kv_len for r, _ in batch]
        chunks = [r.input_ids[r.kv_len : r.kv_len + take] for r, take in batch]
        pool.assign(
            torch.tensor([r.row for r, take in batch for _ in range(take)], dtype=torch.int64),
            torch.tensor([r.kv_len + j for r, take in batch for j in range(take)], dtype=torch.int64),
            slots,
        )
        table_writes = [(r.row, _ready_slots(r.entry)) for r, _ in batch if r.table_pending]
        self._reserved -= len(slots)
        for request, _ in batch:
            request.table_pending = False
        sample_at = [i for i, (r, take) in enumerate(batch) if r.kv_len + take == len(r.input_ids)]
        params = [batch[i][0].params for i in sample_at]
        for request, _ in batch:
            request.busy += 1
        try:
            tokens, logprobs = await self._model_step(
                self.runner.extend, rows, prefix_lens, chunks, slots, sample_at, params, table_writes
            )
        finally:
            for request, take in batch:
                request.busy -= 1
                request.kv_len += take
        self.counters.prefill_steps += 1
        self.counters.prefill_tokens += len(slots)
        for i, token, logprob in zip(sample_at, tokens, logprobs):
            request = batch[i][0]
            if request.filling and not request.done:
                entry, row = request.entry, request.row
                assert entry is not None and row is not None, "a filling request holds its entry and a row"
                cache.fill(entry, pool.slots_of(row, 0, entry.tokens))
                request.shared, request.filling = entry.tokens, False
            self._absorb(request, token, logprob)
            self._prefilling.remove(request)
            self._decoding.append(request)

    async def _queue_decodes(self) -> None:
        while not self._holds and len(self._queued) < self._depth and self._queue_decode():
            pass

    def _queue_decode(self) -> bool:
        """Queue one decode step over the running requests that may still need a token (those queued
        steps do not already take to their length); False when there is none. A request in the step
        queued before takes that step's token, read on the model thread once it is there."""
        pool, _ = self._kv()
        batch = [r for r in self._decoding if not r.finished and len(r.output_ids) + r.busy < r.limit]
        if not batch:
            return False
        slots = self._alloc(len(batch))
        self._reserved -= len(batch)
        rows = [r.row for r in batch if r.row is not None]
        assert len(rows) == len(batch), "a decoding request holds a row until it is released"
        positions = [r.kv_len + r.busy for r in batch]  # each queued step adds one position
        pool.assign(torch.tensor(rows, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), slots)
        before = self._queued[-1] if self._queued else None
        same = batch == self._last_batch
        if not same:
            self._batch_key += 1
            self._last_batch = batch
        if before is None:
            known: list[int] | None = [r.output_ids[-1] for r in batch]
            take_from: list[int] = []
        elif same:
            known, take_from = None, []  # the step before's tokens, as they are
        else:
            index = {id(r): j for j, r in enumerate(before.batch)}
            take_from = [index.get(id(r), -1) for r in batch]  # -1: no queued step has it, its last token is known
            known = [r.output_ids[-1] if j < 0 else 0 for r, j in zip(batch, take_from)]
        for request in batch:
            request.busy += 1
        step = DecodeStep(batch)
        params, key = [r.params for r in batch], (self._batch_key, len(batch))

        def run() -> tuple[list[int], list[float]]:
            if known is None or take_from:
                previous = before.tokens if before is not None else None
                if previous is None:
                    raise RuntimeError("the decode step before this one failed")
                last = previous if known is None else [previous[j] if j >= 0 else t for j, t in zip(take_from, known)]
            else:
                last = known
            tokens, logprobs = self.runner.decode(rows, positions, last, slots, params, key)
            step.tokens = tokens
            return tokens, logprobs

        step.result = self._model_step(run)
        self._queued.append(step)
        return True

    async def _collect_decode(self) -> None:
        """Wait for the oldest queued decode step and take its tokens (the next one runs meanwhile)."""
        step = self._queued[0]
        assert step.result is not None, "a queued step has its result future"
        try:
            tokens, logprobs = await step.result
        except BaseException:
            for request in step.batch:  # its slot is in the table: freed with the rest at release
                request.busy -= 1
                request.kv_len += 1
            raise
        finally:
            self._queued.popleft()
        self.counters.decode_steps += 1
        self.counters.decode_rows += len(step.batch)
        for request, token, logprob in zip(step.batch, tokens, logprobs):  # the hot loop: kept lean
            request.busy -= 1
            request.kv_len += 1
            if request.finished:  # ended by an earlier step's stop token, or aborted while this one ran
                continue
            output = request.output_ids
            output.append(token)
            request.output_logprobs.append(logprob)
            if token in request.stops or len(output) >= request.limit:
                self._finish_on(request, token)

    def _absorb(self, request: Request, token: int, logprob: float) -> None:
        if request.finished:  # aborted while the step ran
            return
        request.output_ids.append(token)
        request.output_logprobs.append(logprob)
        if token in request.stops or len(request.output_ids) >= request.limit:
            self._finish_on(request, token)

    def _finish_on(self, request: Request, token: int) -> None:
        if token in request.stops:
            self._finish(request, {"type": "stop", "matched": token})
        else:
            self._finish(request, {"type": "length", "length": len(request.output_ids)})

    def _reap(self) -> None:
        """Give the slots, rows and prefix references of finished requests back, once no queued step
        uses them (the rest wait for the next reap)."""
        if self._ended:
            ended, self._ended = self._ended, []
            released = False
            for request in ended:
                if request.busy:
                    self._ended.append(request)
                elif request.row is not None:
                    self._release(request)
                    released = True
            if released:
                self._prefilling = [r for r in self._prefilling if r.row is not None]
                self._decoding = [r for r in self._decoding if r.row is not None]
        if not self._prefilling and not self._decoding:
            self._batch_empty.set()
        else:
            self._batch_empty.clear()

    def _release(self, request: Request) -> None:
        pool, cache = self.runner.pool, self.runner.prefix_cache
        if request.row is None:
            return
        if pool is None or cache is None:  # the pool itself is gone (released): nothing to give back to it
            request.row = None
            return
        pool.allocator.free(pool.slots_of(request.row, request.shared, request.kv_len))
        if request.entry is not None:
            if request.filling:
                cache.abandon(request.entry)
            else:
                cache.release(request.entry)
            request.entry = None
        self._reserved -= request.need - (request.kv_len - request.cached_tokens)  # what it did not take
        pool.give_row(request.row)
        request.row = None

    def _log_stats(self) -> None:
        now = time.monotonic()
        if now - self._logged_at < STATS_EVERY_S:
            return
        c, last, elapsed = self.counters, self._logged, now - self._logged_at
        steps = max(1, c.decode_steps - last.decode_steps)
        rows = c.decode_rows - last.decode_rows
        logger.info(
            "last %.0f s: %d decode steps (mean batch %.1f, %.0f tok/s), %d prefill steps (%d tokens), %.2f s in steps of"
            " which %.2f s on the model thread, %.2f s idle, %d prompt tokens from the prefix cache; running %d, waiting %d,"
            " free KV slots %d",
            elapsed, c.decode_steps - last.decode_steps, rows / steps, rows / elapsed, c.prefill_steps - last.prefill_steps,
            c.prefill_tokens - last.prefill_tokens, c.step_s - last.step_s, c.model_s - last.model_s, c.idle_s - last.idle_s,
            c.cached_tokens - last.cached_tokens, self.running_count, len(self._waiting),
            self.runner.pool.allocator.available if self.runner.pool is not None else 0,
        )
        self._logged = replace(c)
        self._logged_at = now

    def _finish(self, request: Request, finish_reason: dict[str, Any]) -> None:
        if request.done:
            return
        started = time.perf_counter()
        request.finished = True
        self._ended.append(request)
        meta_info: dict[str, Any] = {
            "id": request.rid,
            "finish_reason": finish_reason,
            "prompt_tokens": len(request.input_ids),
            "completion_tokens": len(request.output_ids),
            "cached_tokens": request.cached_tokens,
            "weight_version": self.runner.weight_version,
            "e2e_latency": time.monotonic() - request.created_at,
        }
        if request.return_logprob:
            # tuples: JSON arrays all the same, but of atoms only, so the garbage collector skips them
            meta_info["output_token_logprobs"] = list(zip(request.output_logprobs, request.output_ids, repeat(None)))
        request.future.set_result(
            {
                "text": self.runner.decode_text(request.output_ids, request.params.skip_special_tokens),
                "output_ids": list(request.output_ids),
                "meta_info": meta_info,
            }
        )
        self.counters.answer_s += time.perf_counter() - started
        self.counters.last_finish_monotonic_s = time.monotonic()


def _ready_slots(entry: PrefixEntry | None) -> torch.Tensor:
    """The K/V slots of the prefix-cache entry a request shares: admission waits until the entry is filled."""
    assert entry is not None and entry.slots is not None, "a shared prefix is filled before a request uses it"
    return entry.slots
