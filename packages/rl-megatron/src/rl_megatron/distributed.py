"""Joining the process group and megatron-core's parallel state (TP x CP x DP x PP over every rank)."""

from __future__ import annotations

import torch

from rl_core.distributed import init_process_group_from_env, resolve_device

__all__ = ["join_process_group", "resolve_device"]


def join_process_group(device: torch.device) -> bool:
    """Initialise torch.distributed from the env:// variables unless it already is (a lone process needs none);
    True when this call created it, so the backend destroys it on close. Not bound to the device (which would
    start NCCL eagerly): the Megatron backend has run and been measured that way."""
    return init_process_group_from_env(device, bind_device=False)
