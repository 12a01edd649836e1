"""A trained policy as a Hugging Face folder, from any backend's `weights()` (the same names the engines load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_hf(backend: Any, directory: str | Path, hf_checkpoint: str | Path, *, writer: bool) -> None:
    """Write config.json, the tokenizer files of `hf_checkpoint` and model.safetensors (sharded past 5 GiB)
    of `backend`'s LM into `directory`. A collective: every rank iterates the weights, `writer` writes them.
    Tensors keep the trainer's dtype; a tied model's output layer is left to its embedding, as HF saves it.
    A LoRA policy writes its merged weights, plus its adapter (peft's format) in `directory/adapter`."""
    from transformers import AutoConfig

    from rl_fsdp.weights import write_hf_checkpoint

    config = AutoConfig.from_pretrained(str(hf_checkpoint))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in backend.weights():
        if writer and not (tied and name == "lm_head.weight"):
            state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    if writer:
        write_hf_checkpoint(Path(directory), state, config, Path(hf_checkpoint))
    if getattr(backend, "lora", False):  # the merged weights above; the adapter alone too, in peft's format
        backend.save_adapter(Path(directory) / "adapter")


def hf_folder(template: str, rollout_id: int) -> Path:
    """--save-hf with `{rollout_id}` replaced."""
    return Path(template.replace("{rollout_id}", str(rollout_id)))
