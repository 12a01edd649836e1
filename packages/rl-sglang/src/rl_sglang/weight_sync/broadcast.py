"""`BroadcastWeightTransport`: weights broadcast from the trainer over a process group the engines
joined the way SGLang joins it (`rl_sglang.process_group`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterable
from typing import Any, Literal

import torch

from rl_sglang.launcher import free_port
from rl_sglang.process_group import WeightSyncGroup, dtype_name, join_weight_sync_group
from rl_sglang.weight_sync.common import (
    DEFAULT_BUCKET_BYTES,
    _buckets,
    _close_all,
    _in_dtype,
    _on_all,
    _once_per_storage,
    _SessionTransport,
    _with_last,
)


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
        assert self._group is not None, "update() joins the group first"
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
