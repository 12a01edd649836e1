"""`MegatronConfig`: rl-core's BackendConfig plus Megatron's parallelism and training flags (slime's names)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rl_core.backend_config import BackendConfig


class MegatronConfig(BackendConfig):
    """A model trained by megatron-core: data parallel over the ranks left after TP x PP x CP."""

    type: Literal["megatron"] = "megatron"
    supports_log_probs_chunk_size: ClassVar[bool] = True
    unsupported_batching_reason: ClassVar[str] = (
        "its micro-batches are padded to one shape for the pipeline schedule and its SDPA core attention has"
        " no packed-sequence (THD) path; give micro_batch_size (--micro-batch-size), or use --train-backend fsdp"
    )
    tensor_model_parallel_size: int = Field(1, gt=0)
    """--tensor-model-parallel-size: ranks that split every layer's heads and MLP columns."""
    pipeline_model_parallel_size: int = Field(1, gt=0)
    """--pipeline-model-parallel-size: stages of consecutive decoder layers (micro-batches flow through them)."""
    context_parallel_size: int = Field(1, gt=0)
    """--context-parallel-size: ranks that split each sequence (rank r holds chunks r and 2*cp-1-r)."""
    sequence_parallel: bool = False
    """--sequence-parallel: norms and dropouts on a 1/TP slice of the sequence (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """--use-distributed-optimizer: shard the float32 master weights and Adam state over data-parallel ranks."""
    accumulate_allreduce_grads_in_fp32: bool = True
    """--accumulate-allreduce-grads-in-fp32: with bfloat16 compute, accumulate and reduce gradients in
    float32 buffers (else in bfloat16); no effect in float32."""
    attention_softmax_in_fp32: bool = True
    """--attention-softmax-in-fp32: the attention softmax accumulates in float32 (SDPA kernels always do)."""
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """--attention-dropout on attention probabilities in train_step (never in forward)."""
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """--hidden-dropout after attention and MLP, in train_step only."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """--recompute-granularity: full recomputes whole layers in backward, selective only core attention.
    Unset with gradient_checkpointing: full, uniform, 1 layer."""
    recompute_method: Literal["uniform", "block"] | None = None
    """--recompute-method (full only): uniform checkpoints groups of recompute_num_layers layers,
    block the first recompute_num_layers layers of each stage."""
    recompute_num_layers: int | None = Field(None, gt=0)
    no_load_optim: bool = False
    """--no-load-optim: `load` restores the model only (needed to resume under another TP/PP/CP/DP layout)."""
    sgd_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """--sgd-momentum for optimizer sgd (0: plain SGD, as torch.optim.SGD's default)."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """--transformer-impl: local runs SDPA attention and torch norms; transformer_engine needs TE (CUDA)."""
    expert_model_parallel_size: int = Field(1, gt=0)
    """--expert-model-parallel-size (MoE): ranks that split each MoE layer's experts (tokens travel to
    their experts all-to-all); carved out of the data-parallel ranks, so it must divide DP x CP."""
    expert_tensor_parallel_size: int | None = Field(None, gt=0)
    """--expert-tensor-parallel-size (MoE): ranks that split each expert's MLP (default: the TP size)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """--moe-router-load-balancing-type: the load-balancing loss over each micro-batch's tokens (aux_loss)
    or over each sequence's (seq_aux_loss), weighted by --moe-aux-loss-coeff; none: no such loss."""
    moe_aux_loss_coeff: float = Field(0.0, ge=0.0)
    """--moe-aux-loss-coeff: weight of the load-balancing loss (summed over MoE layers; each micro-batch
    counts by its share of the global batch's tokens, as the policy loss does). 0: off."""
    moe_z_loss_coeff: float | None = Field(None, ge=0.0)
    """--moe-z-loss-coeff: weight of the router z-loss (ST-MoE), weighted like the load-balancing loss."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """--moe-token-dispatcher-type: how tokens reach their expert-parallel rank (same result either way);
    allgather only without expert parallelism (it needs the same token count on every EP rank)."""
    moe_router_dtype: Literal["fp32", "fp64"] | None = None
    """--moe-router-dtype: routing (router logits, softmax, top-k) in this precision; default: the model's."""
    moe_grouped_gemm: bool = False
    """--moe-grouped-gemm: all local experts in one grouped GEMM; needs TransformerEngine (CUDA)."""

    @model_validator(mode="after")
    def _check_megatron_flags(self) -> MegatronConfig:
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel=True needs tensor_model_parallel_size > 1 (it splits the sequence over TP ranks)")
        if self.use_distributed_optimizer and self.optimizer != "adam":
            raise ValueError("use_distributed_optimizer=True needs optimizer='adam': megatron-core shards and checkpoints Adam state only")
        if not self.attention_softmax_in_fp32:
            raise ValueError(
                "attention_softmax_in_fp32=False is refused: the SDPA and flash attention kernels always"
                " accumulate the softmax in float32, there is no bfloat16-softmax path to select"
            )
        if self.recompute_granularity == "selective" and (self.recompute_method or self.recompute_num_layers):
            raise ValueError("recompute_method/recompute_num_layers apply to recompute_granularity='full' only, not 'selective'")
        if self.recompute_granularity is None and (self.recompute_method or self.recompute_num_layers):
            raise ValueError("recompute_method/recompute_num_layers are set but recompute_granularity is not")
        if self.transformer_impl == "transformer_engine":
            try:
                import transformer_engine  # noqa: F401
            except ImportError:
                raise ValueError(
                    "transformer_impl='transformer_engine' needs TransformerEngine, which is not installed;"
                    " use 'local' (SDPA attention)"
                ) from None
        if self.moe_token_dispatcher_type == "allgather" and self.expert_model_parallel_size > 1:
            raise ValueError(
                "moe_token_dispatcher_type='allgather' with expert_model_parallel_size > 1 is refused: megatron-core's"
                " all-gather dispatcher needs the same token count on every expert-parallel rank, and each data-parallel"
                " rank pads its micro-batches to its own longest sample; use 'alltoall'"
            )
        if self.moe_grouped_gemm and self.transformer_impl != "transformer_engine":
            raise ValueError(
                "moe_grouped_gemm=True needs transformer_impl='transformer_engine' (TE's grouped experts); the local"
                " spec's grouped GEMM needs the CUDA-only grouped_gemm package and bfloat16, so local runs experts one by one"
            )
        return self

    @property
    def expert_tp_size(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def recompute(self) -> tuple[str | None, str | None, int | None]:
        """(granularity, method, num_layers) for megatron-core's TransformerConfig."""
        if self.recompute_granularity == "full":
            return "full", self.recompute_method or "uniform", self.recompute_num_layers or 1
        if self.recompute_granularity == "selective":
            return "selective", None, None
        if self.gradient_checkpointing:
            return "full", "uniform", 1
        return None, None, None
