"""Training checkpoints of `rl-train` and `rl-train-async`, and resuming from them.

A checkpoint after rollout k is the folder `<save>/rollout_<k>` holding `policy/` and `critic/`
(model and optimizer state of every rank, torch.distributed.checkpoint format) and `state.json`
(the rollout id and the data source's position). `<save>/latest` names the newest complete one and is
replaced only after everything else is written, so a run killed while saving resumes from the one before.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rl_apps.lora_serving import adapter_sync
from rl_apps.train_config import TrainConfig

LATEST = "latest"


class CheckpointError(ValueError):
    """A --load folder that holds no usable checkpoint; the message names the flag and what is missing."""


def save_if_due(config: TrainConfig, parts: Any, rollout_id: int, timing: dict[str, float]) -> None:
    """Save after rollout `rollout_id` when --save (or --save-hf) is set and it is the last rollout or a
    --save-interval multiple."""
    if config.save is None and config.save_hf is None:
        return
    last = rollout_id + 1 == config.num_rollout
    if last or (config.save_interval is not None and (rollout_id + 1) % config.save_interval == 0):
        start = time.perf_counter()
        if config.save is not None:
            save_checkpoint(config, parts, rollout_id)
        if config.save_hf is not None:
            from rl_apps.hf_export import hf_folder

            parts.policy.save_hf(str(hf_folder(config.save_hf, rollout_id)))
        timing["save"] = time.perf_counter() - start


def save_checkpoint(config: TrainConfig, parts: Any, rollout_id: int) -> Path:
    """Write the checkpoint after rollout `rollout_id` (its training done) and point `latest` at it."""
    import ray

    assert config.save is not None
    folder = Path(config.save) / f"rollout_{rollout_id:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    parts.policy.save(str(folder / "policy"))
    if parts.critic is not None:
        parts.critic.save(str(folder / "critic"))
    state = {"rollout_id": rollout_id, "data_source": ray.get(parts.rollout.data_state_before.remote(rollout_id + 1))}
    _write_atomically(folder / "state.json", json.dumps(state))
    _write_atomically(Path(config.save) / LATEST, folder.name + "\n")
    return folder


def find_checkpoint(config: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """The folder `latest` names under --load and its state; raises `CheckpointError` saying what is wrong."""
    assert config.load is not None
    latest = Path(config.load) / LATEST
    if not latest.is_file():
        raise CheckpointError(f"--load {config.load}: no '{LATEST}' file, so no finished checkpoint there")
    folder = Path(config.load) / latest.read_text().strip()
    try:
        state = json.loads((folder / "state.json").read_text())
        rollout_id, data_state = int(state["rollout_id"]), state["data_source"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--load {config.load}: {folder / 'state.json'} is missing or unreadable ({e})") from None
    needed = ["policy"] + (["critic"] if config.use_critic else [])
    for part in needed:
        if not (folder / part / ".metadata").is_file():
            raise CheckpointError(f"--load {config.load}: {folder / part} holds no {part} checkpoint")
    return folder, {"rollout_id": rollout_id, "data_source": data_state}


def resume(config: TrainConfig, parts: Any) -> int:
    """Load the newest checkpoint into the trainer, critic and data source, hand the engines the loaded
    weights, and return the first rollout id still to run (--start-rollout-id if given, else 0 without --load)."""
    import ray

    if config.load is None:
        # The engines start from the base checkpoint: a policy that starts elsewhere (--lora-adapter-path), or
        # whose requests name its adapter (adapter-only sync), is sent before rollout 0.
        if parts is not None and parts.engines and (adapter_sync(config) or config.lora_adapter_path is not None):
            parts.policy.push_weights(parts.engine_urls, "default")
        return config.start_rollout_id or 0
    folder, state = find_checkpoint(config)
    parts.policy.load(str(folder / "policy"))
    if parts.critic is not None:
        parts.critic.load(str(folder / "critic"))
    ray.get(parts.rollout.load_data_state.remote(state["data_source"]))
    start = state["rollout_id"] + 1 if config.start_rollout_id is None else config.start_rollout_id
    if parts.engines:
        parts.policy.push_weights(parts.engine_urls, str(start))
    return start


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
