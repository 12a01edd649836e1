"""Reading a Hugging Face model directory's config into what megatron-core's GPTModel is built from, and
refusing, before anything expensive starts, what the backend cannot build or split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_megatron.config import MegatronConfig
from rl_megatron.transformer_shape import TransformerShape

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
"""Decoders with GQA, SwiGLU and RMSNorm, dense or with top-k softmax-routed experts (no shared experts);
qwen2_moe (shared experts) and deepseek_v3 (MLA, grouped routing) are not mapped yet."""


@dataclass(frozen=True)
class Rope:
    base: float
    llama3_factor: float | None
    """Llama 3.1's frequency scaling factor, or None without rope scaling."""


def read_hf_config(model_path: Path):
    from transformers import AutoConfig

    if not (Path(model_path) / "config.json").is_file():
        raise ValueError(f"model_path {model_path}: no config.json there")
    return AutoConfig.from_pretrained(model_path)


def rope_of(hf_config: Any) -> Rope:
    """RoPE base and scaling, from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type == "default":
        return Rope(float(base), None)
    if rope_type == "llama3":
        merged = {**scaling, **params}
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(merged.get(key, value)) != value:
                raise ValueError(
                    f"rope scaling llama3 with {key}={merged[key]}: megatron-core's Llama 3 scaling fixes {key}={value}"
                )
        return Rope(float(base), float(merged.get("factor", 8.0)))
    raise ValueError(f"rope_type {rope_type!r} of the HF config is not supported (default and llama3 are)")


def _check(flag: str, value: int, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"{flag}={value}: {why}")


def check_config(config: MegatronConfig, hf_config: Any, world_size: int | None = None) -> TransformerShape:
    """Refuse a model family the mapping cannot build, and parallel sizes that do not split this model
    (or `world_size` ranks, when given); returns the model's shape. Cheap: call it before Ray starts."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_path {config.model_path}: model_type {model_type!r} cannot be built as a megatron-core GPTModel"
            f" by rl-megatron (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"model_path {config.model_path}: use_sliding_window=True is not supported (full causal attention only)")
    if getattr(hf_config, "sliding_window", None) is not None and model_type == "mixtral":
        raise ValueError(f"model_path {config.model_path}: sliding_window={hf_config.sliding_window} is not supported (full causal attention only)")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"model_path {config.model_path}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    rope_of(hf_config)
    shape = TransformerShape.from_hf_config(hf_config)
    tp, pp, cp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size
    flag = "--tensor-model-parallel-size"
    _check(flag, tp, shape.num_attention_heads % tp == 0, f"does not divide num_attention_heads={shape.num_attention_heads}")
    _check(flag, tp, shape.num_key_value_heads % tp == 0, f"does not divide num_key_value_heads={shape.num_key_value_heads}")
    _check(flag, tp, shape.ffn_hidden_size % tp == 0, f"does not divide intermediate_size={shape.ffn_hidden_size}")
    flag = "--pipeline-model-parallel-size"
    _check(flag, pp, pp <= shape.num_layers, f"is larger than num_hidden_layers={shape.num_layers}")
    _check(flag, pp, shape.num_layers % pp == 0, f"does not divide num_hidden_layers={shape.num_layers} into equal stages")
    _check_experts(config, shape, world_size)
    if world_size is not None:
        model_parallel = tp * pp * cp
        _check(
            "--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size",
            model_parallel,
            world_size % model_parallel == 0,
            f"(TP={tp} x PP={pp} x CP={cp}) does not divide the {world_size} training ranks (GPUs)",
        )
    return shape


def _check_experts(config: MegatronConfig, shape: TransformerShape, world_size: int | None) -> None:
    ep, etp = config.expert_model_parallel_size, config.expert_tp_size
    if not shape.num_experts:
        moe_flags = {"expert_model_parallel_size": ep > 1, "expert_tensor_parallel_size": config.expert_tensor_parallel_size,
                     "moe_aux_loss_coeff": config.moe_aux_loss_coeff, "moe_z_loss_coeff": config.moe_z_loss_coeff,
                     "moe_grouped_gemm": config.moe_grouped_gemm, "moe_router_dtype": config.moe_router_dtype}
        given = [name for name, value in moe_flags.items() if value]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags}: MoE flag(s), but model_path {config.model_path} is a dense model (no experts)")
        return
    if shape.moe_router_topk == 1 and shape.moe_norm_topk_prob:
        raise ValueError(
            f"model_path {config.model_path}: top-1 routing with renormalised weights (always 1) is refused by megatron-core,"
            " whose top-1 router needs the softmax over all experts (a different model)"
        )
    _check("--expert-model-parallel-size", ep, shape.num_experts % ep == 0, f"does not divide num_experts={shape.num_experts}")
    _check("--expert-tensor-parallel-size", etp, shape.moe_ffn_hidden_size % etp == 0,
           f"does not divide the experts' intermediate size {shape.moe_ffn_hidden_size}")
    if world_size is not None:
        per_stage = world_size // config.pipeline_model_parallel_size
        _check(
            "--expert-model-parallel-size x --expert-tensor-parallel-size",
            ep * etp,
            per_stage % (ep * etp) == 0,
            f"(EP={ep} x ETP={etp}) does not divide the {per_stage} ranks of a pipeline stage",
        )
