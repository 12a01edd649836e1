"""The unit of rollout data: one prompt, one response, and everything training needs about it."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, Field


class SampleStatus(str, Enum):
    """Where a sample is in its life; only COMPLETED and TRUNCATED samples are trained on."""

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"


class Sample(BaseModel):
    """One prompt and one sampled response.

    Token-level lists (`loss_mask`, `rollout_log_probs`) cover the response only: their length is
    `response_length`, aligned with `tokens[-response_length:]`.
    """

    group_index: int | None = None
    """Index of the prompt group; the `n_samples_per_prompt` copies of a prompt share it."""
    index: int | None = None
    """Global index of this sample, unique within a run."""
    prompt: str | list[dict[str, Any]] = ""
    """The prompt as text (after the chat template, if one was applied) or as chat messages."""
    label: Any = None
    """Reference answer handed to the reward function."""
    tokens: list[int] = Field(default_factory=list)
    """Prompt token ids followed by response token ids."""
    response: str = ""
    """Decoded response text."""
    response_length: int = 0
    """Number of response tokens at the end of `tokens`."""
    reward: float | dict[str, float] | None = None
    """Scalar reward, or named reward components (the reward key picks the scalar)."""
    loss_mask: list[int] | None = None
    """1 for response tokens the policy produced, 0 for tokens it did not (tool output); None = all 1."""
    rollout_log_probs: list[float] | None = None
    """Log-probability of each response token under the engine that sampled it."""
    weight_version: str | None = None
    """Version of the engine weights that produced the response."""
    status: SampleStatus = SampleStatus.PENDING
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form per-sample data from the data source (e.g. the row's metadata key)."""

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.response_length :]

    def effective_loss_mask(self) -> list[int]:
        return self.loss_mask if self.loss_mask is not None else [1] * self.response_length
