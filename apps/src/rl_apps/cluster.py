"""Ray placement of the parts `rl-train` runs: engine servers, trainer ranks, critic ranks (ppo), the rollout manager."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator

from rl_apps.train_config import TrainConfig


class PlacementError(RuntimeError):
    """Ray could not find room for the parts; the message lists what was asked and what the cluster has."""


def _free_port(taken: tuple[int, ...] = ()) -> int:
    """A free loopback port other than `taken` (a port just released may be handed out again)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError(f"no free loopback port outside {taken} in 100 tries")


def actor_resources(config: TrainConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Ray resources of one trainer rank and one engine: a GPU each on CUDA machines, half of one with --colocate."""
    import torch

    on_gpu = torch.cuda.is_available() and "cpu" not in (config.train_device, config.rollout_device)
    if not on_gpu:
        return {"num_cpus": 1}, {"num_cpus": 1}
    share = 0.5 if config.colocate else 1.0
    return {"num_cpus": 1, "num_gpus": share}, {"num_cpus": 1, "num_gpus": share}


def placement_notice(config: TrainConfig, *, trainers: bool = True) -> str:
    """One line saying what will run where; refuses --colocate where there is no GPU to share."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus > 0 and "cpu" not in (config.train_device, config.rollout_device)
    if config.colocate and not on_gpu:
        raise PlacementError(
            "--colocate shares GPUs between the trainer and the engines, but "
            + ("torch sees no CUDA GPU" if gpus == 0 else "--train-device/--rollout-device put a part on the CPU")
            + ": every part already runs as its own CPU process, so drop --colocate"
        )
    ranks = config.actor_num_gpus_per_node if trainers else 0
    parts = [f"{ranks} {config.train_backend} trainer rank(s)"] if trainers else []
    if trainers and config.use_critic:
        parts.append(f"{ranks} critic rank(s)")
    parts.append(f"{config.rollout_num_engines} {config.engine_type} engine(s)")
    where = (
        f"on {gpus} visible GPU(s)" + (", trainer and engines sharing them (--colocate)" if config.colocate else "")
        if on_gpu
        else "as CPU processes (no CUDA GPU in use: gloo, one process per rank"
        + (f"; --actor-num-gpus-per-node {ranks} starts {ranks} CPU trainer processes" if ranks > 1 else "")
        + ")"
    )
    return f"placing {', '.join(parts)} {where}"


def _bundle(resources: dict[str, float]) -> dict[str, float]:
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return {names[k]: v for k, v in resources.items()}


@dataclass
class Parts:
    engines: list[Any] = field(default_factory=list)
    engine_urls: list[str] = field(default_factory=list)
    trainers: list[Any] = field(default_factory=list)
    """The policy's ranks (TrainerActor)."""
    critics: list[Any] = field(default_factory=list)
    """PPO's critic ranks, one per trainer rank; empty unless the estimator needs a critic."""
    rollout: Any = None
    policy: Any = None
    """The policy's ranks as one StepBackend (TrainerGroup); None without trainers (rl-eval)."""
    critic: Any = None

    def shutdown(self) -> None:
        import ray

        for actor in [self.rollout, *self.trainers, *self.critics, *self.engines]:
            if actor is None:
                continue
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - best effort: the actor's process may already be gone
                pass


@contextlib.contextmanager
def placed_parts(config: TrainConfig, *, trainers: bool = True) -> Iterator[Parts]:
    """Start Ray (unless already connected), reserve one placement group for every part, start the parts;
    on exit stop them, free the group, and stop Ray if this call started it. `trainers=False` places the
    engines and the rollout manager only (evaluation)."""
    # Workers run in this interpreter's environment: Ray's `uv run` hook, read when ray is first imported,
    # would otherwise copy the project and build a fresh venv for them.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rl_apps.actors import EngineActor, RolloutManager, TrainerActor
    from rl_apps.trainer_group import TrainerGroup

    world, num_engines = config.actor_num_gpus_per_node if trainers else 0, config.rollout_num_engines
    num_critics = world if config.use_critic else 0
    trainer_res, engine_res = actor_resources(config)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=max(os.cpu_count() or 1, world + num_critics + num_engines), include_dashboard=False,
                 configure_logging=False)
    # Bundles: trainer ranks, engines, then critic ranks (each critic rank gets what a trainer rank gets).
    bundles = [_bundle(trainer_res)] * world + [_bundle(engine_res)] * num_engines + [_bundle(trainer_res)] * num_critics
    group = placement_group(bundles, strategy="PACK")
    parts = Parts()
    try:
        try:
            ray.get(group.ready(), timeout=config.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"Ray could not place {world} trainer rank(s) and {num_critics} critic rank(s) with {trainer_res} and"
                f" {num_engines} engine(s) with {engine_res} within {config.placement_timeout}s; the cluster has"
                f" {ray.cluster_resources()}"
            ) from None
        placed = lambda i: PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)  # noqa: E731
        parts.engines = [
            EngineActor.options(scheduling_strategy=placed(world + i), **engine_res).remote(config, i) for i in range(num_engines)
        ]
        parts.engine_urls = ray.get([e.start.remote() for e in parts.engines])
        master_port = _free_port()
        parts.trainers = [
            TrainerActor.options(scheduling_strategy=placed(rank), **trainer_res).remote(
                config, "policy", rank, world, "127.0.0.1", master_port
            )
            for rank in range(world)
        ]
        critic_port = _free_port(taken=(master_port,))
        parts.critics = [
            TrainerActor.options(scheduling_strategy=placed(world + num_engines + rank), **trainer_res).remote(
                config, "critic", rank, world, "127.0.0.1", critic_port
            )
            for rank in range(num_critics)
        ]
        parts.rollout = RolloutManager.options(num_cpus=0).remote(config, parts.engine_urls)
        ray.get([a.__ray_ready__.remote() for a in [*parts.trainers, *parts.critics, parts.rollout]])
        parts.policy = TrainerGroup(parts.trainers) if parts.trainers else None
        parts.critic = TrainerGroup(parts.critics) if parts.critics else None
        yield parts
    finally:
        parts.shutdown()
        ray.util.remove_placement_group(group)
        if owns_ray:
            ray.shutdown()
