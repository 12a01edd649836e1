"""A megatron-core GPTModel of a Hugging Face Llama/Qwen2/Qwen3/Qwen3-MoE/Mixtral config, and its weights
from the HF safetensors (or from the HF model's seeded random init), each rank reading only its TP shard
of its PP stage's layers (and of its expert-parallel rank's experts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from rl_megatron.config import MegatronConfig
from rl_megatron.hf_config import rope_of
from rl_megatron.layers import ValueHead, local_sdpa_block_spec, transformer_engine_block_spec
from rl_megatron.tensor_parallel import split_tp
from rl_megatron.transformer_shape import TransformerShape
from rl_megatron.weight_mapping import fused_expert_source, hf_layer_to_megatron

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_vocab_size(shape: TransformerShape, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of the TP size, so every rank holds an equal slice."""
    return -(-shape.vocab_size // tp_size) * tp_size


_TE_MOE_KERNELS = (
    "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute", "fused_permute_with_probs",
    "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
    "fused_unpermute", "te_general_gemm",
)


def _moe_without_transformer_engine() -> None:
    """megatron-core 0.16 tests its TE MoE kernels against None but leaves them undefined when TE is
    missing (the router's gating GEMM raises NameError); define them as absent, as 0.19 does."""
    from megatron.core.transformer.moe import moe_utils

    for name in _TE_MOE_KERNELS:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def moe_settings(config: MegatronConfig, shape: TransformerShape) -> dict[str, Any]:
    """megatron-core's MoE fields: top-k routing as the HF model routes (softmax over the top-k logits
    equals renormalised top-k probabilities; without renormalisation, softmax first), sequential experts,
    the load-balancing losses of the flags."""
    if not shape.num_experts:
        return {}
    _moe_without_transformer_engine()
    return dict(
        num_moe_experts=shape.num_experts,
        moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
        moe_router_topk=shape.moe_router_topk,
        moe_router_pre_softmax=not shape.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_layer_freq=[int(moe) for moe in shape.moe_layers],
        moe_router_load_balancing_type=config.moe_router_load_balancing_type,
        moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        moe_z_loss_coeff=config.moe_z_loss_coeff,
        moe_token_dispatcher_type=config.moe_token_dispatcher_type,
        moe_router_dtype=config.moe_router_dtype,
        moe_grouped_gemm=config.moe_grouped_gemm,
        moe_permute_fusion=False,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tp_size,
    )


def transformer_config(config: MegatronConfig, shape: TransformerShape, hf_config: Any, on_cpu: bool) -> TransformerConfig:
    granularity, method, num_layers = config.recompute()
    dtype = DTYPES[config.param_dtype]
    return TransformerConfig(
        **moe_settings(config, shape),
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        attention_softmax_in_fp32=config.attention_softmax_in_fp32,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
        sequence_parallel=config.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        recompute_granularity=granularity,
        recompute_method=method,
        recompute_num_layers=num_layers,
        # The rl-core losses return each micro-batch's share of the global-batch loss: gradients are summed
        # over micro-batches and data-parallel ranks, never averaged (see MegatronBackend.train_step).
        calculate_per_token_loss=True,
        # Initialisation is overwritten by the HF weights, but it is also what marks parameters as
        # tensor-parallel (the grad norm and checkpoint sharding read those marks).
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def build_gpt(config: MegatronConfig, shape: TransformerShape, hf_config: Any, tf_config: TransformerConfig) -> GPTModel:
    """This rank's stage of the model (uninitialised: weights come from `load_hf_weights`)."""
    qk_norm = shape.qk_norm
    layers = stage_layers(shape, config.pipeline_model_parallel_size, parallel_state.get_pipeline_model_parallel_rank())
    experts = [shape.num_experts if shape.is_moe_layer(i) else None for i in layers]
    spec = (
        transformer_engine_block_spec(tf_config, qk_norm, experts, config.moe_grouped_gemm)
        if config.transformer_impl == "transformer_engine"
        else local_sdpa_block_spec(tf_config, qk_norm, experts)
    )
    rope = rope_of(hf_config)
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(shape, config.tensor_model_parallel_size),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_word_embeddings and config.head == "lm",
        position_embedding_type="rope",
        rotary_base=rope.base,
        rope_scaling=rope.llama3_factor is not None,
        rope_scaling_factor=rope.llama3_factor or 8.0,
    )
    if config.head == "value" and model.post_process:
        model.output_layer = ValueHead(tf_config, shape.hidden_size)
    return model.to(dtype=tf_config.params_dtype)


class HFWeights:
    """Tensors of a HF checkpoint by name, read lazily from its safetensors; without weight files, the HF
    model's own random init under `seed` (identical to what a Hugging Face backend builds from the seed)."""

    def __init__(self, model_path: Path, hf_config: Any, seed: int) -> None:
        files = sorted(Path(model_path).glob("*.safetensors"))
        self._state: dict[str, torch.Tensor] | None = None
        self._files: dict[str, Path] = {}
        if files:
            index = Path(model_path) / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: Path(model_path) / file for name, file in weight_map.items()}
            else:
                from safetensors import safe_open

                for file in files:
                    with safe_open(str(file), framework="pt") as f:
                        self._files.update({name: file for name in f.keys()})
        else:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)
            self._state = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).state_dict()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` (checkpoint names: one tensor per expert); an expert of a model kept as
        transformers 5 keeps it in memory (experts stacked) is cut out of the stacked tensor."""
        fused = fused_expert_source(name)
        if not self._has(name) and fused is not None and self._has(fused[0]):
            source, expert, kind = fused
            stacked = self._get(source)[expert]
            tensor = stacked if kind == "down" else stacked.chunk(2, dim=0)[kind == "up"]
        else:
            tensor = self._get(name)
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"HF tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def _has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._files)

    def _get(self, name: str) -> torch.Tensor:
        if self._state is not None:
            if name not in self._state:
                raise KeyError(f"HF model has no tensor {name!r}")
            return self._state[name]
        from safetensors import safe_open

        if name not in self._files:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)


def stage_layers(shape: TransformerShape, pp_size: int, pp_rank: int) -> range:
    """Global indices of the decoder layers on pipeline stage `pp_rank` (equal stages)."""
    per_stage = shape.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def stage_state(
    take: Callable[..., torch.Tensor],
    shape: TransformerShape,
    tp_size: int,
    tp_rank: int,
    pp_size: int,
    pp_rank: int,
    lm_head: bool = True,
    ep_size: int = 1,
    ep_rank: int = 0,
    etp_size: int = 1,
    etp_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict: its TP shard of every tensor on its pipeline stage, of MoE layers
    only its expert-parallel rank's experts, each cut to its expert-TP shard (without the output layer
    when `lm_head` is False: a critic's value head starts at zero)."""
    vocab = padded_vocab_size(shape, tp_size)
    h = shape.hidden_size
    full: dict[str, torch.Tensor] = {}

    def vocab_rows(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros(vocab - tensor.shape[0], h)]) if vocab > tensor.shape[0] else tensor

    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if first:
        full["embedding.word_embeddings.weight"] = vocab_rows(take("model.embed_tokens.weight", (shape.vocab_size, h)))
    per_rank = shape.num_experts // ep_size
    experts = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
    for local, layer in enumerate(stage_layers(shape, pp_size, pp_rank)):
        full.update(hf_layer_to_megatron(take, layer, local, shape, experts))
    if last:
        full["decoder.final_layernorm.weight"] = take("model.norm.weight", (h,))
        if not lm_head:
            pass
        elif not shape.tie_word_embeddings:
            full["output_layer.weight"] = vocab_rows(take("lm_head.weight", (shape.vocab_size, h)))
        elif not first:
            # A tied model's last stage keeps its own copy of the embedding as the output layer.
            full["output_layer.weight"] = vocab_rows(take("model.embed_tokens.weight", (shape.vocab_size, h)))
    def shard(name: str, tensor: torch.Tensor) -> torch.Tensor:
        expert = ".mlp.experts." in name
        return split_tp(name, tensor, etp_size if expert else tp_size)[etp_rank if expert else tp_rank].clone()

    return {name: shard(name, tensor) for name, tensor in full.items()}


def load_stage(model: GPTModel, state: dict[str, torch.Tensor]) -> None:
    """Fill `model` from `state`; only a value head (which starts at zero) may be left out."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    value_head = isinstance(getattr(model, "output_layer", None), ValueHead)
    missing = [n for n in missing if not n.endswith("_extra_state") and not (value_head and n.startswith("output_layer."))]
    if missing or unexpected:
        raise ValueError(f"HF weights do not fill the Megatron model: missing {missing[:5]}, unexpected {unexpected[:5]}")
