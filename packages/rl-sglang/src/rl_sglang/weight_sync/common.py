"""What the weight transports share: a background event loop for the engine calls, lazy
bucketing, the engines' layout (TP size, dtype) from /server_info, and the weight-update session."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch

from rl_sglang.client import SGLangClient

T = TypeVar("T")
DEFAULT_BUCKET_BYTES = 512 << 20


class _BackgroundLoop:
    """An event loop on a daemon thread, for calling async clients from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rl-sglang-weight-sync", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *, split_on_dtype: bool = False,
    sent_dtypes: Sequence[torch.dtype | None] = (),
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of about `bucket_bytes`; with `split_on_dtype` a bucket holds one dtype (SGLang
    refuses a flattened broadcast whose tensors would sit at unaligned byte offsets). Floating-point
    tensors are counted at the widest of `sent_dtypes` they will be cast to (None: as they are)."""
    widest = max((d.itemsize for d in sent_dtypes if d is not None), default=None)
    if None in sent_dtypes:
        widest = None
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        itemsize = widest if widest is not None and tensor.is_floating_point() else tensor.element_size()
        nbytes = tensor.numel() * itemsize
        new_dtype = split_on_dtype and bucket and bucket[-1][1].dtype != tensor.dtype
        if bucket and (size + nbytes > bucket_bytes or new_dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


def _with_last(items: Iterator[T]) -> Iterator[tuple[T, bool]]:
    """Each item with whether it is the last (the last bucket flushes the cache and sets the version)."""
    current = next(items, None)
    if current is None:
        return
    for following in items:
        yield current, False
        current = following
    yield current, True


def _once_per_storage(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Skip a tensor that views the same memory as one already sent (tied embeddings): the
    engine's loader fills the tied parameter from the first name."""
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in named_tensors:
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        yield name, tensor


def _in_dtype(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in named_tensors:
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor


def _engine_dtype(server_info: dict[str, Any]) -> torch.dtype | None:
    """The engine's weight dtype from /server_info ("auto" or unknown: None, send as is)."""
    name = server_info.get("dtype")
    value = getattr(torch, str(name).removeprefix("torch."), None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def _engine_layout(server_info: dict[str, Any], url: str) -> int:
    """The engine's TP size; weight sync supports neither data-parallel replicas nor pipeline stages
    (SGLang refuses the first; the second would need one sender per stage)."""
    for key in ("dp_size", "pp_size"):
        if int(server_info.get(key) or 1) != 1:
            raise ValueError(f"engine {url} runs {key}={server_info[key]}; weight sync needs {key}=1")
    return int(server_info.get("tp_size") or 1)


async def _on_all(clients: list[SGLangClient], method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Call `method` on every engine concurrently; raise the first failure after all have answered."""
    results = await asyncio.gather(*(getattr(c, method)(*args, **kwargs) for c in clients), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _close_all(clients: list[SGLangClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def _end_sessions(clients: list[SGLangClient]) -> None:
    """Close the session on every engine, whatever happened inside it; raise the first failure."""
    results = await asyncio.gather(*(c.end_weight_update() for c in clients), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class _SessionTransport:
    """What the session transports share: clients, the loop, each engine's TP size and dtype."""

    def __init__(self, engine_urls: list[str], *, timeout_s: float, dtype: torch.dtype | Literal["engine"] | None):
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        self.engine_urls = list(engine_urls)
        self.timeout_s = timeout_s
        self._dtype = dtype
        self._loop = _BackgroundLoop()
        self._clients = [SGLangClient(url, timeout_s=timeout_s) for url in engine_urls]
        self._layout: list[tuple[int, torch.dtype | None]] | None = None

    def _engine_layouts(self) -> list[tuple[int, torch.dtype | None]]:
        """(tp_size, dtype to send in) per engine, read once from /server_info."""
        if self._layout is None:
            infos = self._loop.run(_on_all(self._clients, "get_server_info"))
            self._layout = [
                (_engine_layout(info, url), _engine_dtype(info) if self._dtype == "engine" else self._dtype)
                for info, url in zip(infos, self.engine_urls)
            ]
        return self._layout

    def _update_in_session(self, send_all: Any) -> None:
        """begin on every engine, `send_all()`, end on every engine even if sending failed."""
        self._loop.run(_on_all(self._clients, "begin_weight_update"))
        try:
            send_all()
        except BaseException:
            try:
                self._loop.run(_end_sessions(self._clients))
            except Exception:
                pass  # the sending failure is the one to report
            raise
        self._loop.run(_end_sessions(self._clients))


async def _gather_raising(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
