"""Typed configuration sections whose field names are slime's flag names (`rollout_batch_size` is
`--rollout-batch-size`). Combinations are checked here, where input enters, and errors name the fields."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from rl_core.algorithms.policy_loss import PolicyLossConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(Section):
    prompt_data: Path | None = None
    """JSONL file of prompts, one JSON object per line."""
    input_key: str = "prompt"
    """Key of the prompt (a string, or a list of chat messages) in each row."""
    label_key: str | None = "label"
    """Key of the reference answer in each row."""
    metadata_key: str = "metadata"
    """Key of a per-row dict copied into each sample's metadata."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    rollout_shuffle: bool = False
    """Shuffle the prompts each epoch."""
    rollout_seed: int = 42
    """Seed of the prompt shuffle and of sampling."""
    rollout_max_prompt_len: int | None = None
    """Prompts longer than this many tokens are refused with the file and line."""


class BatchConfig(Section):
    rollout_batch_size: int = Field(8, gt=0)
    """Prompts per rollout."""
    n_samples_per_prompt: int = Field(8, gt=0)
    """Responses sampled per prompt (the GRPO group size)."""
    global_batch_size: int | None = Field(None, gt=0)
    """Samples per optimizer step; defaults to all samples of a rollout."""
    num_steps_per_rollout: int | None = Field(None, gt=0)
    """Optimizer steps per rollout; derived from global_batch_size when not given."""
    micro_batch_size: int = Field(1, gt=0)
    """Samples per forward/backward pass."""
    num_rollout: int = Field(100, gt=0)
    """Rollouts (generate -> train -> sync cycles) to run."""

    @model_validator(mode="after")
    def _check_batch_arithmetic(self) -> BatchConfig:
        samples = self.rollout_batch_size * self.n_samples_per_prompt
        where = (
            f"rollout_batch_size ({self.rollout_batch_size}) x n_samples_per_prompt ({self.n_samples_per_prompt})"
            f" = {samples} samples per rollout"
        )
        if self.global_batch_size is None and self.num_steps_per_rollout is None:
            object.__setattr__(self, "global_batch_size", samples)
        if self.global_batch_size is None:
            if samples % self.num_steps_per_rollout:
                raise ValueError(f"{where} do not split into num_steps_per_rollout ({self.num_steps_per_rollout}) steps")
            object.__setattr__(self, "global_batch_size", samples // self.num_steps_per_rollout)
        if self.num_steps_per_rollout is None:
            if samples % self.global_batch_size:
                raise ValueError(f"{where} is not a multiple of global_batch_size ({self.global_batch_size})")
            object.__setattr__(self, "num_steps_per_rollout", samples // self.global_batch_size)
        if self.global_batch_size * self.num_steps_per_rollout != samples:
            raise ValueError(
                f"{where}, but global_batch_size ({self.global_batch_size}) x num_steps_per_rollout"
                f" ({self.num_steps_per_rollout}) = {self.global_batch_size * self.num_steps_per_rollout}"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is not a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        return self


class SamplingConfig(Section):
    rollout_temperature: float = Field(1.0, ge=0.0)
    rollout_top_p: float = Field(1.0, gt=0.0, le=1.0)
    rollout_top_k: int = -1
    """-1 keeps every token."""
    rollout_max_response_len: int = Field(256, gt=0)
    """Most tokens generated per response."""
    rollout_stop_token_ids: list[int] | None = None

    def sampling_params(self) -> dict:
        """The SGLang `sampling_params` these settings mean."""
        params = {
            "temperature": self.rollout_temperature,
            "top_p": self.rollout_top_p,
            "top_k": self.rollout_top_k,
            "max_new_tokens": self.rollout_max_response_len,
        }
        if self.rollout_stop_token_ids:
            params["stop_token_ids"] = list(self.rollout_stop_token_ids)
        return params


class AlgorithmConfig(Section):
    advantage_estimator: str = "grpo"
    """Advantage estimator by name (grpo)."""
    disable_grpo_std_normalization: bool = False
    """Subtract the group mean only; do not divide by the group std (Dr. GRPO)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef x KL(policy || reference) to the loss."""
    kl_loss_coef: float = Field(0.0, ge=0.0)
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    eps_clip: float = Field(0.2, gt=0.0)
    """Lower PPO clip range: ratios below 1 - eps_clip are clipped."""
    eps_clip_high: float | None = Field(None, gt=0.0)
    """Upper PPO clip range; defaults to eps_clip."""
    eps_clip_c: float | None = Field(None, gt=1.0)
    """Dual-clip bound for negative advantages (must exceed 1)."""
    loss_aggregation: Literal["token_mean", "sample_mean", "constant"] = "token_mean"
    """How token losses are reduced over the global batch."""
    loss_aggregation_constant: float = Field(1.0, gt=0.0)
    """Divisor of the summed loss when loss_aggregation is `constant`."""
    use_rollout_logprobs: bool = False
    """Use the engine's log-probs as the old policy instead of recomputing them in the trainer."""

    @model_validator(mode="after")
    def _check_algorithm(self) -> AlgorithmConfig:
        # Imported here so that parsing flags does not import torch.
        from rl_core.algorithms.advantages import ADVANTAGE_ESTIMATORS

        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator!r} is not one of {sorted(ADVANTAGE_ESTIMATORS)}"
            )
        if self.use_kl_loss and self.kl_loss_coef == 0.0:
            raise ValueError("use_kl_loss is set but kl_loss_coef is 0: set --kl-loss-coef or drop --use-kl-loss")
        if not self.use_kl_loss and self.kl_loss_coef > 0.0:
            raise ValueError(f"kl_loss_coef is {self.kl_loss_coef} but use_kl_loss is off: add --use-kl-loss")
        return self

    def policy_loss_config(self) -> PolicyLossConfig:
        from rl_core.algorithms.policy_loss import PolicyLossConfig

        return PolicyLossConfig(
            eps_clip=self.eps_clip,
            eps_clip_high=self.eps_clip_high if self.eps_clip_high is not None else self.eps_clip,
            eps_clip_c=self.eps_clip_c,
            use_kl_loss=self.use_kl_loss,
            kl_loss_coef=self.kl_loss_coef,
            kl_loss_type=self.kl_loss_type,
            entropy_coef=self.entropy_coef,
            aggregation=self.loss_aggregation,
            aggregation_constant=self.loss_aggregation_constant,
        )
