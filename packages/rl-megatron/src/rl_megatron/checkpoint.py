"""Checkpoints in megatron-core's dist_checkpointing (torch_dist) format.

The model is saved as global tensors, so it loads under any TP/PP layout. The distributed optimizer's
state is saved `dp_reshardable` (each rank's flat buffer shards: parallel, no gathering), which loads only
under the same TP/PP/CP/DP layout; under another layout `load` refuses unless `no_load_optim` is set,
in which case the optimizer starts fresh (Adam moments zero, step count kept for the LR schedule). A
model-only checkpoint (rl-convert's HF -> torch_dist) loads under any layout with a fresh optimizer.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

if TYPE_CHECKING:
    from rl_megatron.backend import MegatronBackend

_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _plain_results_queue() -> None:
    """A synchronous save collects its writers' results in-process; megatron-core's default queue lives in
    a spawned manager process that costs ~30 s to start on a small CPU machine."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def _layout(backend: MegatronBackend) -> dict[str, int]:
    c = backend.config
    return {
        "tensor_model_parallel_size": c.tensor_model_parallel_size,
        "pipeline_model_parallel_size": c.pipeline_model_parallel_size,
        "context_parallel_size": c.context_parallel_size,
        "data_parallel_size": backend.dp_size,
        "use_distributed_optimizer": int(c.use_distributed_optimizer),
    }


def _sharded(backend: MegatronBackend, is_loading: bool, with_optimizer: bool) -> dict:
    model = backend.gpt.sharded_state_dict()
    state = {"model": model}
    if with_optimizer and is_loading:
        # A distributed optimizer that never stepped has no state to describe; give it placeholder state.
        for optimizer in getattr(backend.optimizer, "chained_optimizers", [backend.optimizer]):
            init = getattr(optimizer, "_init_optimizer_states_with_dummy_values", None)
            if init is not None:
                init()
    if with_optimizer:
        state["optimizer"] = backend.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT)
    return state


def _unshare_step_counters(optimizer) -> None:
    """megatron-core restores torch Adam's per-parameter `step` as one tensor shared by every parameter;
    torch increments each parameter's counter in place, so a shared one would advance once per parameter
    per step (wrong bias correction). Give each parameter its own copy."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


def save_checkpoint(backend: MegatronBackend, directory: Path, with_optimizer: bool = True) -> None:
    """Model (and optimizer) state into `directory`; without the optimizer (a converted HF model, slime's
    convert_hf_to_torch_dist) the checkpoint loads under any layout and starts a fresh optimizer."""
    _plain_results_queue()
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = _sharded(backend, is_loading=False, with_optimizer=with_optimizer)
    state["backend"] = {"steps": backend.steps, "layout": _layout(backend), "model_only": not with_optimizer}
    dist_checkpointing.save(state, str(directory))
    dist.barrier()


def load_checkpoint(backend: MegatronBackend, directory: Path) -> None:
    if not (directory / "metadata.json").is_file():
        raise ValueError(f"checkpoint {directory}: no metadata.json, not a dist_checkpointing (torch_dist) directory")
    common = dist_checkpointing.load_common_state_dict(str(directory))["backend"]
    same_layout = common["layout"] == _layout(backend)
    model_only = bool(common.get("model_only", False))
    if not same_layout and not backend.config.no_load_optim and not model_only:
        raise ValueError(
            f"checkpoint {directory} was saved under layout {common['layout']}, this run is {_layout(backend)}:"
            " the model reshards, the optimizer state does not; set --no-load-optim to load the model only"
        )
    load_optimizer = same_layout and not backend.config.no_load_optim and not model_only
    with torch.no_grad():
        state = dist_checkpointing.load(_sharded(backend, is_loading=True, with_optimizer=load_optimizer), str(directory))
        backend.gpt.load_state_dict(state["model"], strict=False)
        if load_optimizer:
            backend.optimizer.load_state_dict(state["optimizer"])
            _unshare_step_counters(backend.optimizer)
        else:
            # The model's new values must reach the optimizer's float32 master copy.
            reload = getattr(backend.optimizer, "reload_model_params", None)
            if reload is not None:
                reload()
    backend.steps = int(common["steps"])
