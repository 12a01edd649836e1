"""LoRA through peft: wrapping the Hugging Face model before sharding, and the weights the engines take.

Why merge on the trainer: the embedded engine (and SGLang without --enable-lora) serves plain Hugging
Face weights, so `merged_weights` yields W + scale * B @ A under the base model's names, one tensor at a
time; every weight transport works unchanged. `adapter_weights` is the other road, the adapter alone
under PEFT's names, for an engine that holds the base and loads adapters (SGLang's
/load_lora_adapter_from_tensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from rl_core.backend_config import BackendConfig

ADAPTER = "default"
"""peft's name of the one adapter the backend trains."""
_PEFT_PREFIX = "base_model.model."
"""What peft puts in front of the wrapped model's state-dict names."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def wrap_with_lora(model: PreTrainedModel, config: BackendConfig) -> PeftModel:
    """The model with trainable LoRA adapters and a frozen base: new ones (A seeded with config.seed, the
    same on every rank; B zero) or those of config.lora_adapter_path."""
    if config.lora_adapter_path is not None:
        peft_model = PeftModel.from_pretrained(model, config.lora_adapter_path, adapter_name=ADAPTER, is_trainable=True)
    else:
        targets = _target_modules(model, config.lora_target_modules)
        lora_config = LoraConfig(
            # peft annotates lora_alpha as int but scales by lora_alpha / r, which a float alpha keeps exact.
            r=config.lora_rank, lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
            lora_dropout=config.lora_dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM",
        )
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER)
    _check_mergeable(peft_model)
    return peft_model


def _target_modules(model: PreTrainedModel, names: list[str]) -> list[str] | str:
    """peft's target_modules for `names`: "all-linear" alone is peft's own shorthand (every linear layer but
    the output one); beside other names (e.g. `all-linear lm_head`) it is expanded here, since peft would
    read it in a list as a module name that matches nothing and train only the others."""
    if names == ["all-linear"] or "all-linear" not in names:
        return "all-linear" if names == ["all-linear"] else names
    output = model.get_output_embeddings()
    linear = {name.rpartition(".")[2] for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module is not output}
    return sorted(linear | (set(names) - {"all-linear"}))


def _check_mergeable(peft_model: PeftModel) -> None:
    """Refuse what `merged_weights` would get wrong: adapters on non-linear layers, DoRA and other
    variants, adapter biases, extra trained modules, an adapter on a tied weight."""
    source = peft_model.peft_config[ADAPTER]
    if getattr(source, "modules_to_save", None) or getattr(source, "trainable_token_indices", None):
        raise ValueError("LoRA adapter: modules_to_save / trainable_token_indices are not supported (only LoRA on linear layers)")
    layers = lora_layers(peft_model)  # peft has refused target modules that match no layer
    seen: set[int] = set()
    tied: set[int] = set()
    for _, param in peft_model.named_parameters(remove_duplicate=False):
        (tied if id(param) in seen else seen).add(id(param))
    for name, layer in layers.items():
        if type(layer) is not LoraLinear:
            raise ValueError(f"LoRA on {name} ({type(layer).__name__}): only LoRA on nn.Linear layers is supported")
        if layer.lora_variant.get(ADAPTER) is not None or layer.lora_bias.get(ADAPTER):
            raise ValueError(f"LoRA on {name}: DoRA and other variants, and lora_bias, are not supported")
        if id(layer.get_base_layer().weight) in tied:
            raise ValueError(f"LoRA on {name}: its weight is tied to the embeddings; leave it out of the target modules")


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach()


def merged_weights(peft_model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's state dict under its Hugging Face names with every adapter merged in
    (W + scaling * B @ A, float32), all-gathered one tensor at a time (collective)."""
    layers = lora_layers(peft_model)
    state = peft_model.state_dict()
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        module_name, _, param = key.rpartition(".")
        owner = module_name.removesuffix(".base_layer")
        full = _full(value)
        if owner != module_name and owner in layers:
            if param == "weight":
                layer = layers[owner]
                assert isinstance(layer, LoraLinear), "_check_mergeable refuses LoRA on other layers than nn.Linear"
                a = _full(state[f"{owner}.lora_A.{ADAPTER}.weight"]).float()
                b = _full(state[f"{owner}.lora_B.{ADAPTER}.weight"]).float()
                delta = (b @ a) * layer.scaling[ADAPTER]
                full = (full.float() + (delta.T if layer.fan_in_fan_out else delta)).to(full.dtype)
            key = f"{owner}.{param}"
        yield key.removeprefix(_PEFT_PREFIX), full


def adapter_weights(peft_model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter tensors under the names of PEFT's adapter_model.safetensors (no adapter name), all-gathered
    one at a time (collective)."""
    for key, value in peft_model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            yield key.replace(f".{ADAPTER}.", "."), _full(value)


def adapter_config(peft_model: PeftModel) -> dict[str, Any]:
    """The adapter's config as PEFT's adapter_config.json holds it (JSON types only)."""
    config = peft_model.peft_config[ADAPTER].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A PEFT adapter folder (what `PeftModel.from_pretrained` and SGLang's /load_lora_adapter read)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
