"""Training checkpoints of a sharded model: its parameters and optimizer state, every rank's shards.

Why torch.distributed.checkpoint: each rank writes only its own shards (no gather onto rank 0), and on
load each rank reads the pieces its current shards need. Adam's moments are part of the state, so a
resumed run takes the same next step as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Write the model's and the optimizer's state into `directory` (collective: every rank calls it)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Read a `save_training_state` checkpoint into `model` and `optimizer` in place (collective)."""
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: not a training checkpoint (no .metadata file)")
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill, optimizer state included
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
