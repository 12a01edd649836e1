"""What every training backend is built from, whichever implements it; each backend package extends it
with a `type` literal and its own fields, and a `build_backend(config)` factory beside it reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BackendConfig(BaseModel):
    """One model the loop trains: the policy (LM head), PPO's critic (value head) or an SFT model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    type: str
    """Which backend implements it (`fsdp`, `megatron`); slime's --train-backend."""
    model_path: Path
    """Hugging Face model directory: config.json plus *.safetensors, or config.json alone for a random init."""
    head: Literal["lm", "value"] = "lm"
    """lm: the causal LM (forward gives log-probs); value: its body with a scalar value head, starting at zero."""
    ref_model: bool = False
    """Keep a frozen copy of the initial weights, the KL reference (forward(model="reference"))."""
    rollout_temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the engine; logits are divided by it so log-probs match the engine's."""
    seed: int = 42
    """Seed of the random init when model_path has no weights (the same on every rank)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam is AdamW (decoupled weight decay), as Megatron's adam."""
    lr: float = Field(1e-6, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    """Floor of the decayed learning rate."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_iters: int | None = Field(None, gt=0)
    """Optimizer steps over which the learning rate decays from lr to min_lr; None: it stays at lr."""
    lr_warmup_iters: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    clip_grad: float = Field(1.0, ge=0.0)
    """Max global gradient norm; 0 disables clipping (the norm is still reported)."""
    micro_batch_size: int = Field(1, gt=0)
    """Samples per forward/backward pass on each rank."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available (nccl), else CPU (gloo)."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of forward/backward; master weights, gradient reduction and optimizer state stay float32."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (slime's --recompute-granularity full)."""

    @model_validator(mode="after")
    def _check_head(self) -> BackendConfig:
        if self.head == "value" and self.ref_model:
            raise ValueError("ref_model is set on a value-head backend; only the policy (head 'lm') keeps a reference")
        return self
