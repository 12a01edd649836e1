"""The engine's end of a weight-sync group: it joins at `rank_offset` and receives what rank 0 broadcasts."""

from __future__ import annotations

import torch

from rl_sglang.process_group import broadcast_from_rank0, make_process_group


class WeightUpdateGroup:
    """One named group this engine joined; receives broadcast tensors into fresh buffers."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        backend: str,
        *,
        device: torch.device,
        timeout_s: float = 300.0,
    ):
        if rank < 1:
            raise ValueError(f"rank_offset must be >= 1 (rank 0 is the trainer), got {rank}")
        self.group_name = group_name
        # NCCL receives on the engine's GPU; gloo on the host (the copy into parameters moves it)
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.group, self._store = make_process_group(
            master_address, master_port, rank, world_size, group_name, backend, timeout_s=timeout_s
        )

    def receive(self, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        received = []
        for shape, dtype in zip(shapes, dtypes):
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            broadcast_from_rank0(self.group, buffer)
            received.append(buffer)
        return received
