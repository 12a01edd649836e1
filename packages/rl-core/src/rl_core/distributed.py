"""Starting torch.distributed from the env:// variables a launcher sets (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK), shared by the training backends."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """The device this rank trains on ("auto", "cpu" or "cuda"); CUDA ranks take GPU LOCAL_RANK (or RANK
    modulo the GPU count), which also becomes the current CUDA device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", int(os.environ.get("RANK", "0")) % torch.cuda.device_count()))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group_from_env(device: torch.device, *, bind_device: bool = True) -> bool:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT unless it already is; NCCL on
    CUDA, gloo on the CPU. A lone process needs none of them: world size 1 on a free loopback port.

    `bind_device` hands a CUDA `device` to the group (torch's `device_id`: NCCL starts eagerly on it).
    Returns True when this call created the group, so the caller owns its teardown.
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
    port = int(os.environ.get("MASTER_PORT", 0)) or free_loopback_port()
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        device_id=device if bind_device and device.type == "cuda" else None,
    )
    return True
