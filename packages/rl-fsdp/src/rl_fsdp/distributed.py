"""Joining (or creating) the process group the backend shards over."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from rl_core.distributed import init_process_group_from_env, resolve_device


@dataclass
class World:
    """This rank's place in the process group a model is sharded over."""

    device: torch.device
    rank: int
    size: int
    mesh: DeviceMesh
    owns_process_group: bool
    """True when joining created the group, so leaving destroys it."""

    def leave(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            # Leave together: a rank tearing gloo down while a peer (or the store's host) is still
            # busy was seen to abort in C++ ("terminate called without an active exception").
            if self.size > 1:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_process_group = False


def join_world(device_name: str) -> World:
    """Pick the device, join (or create) the process group, and build the 1-D mesh FSDP shards over."""
    device = resolve_device(device_name)
    owns = init_process_group_from_env(device)
    size = dist.get_world_size()
    return World(device, dist.get_rank(), size, init_device_mesh(device.type, (size,)), owns)
