"""Trainer-side weight transports (rl-core's `WeightTransport` shape: `update(named_tensors,
weight_version)`, `close()`), synchronous for the trainer loop. The engine HTTP calls run on a
private event loop in a background thread.

Both consume `named_tensors` lazily in buckets of about `bucket_bytes`, so a trainer that yields
gathered tensors one by one never holds the whole model twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Awaitable, Iterable, Iterator, Literal, TypeVar

import torch
from safetensors.torch import save_file

from rl_sglang.client import SGLangClient
from rl_sglang.launcher import free_port
from rl_sglang.process_group import broadcast_from_rank0, dtype_name, make_process_group

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


def _buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


async def _on_all(clients: list[SGLangClient], method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Call `method` on every engine concurrently; raise the first failure after all have answered."""
    results = await asyncio.gather(*(getattr(c, method)(*args, **kwargs) for c in clients), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _close_all(clients: list[SGLangClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


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


class BroadcastWeightTransport:
    """Broadcasts weights from the trainer (rank 0) to engines that joined a process group
    (/init_weights_update_group, rank_offset 1..N). Per bucket, /update_weights_from_distributed is
    posted to every engine while rank 0 broadcasts the bucket's tensors in the announced order."""

    def __init__(
        self,
        engine_urls: list[str],
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        backend: Literal["gloo", "nccl"] = "gloo",
        *,
        group_name: str = "rl_weight_sync",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = 600,
    ):
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._loop = _BackgroundLoop()
        self._clients = [SGLangClient(url, timeout_s=timeout_s) for url in engine_urls]
        self._group: Any = None
        self._store: Any = None

    def _connect(self) -> None:
        port = self.master_port if self.master_port is not None else free_port(self.master_address)
        world_size = 1 + len(self._clients)
        joins = self._loop.submit(self._join_all(port, world_size))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-sglang-rank0")
        made = pool.submit(
            make_process_group,
            self.master_address, port, 0, world_size, self.group_name, self.backend, timeout_s=self.timeout_s,
        )
        pool.shutdown(wait=False)
        for answer in joins.result():
            if isinstance(answer, BaseException):
                raise answer  # rank 0's half-made group times out on its own thread
        self._group, self._store = made.result()
        self.master_port = port

    async def _join_all(self, port: int, world_size: int) -> list[Any]:
        return await asyncio.gather(
            *(
                client.init_weights_update_group(self.master_address, port, rank, world_size, self.group_name, self.backend)
                for rank, client in enumerate(self._clients, start=1)
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
        pending = _buckets(named_tensors, self.bucket_bytes)
        bucket = next(pending, [])
        while True:
            following = next(pending, None)
            last = following is None
            self._send_bucket(bucket, weight_version if last else None, flush_cache=last)
            if last:
                return
            bucket = following

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
            )
        )
        for tensor in tensors:
            broadcast_from_rank0(self._group, tensor)
        answers.result()

    def close(self) -> None:
        if self._group is not None:
            self._loop.run(self._destroy_all())
            self._group = self._store = None
        self._loop.run(_close_all(self._clients))
        self._loop.close()
