"""Training checkpoints of a sharded model: its parameters and optimizer state, every rank's shards.

Why torch.distributed.checkpoint: each rank writes only its own shards (no gather onto rank 0), and on
load each rank reads the pieces its current shards need. Adam's moments are part of the state, so a
resumed run takes the same next step as one that never stopped. Frozen parameters (LoRA's base) are
left out: they come from the model path, so a LoRA checkpoint holds only the adapters and their state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# Loading fills exactly the trained entries (dcp.load fails on any the checkpoint lacks); strict would
# also demand the frozen ones, which stay as the model path gave them.
_INTO_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Write the model's and the optimizer's state into `directory` (collective: every rank calls it)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Read a `save_training_state` checkpoint into `model` and `optimizer` in place (collective)."""
    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: not a training checkpoint (no .metadata file)")
    # The layout to fill, optimizer state included.
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_TRAINED_ONLY)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_INTO_TRAINED)
