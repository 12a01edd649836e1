"""The engine's preallocated KV cache: one pool of token slots per layer, a request-to-token table
that says which slots hold each request's tokens (SGLang's `req_to_token`), and the free lists.

Slots are single tokens (page size 1), so requests never waste a partial page and a shared prompt
prefix is shared by pointing several table rows at the same slots. Slot 0 and table row 0 are
sinks: padded rows of a batch read and write there and nothing real ever lives there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SINK = 0
CPU_POOL_BYTES = 2 << 30  # default KV budget on CPU when --max-total-tokens is not given
CPU_MAX_TOKENS = 65536


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> KVLayout:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype)


def pool_tokens(
    layout: KVLayout,
    device: torch.device,
    *,
    mem_fraction_static: float | None,
    max_total_tokens: int | None,
    reserved_bytes: int = 0,
) -> int:
    """How many token slots the pool gets. On CUDA, SGLang's rule: once the weights are loaded,
    whatever is free beyond the (1 - `mem_fraction_static`) share of the GPU kept for activations and
    CUDA graphs goes to the KV pool (memory other processes hold counts as used). `max_total_tokens`
    caps it, and sizes it on CPU."""
    per_token = layout.bytes_per_token
    if device.type == "cuda":
        fraction = 0.85 if mem_fraction_static is None else mem_fraction_static
        free, total = torch.cuda.mem_get_info(device)
        free_for_kv = free - int(total * (1 - fraction)) - reserved_bytes
        tokens = free_for_kv // per_token
        if tokens < 1:
            raise ValueError(
                f"--mem-fraction-static {fraction}: with {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free after "
                f"loading the weights, keeping {(1 - fraction) * total / 2**30:.1f} GiB aside leaves no room for a KV cache; raise it"
            )
        if max_total_tokens is not None:
            tokens = min(tokens, max_total_tokens)
    else:
        tokens = max_total_tokens if max_total_tokens is not None else min(CPU_MAX_TOKENS, CPU_POOL_BYTES // per_token)
    if tokens < 1:
        raise ValueError(f"--max-total-tokens must be >= 1, got {max_total_tokens}")
    return int(tokens)


class TokenAllocator:
    """Free token slots, 1..size (slot 0 is the sink). Allocation hands out CPU int64 tensors."""

    def __init__(self, size: int):
        self.size = size
        self._free = torch.arange(1, size + 1, dtype=torch.int64)
        self._released: list[torch.Tensor] = []
        self._released_count = 0

    @property
    def available(self) -> int:
        return len(self._free) + self._released_count

    def alloc(self, count: int) -> torch.Tensor:
        if count > self.available:
            raise MemoryError(f"KV pool: {count} slots asked, {self.available} free")
        if count > len(self._free):
            self._free = torch.cat([self._free, *self._released])
            self._released, self._released_count = [], 0
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def free(self, slots: torch.Tensor) -> None:
        if len(slots):
            self._released.append(slots)
            self._released_count += len(slots)


class KVPool:
    """The device tensors: K and V slots of every layer, the request-to-token table (and its host
    mirror, which the scheduler reads when it frees a request)."""

    def __init__(self, layout: KVLayout, tokens: int, max_requests: int, context_length: int, device: torch.device):
        self.layout = layout
        self.tokens = tokens
        self.context_length = context_length
        self.device = device
        shape = (2, layout.num_layers, tokens + 1, layout.num_kv_heads, layout.head_dim)
        self.buffer = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.req_to_token = torch.zeros(max_requests + 1, context_length, dtype=torch.int32, device=device)
        self.req_to_token_host = torch.zeros(max_requests + 1, context_length, dtype=torch.int32)
        self.allocator = TokenAllocator(tokens)
        self.free_rows = list(range(max_requests, 0, -1))
        logger.info(
            "KV pool: %d tokens (%.2f GiB), %d request rows x %d context",
            tokens, self.buffer.numel() * self.buffer.element_size() / 2**30, max_requests, context_length,
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer[0, index], self.buffer[1, index]

    def take_row(self) -> int:
        return self.free_rows.pop()

    def give_row(self, row: int) -> None:
        self.free_rows.append(row)

    def assign(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Record (host side) that request rows hold `slots` at `positions`; the device table is
        written by the forward pass that fills those slots."""
        self.req_to_token_host[rows, positions] = slots.to(torch.int32)

    def slots_of(self, row: int, start: int, end: int) -> torch.Tensor:
        return self.req_to_token_host[row, start:end].to(torch.int64)

    @staticmethod
    def table_bytes(max_requests: int, context_length: int) -> int:
        return (max_requests + 1) * context_length * 4
