"""The Ray actors `rl-train` places: engine servers, trainer ranks, critic ranks (ppo), and the rollout manager."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from rl_apps.train_config import TrainConfig


def _set_rank_env(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """torch.distributed's env:// variables for this actor; Ray shows each actor only its own GPU, hence LOCAL_RANK 0."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                      LOCAL_RANK="0")


@ray.remote
class EngineActor:
    """Owns one engine server process (SGLang or the embedded engine) on the actor's devices."""

    def __init__(self, config: TrainConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.process = None

    def start(self, timeout_s: float = 600.0) -> str:
        from rl_sglang.launcher import launch_engine

        args = dict(self.config.sglang_args)
        if self.config.engine_type == "embedded":
            args.setdefault("device", self.config.rollout_device)
            args.setdefault("seed", self.config.rollout_seed + self.index)
        self.process = launch_engine(self.config.engine_type, str(self.config.hf_checkpoint), sglang_args=args)
        self.process.wait_until_healthy(timeout_s)
        return self.process.url

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process = None


@ray.remote
class TrainerActor:
    """One rank of a training backend (the policy or PPO's critic), built by the backend's factory from the
    run's config; the backend's result rank also pushes the policy's weights to the engines."""

    def __init__(self, config: TrainConfig, role: str, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        _set_rank_env(rank, world_size, master_addr, master_port)
        from rl_apps.backends import build_backend

        self.config = config
        self.backend = build_backend(config.backend_config(role))
        self.transport = None

    def result_rank(self) -> int:
        return self.backend.result_rank

    def forward(self, batch: Any, model: str) -> list[Any]:
        return self.backend.forward(batch, model)

    def train_step(self, batch: Any, loss: Any) -> dict[str, float]:
        return self.backend.train_step(batch, loss)

    def update_weights(self, engine_urls: list[str], weight_version: str) -> float:
        """Gather full weights (all ranks take part) and push them from the result rank; returns seconds spent."""
        start = time.perf_counter()
        weights = self.backend.weights()
        if int(os.environ["RANK"]) != self.backend.result_rank:
            for _ in weights:
                pass
            return time.perf_counter() - start
        if self.transport is None:
            self.transport = self._make_transport(engine_urls)
        self.transport.update(weights, weight_version)
        return time.perf_counter() - start

    def save(self, directory: str) -> None:
        self.backend.save(directory)

    def load(self, directory: str) -> None:
        self.backend.load(directory)

    def _make_transport(self, engine_urls: list[str]) -> Any:
        from rl_sglang.weight_sync import BroadcastWeightTransport, DiskWeightTransport

        if self.config.update_weight_transport == "disk":
            return DiskWeightTransport(engine_urls, self.config.output_dir / "weights")
        import torch

        backend = "nccl" if torch.cuda.is_available() and self.config.train_device != "cpu" else "gloo"
        return BroadcastWeightTransport(engine_urls, backend=backend)

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.backend.close()


@ray.remote
class RolloutManager:
    """Data source, router and reward hub in one place: hands back scored samples for a rollout."""

    def __init__(self, config: TrainConfig, engine_urls: list[str]) -> None:
        from rl_rewards import build_reward
        from rl_router import MetricsMiddleware, Router, RouterThread
        from rl_sglang.client import SGLangClient

        from rl_apps.data import build_data_source, load_eval_rows, load_sample_filter, load_tokenizer

        self.config = config
        tokenizer = load_tokenizer(config)
        self.data_source = build_data_source(config, tokenizer) if config.prompt_data is not None else None
        self.eval_rows = load_eval_rows(config, tokenizer)
        self.sample_filter = load_sample_filter(config)
        self.reward = build_reward(config.rm_type, config.custom_rm_path, **config.reward_options())
        self.eval_reward = self.reward.with_reward_key(config.eval_reward_key or config.reward_key)
        request_timeout = config.rollout_request_timeout_s()  # the clients' own HTTP timeout must not fire first
        self.router = RouterThread(
            Router({f"engine{i}": SGLangClient(url, timeout_s=request_timeout + 30)
                    for i, url in enumerate(engine_urls)},
                   policy=config.router_policy, middleware=[MetricsMiddleware(), *config.router_middleware_paths],
                   health_interval_s=config.rollout_health_check_interval if config.use_fault_tolerance else None,
                   health_timeout_s=config.rollout_health_check_timeout, engine_timeout_s=request_timeout)
        )
        self.router_address = self.router.start()
        self._client = None
        self._state_before: tuple[int, dict[str, Any]] | None = None

    async def generate(self, rollout_id: int) -> dict[str, Any]:
        from rl_core.metrics import rollout_metrics
        from rl_core.rollout import generate_groups, generate_samples, score_samples

        if self.config.save is not None:  # only a checkpoint reads it; the state carries every buffered sample
            self._state_before = (rollout_id, self.data_source.state_dict())
        client = self._router_client()
        start = time.perf_counter()
        timing: dict[str, float] = {}
        extra: dict[str, float] = {}
        if self.sample_filter is None and self.config.over_sampling_batch_size is None:
            samples = [s for g in self.data_source.get_samples(self.config.rollout_batch_size) for s in g]
            await generate_samples(client, samples, self.config.sampling_params())
            timing["generate"] = time.perf_counter() - start
            await score_samples(self.reward, samples, max_error_ratio=self.config.max_reward_error_ratio)
            timing["reward"] = time.perf_counter() - start - timing["generate"]
        else:
            # Dynamic sampling: generate and score rounds of groups until enough pass the filter.
            groups, stats = await generate_groups(
                client, self.reward, self.data_source,
                num_groups=self.config.rollout_batch_size,
                sampling_params=self.config.sampling_params(),
                over_sampling_batch_size=self.config.over_sampling_batch_size,
                sample_filter=self.sample_filter,
                max_error_ratio=self.config.max_reward_error_ratio,
            )
            samples = [s for g in groups for s in g]
            timing["generate_and_reward"] = time.perf_counter() - start
            extra = stats.metrics()
        metrics = rollout_metrics(samples)
        metrics.update(extra)
        metrics.update(self.router.metrics())  # counters, faults, per-engine load and every middleware's snapshot()
        metrics.update({f"reward/{k}": float(v) for k, v in self.reward.stats.items()})
        return {"samples": samples, "metrics": metrics, "timing": timing}

    async def evaluate(self) -> dict[str, float]:
        """Every --eval-prompt-data set, each prompt `n_samples_per_eval_prompt` times with the eval sampling
        parameters, graded by the reward hub: `eval/<name>/...` metrics (reward, lengths, pass@k, weight version)."""
        from rl_core.data_source import JsonlDataSource
        from rl_core.metrics import rollout_metrics
        from rl_core.rollout import generate_samples, score_samples

        client = self._router_client()
        out: dict[str, float] = {}
        for name, rows in self.eval_rows.items():
            start = time.perf_counter()
            source = JsonlDataSource(rows, n_samples_per_prompt=self.config.n_samples_per_eval_prompt)
            samples = [s for group in source.get_samples(len(rows)) for s in group]
            await generate_samples(client, samples, self.config.eval_sampling_params())
            await score_samples(self.eval_reward, samples, max_error_ratio=self.config.max_reward_error_ratio)
            for key, value in rollout_metrics(samples).items():
                out[f"eval/{name}/{key.removeprefix('rollout/')}"] = value
            out[f"eval/{name}/time"] = time.perf_counter() - start
        return out

    def _router_client(self) -> Any:
        from rl_router import RouterClient

        if self._client is None:
            self._client = RouterClient(self.router_address)
        return self._client

    def data_state_before(self, rollout_id: int) -> dict[str, Any]:
        """The data source's state from just before rollout `rollout_id` drew its prompts: what a checkpoint
        taken after rollout `rollout_id - 1` keeps, even when rollout `rollout_id` is already in flight."""
        if self._state_before is not None and self._state_before[0] == rollout_id:
            return self._state_before[1]
        return self.data_source.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.data_source.load_state_dict(state)

    def shutdown(self) -> None:
        self.router.stop()
        if self._client is not None:
            self._client.close()

