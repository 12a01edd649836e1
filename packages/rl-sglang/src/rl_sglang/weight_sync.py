"""Trainer-side weight transports (rl-core's `WeightTransport` shape: `update(named_tensors,
weight_version)`, `close()`), synchronous for the trainer loop. The engine HTTP calls run on a
private event loop in a background thread.

All consume `named_tensors` lazily in buckets of about `bucket_bytes`, so a trainer that yields
gathered tensors one by one never holds the whole model twice. The broadcast and tensor transports
send each update inside a weight-update session (`/begin_weight_update` ... `/end_weight_update`),
which SGLang 0.5.23 requires, and cast floating tensors to the engine's dtype (fewer bytes, and
the engine would cast anyway); tensors that share storage (tied embeddings) are sent once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import threading
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors.torch import save_file

from rl_sglang.client import SGLangClient
from rl_sglang.launcher import free_port
from rl_sglang.process_group import WeightSyncGroup, dtype_name, join_weight_sync_group
from rl_sglang.tensor_handoff import flattened_bucket, serialize_entry

T = TypeVar("T")
DEFAULT_BUCKET_BYTES = 512 << 20


class _BackgroundLoop:
    """An event loop on a daemon thread, for calling async clients from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rl-sglang-weight-sync", daemon=True)
        self._thread.start()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, *, split_on_dtype: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of about `bucket_bytes`; with `split_on_dtype` a bucket holds one dtype (SGLang
    refuses a flattened broadcast whose tensors would sit at unaligned byte offsets)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
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


class DiskWeightTransport:
    """Writes each version as safetensors shards (HF layout with an index) into a fresh subfolder of
    `directory`, has every engine load it via /update_weights_from_disk, then deletes the versions
    this transport wrote before."""

    def __init__(
        self,
        engine_urls: list[str],
        directory: str | Path,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600,
    ):
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bucket_bytes = bucket_bytes
        self._loop = _BackgroundLoop()
        self._clients = [SGLangClient(url, timeout_s=timeout_s) for url in engine_urls]
        self._written: list[Path] = []

    def _fresh_folder(self, weight_version: str) -> Path:
        stem = "weights_" + (re.sub(r"[^A-Za-z0-9_.-]", "_", weight_version) or "unnamed")
        folder, suffix = self.directory / stem, 1
        while folder.exists():
            folder, suffix = self.directory / f"{stem}-{suffix}", suffix + 1
        folder.mkdir()
        return folder

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> Path:
        folder = self._fresh_folder(weight_version)
        shard_maps: list[list[str]] = []
        for index, bucket in enumerate(_buckets(named_tensors, self.bucket_bytes)):
            # clone: tied weights share storage, which safetensors refuses to write twice
            tensors = {name: t.to("cpu").contiguous().clone() for name, t in bucket}
            save_file(tensors, str(folder / f"shard-{index:05d}.safetensors"), metadata={"format": "pt"})
            shard_maps.append(list(tensors))
        total = len(shard_maps)
        weight_map = {}
        for index, names in enumerate(shard_maps):
            final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            (folder / f"shard-{index:05d}.safetensors").rename(folder / final)
            weight_map.update({name: final for name in names})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        folder = self.write(named_tensors, weight_version)
        self._written.append(folder)
        self._loop.run(
            _on_all(self._clients, "update_weights_from_disk", str(folder), weight_version=weight_version)
        )
        for old in self._written[:-1]:
            shutil.rmtree(old, ignore_errors=True)
        self._written = self._written[-1:]

    def close(self) -> None:
        self._loop.run(_close_all(self._clients))
        self._loop.close()


class BroadcastWeightTransport(_SessionTransport):
    """Broadcasts weights from the trainer (rank 0) to engines that joined a process group through
    /init_weights_update_group (engine i at rank_offset 1 + the TP sizes before it; its TP ranks
    take rank_offset + tp_rank, as SGLang does). Per bucket, /update_weights_from_distributed is
    posted to every engine while rank 0 broadcasts the bucket in the announced order, inside a
    weight-update session. `load_format="flattened_bucket"` sends a bucket as one uint8 broadcast."""

    def __init__(
        self,
        engine_urls: list[str],
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        backend: Literal["gloo", "nccl"] = "gloo",
        *,
        group_name: str = "rl_weight_sync",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        load_format: Literal["flattened_bucket"] | None = None,
        dtype: torch.dtype | Literal["engine"] | None = "engine",
        timeout_s: float = 600,
    ):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if load_format not in (None, "flattened_bucket"):
            raise ValueError(f"load_format must be None or 'flattened_bucket', got {load_format!r}")
        super().__init__(engine_urls, timeout_s=timeout_s, dtype=dtype)
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.load_format = load_format
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._group: WeightSyncGroup | None = None

    def _connect(self) -> None:
        tp_sizes = [tp for tp, _ in self._engine_layouts()]
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        world_size = 1 + sum(tp_sizes)
        port = self.master_port if self.master_port is not None else free_port(self.master_address)
        joins = self._loop.submit(self._join_all(port, offsets, world_size))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-sglang-rank0")
        made = pool.submit(
            join_weight_sync_group,
            self.master_address, port, 0, world_size, self.group_name, self.backend, timeout_s=self.timeout_s,
        )
        pool.shutdown(wait=False)
        for answer in joins.result():
            if isinstance(answer, BaseException):
                raise answer  # rank 0's half-made group times out on its own thread
        self._group = made.result()
        self.master_port = port

    async def _join_all(self, port: int, offsets: list[int], world_size: int) -> list[Any]:
        return await asyncio.gather(
            *(
                client.init_weights_update_group(self.master_address, port, offset, world_size, self.group_name, self.backend)
                for offset, client in zip(offsets, self._clients)
            ),
            return_exceptions=True,
        )

    async def _destroy_all(self) -> None:
        await asyncio.gather(
            *(c.destroy_weights_update_group(self.group_name) for c in self._clients), return_exceptions=True
        )

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        if self._group is None:
            self._connect()
        dtypes = {dtype for _, dtype in self._engine_layouts()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None  # one broadcast serves all: engines must agree
        tensors = _in_dtype(_once_per_storage(named_tensors), dtype)
        buckets = _buckets(tensors, self.bucket_bytes, split_on_dtype=self.load_format == "flattened_bucket")

        def send_all() -> None:
            for bucket, last in _with_last(buckets):
                self._send_bucket(bucket, weight_version if last else None, flush_cache=last)

        self._update_in_session(send_all)

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], weight_version: str | None, *, flush_cache: bool) -> None:
        tensors = [t.to(self.device).contiguous() for _, t in bucket]
        answers = self._loop.submit(
            _on_all(
                self._clients,
                "update_weights_from_distributed",
                [name for name, _ in bucket],
                [dtype_name(t.dtype) for t in tensors],
                [list(t.shape) for t in tensors],
                self.group_name,
                weight_version=weight_version,
                flush_cache=flush_cache,
                load_format=self.load_format,
            )
        )
        if self.load_format == "flattened_bucket":
            self._group.broadcast_from_rank0(torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]))
        else:
            for tensor in tensors:
                self._group.broadcast_from_rank0(tensor)
        answers.result()

    def close(self) -> None:
        if self._group is not None:
            self._loop.run(self._destroy_all())
            self._group.close()
            self._group = None
        self._loop.run(_close_all(self._clients))
        self._loop.close()


class TensorWeightTransport(_SessionTransport):
    """Colocated sync: hands the engines the trainer's tensors by handle (CUDA IPC on GPU, shared
    memory file descriptors on CPU) through /update_weights_from_tensor, one serialized entry per
    engine TP rank, in buckets of about `bucket_bytes` (`load_format="flattened_bucket"`: one
    uint8 tensor per bucket), inside a weight-update session. Each bucket stays referenced until
    every engine has answered, since the engines read the memory in place."""

    def __init__(
        self,
        engine_urls: list[str],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        load_format: Literal["flattened_bucket", "direct"] | None = "flattened_bucket",
        dtype: torch.dtype | Literal["engine"] | None = "engine",
        timeout_s: float = 600,
    ):
        if load_format not in (None, "direct", "flattened_bucket"):
            raise ValueError(f"load_format must be None, 'direct' or 'flattened_bucket', got {load_format!r}")
        super().__init__(engine_urls, timeout_s=timeout_s, dtype=dtype)
        self.bucket_bytes = bucket_bytes
        self.load_format = load_format

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        layouts = self._engine_layouts()
        buckets = _buckets(_once_per_storage(named_tensors), self.bucket_bytes)
        sent: list[int] = []

        def send_all() -> None:
            for bucket, last in _with_last(buckets):
                self._send_bucket(bucket, layouts, weight_version if last else None, flush_cache=last)
                sent.append(len(bucket))

        self._update_in_session(send_all)
        if not sent:
            raise ValueError("update got no tensors to send")

    def _send_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], layouts: list[tuple[int, torch.dtype | None]],
        weight_version: str | None, *, flush_cache: bool,
    ) -> None:
        keep_alive: list[Any] = []
        by_dtype: dict[torch.dtype | None, Any] = {}
        calls = []
        for client, (tp_size, dtype) in zip(self._clients, layouts):
            if dtype not in by_dtype:
                tensors = [(n, t.contiguous()) for n, t in _in_dtype(bucket, dtype)]
                by_dtype[dtype] = flattened_bucket(tensors) if self.load_format == "flattened_bucket" else tensors
                keep_alive.append(by_dtype[dtype])
            entries = [serialize_entry(by_dtype[dtype]) for _ in range(tp_size)]  # each TP rank opens its own
            calls.append(
                client.update_weights_from_tensor(
                    entries, load_format=self.load_format, flush_cache=flush_cache, weight_version=weight_version
                )
            )
        self._loop.run(_gather_raising(calls))
        del keep_alive  # every engine has answered: it no longer reads this memory

    def close(self) -> None:
        self._loop.run(_close_all(self._clients))
        self._loop.close()


async def _gather_raising(calls: list[Awaitable[Any]]) -> list[Any]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
