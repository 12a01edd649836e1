"""The few numbers that decide every tensor shape the HF <-> Megatron mapping touches."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator


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

    @model_validator(mode="after")
    def _check_grouping(self) -> TransformerShape:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        return self

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_rows(self) -> int:
        """Output rows of the fused QKV projection: every q head plus one k and one v head per group."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> TransformerShape:
        """Read a transformers LlamaConfig/Qwen2Config/Qwen3Config (or anything with the same attributes).

        Qwen2 always has q/k/v bias and no `attention_bias` attribute; Llama and Qwen3 read
        `attention_bias`; Qwen3 always normalises queries and keys.
        """
        model_type = getattr(hf_config, "model_type", "")
        if model_type == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(getattr(hf_config, "attention_bias", False))
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("hf_config.mlp_bias=True is not supported: the mapping has no MLP bias tensors")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=model_type == "qwen3",
        )
