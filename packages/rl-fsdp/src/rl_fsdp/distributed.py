"""Joining (or creating) the process group the backend shards over."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def resolve_device(name: str) -> torch.device:
    """The device this rank trains on; CUDA ranks take GPU LOCAL_RANK (or RANK modulo the GPU count)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", int(os.environ.get("RANK", "0")) % torch.cuda.device_count()))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group_from_env(device: torch.device) -> bool:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT unless it already is.

    Returns True when this call created the group (so the caller owns its teardown). A lone process
    needs no env vars: it gets world size 1 on a free loopback port.
    """
    if dist.is_initialized():
        return False
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE is {world_size} but {', '.join(missing)} is not set")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else _free_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        device_id=device if device.type == "cuda" else None,
    )
    return True


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
