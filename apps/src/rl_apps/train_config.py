"""The full configuration of `rl-train`: rl-core's sections plus the parts the app assembles.

Every field is a command-line flag of the same name with dashes (`hf_checkpoint` is `--hf-checkpoint`),
slime's name wherever slime has one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from rl_core.config import DataConfig, RLStepConfig, SamplingConfig, Section, nearest_divisors
from rl_rewards import default_registry as reward_registry


class ModelConfig(Section):
    help_section: ClassVar[str] = "data"

    hf_checkpoint: Path | None = None
    """Hugging Face model folder (config, tokenizer, weights) that both trainer and engines load."""

    @property
    def hf_folder(self) -> Path:
        """--hf-checkpoint, which every command reading it requires (checked when its config is parsed)."""
        assert self.hf_checkpoint is not None, "--hf-checkpoint is a required flag, checked when the config is parsed"
        return self.hf_checkpoint


class TrainerConfig(Section):
    help_section: ClassVar[str] = "trainer"

    train_backend: Literal["fsdp", "megatron"] = "fsdp"
    """Training backend: PyTorch FSDP2 over Hugging Face models, or megatron-core (TP/PP/CP)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam is AdamW (decoupled weight decay), as Megatron's."""
    lr: float = Field(1e-6, gt=0.0)
    """Learning rate of the policy (the peak, with warm-up and decay)."""
    min_lr: float = Field(0.0, ge=0.0)
    """Learning rate floor of --lr-decay-style linear/cosine."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """How the learning rate falls from --lr to --min-lr over --lr-decay-iters."""
    lr_decay_iters: int | None = Field(None, gt=0)
    """Optimizer steps over which the rate decays from --lr to --min-lr (default: all steps of the run)."""
    lr_warmup_iters: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to --lr."""
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """Adam's first-moment decay."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """Adam's second-moment decay."""
    adam_eps: float = Field(1e-8, gt=0.0)
    """Adam's denominator epsilon."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay (AdamW) or L2 (sgd)."""
    clip_grad: float = Field(1.0, ge=0.0)
    """Gradient norm clipping threshold; 0 disables clipping."""
    seed: int = 1234
    """Seed of the trainer: torch.manual_seed before the model is built (a random init, value heads)."""
    actor_num_nodes: int = Field(1, gt=0)
    """Nodes of the trainer; it runs actor_num_nodes x actor_num_gpus_per_node ranks."""
    actor_num_gpus_per_node: int = Field(1, gt=0)
    """Trainer ranks per node (one per GPU on CUDA machines, one process each on CPU)."""
    critic_num_nodes: int | None = Field(None, gt=0)
    """Nodes of PPO's critic; it runs one rank per trainer rank, so only --actor-num-nodes is accepted (as slime sets it)."""
    critic_num_gpus_per_node: int | None = Field(None, gt=0)
    """Critic ranks per node; only --actor-num-gpus-per-node is accepted (as slime sets it)."""
    train_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the trainer; auto is cuda when torch sees a GPU."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the trainer; master weights and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass to save memory (--recompute-granularity full)."""
    torch_compile: bool = True
    """Compile the trainer's decoder layers and log-prob function with torch.compile on CUDA (the first step
    pays the compilation; --no-torch-compile runs eagerly); no effect on a CPU trainer."""
    use_dynamic_batch_size: bool | None = None
    """Micro-batches formed by a token budget (--max-tokens-per-gpu), samples packed without padding
    (default on --train-backend fsdp unless --micro-batch-size is given; megatron refuses it)."""
    max_tokens_per_gpu: int | None = Field(None, gt=0)
    """Tokens per training micro-batch on each rank with dynamic batch size (default 16384)."""
    log_probs_max_tokens_per_gpu: int | None = Field(None, gt=0)
    """Tokens per micro-batch of log-prob/value passes without gradients (default --max-tokens-per-gpu)."""
    balance_data: bool = False
    """Deal samples to data-parallel ranks so each gets about the same number of tokens (fsdp)."""
    log_probs_chunk_size: int = Field(-1, ge=-1)
    """Compute log-probs and entropy this many tokens at a time, so no micro-batch's full-vocabulary
    logits exist at once (recomputed in the backward pass); -1: all at once (fsdp)."""
    critic_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the critic (ppo); defaults to lr, as in slime."""


class MegatronFlags(Section):
    help_section: ClassVar[str] = "trainer"

    """megatron-core's flags (slime's and Megatron's names), used with --train-backend megatron; checked
    in full by rl_megatron.MegatronConfig before Ray starts."""

    tensor_model_parallel_size: int = Field(1, gt=0)
    """Ranks that split every layer's heads and MLP columns."""
    pipeline_model_parallel_size: int = Field(1, gt=0)
    """Stages of consecutive decoder layers."""
    context_parallel_size: int = Field(1, gt=0)
    """Ranks that split each sequence."""
    sequence_parallel: bool = False
    """Norms and dropouts on a 1/TP slice of the sequence (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard float32 master weights and Adam state over the data-parallel ranks."""
    accumulate_allreduce_grads_in_fp32: bool = True
    """With bfloat16 compute, accumulate and reduce gradients in float32."""
    attention_softmax_in_fp32: bool = True
    """Attention softmax in float32 (always so with SDPA; False is refused)."""
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities during train steps."""
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after attention and MLP during train steps."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation: full layers, or core attention only."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recomputation: uniform groups of --recompute-num-layers, or the first N layers of each stage."""
    recompute_num_layers: int | None = Field(None, gt=0)
    """Layers per recomputed group (uniform) or recomputed layers per stage (block)."""
    no_load_optim: bool = False
    """--load restores the model only (to resume under another parallel layout)."""
    sgd_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """Momentum of --optimizer sgd."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """local: SDPA attention and torch norms; transformer_engine needs TransformerEngine."""
    expert_model_parallel_size: int = Field(1, gt=0)
    """MoE: ranks that split each MoE layer's experts (out of the data-parallel ranks)."""
    expert_tensor_parallel_size: int | None = Field(None, gt=0)
    """MoE: ranks that split each expert's MLP (default: --tensor-model-parallel-size)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """MoE: the load-balancing loss over each micro-batch's tokens, or each sequence's."""
    moe_aux_loss_coeff: float = Field(0.0, ge=0.0)
    """MoE: weight of the load-balancing loss (0: off)."""
    moe_z_loss_coeff: float | None = Field(None, ge=0.0)
    """MoE: weight of the router z-loss."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """MoE: how tokens reach their experts' ranks (allgather only without expert parallelism)."""
    moe_router_dtype: Literal["fp32", "fp64"] | None = None
    """MoE: precision of the routing (default: the model's)."""
    moe_grouped_gemm: bool = False
    """MoE: all local experts in one grouped GEMM (needs --transformer-impl transformer_engine)."""
    calculate_per_token_loss: bool = False
    """Megatron's per-token loss: the same as --loss-aggregation token_mean, which it sets."""
    bf16: bool = False
    """Megatron's bfloat16 switch: the same as --param-dtype bfloat16, which it sets."""


class LoraFlags(Section):
    help_section: ClassVar[str] = "trainer"

    """LoRA on the policy (the critic of ppo trains in full), on --train-backend fsdp through peft; each
    field goes to rl_core.backend_config.BackendConfig's of the same name, which checks it."""

    lora_rank: int = Field(0, ge=0)
    """Rank of the LoRA adapters trained instead of the policy's weights; 0: full fine-tuning. The KL
    reference is the base with adapters off; the engines get the adapter alone over disk and tensor, merged weights over broadcast."""
    lora_alpha: float = Field(16.0, gt=0.0)
    """Adapter scale numerator: the update is (lora_alpha / lora_rank) * B @ A."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input in train steps."""
    lora_target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    """all-linear (every linear layer but the LM head) or module names (q_proj v_proj ...)."""
    lora_adapter_path: Path | None = None
    """PEFT adapter folder (peft's save_pretrained) to start from; it gives rank, alpha, dropout, targets."""

    def lora_fields(self) -> dict[str, Any]:
        """The LoRA flags given on the command line (the others keep BackendConfig's defaults)."""
        fields = {name: getattr(self, name) for name in LoraFlags.model_fields if name in self.model_fields_set}
        if fields.get("lora_adapter_path") is not None:
            fields["lora_adapter_path"] = fields["lora_adapter_path"].resolve()
        return fields

    @model_validator(mode="after")
    def _lora_needs_fsdp(self) -> LoraFlags:
        given = [name for name in LoraFlags.model_fields if name in self.model_fields_set]
        backend = getattr(self, "train_backend", "fsdp")
        if given and backend != "fsdp":
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags}: LoRA is implemented on --train-backend fsdp (through peft), not {backend}")
        if given:
            from rl_fsdp import FSDPConfig

            # The backend's own checks (an adapter folder, values that contradict it), before Ray starts.
            FSDPConfig(model_path=Path("."), **self.lora_fields())
        return self


BATCHING_FLAGS = ("use_dynamic_batch_size", "max_tokens_per_gpu", "log_probs_max_tokens_per_gpu", "balance_data",
                  "log_probs_chunk_size")


def batching_fields(config: Any) -> dict[str, Any]:
    """The micro-batching flags given on the command line, --micro-batch-size among them (the others keep
    BackendConfig's defaults, which pick dynamic batch size where the backend has it)."""
    return {name: getattr(config, name) for name in (*BATCHING_FLAGS, "micro_batch_size") if name in config.model_fields_set}


def check_trainer_flags(config: Any) -> None:
    """Checks of the TrainerConfig and MegatronFlags fields of an app's config (one with loss_aggregation),
    where its validator calls it: Megatron flags need --train-backend megatron; --bf16 sets --param-dtype;
    --recompute-granularity full is activation checkpointing on fsdp; micro-batching flags are checked."""
    if config.train_backend == "fsdp" and config.recompute_granularity is not None:
        if config.recompute_granularity != "full":
            raise ValueError(
                f"--recompute-granularity {config.recompute_granularity}: --train-backend fsdp recomputes whole decoder"
                " layers (full); selective recomputation of core attention is megatron's"
            )
        object.__setattr__(config, "gradient_checkpointing", True)
    megatron_only = sorted(name for name in MegatronFlags.model_fields if name in config.model_fields_set
                           and name not in ("calculate_per_token_loss", "bf16")
                           and not (name == "recompute_granularity" and config.train_backend == "fsdp"))
    if megatron_only and config.train_backend != "megatron":
        flags = ", ".join("--" + name.replace("_", "-") for name in megatron_only)
        raise ValueError(f"{flags}: megatron-core flag(s), which need --train-backend megatron")
    if config.calculate_per_token_loss and config.loss_aggregation != "token_mean":
        raise ValueError(f"--calculate-per-token-loss is --loss-aggregation token_mean, not {config.loss_aggregation!r}")
    if config.bf16:
        if "param_dtype" in config.model_fields_set and config.param_dtype != "bfloat16":
            raise ValueError(f"--bf16 is --param-dtype bfloat16, not {config.param_dtype!r}")
        object.__setattr__(config, "param_dtype", "bfloat16")
    given = batching_fields(config)
    if config.train_backend == "fsdp" and set(given) - {"micro_batch_size"}:
        from rl_fsdp import FSDPConfig

        try:  # the backend's own checks, before Ray starts, in flag names
            FSDPConfig(model_path=Path("."), **given)
        except ValidationError as error:
            message = error.errors()[0]["msg"].removeprefix("Value error, ")
            for name in sorted((*BATCHING_FLAGS, "micro_batch_size"), key=len, reverse=True):
                message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
            raise ValueError(message) from None


def trainer_backend_config(config: Any, *, total_steps: int, **role_fields: Any) -> Any:
    """The BackendConfig typed for --train-backend from an app config's TrainerConfig and MegatronFlags
    fields, plus what differs per trained model (`role_fields`: model_path, head, lr, ...). A decaying
    --lr-decay-style without --lr-decay-iters decays over `total_steps` optimizer steps."""
    decay_iters = config.lr_decay_iters
    if decay_iters is None and config.lr_decay_style != "constant":
        decay_iters = total_steps
    common = dict(
        role_fields,
        **batching_fields(config),
        seed=config.seed,
        optimizer=config.optimizer,
        min_lr=config.min_lr,
        lr_decay_style=config.lr_decay_style,
        lr_decay_iters=decay_iters,
        lr_warmup_iters=config.lr_warmup_iters,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_eps=config.adam_eps,
        clip_grad=config.clip_grad,
        device=config.train_device,
        param_dtype=config.param_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
        torch_compile=config.torch_compile,
    )
    if config.train_backend == "megatron":
        from rl_megatron import MegatronConfig

        megatron = {name: getattr(config, name) for name in MegatronFlags.model_fields
                    if name not in ("calculate_per_token_loss", "bf16")}
        return MegatronConfig(**common, **megatron)
    from rl_fsdp import FSDPConfig

    return FSDPConfig(**common)


class RolloutEngineConfig(Section):
    help_section: ClassVar[str] = "engines"

    engine_type: Literal["embedded", "sglang"] = "embedded"
    """`sglang` launches sglang.launch_server; `embedded` the built-in engine with the same HTTP API."""
    rollout_num_engines: int | None = Field(None, gt=0)
    """Engine servers behind the router (default: --rollout-num-gpus / --rollout-num-gpus-per-engine, else 1,
    or one per trainer GPU with --colocate)."""
    rollout_num_gpus: int | None = Field(None, ge=0)
    """GPUs of all engines together (slime's name); on CPU it counts engine processes the same way."""
    rollout_num_gpus_per_engine: int = Field(1, gt=0)
    """GPUs one engine spans: its Ray bundle gets that many and SGLang's --tp-size follows (default: --sglang-tp-size or 1)."""
    num_gpus_per_node: int = Field(8, gt=0)
    """GPUs per node; an engine may not span more (engines across nodes are not supported)."""
    rollout_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the embedded engine."""
    colocate: bool = False
    """Trainer and engines share GPUs (half a GPU each to Ray)."""
    placement_timeout: float = Field(300.0, gt=0.0)
    """Seconds to wait for Ray to find room for the trainer ranks and engines."""
    router_policy: Literal["round_robin", "least_outstanding", "cache_aware"] = "cache_aware"
    """How the router picks an engine; cache_aware keeps a prompt's samples on the engine holding its prefix."""
    router_middleware_paths: list[str] = Field(default_factory=list)
    """Extra router middleware, outermost first, as `module:Class` or `path/to/file.py:Class` (built with no
    arguments); a middleware with a `snapshot()` method has its figures logged with the rollout metrics."""
    use_fault_tolerance: bool = False
    """Health-check engines: one that fails is taken out and its requests retried elsewhere until it recovers."""
    rollout_health_check_interval: float = Field(30.0, gt=0.0)
    """Seconds between engine health checks (with --use-fault-tolerance)."""
    rollout_health_check_timeout: float = Field(30.0, gt=0.0)
    """Seconds an engine may take to answer a health check, which runs a one-token generation."""
    rollout_health_check_first_wait: float = Field(0.0, ge=0.0)
    """Seconds after an engine starts before its first restart check (with --use-fault-tolerance): time for
    compilation and warm-up, as slime's."""
    rollout_max_engine_restarts: int = Field(3, ge=0)
    """Restarts of a dead or hung engine process, per engine (with --use-fault-tolerance and
    --update-weight-transport disk): the restarted engine loads the policy's current weights before any request
    reaches it, and the router readmits it. 0 leaves a dead engine out of rotation for the rest of the run."""
    update_weights_interval: int = Field(1, ge=1)
    """Send the trainer's weights to the engines every N rollouts (slime's name)."""
    rollout_request_timeout: float | None = Field(None, gt=0.0)
    """Seconds one generate request may take on an engine, queueing included, before the router aborts it there
    and retries it on another engine (that engine leaves rotation; with --use-fault-tolerance it returns once
    its health check passes, which usually finds a hung engine first). Default: 600 plus 0.1 per token of the
    longest response allowed (--rollout-max-response-len, --eval-max-response-len), i.e. at least 10 tokens/s
    per request, so long generations are not cut; raise it when many long requests queue on few engines."""
    update_weight_transport: Literal["disk", "broadcast", "tensor"] | None = None
    """How new weights reach the engines: safetensors on disk, a broadcast over a process group (NCCL on
    GPUs), or tensor handles (CUDA IPC; SGLang's /update_weights_from_tensor) to engines sharing the
    trainer's GPU. Default: tensor with --colocate, broadcast otherwise."""
    offload_train: bool = False
    """While the engines generate, the trainer's parameters, gradients and optimizer state leave the GPU."""
    offload_rollout: bool = False
    """While the trainer trains, the engines release their KV cache and weights (SGLang's memory routes)."""
    offload: bool = False
    """Both --offload-train and --offload-rollout (slime's)."""
    engine_python: Path | None = None
    """Python interpreter of an environment of SGLang's own (e.g. /opt/sglang/.venv/bin/python), which runs
    `-m sglang.launch_server` for --engine-type sglang; default: this one."""
    sglang_args: dict[str, Any] = Field(default_factory=dict)
    """Any `--sglang-X value` flag, passed to SGLang as `--X value`."""


EMBEDDED_ENGINE_DEFAULT_ROWS = 64
"""The embedded engine's own --max-running-requests default (rl_sglang.embedded): rl-train never gives it fewer."""
MAX_EMBEDDED_ROWS = 4096
"""The most requests rl-train lets one embedded engine run at once by default: its request-to-token table
(rows x context length x 4 bytes) stays within a few GiB even at a 128k context."""

_ISOLATABLE_REWARDS = ", ".join(n for n in reward_registry.names() if reward_registry.takes_option(n, "isolate"))


class GenerationHooksConfig(Section):
    help_section: ClassVar[str] = "rollout"

    custom_generate_function_path: str | None = None
    """slime's per-sample generate function `async def generate(args, sample, sampling_params) -> Sample`, as
    `module:function` or `path/to/file.py:function`: one sample generated to the end (multi-turn, tools)."""
    rollout_function_path: str | None = None
    """slime's whole-rollout function `generate_rollout(args, rollout_id, data_source, evaluation=False) ->
    list[list[Sample]]` (sync or async); samples it returns without a reward are graded by the reward hub."""
    eval_function_path: str | None = None
    """The rollout function of evaluation (called with evaluation=True); default: --rollout-function-path's."""
    rollout_max_context_len: int | None = Field(None, gt=0)
    """Most tokens of prompt plus response; a sample that reaches it is TRUNCATED (the default generator asks
    for no more new tokens than fit)."""
    save_debug_rollout_data: str | None = None
    """Write each rollout's samples as they go to training to this path, one JSON line each; `{rollout_id}` in
    the path is replaced."""
    load_debug_rollout_data: str | None = None
    """Train on the samples --save-debug-rollout-data wrote (same `{rollout_id}` template) instead of generating."""
    partial_rollout: bool = False
    """slime's partial rollout (APRIL): with --over-sampling-batch-size, stop once --rollout-batch-size groups
    are done; the rest are aborted and continued in a later rollout from where they stopped."""
    mask_offpolicy_in_partial_rollout: bool = False
    """With --partial-rollout: a continued sample's tokens from an older policy leave the loss mask."""
    max_staleness: int | None = Field(None, ge=0)
    """Samples whose oldest part was generated more than N policy versions before the one being trained are
    not trained on (counted as rollout/stale_samples); bounds off-policyness under rl-train-async and
    --partial-rollout."""
    rollout_sample_filter_path: str | None = None
    """slime's `filter(args, groups)`: sets `sample.remove_sample` on samples not to train on (they still count
    in their group's reward statistics)."""
    rollout_all_samples_process_path: str | None = None
    """slime's `process(args, all_groups, data_source)`: sees every generated group, dropped ones too."""
    custom_reward_post_process_path: str | None = None
    """slime's `post_process(args, samples) -> (raw_rewards, rewards)`: the rewards the advantages come from,
    replacing the group normalisation."""
    custom_convert_samples_to_train_data_path: str | None = None
    """slime's `convert(args, samples) -> dict` (tokens, response_lengths, loss_masks, rewards): what training reads."""
    group_rm: bool = False
    """Call the --custom-rm-path function once per prompt group, `reward_func(args, samples) -> list` (slime's)."""
    max_turns: int | None = Field(None, gt=0)
    """Most policy turns of one multi-turn sample: `args.max_turns` for the generate/rollout functions (the
    agent examples read it), and the chat endpoint refuses a session's call past it (HTTP 400) and ends that
    trajectory TRUNCATED (docs/agents.md)."""
    tool_call_parser: str = "qwen25"
    """How the chat endpoint (/v1/chat/completions) reads tool calls out of the model's text, by SGLang's
    --tool-call-parser names: qwen25 (<tool_call>{json}</tool_call> blocks), hermes (the same), none."""
    debug_rollout_only: bool = False
    """Generate (and grade) rollouts, but do not train and do not sync weights."""
    debug_train_only: bool = False
    """Train on --load-debug-rollout-data only: no engine generates."""

    @model_validator(mode="after")
    def _debug_flags(self) -> GenerationHooksConfig:
        if self.debug_train_only and self.load_debug_rollout_data is None:
            raise ValueError("--debug-train-only trains on saved rollouts: give --load-debug-rollout-data")
        if self.debug_train_only and self.debug_rollout_only:
            raise ValueError("--debug-train-only and --debug-rollout-only exclude each other")
        from rl_sglang.tool_parsers import TOOL_CALL_PARSERS

        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r} is not a parser here; choose one of"
                             f" {', '.join(sorted(TOOL_CALL_PARSERS))}")
        if self.max_turns is not None and not (self.custom_generate_function_path or self.rollout_function_path):
            raise ValueError("--max-turns bounds multi-turn samples, and the default rollout makes one engine call per"
                             " sample: give --custom-generate-function-path or --rollout-function-path")
        if self.custom_generate_function_path and self.rollout_function_path:
            raise ValueError(
                "--custom-generate-function-path is called by the default rollout, which --rollout-function-path"
                " replaces: give one of them"
            )
        return self


class RewardConfig(Section):
    help_section: ClassVar[str] = "rewards"

    rm_type: str | None = Field(
        None, description=f"Built-in grader by name: {', '.join(reward_registry.names())} (remote needs --rm-url)."
    )
    custom_rm_path: str | None = None
    """Custom reward function as `module:function` or `path/to/file.py:function`."""
    reward_key: str | None = None
    """Key of the reward to train on when the reward function returns a dict."""
    reward_timeout: float = Field(10.0, gt=0.0)
    """Seconds one sample may take to grade before it gets the error reward."""
    max_reward_error_ratio: float = Field(0.25, ge=0.0, le=1.0)
    """Stop the run when more than this share of a rollout's samples fail to grade (the grader raises, times
    out or returns no number); a rollout whose every sample failed always stops it."""
    rm_url: str | None = None
    """Endpoint of --rm-type remote: gets POST {"items": [{prompt, response, label, metadata}, ...]} and answers
    {"rewards": [...]}, one per item."""
    reward_isolation: bool = Field(False, description=(
        f"Grade in worker processes under a memory limit (--rm-type {_ISOLATABLE_REWARDS} or --custom-rm-path):"
        " a grader that hangs past --reward-timeout or runs out of memory is killed, not the rollout."
    ))
    reward_memory_limit_mb: int | None = Field(None, ge=64)
    """Address-space limit of each grading worker, with --reward-isolation (default 1024)."""
    reward_num_workers: int | None = Field(None, ge=1)
    """Grading worker processes, with --reward-isolation (default 2)."""

    @model_validator(mode="after")
    def _one_reward_source(self) -> RewardConfig:
        if (self.rm_type is None) == (self.custom_rm_path is None):
            raise ValueError("give exactly one of --rm-type and --custom-rm-path")
        if self.rm_url is not None and self.rm_type != "remote":
            raise ValueError(f"--rm-url is only used with --rm-type remote (got --rm-type {self.rm_type})")
        if self.rm_type == "remote" and self.rm_url is None:
            raise ValueError("--rm-type remote needs --rm-url, the reward model's endpoint")
        for name in ("reward_memory_limit_mb", "reward_num_workers"):
            if getattr(self, name) is not None and not self.reward_isolation:
                raise ValueError(f"--{name.replace('_', '-')} needs --reward-isolation (it sizes the grading workers)")
        isolatable = self.rm_type is None or reward_registry.takes_option(self.rm_type, "isolate")
        if self.reward_isolation and not isolatable:
            raise ValueError(
                f"--reward-isolation works with --rm-type {_ISOLATABLE_REWARDS} or --custom-rm-path, "
                f"not --rm-type {self.rm_type}"
            )
        return self

    def reward_options(self) -> dict[str, Any]:
        """Every keyword of `rl_rewards.build_reward` beyond --rm-type/--custom-rm-path, from these flags."""
        options: dict[str, Any] = {
            "reward_key": self.reward_key, "timeout_s": self.reward_timeout, "rm_url": self.rm_url,
        }
        if self.reward_isolation:  # a worker is killed when its call outlives --reward-timeout
            pool = {"memory_mb": self.reward_memory_limit_mb, "workers": self.reward_num_workers}
            options["grader_options"] = {
                "isolate": True, "timeout_s": self.reward_timeout, **{k: v for k, v in pool.items() if v is not None}
            }
        return options


class LoggingConfig(Section):
    help_section: ClassVar[str] = "logging"

    output_dir: Path = Path("outputs/run")
    """Where metrics.jsonl, TensorBoard logs, the reward curve and weight-sync files go."""
    use_tensorboard: bool = True
    """Write TensorBoard event files (under output_dir/tensorboard, or as --tb-project-name says)."""
    tb_project_name: str | None = None
    """TensorBoard logs go to output_dir/tensorboard/<this>/<--tb-experiment-name> (slime's names; $TENSORBOARD_DIR wins)."""
    tb_experiment_name: str | None = None
    """Sub-folder of --tb-project-name (default: the start time, as slime)."""
    save_reward_curve: bool = True
    """Write reward_curve.png into output_dir at the end."""
    use_wandb: bool = False
    """Log the same metrics to Weights & Biases (needs the extra: pip install 'rl-apps[wandb]')."""
    wandb_project: str | None = None
    """W&B project of the run."""
    wandb_group: str | None = None
    """W&B group; the run is named after it (default: the --output-dir folder's name)."""
    wandb_team: str | None = None
    """W&B entity (team or user) that owns the project."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """online uploads; offline writes the run under --wandb-dir only (`wandb sync` uploads it later); disabled logs nothing (default: $WANDB_MODE, else online)."""
    wandb_dir: Path | None = None
    """Folder of W&B's local files (default: output_dir)."""
    wandb_run_id: str | None = None
    """Log into this W&B run id, resuming it when it exists (e.g. with --load)."""
    wandb_key: str | None = None
    """W&B API key to log in with (online mode); never written to the run's config."""
    disable_wandb_random_suffix: bool = False
    """Name the W&B group and run exactly --wandb-group, without slime's random 8-character suffix."""

    @model_validator(mode="after")
    def _logging_flags_need_their_sink(self) -> LoggingConfig:
        wandb_flags = [name for name in type(self).model_fields if name.startswith(("wandb_", "disable_wandb"))]
        if not self.use_wandb:
            for name in wandb_flags:
                if name in self.model_fields_set:
                    raise ValueError(f"{name} is set but W&B is off: add --use-wandb")
        for name in ("tb_project_name", "tb_experiment_name"):
            if getattr(self, name) is not None and not self.use_tensorboard:
                raise ValueError(f"{name} is set but --no-use-tensorboard turns TensorBoard off")
        if self.tb_experiment_name is not None and self.tb_project_name is None:
            raise ValueError("tb_experiment_name needs tb_project_name (it names a folder inside it)")
        return self

    def tensorboard_dir(self) -> Path:
        """Where TensorBoard event files go: $TENSORBOARD_DIR, or the --tb-project-name folders, or output_dir/tensorboard."""
        import datetime
        import os

        if os.environ.get("TENSORBOARD_DIR"):
            return Path(os.environ["TENSORBOARD_DIR"])
        if self.tb_project_name is None:
            return Path(self.output_dir) / "tensorboard"
        experiment = self.tb_experiment_name or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        return Path(self.output_dir) / "tensorboard" / self.tb_project_name / experiment


def _absolute_file_spec(spec: str) -> str:
    """`file.py:name` with the file made absolute."""
    file, _, name = spec.rpartition(":")
    return f"{Path(file).resolve()}:{name}"


class EvalConfig(Section):
    help_section: ClassVar[str] = "eval"

    eval_prompt_data: list[str] = Field(default_factory=list)
    """Evaluation sets as name/path pairs: `--eval-prompt-data math500 math500.jsonl gsm8k gsm8k.jsonl`."""
    eval_interval: int | None = Field(None, ge=1)
    """Evaluate whenever the engines hold policy version N, 2N, ... (the rollouts trained on; after that weight sync)."""
    skip_eval_before_train: bool = False
    """Do not evaluate the starting policy before the first rollout."""
    n_samples_per_eval_prompt: int = Field(1, ge=1)
    """Responses sampled per evaluation prompt (pass@k is reported for k up to this)."""
    eval_temperature: float | None = Field(None, ge=0.0)
    """Sampling temperature of evaluation (default: --rollout-temperature); also --eval-top-p/-top-k/-max-response-len."""
    eval_top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Top-p of evaluation (default: --rollout-top-p)."""
    eval_top_k: int | None = None
    """Top-k of evaluation (default: --rollout-top-k)."""
    eval_max_response_len: int | None = Field(None, gt=0)
    """Most tokens per evaluation response (default: --rollout-max-response-len)."""
    eval_input_key: str | None = None
    """Prompt key of the evaluation files (default: --input-key); --eval-label-key likewise."""
    eval_label_key: str | None = None
    """Label key of the evaluation files (default: --label-key)."""
    eval_reward_key: str | None = None
    """Key of the reward to report in evaluation when the reward function returns a dict (default: --reward-key)."""


class CheckpointConfig(Section):
    help_section: ClassVar[str] = "checkpoints"

    save: Path | None = None
    """Folder for training checkpoints (policy and critic weights with their optimizer state, data position)."""
    save_interval: int | None = Field(None, ge=1)
    """Save every N rollouts (with --save); the last rollout is always saved."""
    load: Path | None = None
    """Resume from the newest checkpoint in this folder (a --save folder of an earlier run)."""
    start_rollout_id: int | None = Field(None, ge=0)
    """Id of the first rollout to run (default: the one after the --load checkpoint, else 0); metrics steps,
    checkpoint names, policy versions and --num-critic-only-steps count from it."""
    save_hf: str | None = None
    """Also write the policy as a Hugging Face folder (config.json, tokenizer files, model.safetensors) whenever
    a checkpoint is due (the last one at least, even without --save); `{rollout_id}` in it is replaced
    (slime's), else each write replaces the previous one."""

    @model_validator(mode="after")
    def _interval_needs_a_folder(self) -> CheckpointConfig:
        if self.save_interval is not None and self.save is None and self.save_hf is None:
            raise ValueError("--save-interval needs --save or --save-hf")
        if self.save_hf is not None:
            object.__setattr__(self, "save_hf", str(Path(self.save_hf).resolve()))
        return self


class TrainConfig(
    DataConfig, RLStepConfig, SamplingConfig, ModelConfig, TrainerConfig, MegatronFlags, LoraFlags, RolloutEngineConfig, GenerationHooksConfig,
    RewardConfig, LoggingConfig, CheckpointConfig, EvalConfig
):
    def eval_datasets(self) -> list[tuple[str, Path]]:
        """(name, file) of every --eval-prompt-data pair."""
        pairs = self.eval_prompt_data
        return [(pairs[i], Path(pairs[i + 1])) for i in range(0, len(pairs), 2)]

    def backend_config(self, role: Literal["policy", "critic"]) -> Any:
        """The BackendConfig of the policy (LM head, a reference copy when a KL needs one) or of PPO's
        critic (value head, --critic-lr), typed for --train-backend."""
        policy = role == "policy"
        return trainer_backend_config(
            self,
            total_steps=self.num_rollout * self.num_steps_per_rollout,  # type: ignore[operator]
            model_path=self.hf_checkpoint,
            head="lm" if policy else "value",
            ref_model=policy and (self.use_kl_loss or self.kl_coef > 0.0),
            # Temperature 0 is greedy; the engine reports log-probs of the unscaled logits then, as SGLang does.
            rollout_temperature=self.rollout_temperature or 1.0,
            lr=self.lr if policy else self.critic_lr,
            **(self.lora_fields() if policy else {}),
        )

    def eval_sampling_params(self) -> dict[str, Any]:
        """The rollout's sampling parameters with the --eval-* overrides."""
        params = self.sampling_params()
        overrides = {"temperature": self.eval_temperature, "top_p": self.eval_top_p, "top_k": self.eval_top_k,
                     "max_new_tokens": self.eval_max_response_len}
        params.update({k: v for k, v in overrides.items() if v is not None})
        return params

    def rollout_request_timeout_s(self) -> float:
        """--rollout-request-timeout, or its default scaled by the longest response allowed."""
        if self.rollout_request_timeout is not None:
            return self.rollout_request_timeout
        return 600.0 + 0.1 * max(self.rollout_max_response_len, self.eval_max_response_len or 0)

    @model_validator(mode="after")
    def _absolute_paths(self) -> TrainConfig:
        """Ray actors do not share the driver's working directory, so relative paths are resolved here."""
        for name in ("hf_checkpoint", "prompt_data", "output_dir", "save", "load", "wandb_dir"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                object.__setattr__(self, name, value.resolve())
        from rl_core.hooks import is_file_spec

        for name in ("custom_rm_path", "custom_generate_function_path", "rollout_function_path", "eval_function_path",
                     "rollout_sample_filter_path", "rollout_all_samples_process_path", "custom_reward_post_process_path",
                     "custom_convert_samples_to_train_data_path", "dynamic_sampling_filter_path", "buffer_filter_path"):
            spec = getattr(self, name)
            if spec and is_file_spec(spec):
                object.__setattr__(self, name, _absolute_file_spec(spec))
        object.__setattr__(self, "eval_prompt_data", [
            item if i % 2 == 0 else str(Path(item).resolve()) for i, item in enumerate(self.eval_prompt_data)
        ])
        object.__setattr__(self, "router_middleware_paths", [
            _absolute_file_spec(spec) if is_file_spec(spec) else spec for spec in self.router_middleware_paths
        ])
        return self

    required_flags: ClassVar[tuple[str, ...]] = ("prompt_data", "hf_checkpoint")

    @model_validator(mode="after")
    def _required(self) -> TrainConfig:
        missing = [f"--{name.replace('_', '-')}" for name in self.required_flags if not getattr(self, name)]
        if missing:
            raise ValueError(f"missing required flag(s): {' '.join(missing)}")
        if not self.use_critic:
            for name in ("critic_lr",):
                if name in self.model_fields_set:
                    raise ValueError(
                        f"{name} is set but advantage_estimator {self.advantage_estimator!r} trains no critic (only 'ppo' does)"
                    )
        if len(self.eval_prompt_data) % 2:
            raise ValueError(f"--eval-prompt-data takes name/path pairs, got {len(self.eval_prompt_data)} value(s)")
        names = self.eval_prompt_data[::2]
        if len(set(names)) != len(names):
            raise ValueError(f"--eval-prompt-data names must differ, got {names}")
        check_trainer_flags(self)
        if self.offload:
            object.__setattr__(self, "offload_train", True)
            object.__setattr__(self, "offload_rollout", True)
        if self.update_weight_transport is None:
            object.__setattr__(self, "update_weight_transport", "tensor" if self.colocate else "broadcast")
        if self.colocate and self.update_weight_transport == "broadcast":
            raise ValueError(
                "--update-weight-transport broadcast with --colocate: NCCL cannot put the trainer and an engine on one"
                " GPU (ncclInvalidUsage: Duplicate GPU detected); use tensor (CUDA IPC, the default) or disk"
            )
        if self.colocate and self.engine_type == "embedded" and "mem_fraction_static" not in self.sglang_args:
            # SGLang's default (0.85 of the GPU for weights and KV) leaves a colocated trainer almost nothing.
            object.__setattr__(self, "sglang_args", {**self.sglang_args, "mem_fraction_static": 0.4})
        if self.partial_rollout and (self.over_sampling_batch_size or self.rollout_batch_size) <= self.rollout_batch_size:
            raise ValueError(
                "--partial-rollout aborts the groups generated beyond --rollout-batch-size, so it needs"
                f" --over-sampling-batch-size larger than {self.rollout_batch_size}"
            )
        if self.mask_offpolicy_in_partial_rollout and not self.partial_rollout:
            raise ValueError("--mask-offpolicy-in-partial-rollout needs --partial-rollout")
        if self.partial_rollout and self.rollout_function_path:
            raise ValueError("--partial-rollout is a mode of the default rollout, which --rollout-function-path replaces")
        if self.group_rm and self.custom_rm_path is None:
            raise ValueError("--group-rm calls a --custom-rm-path function once per group; give --custom-rm-path")
        if self.debug_train_only and self.eval_prompt_data:
            raise ValueError("--debug-train-only runs no engine, so it cannot evaluate --eval-prompt-data")
        if self.eval_interval is not None and not self.eval_prompt_data:
            raise ValueError("--eval-interval needs --eval-prompt-data")
        if self.critic_lr is None:
            object.__setattr__(self, "critic_lr", self.lr)
        world = self.actor_world_size()
        size = self.global_batch_size
        assert size is not None, "BatchConfig's validator sets global_batch_size"
        if size % world:
            samples = self.rollout_batch_size * self.n_samples_per_prompt
            raise ValueError(
                f"global_batch_size ({size}) does not split over actor_num_nodes x"
                f" actor_num_gpus_per_node ({world}) trainer ranks; for these ranks"
                f" {nearest_divisors(samples, size, 'global_batch_size', multiple_of=world)},"
                f" for this batch on one node {nearest_divisors(size, world, 'actor_num_gpus_per_node')}"
            )
        return self

    @model_validator(mode="after")
    def _rollout_flags(self) -> TrainConfig:
        if self.rollout_stop and self.engine_type == "embedded":
            raise ValueError(
                "rollout_stop (stop strings) is not supported by the embedded engine: use --rollout-stop-token-ids,"
                " or --engine-type sglang"
            )
        if self.apply_chat_template_kwargs and not self.apply_chat_template:
            raise ValueError("apply_chat_template_kwargs is set but --apply-chat-template is off")
        if self.num_epoch is not None and "num_rollout" in self.model_fields_set:
            raise ValueError(
                f"num_epoch ({self.num_epoch}) and num_rollout ({self.num_rollout}) are both set: give one"
                " (slime ignores --num-epoch then; here it is refused)"
            )
        if self.start_rollout_id is not None and self.num_epoch is None and self.start_rollout_id >= self.num_rollout:
            raise ValueError(f"start_rollout_id ({self.start_rollout_id}) >= num_rollout ({self.num_rollout}): nothing to run")
        return self

    def engine_restarts(self) -> bool:
        """Whether engine processes are restarted when they die or hang."""
        return self.use_fault_tolerance and self.update_weight_transport == "disk" and self.rollout_max_engine_restarts > 0

    @model_validator(mode="after")
    def _restart_flags(self) -> TrainConfig:
        for name in ("rollout_health_check_first_wait", "rollout_max_engine_restarts"):
            if name in self.model_fields_set and not self.use_fault_tolerance:
                raise ValueError(f"{name} is set but --use-fault-tolerance is off")
        if ("rollout_max_engine_restarts" in self.model_fields_set and self.rollout_max_engine_restarts > 0
                and self.update_weight_transport != "disk"):
            raise ValueError(
                f"rollout_max_engine_restarts needs --update-weight-transport disk: a restarted engine reloads the"
                f" policy's weights from disk, and cannot rejoin the trainer's {self.update_weight_transport} weight transport"
            )
        return self

    def actor_world_size(self) -> int:
        return self.actor_num_nodes * self.actor_num_gpus_per_node

    @model_validator(mode="after")
    def _resources(self) -> TrainConfig:
        """slime's resource flags: derive the engine count and refuse what this project cannot place."""
        for name, actor in (("critic_num_nodes", "actor_num_nodes"), ("critic_num_gpus_per_node", "actor_num_gpus_per_node")):
            value = getattr(self, name)
            if value is None:
                continue
            if not self.use_critic:
                raise ValueError(f"{name} is set but advantage_estimator {self.advantage_estimator!r} trains no critic")
            if value != getattr(self, actor):
                raise ValueError(
                    f"{name} ({value}) must equal {actor} ({getattr(self, actor)}): the critic runs one rank per"
                    " trainer rank (slime sets it so as well)"
                )
        tp = self.sglang_args.get("tp_size")
        per_engine = self.rollout_num_gpus_per_engine
        if tp is not None:
            if "rollout_num_gpus_per_engine" not in self.model_fields_set:
                object.__setattr__(self, "rollout_num_gpus_per_engine", per_engine := int(tp))
            elif int(tp) != per_engine:
                raise ValueError(
                    f"--sglang-tp-size {tp} differs from rollout_num_gpus_per_engine ({per_engine}): an engine's"
                    " tensor-parallel size is the GPUs it spans; give one of them"
                )
        if self.engine_python is not None and self.engine_type != "sglang":
            raise ValueError("engine_python is set but --engine-type is embedded, which runs in this environment")
        if per_engine > 1 and self.engine_type == "embedded":
            raise ValueError(
                f"rollout_num_gpus_per_engine ({per_engine}) > 1 needs --engine-type sglang: the embedded engine"
                " runs on one device (no tensor parallelism)"
            )
        if per_engine > self.num_gpus_per_node:
            raise ValueError(
                f"rollout_num_gpus_per_engine ({per_engine}) exceeds num_gpus_per_node ({self.num_gpus_per_node}):"
                " an engine spanning nodes is not supported"
            )
        if per_engine > 1 and self.colocate:
            raise ValueError(
                f"rollout_num_gpus_per_engine ({per_engine}) > 1 with --colocate is not supported: Ray gives an"
                " actor the GPUs of one bundle, and colocated bundles hold one GPU each"
            )
        if self.rollout_num_gpus == 0:
            raise ValueError("rollout_num_gpus 0 (slime: a router over external engines only) is not supported here")
        if self.rollout_num_gpus is not None:
            if self.rollout_num_gpus % per_engine:
                lower = self.rollout_num_gpus // per_engine * per_engine
                nearest = [v for v in (lower, lower + per_engine) if v > 0]
                raise ValueError(
                    f"rollout_num_gpus ({self.rollout_num_gpus}) is not a multiple of rollout_num_gpus_per_engine"
                    f" ({per_engine}); nearest that work: {' or '.join(map(str, nearest))}"
                )
            engines = self.rollout_num_gpus // per_engine
            if self.rollout_num_engines is not None and self.rollout_num_engines != engines:
                raise ValueError(
                    f"rollout_num_engines ({self.rollout_num_engines}) disagrees with rollout_num_gpus"
                    f" ({self.rollout_num_gpus}) / rollout_num_gpus_per_engine ({per_engine}) = {engines}; give one"
                )
        elif self.rollout_num_engines is not None:
            engines = self.rollout_num_engines
        else:
            engines = self.actor_world_size() if self.colocate else 1
        object.__setattr__(self, "rollout_num_engines", engines)
        object.__setattr__(self, "rollout_num_gpus", engines * per_engine)
        return self

    @model_validator(mode="after")
    def _embedded_engine_rows(self) -> TrainConfig:
        """The embedded engine runs at most --max-running-requests at once (its own default, 64): a rollout
        larger than that went through in waves, each finished request letting one waiting request in, so nearly
        every decode step also ran a prefill for the newcomers (measured: 4x the forward passes of one batch).
        Unless --sglang-max-running-requests says otherwise, each engine gets rows for its share of a rollout
        (SGLang derives its own default from the KV pool's size, not from a fixed 64)."""
        if self.engine_type == "embedded" and "max_running_requests" not in self.sglang_args:
            in_flight = (self.over_sampling_batch_size or self.rollout_batch_size) * self.n_samples_per_prompt
            rows = min(MAX_EMBEDDED_ROWS, max(EMBEDDED_ENGINE_DEFAULT_ROWS, -(-in_flight // (self.rollout_num_engines or 1))))
            object.__setattr__(self, "sglang_args", {**self.sglang_args, "max_running_requests": rows})
        return self
