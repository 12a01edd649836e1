"""`rl-sft`: supervised fine-tuning on JSONL/Parquet rows with the same backends, metrics and checkpoints as rl-train.

Each optimizer step trains the SFT loss (negative log-likelihood of the response / assistant tokens) on
--global-batch-size rows; --num-epoch passes over the data, reshuffled each epoch with --rollout-shuffle.
One trainer rank runs in this process; more (--actor-num-gpus-per-node) run as Ray actors.
Flags are parsed before torch or Ray is imported, so `rl-sft --help` and a bad flag answer at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from rl_apps.cli import parse_config
from rl_apps.sft_config import SFTConfig
from rl_apps.train import InputError, exit_on_failure


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(SFTConfig, argv, "rl-sft", __doc__.splitlines()[0])
    exit_on_failure("rl-sft", lambda: run(config))


def load_examples(config: SFTConfig) -> list[Any]:
    """The SFT rows as token ids and loss masks; a bad row or flag raises InputError naming it."""
    from rl_core.prompt_files import DataError
    from rl_core.sft_data import load_sft_examples
    from rl_sglang.tokenizer import load_tokenizer

    if not (config.hf_folder / "config.json").is_file():
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no config.json in that folder")
    try:
        tokenizer = load_tokenizer(config.hf_folder)
    except (OSError, ValueError) as e:
        raise InputError(f"--hf-checkpoint {config.hf_checkpoint}: no loadable tokenizer ({e})") from None
    assert config.prompt_data is not None, "--prompt-data is a required flag of rl-sft, checked when the config is parsed"
    try:
        return load_sft_examples(
            config.prompt_data, tokenizer, input_key=config.input_key, response_key=config.response_key,
            apply_chat_template=config.apply_chat_template, eos_token_id=tokenizer.eos_token_id,
        )
    except (DataError, ImportError) as e:
        raise InputError(str(e)) from None


def epoch_batches(config: SFTConfig, count: int, epoch: int) -> list[list[int]]:
    """Row indices of each optimizer step of `epoch`, in order (the same on a resumed run)."""
    order = list(range(count))
    if config.rollout_shuffle:
        random.Random(config.rollout_seed + epoch).shuffle(order)
    size = config.global_batch_size
    return [order[i : i + size] for i in range(0, count, size)]


def check_inputs(config: SFTConfig) -> list[Any]:
    """Everything that can be wrong before a backend starts: data, model folder, Megatron layout, --load."""
    examples = load_examples(config)
    if config.train_backend == "megatron":
        from rl_megatron import check_config, read_hf_config

        try:
            check_config(config.backend_config(), read_hf_config(config.hf_folder),
                         world_size=config.actor_num_gpus_per_node)
        except ValueError as e:
            raise InputError(str(e)) from None
    if config.load is not None:
        find_step(config.load)
    return examples


def run(config: SFTConfig) -> Path:
    """Train; returns the metrics file (one JSON line per optimizer step: train/loss, grad_norm, lr, ...)."""
    from rl_apps.metrics import FanOutSink, JsonlSink, TensorBoardSink
    from rl_core.sft_data import sft_batch

    examples = check_inputs(config)
    steps_per_epoch = len(epoch_batches(config, len(examples), 0))
    total = steps_per_epoch * config.num_epoch
    print(f"rl-sft: {len(examples)} rows, {config.num_epoch} epoch(s) of {steps_per_epoch} step(s),"
          f" {config.actor_num_gpus_per_node} {config.train_backend} trainer rank(s)", flush=True)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    sinks = [JsonlSink(metrics_path)] + ([TensorBoardSink(output_dir / "tensorboard")] if config.use_tensorboard else [])
    sink = FanOutSink(sinks)
    loss = _sft_loss(config)
    try:
        with trainer(config, total) as policy:
            start = 0
            if config.load is not None:
                folder, step = find_step(config.load)
                policy.load(str(folder / "policy"))
                start = step + 1
            for step in range(start, total):
                step_start = time.perf_counter()
                rows = epoch_batches(config, len(examples), step // steps_per_epoch)[step % steps_per_epoch]
                metrics = {f"train/{k}": v for k, v in policy.train_step(sft_batch([examples[i] for i in rows]), loss).items()}
                metrics["train/epoch"] = step / steps_per_epoch
                timing = {"train": time.perf_counter() - step_start}
                if step + 1 == total or (config.save_interval is not None and (step + 1) % config.save_interval == 0):
                    save_start = time.perf_counter()
                    save_step(config, policy, step)
                    timing["save"] = time.perf_counter() - save_start
                metrics.update({f"time/{k}": v for k, v in timing.items()})
                sink.log(step, metrics)
                print(f"step {step}: loss {metrics['train/loss']:.4f} grad_norm {metrics['train/grad_norm']:.3f}", flush=True)
    finally:
        sink.close()
    return metrics_path


def _sft_loss(config: SFTConfig) -> Any:
    from rl_core.losses import SFTLoss

    return SFTLoss(config.loss_aggregation, config.loss_aggregation_constant)


# --- checkpoints: <save>/step_<k>/{policy/, state.json} and <save>/latest, as rl-train's -----------------


def save_step(config: SFTConfig, policy: Any, step: int) -> None:
    from rl_apps.checkpoints import LATEST, _write_atomically
    from rl_apps.hf_export import hf_folder

    if config.save is not None:
        folder = Path(config.save) / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        policy.save(str(folder / "policy"))
        _write_atomically(folder / "state.json", json.dumps({"step": step}))
        _write_atomically(Path(config.save) / LATEST, folder.name + "\n")
    if config.save_hf is not None:
        policy.save_hf(str(hf_folder(config.save_hf, step)))


def find_step(load: Path) -> tuple[Path, int]:
    """The folder `latest` names under --load and its step; InputError saying what is missing."""
    from rl_apps.checkpoints import LATEST

    latest = Path(load) / LATEST
    if not latest.is_file():
        raise InputError(f"--load {load}: no '{LATEST}' file, so no finished checkpoint there")
    folder = Path(load) / latest.read_text().strip()
    try:
        step = int(json.loads((folder / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--load {load}: {folder / 'state.json'} is missing or is not an rl-sft checkpoint ({e})") from None
    if not (folder / "policy" / ".metadata").is_file():
        raise InputError(f"--load {load}: {folder / 'policy'} holds no checkpoint")
    return folder, step


# --- the trainer: in this process for one rank, Ray actors for more ---------------------------------------


class LocalTrainer:
    """One backend in this process, with rl-train's TrainerGroup methods."""

    def __init__(self, backend: Any, hf_checkpoint: Path) -> None:
        self.backend, self.hf_checkpoint = backend, hf_checkpoint

    def train_step(self, batch: Any, loss: Any) -> dict[str, float]:
        return self.backend.train_step(batch, loss)

    def save(self, directory: str) -> None:
        self.backend.save(directory)

    def load(self, directory: str) -> None:
        self.backend.load(directory)

    def save_hf(self, directory: str) -> None:
        from rl_apps.hf_export import save_hf

        save_hf(self.backend, directory, self.hf_checkpoint, writer=True)


@contextlib.contextmanager
def trainer(config: SFTConfig, total_steps: int) -> Iterator[Any]:
    """The trained policy for the run's length (`total_steps` sizes the LR decay), closed on exit."""
    backend_config = config.backend_config(total_steps=total_steps)
    world = config.actor_num_gpus_per_node
    if world == 1:
        from rl_apps.backends import build_backend

        backend = build_backend(backend_config)
        try:
            yield LocalTrainer(backend, config.hf_folder)
        finally:
            backend.close()
        return
    with ray_trainers(config, world, total_steps) as group:
        yield group


@contextlib.contextmanager
def ray_trainers(config: SFTConfig, world: int, total_steps: int) -> Iterator[Any]:
    """`world` TrainerActor ranks in one placement group (a GPU each where there are GPUs), as a TrainerGroup."""
    import ray
    import torch
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rl_apps.actors import TrainerActor, actor_class
    from rl_apps.cluster import _free_port, _workers_use_this_interpreter
    from rl_apps.trainer_group import TrainerGroup

    resources = {"num_cpus": 1, "num_gpus": 1} if torch.cuda.is_available() and config.train_device != "cpu" else {"num_cpus": 1}
    _workers_use_this_interpreter()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=max(os.cpu_count() or 1, world), include_dashboard=False, configure_logging=False)
    group = placement_group([{"CPU": 1, **({"GPU": 1} if "num_gpus" in resources else {})}] * world, strategy="PACK")
    actors: list[Any] = []
    try:
        ray.get(group.ready(), timeout=300)
        port = _free_port()
        actors = [
            actor_class(TrainerActor).options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=r),
                **resources,
            ).remote(_FixedSteps(config, total_steps), "policy", r, world, "127.0.0.1", port)
            for r in range(world)
        ]
        yield TrainerGroup(actors)
    finally:
        with contextlib.suppress(Exception):  # all ranks at once: each one's shutdown waits for its peers'
            ray.get([actor.shutdown.remote() for actor in actors], timeout=60)
        ray.util.remove_placement_group(group)
        if owns_ray:
            ray.shutdown()


class _FixedSteps:
    """The config as a TrainerActor reads it (`backend_config(role)`, `hf_checkpoint`), with the run's length."""

    def __init__(self, config: SFTConfig, total_steps: int) -> None:
        self.config, self.total_steps = config, total_steps
        self.hf_checkpoint = config.hf_checkpoint

    def backend_config(self, role: str) -> Any:
        return self.config.backend_config(role, total_steps=self.total_steps)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
