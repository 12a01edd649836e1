"""A weight-sync process group shared by trainer (rank 0) and engines, kept apart from torch's default group.

Built from a `TCPStore` and a bare `ProcessGroupGloo`/`ProcessGroupNCCL`, never through
`torch.distributed.init_process_group`, so neither side gives up its own default group to it.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def make_process_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    *,
    timeout_s: float,
) -> tuple[dist.ProcessGroup, dist.TCPStore]:
    """Rendezvous through a TCPStore (rank 0 hosts it) and build the group; blocks until all ranks join.
    The store is returned because the group needs it alive."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(group_name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout), store
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, world_size, options), store


def broadcast_from_rank0(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bfloat16', the spelling SGLang's update_weights_from_distributed reads."""
    return str(dtype).removeprefix("torch.")
