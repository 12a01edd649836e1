"""The few numbers that decide every tensor shape the HF <-> Megatron mapping touches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, model_validator

MoENames = Literal["qwen", "mixtral"]
"""How a checkpoint names an MoE layer: Qwen's `mlp.gate` + `mlp.experts.E.{gate,up,down}_proj`, or
Mixtral's `block_sparse_moe.gate` + `block_sparse_moe.experts.E.{w1,w3,w2}`."""


class TransformerShape(BaseModel):
    """Shape of a Llama/Qwen2/Qwen3-family decoder (GQA, SwiGLU MLP, RMSNorm, optional QKV bias and QK norm)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: PositiveInt
    hidden_size: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    head_dim: PositiveInt
    ffn_hidden_size: PositiveInt
    vocab_size: PositiveInt
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    num_experts: NonNegativeInt = 0
    """Routed experts of each MoE layer (0: a dense model)."""
    moe_ffn_hidden_size: NonNegativeInt = 0
    """Intermediate size of one expert's SwiGLU MLP."""
    moe_router_topk: NonNegativeInt = 0
    """Experts each token is sent to."""
    moe_norm_topk_prob: bool = True
    """The top-k routing weights are renormalised to sum to 1 (else: the softmax over all experts, cut to k)."""
    moe_layers: tuple[bool, ...] = ()
    """Per decoder layer: an MoE layer (True) or a dense MLP of ffn_hidden_size (False); empty when dense."""
    moe_names: MoENames = "qwen"

    @model_validator(mode="after")
    def _check_grouping(self) -> TransformerShape:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for num_layers={self.num_layers}")
        if self.num_experts and not 0 < self.moe_router_topk <= self.num_experts:
            raise ValueError(f"moe_router_topk={self.moe_router_topk} must be in 1..num_experts={self.num_experts}")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_rows(self) -> int:
        """Output rows of the fused QKV projection: every q head plus one k and one v head per group."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> TransformerShape:
        """Read a transformers LlamaConfig/Qwen2Config/Qwen3Config/Qwen3MoeConfig/MixtralConfig (or anything
        with the same attributes).

        Qwen2 always has q/k/v bias and no `attention_bias` attribute; Llama and Qwen3 read
        `attention_bias`; Qwen3 always normalises queries and keys. Qwen3-MoE puts experts on layers
        outside `mlp_only_layers` every `decoder_sparse_step`; Mixtral on every layer, weights renormalised.
        """
        model_type = getattr(hf_config, "model_type", "")
        if model_type == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(getattr(hf_config, "attention_bias", False))
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("hf_config.mlp_bias=True is not supported: the mapping has no MLP bias tensors")
        num_heads = hf_config.num_attention_heads
        layers = hf_config.num_hidden_layers
        moe: dict[str, Any] = {}
        if model_type == "qwen3_moe":
            step, dense = int(getattr(hf_config, "decoder_sparse_step", 1)), set(getattr(hf_config, "mlp_only_layers", []) or [])
            moe = dict(
                num_experts=hf_config.num_experts,
                moe_ffn_hidden_size=hf_config.moe_intermediate_size,
                moe_router_topk=hf_config.num_experts_per_tok,
                moe_norm_topk_prob=bool(hf_config.norm_topk_prob),
                moe_layers=tuple(hf_config.num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(layers)),
            )
        elif model_type == "mixtral":
            moe = dict(
                num_experts=hf_config.num_local_experts,
                moe_ffn_hidden_size=hf_config.intermediate_size,
                moe_router_topk=hf_config.num_experts_per_tok,
                moe_layers=(True,) * layers,
                moe_names="mixtral",
            )
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return cls(
            num_layers=layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **moe,
        )
