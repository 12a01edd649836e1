"""Ray placement of the parts `rl-train` runs: engine servers, trainer ranks, critic ranks (ppo), the rollout manager."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator

from rl_apps.placement import Placement, PlacementError, check_fits, plan_placement
from rl_apps.train_config import TrainConfig

__all__ = ["Parts", "PlacementError", "placed_parts", "placement_notice", "placement_for"]


def _free_port(host: str = "127.0.0.1", taken: tuple[int, ...] = ()) -> int:
    """A free port on `host` other than `taken` (a port just released may be handed out again)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError(f"no free port on {host} outside {taken} in 100 tries")


def _on_gpu(config: TrainConfig) -> bool:
    import torch

    return torch.cuda.is_available() and "cpu" not in (config.train_device, config.rollout_device)


def placement_for(config: TrainConfig, *, trainers: bool = True) -> Placement:
    """The bundles this machine's devices call for (GPUs when torch sees CUDA and no part is put on the CPU)."""
    return plan_placement(config, on_gpu=_on_gpu(config), trainers=trainers)


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
    ranks = config.actor_world_size() if trainers else 0
    parts = [f"{ranks} {config.train_backend} trainer rank(s)"] if trainers else []
    if trainers and config.use_critic:
        parts.append(f"{ranks} critic rank(s)")
    per_engine = f" of {config.rollout_num_gpus_per_engine} GPUs (tp)" if on_gpu and config.rollout_num_gpus_per_engine > 1 else ""
    engines = 0 if config.debug_train_only else config.rollout_num_engines
    parts.append(f"{engines} {config.engine_type} engine(s){per_engine}")
    where = (
        f"on {gpus} visible GPU(s)" + (", trainer and engines sharing them (--colocate)" if config.colocate else "")
        if on_gpu
        else "as CPU processes (no CUDA GPU in use: gloo, one process per rank"
        + (f"; {ranks} trainer rank(s) from --actor-num-nodes x --actor-num-gpus-per-node start {ranks} CPU trainer"
           " processes" if ranks > 1 else "")
        + ")"
    )
    return f"placing {', '.join(parts)} {where}"


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

        actors = [a for a in [self.rollout, *self.trainers, *self.critics, *self.engines] if a is not None]
        # All at once: a trainer rank's shutdown waits in a barrier for its peers' (told one by one, rank 0
        # would sit out the whole timeout before rank 1 heard of it).
        calls = []
        for actor in actors:
            with contextlib.suppress(Exception):  # best effort: the actor's process may already be gone
                calls.append(actor.shutdown.remote())
        with contextlib.suppress(Exception):
            ray.wait(calls, num_returns=len(calls), timeout=60)
        # Their processes go now, not when the last handle is collected: a Ray cluster shared by several
        # runs (a test session) must not fill up with the idle actors of finished ones.
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)


def _rank_zero_address(taken: int) -> tuple[str, int]:
    """The node address of rank 0's bundle and a free port there: torch.distributed's rendezvous."""
    import ray

    from rl_apps.addresses import LOOPBACK, alive_node_count

    host = LOOPBACK if alive_node_count() == 1 else ray.util.get_node_ip_address()
    return host, _free_port(host, taken=(taken,))


def _workers_use_this_interpreter() -> None:
    """Ray reads RAY_ENABLE_UV_RUN_RUNTIME_ENV (set off by `import rl_apps`) once, when ray is first
    imported: a program that imported ray before rl_apps would still build a venv per run for the workers."""
    from ray._private import ray_constants

    if os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") == "0":
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


@contextlib.contextmanager
def placed_parts(config: TrainConfig, *, trainers: bool = True) -> Iterator[Parts]:
    """Start Ray (unless already connected), reserve one placement group for every part, start the parts;
    on exit stop them, free the group, and stop Ray if this call started it. `trainers=False` places the
    engines and the rollout manager only (evaluation)."""
    import ray

    _workers_use_this_interpreter()
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rl_apps.actors import EngineActor, RolloutManager, TrainerActor, actor_class
    from rl_apps.addresses import alive_node_count, check_engine_host
    from rl_apps.trainer_group import TrainerGroup

    plan = placement_for(config, trainers=trainers)
    world, num_critics = len(plan.trainers), len(plan.critics)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(sum(b["CPU"] for b in plan.bundles))), include_dashboard=False,
                 configure_logging=False)
    on_one_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    try:
        check_fits(plan, [node["Resources"] for node in ray.nodes() if node.get("Alive")])
        try:
            check_engine_host(config.sglang_args.get("host"), alive_node_count())
        except ValueError as e:
            raise PlacementError(str(e)) from None
    except PlacementError:
        if owns_ray:
            ray.shutdown()
        raise
    group = placement_group(plan.bundles, strategy="PACK")
    parts = Parts()
    try:
        try:
            ray.get(group.ready(), timeout=config.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"Ray could not place {plan.asked()} within {config.placement_timeout}s (--placement-timeout); the"
                f" cluster has {ray.cluster_resources()}, of which {ray.available_resources()} is free"
            ) from None
        on = lambda part: PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=part.bundle)  # noqa: E731
        placed = lambda part: dict(scheduling_strategy=on(part), **part.resources)  # noqa: E731
        def rank_zero_address(part: Any, taken: int = 0) -> tuple[str, int]:
            if on_one_node:  # the driver's loopback is every rank's: no task (and worker start) to ask it
                return "127.0.0.1", _free_port(taken=(taken,))
            return ray.get(ray.remote(_rank_zero_address).options(scheduling_strategy=on(part), num_cpus=0).remote(taken))

        def start_trainers() -> None:
            master_addr, master_port = rank_zero_address(plan.trainers[0]) if world else ("", 0)
            parts.trainers = [
                actor_class(TrainerActor).options(**placed(part)).remote(config, "policy", rank, world, master_addr, master_port)
                for rank, part in enumerate(plan.trainers)
            ]
            critic_addr, critic_port = rank_zero_address(plan.critics[0], master_port) if num_critics else ("", 0)
            parts.critics = [
                actor_class(TrainerActor).options(**placed(part)).remote(config, "critic", rank, num_critics, critic_addr, critic_port)
                for rank, part in enumerate(plan.critics)
            ]

        parts.engines = [actor_class(EngineActor).options(**placed(part)).remote(config, i) for i, part in enumerate(plan.engines)]
        engines_up = [e.start.remote() for e in parts.engines]
        if not config.colocate:  # the trainers build their models while the engines start
            start_trainers()
        parts.engine_urls = ray.get(engines_up)
        if config.colocate:  # sharing a GPU, an engine sizes its KV cache from the memory free: it goes first
            start_trainers()
        parts.rollout = actor_class(RolloutManager).options(num_cpus=0).remote(config, parts.engine_urls)
        ray.get([a.__ray_ready__.remote() for a in [*parts.trainers, *parts.critics, parts.rollout]])
        parts.policy = TrainerGroup(parts.trainers) if parts.trainers else None
        parts.critic = TrainerGroup(parts.critics, role="critic") if parts.critics else None
        yield parts
    finally:
        parts.shutdown()
        ray.util.remove_placement_group(group)
        if owns_ray:
            ray.shutdown()
