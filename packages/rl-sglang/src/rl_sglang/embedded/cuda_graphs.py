"""Decode steps replayed from CUDA graphs captured at start, one per batch-size bucket, so no step
pays a first-shape cost and a step costs one launch instead of hundreds. A batch runs in the
smallest bucket that holds it; the padding rows point at the KV pool's sink row and slot."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, every 32 up to 512, every 64 beyond; `max_bs` last."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, max_bs + 1, 64)]
    return [s for s in sizes if s < max_bs] + [max_bs]


class DecodeGraphs:
    def __init__(self, forward: Callable[..., torch.Tensor], sizes: list[int], device: torch.device):
        """`forward(ids, positions, rows, seq_lens, slots)` -> logits is the decode step on device tensors."""
        self.sizes = sizes
        self.max_bs = sizes[-1]
        self.device = device
        n = self.max_bs
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.rows = torch.zeros(n, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        started = time.monotonic()
        memory_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        with torch.inference_mode():
            for bs in reversed(sizes):  # largest first: the smaller ones reuse its memory
                args = (self.ids[:bs], self.positions[:bs], self.rows[:bs], self.seq_lens[:bs], self.slots[:bs])
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compile Triton kernels, pick cuBLAS plans
                        forward(*args)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory_pool, stream=stream, capture_error_mode="thread_local"):
                    self.outputs[bs] = forward(*args)
                self.graphs[bs] = graph
        torch.cuda.synchronize(device)
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(sizes), n, time.monotonic() - started)

    def replay(self, host: torch.Tensor) -> torch.Tensor:
        """`host` [4, B] int64: last tokens, positions, table rows, slots. Returns logits [B, V]."""
        b = host.shape[1]
        bs = next(s for s in self.sizes if s >= b)
        ids, positions, rows, slots = host.to(self.device, non_blocking=True)
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(positions)
        self.rows[:b].copy_(rows)
        self.seq_lens[:b].copy_(positions + 1)
        self.slots[:b].copy_(slots)
        if b < bs:
            for buffer in (self.ids, self.positions, self.rows, self.slots):
                buffer[b:bs].zero_()
            self.seq_lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
