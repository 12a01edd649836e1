"""The configuration of `rl-sft`: the SFT data, its epochs and batches, and rl-train's trainer, Megatron,
logging and checkpoint flags under the same names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from rl_apps.train_config import (
    CheckpointConfig,
    MegatronFlags,
    ModelConfig,
    TrainerConfig,
    check_trainer_flags,
    trainer_backend_config,
)
from rl_core.config import Section


class SFTDataConfig(Section):
    help_section: ClassVar[str] = "data"

    prompt_data: Path | None = None
    """JSONL or Parquet file of SFT rows; `path@[start:end]` takes a slice of its rows."""
    input_key: str = "messages"
    """Key of each row's chat messages (trained on the assistant turns) or of its prompt string."""
    response_key: str = "response"
    """Key of the response a prompt row is trained on (appended as the last assistant turn of a chat row)."""
    apply_chat_template: bool = False
    """Render prompt/response rows as a user and an assistant turn of the chat template (chat rows always are);
    without it a prompt row is its prompt's tokens, its response's and EOS."""
    rollout_shuffle: bool = False
    """Shuffle the rows each epoch."""
    rollout_seed: int = 42
    """Seed of the shuffle."""


class SFTBatchConfig(Section):
    help_section: ClassVar[str] = "trainer"

    num_epoch: int = Field(1, gt=0)
    """Passes over the data."""
    global_batch_size: int = Field(8, gt=0)
    """Rows per optimizer step (an epoch's last step takes the rows left)."""
    micro_batch_size: int = Field(1, gt=0)
    """Rows per forward/backward pass on each rank."""
    loss_aggregation: Literal["token_mean", "sample_mean", "constant"] = "token_mean"
    """How token losses are reduced over the global batch."""
    loss_aggregation_constant: float = Field(1.0, gt=0.0)
    """Divisor of the summed loss when loss_aggregation is `constant`."""


class SFTLoggingConfig(Section):
    help_section: ClassVar[str] = "logging"

    output_dir: Path = Path("outputs/sft")
    """Where metrics.jsonl and the TensorBoard logs go."""
    use_tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""


class SFTConfig(SFTDataConfig, SFTBatchConfig, ModelConfig, TrainerConfig, MegatronFlags, SFTLoggingConfig, CheckpointConfig):
    """Everything `rl-sft` reads. Checkpoints count optimizer steps: --save-interval N saves every N steps
    (and the last), into `<save>/step_<k>/policy`; `{rollout_id}` in --save-hf is the step."""

    def backend_config(self, role: Literal["policy"] = "policy", *, total_steps: int = 1) -> Any:
        """The trained model's BackendConfig; a decaying learning rate decays over `total_steps` by default."""
        if role != "policy":
            raise ValueError(f"rl-sft trains the policy only, not a {role}")
        return trainer_backend_config(
            self, total_steps=total_steps, model_path=self.hf_checkpoint, head="lm", ref_model=False,
            rollout_temperature=1.0, lr=self.lr,
        )

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        missing = [f"--{n.replace('_', '-')}" for n in ("prompt_data", "hf_checkpoint") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"missing required flag(s): {' '.join(missing)}")
        if "critic_lr" in self.model_fields_set:
            raise ValueError("--critic-lr: rl-sft trains no critic")
        check_trainer_flags(self)
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is not a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.global_batch_size % self.actor_num_gpus_per_node:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) does not split over actor_num_gpus_per_node"
                f" ({self.actor_num_gpus_per_node}) trainer ranks"
            )
        for name in ("hf_checkpoint", "output_dir", "save", "load"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                object.__setattr__(self, name, value.resolve())
        return self
