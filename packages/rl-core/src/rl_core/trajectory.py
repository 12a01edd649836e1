"""A multi-turn conversation as the engines saw it, token for token, and how it becomes a training Sample.

Whoever records the conversation (the OpenAI-compatible chat endpoint in rl-sglang, or a user's own
generate function) keeps the exact token ids sent to and sampled by the engine; `apply_trajectory` puts
them on a Sample with slime's semantics (`Sample.append_response_tokens`): the first call's prompt is the
sample's prompt, everything after it is the response, loss mask 1 exactly where the policy sampled.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from rl_core.generation import FinishReason
from rl_core.sample import Sample, SampleStatus

_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


class Trajectory(BaseModel):
    """Every token of a conversation in order: the first prompt, then each turn's sampled tokens and the
    template / tool / user tokens between turns."""

    token_ids: list[int]
    loss_mask: list[int]
    """1 on tokens an engine sampled, 0 on every other token (prompt, template, tool output, user)."""
    log_probs: list[float]
    """The engine's log-prob of each sampled token; 0.0 on tokens it did not sample."""
    prompt_length: int
    """Tokens of the first call's prompt: the sample's prompt; the rest is its response."""
    weight_versions: list[str] = Field(default_factory=list)
    """The engine weight version of each generation call, in order."""
    finish_reason: FinishReason = "stop"
    """The last call's: stop -> COMPLETED, length -> TRUNCATED, abort -> ABORTED."""
    response_text: str = ""
    """The response tokens decoded (what a reward function reads as `sample.response`)."""

    @model_validator(mode="after")
    def _aligned(self) -> Trajectory:
        n = len(self.token_ids)
        if not (len(self.loss_mask) == len(self.log_probs) == n):
            raise ValueError(f"token_ids, loss_mask and log_probs need one entry per token, got "
                             f"{n}, {len(self.loss_mask)}, {len(self.log_probs)}")
        if not 0 <= self.prompt_length <= n:
            raise ValueError(f"prompt_length {self.prompt_length} is outside the {n} tokens")
        if any(self.loss_mask[: self.prompt_length]):
            raise ValueError("the prompt holds tokens marked as sampled (loss mask 1)")
        return self


def apply_trajectory(sample: Sample, trajectory: Trajectory) -> Sample:
    """Make `sample` hold `trajectory`: tokens, response length, loss mask, rollout log-probs, weight
    versions, status and response text (replacing what the sample held before)."""
    start = trajectory.prompt_length
    sample.tokens = list(trajectory.token_ids)
    sample.response_length = len(trajectory.token_ids) - start
    sample.loss_mask = list(trajectory.loss_mask[start:])
    sample.rollout_log_probs = [float(x) for x in trajectory.log_probs[start:]]
    sample.weight_versions = list(trajectory.weight_versions)
    sample.weight_version = trajectory.weight_versions[-1] if trajectory.weight_versions else None
    sample.response = trajectory.response_text
    sample.status = _STATUS[trajectory.finish_reason]
    return sample
