"""The Ray actors `rl-train` places: engine servers, trainer ranks, critic ranks (ppo), and the rollout manager."""

from __future__ import annotations

import gc
import os
import time
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import ray

from rl_apps.lora_serving import LORA_NAME, LoraPathMiddleware, adapter_sync, engine_lora_args
from rl_apps.train_config import TrainConfig
from rl_core.protocols import AdapterBackend, AdapterWeightTransport, ForwardModel

if TYPE_CHECKING:
    from ray.actor import ActorClass

    from rl_apps.engine_supervision import EngineSupervisor, HoldingForwarder
    from rl_core.data_source import JsonlDataSource
    from rl_core.protocols import WeightTransport
    from rl_router import RouterClient
    from rl_sglang.launcher import EngineProcess


def _set_rank_env(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """torch.distributed's env:// variables for this actor; Ray shows each actor only its own GPU, hence LOCAL_RANK 0."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                      LOCAL_RANK="0")


_Actor = TypeVar("_Actor")


def actor_class(cls: type[_Actor]) -> ActorClass[_Actor]:
    """One of this module's classes as the Ray ActorClass its @ray.remote made it (mypy does not apply class
    decorators): what `.options(...).remote(...)` is called on."""
    return cast("ActorClass[_Actor]", cls)


@ray.remote
class EngineActor:
    """Owns one engine server process (SGLang or the embedded engine) on the actor's devices; with engine
    restarts on (`TrainConfig.engine_restarts`), restarts it when it dies or hangs, behind a URL that stays."""

    def __init__(self, config: TrainConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.process: EngineProcess | None = None
        self.supervisor: EngineSupervisor | None = None
        self.forwarder: HoldingForwarder | None = None
        self.bind_host, self.advertise_host = "127.0.0.1", "127.0.0.1"

    def _launch(self, timeout_s: float) -> EngineProcess:
        from rl_sglang.launcher import launch_engine

        args = {k: v for k, v in self.config.sglang_args.items() if k != "host"}
        if self.config.engine_type == "embedded":
            args.setdefault("device", self.config.rollout_device)
            args.setdefault("seed", self.config.rollout_seed + self.index)
        else:
            args.setdefault("random_seed", self.config.rollout_seed + self.index)
            if adapter_sync(self.config):
                for key, value in engine_lora_args(self.config).items():
                    args.setdefault(key, value)
            if self.config.rollout_num_gpus_per_engine > 1:  # the GPUs Ray gave this actor (CUDA_VISIBLE_DEVICES)
                args["tp_size"] = self.config.rollout_num_gpus_per_engine
        python = str(self.config.engine_python) if self.config.engine_python is not None else None
        process = launch_engine(self.config.engine_type, str(self.config.hf_checkpoint), host=self.bind_host,
                                advertise_host=self.advertise_host, sglang_args=args, python=python)
        try:
            process.wait_until_healthy(timeout_s)
        except BaseException:
            process.terminate()
            raise
        return process

    def start(self, timeout_s: float = 600.0) -> str:
        """Launch the engine; returns the URL the router and the trainers reach it at (its node's IP on a
        cluster of several nodes, see rl_apps.addresses)."""
        from rl_apps.addresses import alive_node_count, engine_hosts

        self.bind_host, self.advertise_host = engine_hosts(
            self.config.sglang_args.get("host"), node_count=alive_node_count(), node_ip=ray.util.get_node_ip_address()
        )
        process = self.process = self._launch(timeout_s)
        if not self.config.engine_restarts():
            return process.url
        from rl_apps.engine_supervision import EngineSupervisor, HoldingForwarder
        from rl_sglang.launcher import free_port, http_url

        forwarder = self.forwarder = HoldingForwarder(free_port(self.bind_host), host=self.bind_host, hold_s=timeout_s)
        forwarder.open(int(process.url.rsplit(":", 1)[1]))
        self.supervisor = EngineSupervisor(
            process, forwarder, lambda: self._launch(timeout_s),
            weights_dir=self.config.output_dir / "weights",
            max_restarts=self.config.rollout_max_engine_restarts,
            first_wait_s=self.config.rollout_health_check_first_wait,
            interval_s=self.config.rollout_health_check_interval,
            timeout_s=self.config.rollout_health_check_timeout,
            log=lambda line: print(f"engine {self.index}: {line}", flush=True),
        )
        return http_url(self.advertise_host, forwarder.port)

    def restart_count(self) -> int:
        """How often this engine's process was restarted."""
        return self.supervisor.restarts if self.supervisor is not None else 0

    def _current(self) -> Any:
        """The engine process serving now (a restart replaces it)."""
        return self.supervisor.process if self.supervisor is not None else self.process

    def pid(self) -> int | None:
        """The engine process's id (tests kill it)."""
        process = self._current()
        return process.process.pid if process is not None else None

    def release_memory(self, release: bool) -> None:
        """Give the GPU up (KV cache, weights, CUDA graphs) while the trainer trains, or take it back."""
        import asyncio

        from rl_sglang.client import SGLangClient

        async def call() -> None:
            client = SGLangClient(self._current().url)
            try:
                await (client.release_memory_occupation() if release else client.resume_memory_occupation())
            finally:
                await client.close()

        asyncio.run(call())

    def shutdown(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
            self.process = None
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
        if self.process is not None:
            self.process.terminate()
            self.process = None


@ray.remote
class TrainerActor:
    """One rank of a training backend (the policy or PPO's critic), built by the backend's factory from the
    run's config; the backend's result rank also pushes the policy's weights to the engines."""

    def __init__(self, config: TrainConfig, role: Literal["policy", "critic"], rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        _set_rank_env(rank, world_size, master_addr, master_port)
        from rl_apps.backends import build_backend

        self.config = config
        self.backend = build_backend(config.backend_config(role))
        self.transport: WeightTransport | None = None

    def result_rank(self) -> int:
        return self.backend.result_rank

    def forward(self, batch: Any, model: ForwardModel) -> list[Any]:
        return self.backend.forward(batch, model)

    def train_step(self, batch: Any, loss: Any) -> dict[str, float]:
        return self.backend.train_step(batch, loss)

    def peak_memory(self) -> int | None:
        """Peak CUDA memory allocated by this rank since the last call, then the peak is reset; None when
        the rank trains on the CPU (a figure that cannot be measured is left out, not 0)."""
        import torch

        if self.config.train_device == "cpu" or not torch.cuda.is_available():
            return None
        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return peak

    def update_weights(self, engine_urls: list[str], weight_version: str) -> float:
        """Gather full weights (all ranks take part) and push them from the result rank; returns seconds spent.
        A LoRA policy on the disk or tensor transport sends its adapter alone (`lora_serving.adapter_sync`)."""
        start = time.perf_counter()
        backend = self.backend
        adapter_only = adapter_sync(self.config)
        if adapter_only:
            assert isinstance(backend, AdapterBackend), f"adapter_sync holds for LoRA only, which {type(backend).__name__} lacks"
            weights = backend.adapter_weights()
        else:
            weights = backend.weights()
        if int(os.environ["RANK"]) != backend.result_rank:
            for _ in weights:
                pass
            return time.perf_counter() - start
        if self.transport is None:
            self.transport = self._make_transport(engine_urls)
        transport = self.transport
        if adapter_only:
            assert isinstance(backend, AdapterBackend) and isinstance(transport, AdapterWeightTransport), \
                "adapter_sync holds for the disk and tensor transports only, which have LoRA routes"
            transport.update_adapter(LORA_NAME, backend.adapter_config(), weights, weight_version)
        else:
            transport.update(weights, weight_version)
        return time.perf_counter() - start

    def save(self, directory: str) -> None:
        self.backend.save(directory)

    def offload(self, offloaded: bool) -> None:
        self.backend.offload() if offloaded else self.backend.onload()

    def load(self, directory: str) -> None:
        self.backend.load(directory)

    def save_hf(self, directory: str) -> None:
        from rl_apps.hf_export import save_hf

        save_hf(self.backend, directory, self.config.hf_folder, writer=int(os.environ["RANK"]) == self.backend.result_rank)

    def _make_transport(self, engine_urls: list[str]) -> WeightTransport:
        from rl_sglang.weight_sync import BroadcastWeightTransport, DiskWeightTransport

        if self.config.update_weight_transport == "disk":
            # With fault tolerance a dead engine is restarted from the newest version on disk, so it may miss a call.
            return DiskWeightTransport(engine_urls, self.config.output_dir / "weights",
                                       skip_unreachable=self.config.use_fault_tolerance)
        if self.config.update_weight_transport == "tensor":
            from rl_sglang.weight_sync import TensorWeightTransport

            return TensorWeightTransport(engine_urls)
        import torch

        from rl_apps.addresses import weight_sync_address

        backend: Literal["gloo", "nccl"] = "nccl" if torch.cuda.is_available() and self.config.train_device != "cpu" else "gloo"
        return BroadcastWeightTransport(engine_urls, weight_sync_address(engine_urls, ray.util.get_node_ip_address()),
                                        backend=backend)

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.backend.close()


@ray.remote
class RolloutManager:
    """Data source, router and reward hub in one place: hands back scored samples for a rollout."""

    def __init__(self, config: TrainConfig, engine_urls: list[str]) -> None:
        from rl_apps.data import (
            build_data_source,
            load_eval_rows,
            load_generation_hooks,
            load_sample_filter,
            load_sample_hooks,
            load_tokenizer,
        )
        from rl_apps.slime_api import slime_args
        from rl_rewards import build_reward
        from rl_router import MetricsMiddleware, Router, RouterThread
        from rl_sglang.client import SGLangClient

        self.config = config
        tokenizer = load_tokenizer(config)
        self.data_source = build_data_source(config, tokenizer) if config.prompt_data is not None else None
        self.eval_rows = load_eval_rows(config, tokenizer)
        self.sample_filter = load_sample_filter(config)
        self.custom_generate, self.rollout_function, self.eval_function = load_generation_hooks(config)
        self.sample_hooks = load_sample_hooks(config)
        self.reward = build_reward(config.rm_type, config.custom_rm_path, slime_args=slime_args(config),
                                   group_rm=config.group_rm, **config.reward_options())
        self.eval_reward = self.reward.with_reward_key(config.eval_reward_key or config.reward_key)
        request_timeout = config.rollout_request_timeout_s()  # the clients' own HTTP timeout must not fire first
        self.router = RouterThread(
            Router({f"engine{i}": SGLangClient(url, timeout_s=request_timeout + 30)
                    for i, url in enumerate(engine_urls)},
                   policy=config.router_policy,
                   middleware=[MetricsMiddleware(), *([LoraPathMiddleware()] if adapter_sync(config) else []),
                               *config.router_middleware_paths],
                   health_interval_s=config.rollout_health_check_interval if config.use_fault_tolerance else None,
                   health_timeout_s=config.rollout_health_check_timeout, engine_timeout_s=request_timeout)
        )
        self.router_address = self.router.start()
        self._client: RouterClient | None = None
        self._gateway: Any = None
        self._args: Any = None
        self._state_before: tuple[int, dict[str, Any]] | None = None
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:  # its own actor process
            # The process keeps what it has loaded (the prompts, tokenizer, torch) for the whole run: out of the
            # collector's reach, a full collection while a rollout's answers are parsed does not walk it (in the
            # engine benchmark's client such pauses took 0.28-0.32 s of a 2 s rollout).
            gc.collect()
            gc.freeze()

    async def generate(self, rollout_id: int) -> dict[str, Any]:
        """One rollout's scored samples (in group order), metrics, timing and wall time: from --load-debug-rollout-data,
        from --rollout-function-path, or from the default rollout (with --custom-generate-function-path
        generating each sample when given)."""
        from rl_core.debug_data import load_rollout, save_rollout
        from rl_core.metrics import rollout_metrics
        from rl_core.rollout import default_rollout
        from rl_core.sample_hooks import SampleHooks, apply_sample_hooks

        if self.config.save is not None:  # only a checkpoint reads it; the state carries every buffered sample
            self._state_before = (rollout_id, self._prompts().state_dict())
        start = time.perf_counter()
        extra: dict[str, float] = {}
        normalized_rewards = None
        if self.config.load_debug_rollout_data is not None:
            samples = load_rollout(self.config.load_debug_rollout_data, rollout_id)
            timing = {"load_rollout": time.perf_counter() - start}
        else:
            if self.rollout_function is not None:
                groups = await self._call_rollout_function(self.rollout_function, rollout_id, evaluation=False)
                await self._score_unscored([s for g in groups for s in g], self.reward)
                dropped: list[Any] = []
                timing = {"generate_and_reward": time.perf_counter() - start}
            else:
                groups, dropped, extra, timing = await default_rollout(
                    await self._generator(self.config.sampling_params()), self.reward, self._prompts(),
                    num_groups=self.config.rollout_batch_size,
                    over_sampling_batch_size=self.config.over_sampling_batch_size,
                    sample_filter=self.sample_filter,
                    max_error_ratio=self.config.max_reward_error_ratio,
                    abort=self._router_client().abort if self.config.partial_rollout else None,
                )
            args = await self._slime_args() if self.sample_hooks != SampleHooks() else None
            samples, normalized_rewards = apply_sample_hooks(self.sample_hooks, args, groups, dropped, self.data_source)
        # Generation and grading on this actor's clock (perf/rollout_time); none for a rollout read from disk.
        rollout_time = None if self.config.load_debug_rollout_data is not None else time.perf_counter() - start
        if self.config.save_debug_rollout_data is not None:
            save_rollout(self.config.save_debug_rollout_data, rollout_id, samples)
        metrics = rollout_metrics(samples)
        metrics.update(extra)
        metrics.update(self.router.metrics())  # counters, faults, per-engine load and every middleware's snapshot()
        metrics.update({f"reward/{k}": float(v) for k, v in self.reward.stats.items()})
        return {"samples": samples, "metrics": metrics, "timing": timing, "normalized_rewards": normalized_rewards,
                "rollout_time": rollout_time}

    async def evaluate(self) -> dict[str, float]:
        """Every --eval-prompt-data set, each prompt `n_samples_per_eval_prompt` times with the eval sampling
        parameters (through --eval-function-path or the generate function), graded by the eval reward:
        `eval/<name>/...` metrics (reward, lengths, pass@k, weight version)."""
        from rl_core.data_source import JsonlDataSource
        from rl_core.metrics import rollout_metrics
        from rl_core.rollout import generate_samples

        out: dict[str, float] = {}
        for name, rows in self.eval_rows.items():
            start = time.perf_counter()
            source = JsonlDataSource(rows, n_samples_per_prompt=self.config.n_samples_per_eval_prompt)
            if self.eval_function is not None:
                groups = await self._call_rollout_function(self.eval_function, 0, evaluation=True, data_source=source)
                samples = [s for g in groups for s in g]
            else:
                pending = [s for group in source.get_samples(len(rows)) for s in group]
                samples = await generate_samples(await self._generator(self.config.eval_sampling_params()), pending)
            await self._score_unscored(samples, self.eval_reward)
            for key, value in rollout_metrics(samples).items():
                out[f"eval/{name}/{key.removeprefix('rollout/')}"] = value
            out[f"eval/{name}/time"] = time.perf_counter() - start
        return out

    async def _generator(self, sampling_params: dict[str, Any]) -> Any:
        """The per-sample generator: the user's --custom-generate-function-path, or one engine call."""
        from rl_core.rollout import custom_generator, default_generator
        from rl_sglang.generation import SGLangGenerate

        if self.custom_generate is None:
            return default_generator(SGLangGenerate(self._router_client()), sampling_params,
                                     max_context_len=self.config.rollout_max_context_len,
                                     mask_offpolicy=self.config.mask_offpolicy_in_partial_rollout)
        return custom_generator(self.custom_generate, await self._slime_args(), sampling_params)

    async def _slime_args(self) -> Any:
        """The config as slime's `args`, its router address the HTTP gateway (started on first use, on this
        actor's event loop, where the user's functions run)."""
        from rl_apps.data import load_tokenizer
        from rl_apps.slime_api import slime_args
        from rl_sglang.gateway import GenerateGateway

        if self._gateway is None:  # the tokenizer serves /v1/chat/completions (docs/agents.md)
            self._gateway = GenerateGateway(self._router_client(), tokenizer=load_tokenizer(self.config),
                                            tool_call_parser=self.config.tool_call_parser, max_turns=self.config.max_turns)
            await self._gateway.start()
            self._args = slime_args(self.config, self._gateway.url)
        return self._args

    async def _call_rollout_function(self, function: Any, rollout_id: int, *, evaluation: bool,
                                     data_source: Any = None) -> list[list[Any]]:
        """slime's rollout function, async or sync; a sync one runs on a thread, so that its own event loop
        does not meet this actor's (which serves the HTTP gateway it posts to)."""
        import asyncio
        import inspect

        args, source = await self._slime_args(), data_source or self.data_source
        if inspect.iscoroutinefunction(function):
            groups = await function(args, rollout_id, source, evaluation=evaluation)
        else:
            groups = await asyncio.to_thread(function, args, rollout_id, source, evaluation=evaluation)
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise TypeError(f"the rollout function returned {type(groups).__name__}; it must return list[list[Sample]]")
        return groups

    async def _score_unscored(self, samples: list[Any], reward: Any) -> list[Any]:
        """Grade the samples a custom function left without a reward."""
        from rl_core.rollout import score_samples

        unscored = [s for s in samples if s.reward is None]
        if unscored:
            await score_samples(reward, unscored, max_error_ratio=self.config.max_reward_error_ratio)
        return samples

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
        return self._prompts().state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self._prompts().load_state_dict(state)

    def _prompts(self) -> JsonlDataSource:
        """The --prompt-data source, which every command drawing training prompts requires (rl-eval has none)."""
        assert self.data_source is not None, "training rollouts need --prompt-data, a required flag of rl-train"
        return self.data_source

    async def shutdown(self) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
        self.router.stop()
        if self._client is not None:
            self._client.close()

