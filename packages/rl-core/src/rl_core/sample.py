"""The unit of rollout data: one prompt, one response, and everything training needs about it."""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field


class SampleStatus(str, Enum):
    """Where a sample is in its life; only COMPLETED and TRUNCATED samples are trained on."""

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"
    """A recoverable failure in a custom generate function (a tool or API error); not trained on."""


class Sample(BaseModel):
    """One prompt and one sampled response, which may span several turns (model output interleaved with
    tool or environment tokens, told apart by `loss_mask`).

    Token-level lists (`loss_mask`, `rollout_log_probs`) cover the response only: their length is
    `response_length`, aligned with `tokens[-response_length:]`. Field names and `Sample.Status` are
    slime's, so slime's custom generate and reward functions work on it; a function may set attributes of
    its own (they travel with the sample).
    """

    model_config = ConfigDict(extra="allow")
    Status: ClassVar[type[SampleStatus]] = SampleStatus

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
    """Version of the engine weights that produced the response (the last turn's, for several turns)."""
    weight_versions: list[str] = Field(default_factory=list)
    """The weight version of each generation call that produced the response, in order (slime's)."""
    status: SampleStatus = SampleStatus.PENDING
    remove_sample: bool = False
    """Set by a --rollout-sample-filter-path function: not trained on, still in its group's reward statistics."""
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

    @property
    def effective_response_length(self) -> int:
        """Response tokens that are trained on."""
        return sum(self.effective_loss_mask())

    def append_response_tokens(
        self,
        args: Any = None,
        *,
        tokens: Sequence[int] = (),
        log_probs: Sequence[float] | None = None,
        trainable: bool = True,
        meta_info: dict[str, Any] | None = None,
        text: str | None = None,
    ) -> None:
        """Extend the response by one turn's tokens, keeping the loss mask and log-probs aligned (slime's).

        Tokens the policy sampled pass `trainable=True` with the engine's log-probs; tool or environment
        tokens pass `trainable=False` and get loss mask 0 and log-prob 0. `meta_info`, an SGLang answer's,
        records the turn's weight version. `args` is accepted for slime's signature and not read.
        """
        tokens = [int(t) for t in tokens]
        if log_probs is not None and len(log_probs) != len(tokens):
            raise ValueError(f"log_probs has {len(log_probs)} entries for {len(tokens)} tokens")
        if tokens and trainable and log_probs is None:
            raise ValueError("trainable response tokens need the engine's log-probs")
        if not trainable:
            if log_probs is not None:
                raise ValueError("tokens that are not trained on take no log-probs")
            log_probs = [0.0] * len(tokens)
        if text is not None:
            self.response += text
        if self.rollout_log_probs is None:
            if trainable and self.response_length:
                raise ValueError("the response already has tokens without log-probs; cannot append trainable ones")
            self.rollout_log_probs = [0.0] * self.response_length
        self.loss_mask = self.effective_loss_mask() + [1 if trainable else 0] * len(tokens)
        self.tokens = list(self.tokens) + tokens
        self.response_length += len(tokens)
        self.rollout_log_probs = list(self.rollout_log_probs) + [float(x) for x in log_probs or []]
        version = (meta_info or {}).get("weight_version")
        if version is not None:
            self.weight_version = str(version)
            self.weight_versions.append(str(version))
