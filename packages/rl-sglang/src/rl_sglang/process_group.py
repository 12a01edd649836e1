"""The weight-sync process group, joined the way SGLang's engines join it.

An SGLang engine answers /init_weights_update_group with its `init_custom_process_group` helper:
`torch.distributed.rendezvous("tcp://addr:port", rank, world_size)` (rank 0 hosts the TCPStore),
`PrefixStore(group_name, store)`, then torch's group helper, which adds the prefixes
`"{group_name}/"` and `"{device}/"` before building the backend. Both the trainer side and the
embedded engine build the same chain of stores here, so their keys meet SGLang's; the group is not
registered in torch's global group table, so neither side gives up its default group to it and a
trainer and an embedded engine may share one process (tests). `tests/test_sglang_rendezvous.py`
joins SGLang's own helper (its source, read from the wheel) with this one over gloo.

Ranks: the trainer is rank 0; engine `i`'s TP rank `t` is `rank_offset_i + t`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

BACKENDS = ("gloo", "nccl")


def tcp_init_method(master_address: str, master_port: int) -> str:
    """SGLang's `NetworkAddress.to_tcp()`: IPv6 literals in brackets."""
    host = f"[{master_address}]" if ":" in master_address and not master_address.startswith("[") else master_address
    return f"tcp://{host}:{master_port}"


@dataclass
class WeightSyncGroup:
    """One rank's membership: the backend that runs the collectives and the store it needs alive."""

    backend: Any
    store: dist.Store
    rank: int
    world_size: int
    group_name: str

    def broadcast_from_rank0(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        self.backend.broadcast([tensor], options).wait()

    def close(self) -> None:
        shutdown = getattr(self.backend, "shutdown", None)
        if callable(shutdown) and "NCCL" in type(self.backend).__name__:
            shutdown()
        self.backend = None


def join_weight_sync_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    *,
    timeout_s: float,
) -> WeightSyncGroup:
    """Rendezvous and build the group; blocks until all `world_size` ranks have joined."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not group_name:
        raise ValueError("group_name must not be empty (SGLang refuses it)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        dist.rendezvous(tcp_init_method(master_address, master_port), rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    backend_store = dist.PrefixStore(f"{_first_device(backend)}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store)))
    made = _make_backend(backend_store, rank, world_size, backend, group_name, timeout)
    return WeightSyncGroup(made, store, rank, world_size, group_name)


def _first_device(backend: str) -> str:
    """The device whose prefix torch's group helper gives a single-backend group ("cpu" for gloo,
    "cuda" for nccl): the first of the backend's devices."""
    config = c10d.BackendConfig(dist.Backend(backend))
    return next(iter(config.get_device_backend_map()))


def _make_backend(store: dist.Store, rank: int, world_size: int, backend: str, group_name: str, timeout: datetime.timedelta) -> Any:
    """The backend torch's group helper would create for `backend` (a registered creator where this
    torch has one, e.g. the NCCL implementation it picks), without a parent group to split from."""
    plugin = getattr(dist.Backend, "_plugins", {}).get(backend.upper())
    if plugin is not None and getattr(plugin, "extended_api", False):
        options = c10d._DistributedBackendOptions()
        options.store = store
        options.group_rank = rank
        options.group_size = world_size
        options.timeout = timeout
        options.group_id = c10d.GroupName(group_name)
        options.global_ranks_in_group = []
        return plugin.creator_fn(options, None)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    nccl_options = dist.ProcessGroupNCCL.Options()
    nccl_options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, nccl_options)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bfloat16', the spelling SGLang's update_weights_from_distributed reads."""
    return str(dtype).removeprefix("torch.")
