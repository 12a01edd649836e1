"""The engine's end of a weight-sync group: it joins at `rank_offset` (its only TP rank is 0, so
its rank is `rank_offset + 0`, as in SGLang) and receives what rank 0 broadcasts."""

from __future__ import annotations

import torch

from rl_sglang.process_group import join_weight_sync_group


class WeightUpdateGroup:
    """One named group this engine joined; receives broadcast tensors into fresh buffers."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        *,
        device: torch.device,
        timeout_s: float = 300.0,
    ):
        if rank_offset < 1:
            raise ValueError(f"rank_offset must be >= 1 (rank 0 is the trainer), got {rank_offset}")
        self.group_name = group_name
        # NCCL receives on the engine's GPU; gloo on the host (the copy into parameters moves it)
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.group = join_weight_sync_group(
            master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s=timeout_s
        )

    def receive(self, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        received = []
        for shape, dtype in zip(shapes, dtypes):
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            self.group.broadcast_from_rank0(buffer)
            received.append(buffer)
        return received

    def receive_flattened(self, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """`load_format: flattened_bucket`: one uint8 broadcast holding the tensors back to back."""
        sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, dtypes)]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        self.group.broadcast_from_rank0(flat)
        out, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes):
            if start % dtype.itemsize:
                raise ValueError(f"unaligned tensor at byte {start} for dtype {dtype}")
            out.append(flat[start : start + size].view(dtype).reshape(shape))
            start += size
        return out

    def close(self) -> None:
        self.group.close()
