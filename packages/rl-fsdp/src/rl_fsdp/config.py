"""Settings of the FSDP training backend; optimizer and loss names follow slime's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rl_core.algorithms.policy_loss import LossAggregation, PolicyLossConfig


class ShardedTrainingConfig(BaseModel):
    """What every FSDP2-trained model (policy, critic) shares: where it comes from, its optimizer, its devices."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    model_path: Path
    """Hugging Face model directory: config.json plus *.safetensors, or config.json alone for a random init."""
    seed: int = 42
    """Seed of the random init when model_path has no weights (the same on every rank)."""
    lr: float = Field(1e-6, ge=0.0)
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
    param_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Compute dtype of forward/backward; master weights, gradient reduction and optimizer stay float32."""
    gradient_checkpointing: bool = False


class FSDPConfig(ShardedTrainingConfig):
    loss: PolicyLossConfig = Field(default_factory=PolicyLossConfig)
    rollout_temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of the engine; logits are divided by it so log-probs match the engine's."""
    use_rollout_logprobs: bool = False
    """True: the engine's rollout log-probs are the old policy. False: the trainer's own pre-update log-probs are."""
    ref_model: bool | None = None
    """Keep a frozen copy of the initial weights as the KL reference; None = only when loss.use_kl_loss.
    True without the KL loss serves `compute_ref_log_probs` (the reward KL of --kl-coef)."""

    @model_validator(mode="after")
    def _check_reference(self) -> FSDPConfig:
        if self.loss.use_kl_loss and self.ref_model is False:
            raise ValueError("loss.use_kl_loss needs the reference model, but ref_model is False")
        return self

    @property
    def keeps_reference(self) -> bool:
        return self.ref_model if self.ref_model is not None else self.loss.use_kl_loss


class CriticConfig(ShardedTrainingConfig):
    """The PPO critic: the policy's body with a scalar value head, trained on the clipped value loss."""

    value_clip: float = Field(0.2, gt=0.0)
    """Clip range of the value change against the rollout-time values (--value-clip)."""
    aggregation: LossAggregation = "token_mean"
    """How token losses are reduced over the global batch, as the policy's --loss-aggregation."""
    aggregation_constant: float = Field(1.0, gt=0.0)
    """Divisor of the summed loss when aggregation is `constant`."""
