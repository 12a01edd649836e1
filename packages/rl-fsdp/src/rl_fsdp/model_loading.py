"""Building the Hugging Face model (from weights or a seeded random init) and sharding it with FSDP2."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def has_weights(model_path: Path) -> bool:
    return any(p.name.endswith(".safetensors") for p in model_path.iterdir())


def load_hf_model(model_path: Path, seed: int) -> PreTrainedModel:
    """The float32 model on CPU: loaded from safetensors, or randomly initialised with `seed` (same on every rank)."""
    if not (model_path / "config.json").is_file():
        raise ValueError(f"model_path {model_path}: no config.json there")
    if has_weights(model_path):
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = AutoConfig.from_pretrained(model_path)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that share storage with an earlier name (tied embeddings): alias -> first name."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return aliases


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant per-layer checkpointing (the reentrant kind breaks under FSDP2's hooks).

    Newer transformers renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


RECOMPILE_LIMIT = 64
"""Compiled variants dynamo keeps of one decoder layer's forward before it runs the rest eagerly. Every model of
an architecture in the process (policy, reference, critic) shares the layer's code, and grad mode, activation
checkpointing and packed-or-padded rows each double the variants: eight, dynamo's default, is soon reached."""


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, name, max(getattr(config, name), limit))


def shard_model(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, layer_classes: set[str] | None = None,
    compile_layers: bool = False,
) -> nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head); float32 master
    weights and gradient reduction, `param_dtype` compute. `layer_classes` defaults to the Hugging Face
    model's `_no_split_modules` (a wrapper such as the critic passes its body's).

    `compile_layers`: each decoder layer's forward goes through torch.compile, which fuses its norms,
    rotary embedding, activation and residual adds; FSDP's hooks (gathering the layer's weights) stay eager.
    Its token dimension is dynamic from the first call (`mark_tokens_dynamic`)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if layer_classes is None:
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    if compile_layers:
        _raise_recompile_limit(RECOMPILE_LIMIT)
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            if compile_layers:
                module.forward = torch.compile(module.forward)  # type: ignore[method-assign]
            fully_shard(module, mesh=mesh, mp_policy=policy)
            if compile_layers:
                module.register_forward_pre_hook(mark_tokens_dynamic, with_kwargs=True)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def mark_tokens_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a compiled decoder layer: every input dimension as long as the hidden states'
    token dimension becomes dynamic before dynamo first sees it. Micro-batches differ in length, and a graph
    compiled for the first length alone would be compiled again, shape-dynamic, at the second."""
    hidden = args[0] if args else kwargs["hidden_states"]
    tokens = hidden.shape[-2]
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            for dim, size in enumerate(leaf.shape):
                if size == tokens:
                    torch._dynamo.maybe_mark_dynamic(leaf, dim)
