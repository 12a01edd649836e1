"""Joining the process group and megatron-core's parallel state (TP x CP x DP x PP over every rank)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """CUDA ranks take GPU LOCAL_RANK (or RANK modulo the GPU count); auto picks CUDA when there is one."""
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(device: torch.device) -> bool:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT unless it already is (a
    lone process needs none of them); True when this call created it, so the backend destroys it on close."""
    if dist.is_initialized():
        return False
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        raise ValueError(f"WORLD_SIZE is {world_size} but MASTER_ADDR/MASTER_PORT are not set")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
    )
    return True
