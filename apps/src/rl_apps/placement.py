"""What `rl-train` asks Ray for: one placement-group bundle per part, and which bundle each part runs on.

Pure arithmetic over the config (slime's resource flags) and whether GPUs are in use, so it is tested
without a cluster; `cluster.placed_parts` hands the bundles to Ray. `check_fits` refuses a request that
no cluster of the given nodes can hold before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class PlacementError(RuntimeError):
    """Ray could not find room for the parts; the message lists what was asked and what the cluster has."""


@dataclass(frozen=True)
class PartPlacement:
    bundle: int
    """Index into `Placement.bundles`."""
    resources: dict[str, float]
    """Ray actor options (`num_cpus`, `num_gpus`) within that bundle."""


@dataclass(frozen=True)
class Placement:
    bundles: list[dict[str, float]]
    """Ray bundles ({"CPU": n, "GPU": m}), in the order: trainer ranks, engines, critic ranks."""
    trainers: list[PartPlacement] = field(default_factory=list)
    engines: list[PartPlacement] = field(default_factory=list)
    critics: list[PartPlacement] = field(default_factory=list)
    gpus_per_engine: int = 1
    """GPUs each engine's bundle holds; SGLang's --tp-size."""
    on_gpu: bool = False

    def asked(self) -> str:
        cpus = sum(b.get("CPU", 0.0) for b in self.bundles)
        gpus = sum(b.get("GPU", 0.0) for b in self.bundles)
        return (f"{len(self.trainers)} trainer rank(s), {len(self.engines)} engine(s) of {self.gpus_per_engine if self.on_gpu else 0}"
                f" GPU(s), {len(self.critics)} critic rank(s): {len(self.bundles)} bundle(s), {cpus:g} CPU and {gpus:g} GPU in all,"
                f" the largest bundle {max(self.bundles, key=lambda b: (b.get('GPU', 0), b.get('CPU', 0)), default={})}")


def plan_placement(config: Any, *, on_gpu: bool, trainers: bool = True) -> Placement:
    """The bundles and the parts on them. On GPUs each trainer/critic rank gets one GPU and each engine
    --rollout-num-gpus-per-engine GPUs; with --colocate trainer rank i, critic rank i and engine i share
    bundle i (one GPU, split between them). On CPU every part is a process with one CPU."""
    world = config.actor_world_size() if trainers else 0
    critics = world if trainers and config.use_critic else 0
    engines = 0 if config.debug_train_only else config.rollout_num_engines  # trains on saved rollouts, no engine
    per_engine = config.rollout_num_gpus_per_engine
    if not on_gpu:
        one = {"num_cpus": 1}
        bundles = [{"CPU": 1.0}] * (world + engines + critics)
        return Placement(
            bundles,
            trainers=[PartPlacement(i, dict(one)) for i in range(world)],
            engines=[PartPlacement(world + i, dict(one)) for i in range(engines)],
            critics=[PartPlacement(world + engines + i, dict(one)) for i in range(critics)],
            gpus_per_engine=per_engine,
        )
    if config.colocate:
        # slime's layout: max(trainer GPUs, engine GPUs) GPUs, each shared by the parts placed on it.
        gpus = max(world, engines)
        sharing = [int(i < world) + int(i < engines) + int(i < critics) for i in range(gpus)]
        bundles = [{"CPU": float(n), "GPU": 1.0} for n in sharing]
        share = lambda i: {"num_cpus": 1, "num_gpus": round(1.0 / sharing[i], 4)}  # noqa: E731
        return Placement(
            bundles,
            trainers=[PartPlacement(i, share(i)) for i in range(world)],
            engines=[PartPlacement(i, share(i)) for i in range(engines)],
            critics=[PartPlacement(i, share(i)) for i in range(critics)],
            gpus_per_engine=1,
            on_gpu=True,
        )
    rank = {"num_cpus": 1, "num_gpus": 1}
    bundles = [{"CPU": 1.0, "GPU": 1.0}] * world + [{"CPU": 1.0, "GPU": float(per_engine)}] * engines
    bundles += [{"CPU": 1.0, "GPU": 1.0}] * critics
    return Placement(
        bundles,
        trainers=[PartPlacement(i, dict(rank)) for i in range(world)],
        engines=[PartPlacement(world + i, {"num_cpus": 1, "num_gpus": per_engine}) for i in range(engines)],
        critics=[PartPlacement(world + engines + i, dict(rank)) for i in range(critics)],
        gpus_per_engine=per_engine,
        on_gpu=True,
    )


def check_fits(placement: Placement, nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse, naming what was asked and what the nodes have, a placement that cannot fit: a bundle larger
    than every node (a bundle lives on one node), or more CPUs or GPUs than the nodes hold together.
    `nodes` are the alive nodes' total resources (Ray's `ray.nodes()[i]["Resources"]`)."""
    have = [f"node {i}: {n.get('CPU', 0.0):g} CPU, {n.get('GPU', 0.0):g} GPU" for i, n in enumerate(nodes)]
    where = f"asked for {placement.asked()}; Ray has {'; '.join(have) or 'no nodes'}"
    for kind in ("CPU", "GPU"):
        asked = sum(b.get(kind, 0.0) for b in placement.bundles)
        total = sum(n.get(kind, 0.0) for n in nodes)
        if asked > total + 1e-9:
            raise PlacementError(f"the parts need {asked:g} {kind} but the cluster has {total:g}: {where}")
    for bundle in placement.bundles:
        if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
            raise PlacementError(f"no node can hold a bundle of {bundle} (a bundle lives on one node): {where}")
