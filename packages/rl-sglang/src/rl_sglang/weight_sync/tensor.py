"""`TensorWeightTransport`: colocated weights handed over by handle (`rl_sglang.tensor_handoff`)
through /update_weights_from_tensor."""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from typing import Any, Literal

import torch

from rl_sglang.tensor_handoff import flattened_bucket, serialize_entry
from rl_sglang.weight_sync.adapter import replace_adapter
from rl_sglang.weight_sync.common import (
    DEFAULT_BUCKET_BYTES,
    _buckets,
    _close_all,
    _gather_raising,
    _in_dtype,
    _once_per_storage,
    _SessionTransport,
    _with_last,
)


async def _answered(calls: list[Coroutine[Any, Any, Any]], keep_alive: list[Any]) -> None:
    """Await one bucket's engine calls, holding its memory until every engine has answered (they read it in place)."""
    await _gather_raising(calls)
    del keep_alive


class TensorWeightTransport(_SessionTransport):
    """Colocated sync: hands the engines the trainer's tensors by handle (CUDA IPC on GPU, shared
    memory files on CPU) through /update_weights_from_tensor, one serialized entry per
    engine TP rank, in buckets of about `bucket_bytes` in the dtype sent (`load_format="flattened_bucket"`:
    one uint8 tensor per bucket), inside a weight-update session. Each bucket stays referenced until
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
        self._adapters_loaded: set[str] = set()

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str) -> None:
        """Bucket by bucket, sized in the dtype sent; each bucket is gathered and copied while the engines
        load the one before (one bucket in flight at a time, in order)."""
        layouts = self._engine_layouts()
        sent_dtypes = [dtype for _, dtype in layouts]
        buckets = _buckets(_once_per_storage(named_tensors), self.bucket_bytes, sent_dtypes=sent_dtypes)
        sent: list[int] = []

        def send_all() -> None:
            in_flight: Future[Any] | None = None
            for bucket, last in _with_last(buckets):
                calls, keep_alive = self._prepare_bucket(bucket, layouts, weight_version if last else None, flush_cache=last)
                if in_flight is not None:
                    try:
                        in_flight.result()
                    except BaseException:
                        for call in calls:
                            call.close()  # never sent
                        raise
                in_flight = self._loop.submit(_answered(calls, keep_alive))
                sent.append(len(bucket))
            if in_flight is not None:
                in_flight.result()

        self._update_in_session(send_all)
        if not sent:
            raise ValueError("update got no tensors to send")

    def _prepare_bucket(
        self, bucket: list[tuple[str, torch.Tensor]], layouts: list[tuple[int, torch.dtype | None]],
        weight_version: str | None, *, flush_cache: bool,
    ) -> tuple[list[Coroutine[Any, Any, Any]], list[Any]]:
        """The engine calls for one bucket (not yet awaited), and the memory they hand over by handle."""
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
        return calls, keep_alive

    def update_adapter(self, lora_name: str, config: dict[str, Any], named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str) -> None:
        """Adapter-only sync: the LoRA tensors alone, by handle, through /load_lora_adapter_from_tensors as
        `lora_name` (one entry per engine TP rank), replacing the version this transport loaded before. No
        weight-update session: SGLang's LoRA routes run outside one."""
        layouts = self._engine_layouts()
        named = list(named_tensors)
        if not named:
            raise ValueError("update_adapter got no tensors to send")
        keep_alive: list[Any] = []
        by_dtype: dict[torch.dtype | None, Any] = {}
        calls = []
        for client, (tp_size, dtype) in zip(self._clients, layouts):
            if dtype not in by_dtype:
                tensors = [(n, t.contiguous()) for n, t in _in_dtype(named, dtype)]
                by_dtype[dtype] = flattened_bucket(tensors) if self.load_format == "flattened_bucket" else tensors
                keep_alive.append(by_dtype[dtype])
            entries = [serialize_entry(by_dtype[dtype]) for _ in range(tp_size)]

            def load(client=client, entries=entries):
                return client.load_lora_adapter_from_tensors(lora_name, config, entries, load_format=self.load_format)

            calls.append(replace_adapter(client, lora_name, load, weight_version, loaded_before=lora_name in self._adapters_loaded))
        self._loop.run(_gather_raising(calls))
        del keep_alive  # every engine has answered and copied what it keeps
        self._adapters_loaded.add(lora_name)

    def close(self) -> None:
        self._loop.run(_close_all(self._clients))
        self._loop.close()
