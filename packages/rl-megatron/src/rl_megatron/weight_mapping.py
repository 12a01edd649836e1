"""Hugging Face <-> Megatron-Core (GPTModel, local layer spec) state dicts for Llama/Qwen2/Qwen3-family models.

SGLang engines load Hugging Face names and layouts, while Megatron-Core fuses Q/K/V into one
`linear_qkv` (interleaved per query group: [q heads of group g, k_g, v_g] for g in groups, see
`SelfAttention.get_query_key_value_tensors`) and gate/up into one `linear_fc1` ([gate; up], see the
`glu` in `MLP`). An MoE layer's router is `mlp.router`, its experts `mlp.experts.local_experts.E` (one
SequentialMLP each, fc1 = [gate; up]); full state dicts number experts globally. Megatron may pad the vocabulary to a multiple of its TP-friendly size; the padding
rows are added on the way in (`padded_vocab_size`) and dropped on the way out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from rl_megatron.transformer_shape import TransformerShape

__all__ = [
    "TransformerShape",
    "hf_to_megatron",
    "megatron_to_hf",
    "fuse_qkv",
    "unfuse_qkv",
    "hf_layer_to_megatron",
    "megatron_tensor_to_hf",
    "megatron_layer_suffixes",
]

# Buffers that some checkpoints carry but that are recomputed from the config, never weights.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MCORE_IGNORED_SUFFIXES = ("_extra_state", "rotary_pos_emb.inv_freq")


def _expect(name: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


class _Reader:
    """Pops tensors from a state dict by name so that leftovers can be reported at the end."""

    def __init__(self, state: Mapping[str, Tensor], ignored_suffixes: tuple[str, ...], side: str) -> None:
        self._left = {k: v for k, v in state.items() if not k.endswith(ignored_suffixes)}
        self._side = side

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if name not in self._left:
            raise KeyError(f"{self._side} state dict has no tensor {name!r}")
        tensor = self._left.pop(name)
        return tensor if shape is None else _expect(name, tensor, shape)

    def discard(self, name: str) -> None:
        self._left.pop(name, None)

    def finish(self) -> None:
        if self._left:
            shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(self._left.items())[:5])
            raise ValueError(f"{self._side} state dict has {len(self._left)} unmapped tensor(s): {shown}")


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: TransformerShape) -> Tensor:
    """Stack HF q/k/v (weights or biases) into Megatron's per-query-group interleaved `linear_qkv`."""
    groups = config.num_key_value_heads
    rest = q.shape[1:]
    return torch.cat(
        [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)], dim=1
    ).reshape(config.qkv_rows, *rest)


def unfuse_qkv(qkv: Tensor, config: TransformerShape) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv`: Megatron `linear_qkv` rows back to HF q, k, v."""
    groups, hd = config.num_key_value_heads, config.head_dim
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, -1, *rest).split([config.heads_per_group * hd, hd, hd], dim=1)
    return (
        q.reshape(config.num_attention_heads * hd, *rest),
        k.reshape(config.num_key_value_heads * hd, *rest),
        v.reshape(config.num_key_value_heads * hd, *rest),
    )


def _pad_vocab(name: str, tensor: Tensor, padded_vocab_size: int | None) -> Tensor:
    if padded_vocab_size is None or padded_vocab_size == tensor.shape[0]:
        return tensor
    if padded_vocab_size < tensor.shape[0]:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} is smaller than {name!r} {tuple(tensor.shape)}")
    pad = tensor.new_zeros(padded_vocab_size - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, pad], dim=0)


def _trim_vocab(name: str, tensor: Tensor, config: TransformerShape) -> Tensor:
    if tensor.ndim != 2 or tensor.shape[0] < config.vocab_size or tensor.shape[1] != config.hidden_size:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
            f"(>= {config.vocab_size}, {config.hidden_size})"
        )
    return tensor[: config.vocab_size]


class HFMoENames:
    """The checkpoint names of one MoE layer's router and experts."""

    def __init__(self, config: TransformerShape, layer: int) -> None:
        base = f"model.layers.{layer}." + ("block_sparse_moe." if config.moe_names == "mixtral" else "mlp.")
        self.router = base + "gate.weight"
        self._experts = base + "experts."
        self._parts = ("w1", "w3", "w2") if config.moe_names == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    def expert(self, e: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of expert `e`."""
        return tuple(f"{self._experts}{e}.{part}.weight" for part in self._parts)  # type: ignore[return-value]


_FUSED_EXPERT = re.compile(r"(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")


def fused_expert_source(name: str) -> tuple[str, int, str] | None:
    """Where transformers 5 keeps checkpoint tensor `name` of one expert in memory: (fused tensor name,
    expert, "gate" | "up" | "down"); its state dict stacks experts as `mlp.experts.gate_up_proj`
    [E, 2I, H] ([gate; up] per expert) and `mlp.experts.down_proj` [E, H, I]. None for other names."""
    match = _FUSED_EXPERT.fullmatch(name)
    if match is None:
        return None
    prefix, expert, part = match.groups()
    kind = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}[part]
    return prefix + "mlp.experts." + ("down_proj" if kind == "down" else "gate_up_proj"), int(expert), kind


def hf_layer_to_megatron(
    take, hf_layer: int, mcore_layer: int, config: TransformerShape, experts: range | None = None
) -> dict[str, Tensor]:
    """Decoder layer `hf_layer` of a HF model, read with `take(name, shape)`, under Megatron names of
    layer `mcore_layer` (its index within a pipeline stage). An MoE layer holds the experts `experts`
    (default: all), numbered from 0 in that order (an expert-parallel rank's local experts)."""
    c = config
    h, hd, ffn = c.hidden_size, c.head_dim, c.ffn_hidden_size
    hf, mc = f"model.layers.{hf_layer}.", f"decoder.layers.{mcore_layer}."
    out: dict[str, Tensor] = {}
    q = take(hf + "self_attn.q_proj.weight", (c.num_attention_heads * hd, h))
    k = take(hf + "self_attn.k_proj.weight", (c.num_key_value_heads * hd, h))
    v = take(hf + "self_attn.v_proj.weight", (c.num_key_value_heads * hd, h))
    out[mc + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, c)
    if c.qkv_bias:
        qb = take(hf + "self_attn.q_proj.bias", (c.num_attention_heads * hd,))
        kb = take(hf + "self_attn.k_proj.bias", (c.num_key_value_heads * hd,))
        vb = take(hf + "self_attn.v_proj.bias", (c.num_key_value_heads * hd,))
        out[mc + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, c)
    if c.qk_norm:
        out[mc + "self_attention.q_layernorm.weight"] = take(hf + "self_attn.q_norm.weight", (hd,))
        out[mc + "self_attention.k_layernorm.weight"] = take(hf + "self_attn.k_norm.weight", (hd,))
    out[mc + "self_attention.linear_proj.weight"] = take(hf + "self_attn.o_proj.weight", (h, c.num_attention_heads * hd))
    out[mc + "input_layernorm.weight"] = take(hf + "input_layernorm.weight", (h,))
    out[mc + "pre_mlp_layernorm.weight"] = take(hf + "post_attention_layernorm.weight", (h,))
    if c.is_moe_layer(hf_layer):
        names = HFMoENames(c, hf_layer)
        out[mc + "mlp.router.weight"] = take(names.router, (c.num_experts, h))
        for local, e in enumerate(range(c.num_experts) if experts is None else experts):
            gate, up, down = names.expert(e)
            fc = f"{mc}mlp.experts.local_experts.{local}."
            out[fc + "linear_fc1.weight"] = torch.cat(
                [take(gate, (c.moe_ffn_hidden_size, h)), take(up, (c.moe_ffn_hidden_size, h))], dim=0
            )
            out[fc + "linear_fc2.weight"] = take(down, (h, c.moe_ffn_hidden_size))
        return out
    gate = take(hf + "mlp.gate_proj.weight", (ffn, h))
    up = take(hf + "mlp.up_proj.weight", (ffn, h))
    out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out[mc + "mlp.linear_fc2.weight"] = take(hf + "mlp.down_proj.weight", (h, ffn))
    return out


def hf_to_megatron(
    hf_state: Mapping[str, Tensor], config: TransformerShape, padded_vocab_size: int | None = None
) -> dict[str, Tensor]:
    """Rename and fuse a HF Llama/Qwen2/Qwen3 state dict into Megatron-Core GPTModel names (TP size 1).

    A tied model's `lm_head.weight` (present in `model.state_dict()`, absent from safetensors) is
    accepted and dropped: Megatron then shares `embedding.word_embeddings.weight` with the output layer.
    """
    c = config
    h = c.hidden_size
    src = _Reader(hf_state, _HF_IGNORED_SUFFIXES, "HF")
    out: dict[str, Tensor] = {}

    embed = src.take("model.embed_tokens.weight", (c.vocab_size, h))
    out["embedding.word_embeddings.weight"] = _pad_vocab("model.embed_tokens.weight", embed, padded_vocab_size)
    for i in range(c.num_layers):
        out.update(hf_layer_to_megatron(src.take, i, i, c))
    out["decoder.final_layernorm.weight"] = src.take("model.norm.weight", (h,))
    if c.tie_word_embeddings:
        src.discard("lm_head.weight")
    else:
        head = src.take("lm_head.weight", (c.vocab_size, h))
        out["output_layer.weight"] = _pad_vocab("lm_head.weight", head, padded_vocab_size)
    src.finish()
    return out


_LAYER_RENAMES = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


_QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


def megatron_layer_suffixes(config: TransformerShape, layer: int) -> list[str]:
    """Names of decoder layer `layer`'s tensors in a full Megatron state dict, after `decoder.layers.N.`
    (experts numbered globally)."""
    names = ["self_attention.linear_qkv.weight"] + (["self_attention.linear_qkv.bias"] if config.qkv_bias else [])
    names += [n for n in _LAYER_RENAMES if not n.startswith("mlp.") and (config.qk_norm or n not in _QK_NORMS)]
    if config.is_moe_layer(layer):
        names.append("mlp.router.weight")
        for e in range(config.num_experts):
            names += [f"mlp.experts.local_experts.{e}.linear_fc1.weight", f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    else:
        names += ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    return names


def megatron_tensor_to_hf(name: str, tensor: Tensor, config: TransformerShape) -> list[tuple[str, Tensor]]:
    """One full (TP-merged) Megatron tensor with a global layer number as (HF name, tensor) pairs: a fused
    QKV gives q, k, v; fc1 gives gate and up; vocabulary padding is dropped. A tied embedding also gives
    `lm_head.weight`, as a tied HF model's state dict lists it. A critic's `value_head.*` keeps its name."""
    c = config
    if name.startswith("value_head."):
        return [(name, tensor)]
    if name == "embedding.word_embeddings.weight":
        embed = _trim_vocab(name, tensor, c)
        return [("model.embed_tokens.weight", embed)] + ([("lm_head.weight", embed)] if c.tie_word_embeddings else [])
    if name == "output_layer.weight":
        return [("lm_head.weight", _trim_vocab(name, tensor, c))]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", _expect(name, tensor, (c.hidden_size,)))]
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["decoder", "layers"] or not parts[2].isdigit():
        raise ValueError(f"Megatron tensor {name!r} has no Hugging Face counterpart")
    hf, suffix = f"model.layers.{parts[2]}.", parts[3]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        _expect(name, tensor, (c.qkv_rows, c.hidden_size) if kind == "weight" else (c.qkv_rows,))
        return [(hf + f"self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", unfuse_qkv(tensor, c))]
    if suffix == "mlp.router.weight":
        return [(HFMoENames(c, int(parts[2])).router, _expect(name, tensor, (c.num_experts, c.hidden_size)))]
    if suffix.startswith("mlp.experts.local_experts."):
        expert, kind = suffix.removeprefix("mlp.experts.local_experts.").split(".", 1)
        gate_name, up_name, down_name = HFMoENames(c, int(parts[2])).expert(int(expert))
        h, ffn = c.hidden_size, c.moe_ffn_hidden_size
        if kind == "linear_fc1.weight":
            g, u = _expect(name, tensor, (2 * ffn, h)).chunk(2, dim=0)
            return [(gate_name, g), (up_name, u)]
        if kind == "linear_fc2.weight":
            return [(down_name, _expect(name, tensor, (h, ffn)))]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = _expect(name, tensor, (2 * c.ffn_hidden_size, c.hidden_size)).chunk(2, dim=0)
        return [(hf + "mlp.gate_proj.weight", gate), (hf + "mlp.up_proj.weight", up)]
    if suffix in _LAYER_RENAMES:
        return [(hf + _LAYER_RENAMES[suffix], tensor)]
    raise ValueError(f"Megatron tensor {name!r} has no Hugging Face counterpart")


def megatron_to_hf(mcore_state: Mapping[str, Tensor], config: TransformerShape) -> dict[str, Tensor]:
    """Split and rename a full (TP-merged) Megatron-Core GPTModel state dict into HF names.

    Vocabulary padding rows are dropped; a tied model yields no `lm_head.weight`.
    """
    src = _Reader(mcore_state, _MCORE_IGNORED_SUFFIXES, "Megatron")
    expected = ["embedding.word_embeddings.weight"]
    for i in range(config.num_layers):
        mc = f"decoder.layers.{i}."
        expected += [mc + n for n in megatron_layer_suffixes(config, i)]
    expected += ["decoder.final_layernorm.weight"] + ([] if config.tie_word_embeddings else ["output_layer.weight"])
    out: dict[str, Tensor] = {}
    for name in expected:
        for hf_name, tensor in megatron_tensor_to_hf(name, src.take(name), config):
            if not (config.tie_word_embeddings and hf_name == "lm_head.weight"):
                out[hf_name] = tensor
    src.finish()
    return out
