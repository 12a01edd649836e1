"""One generation call as the rollout sees it, whichever engine answers: typed records in and out.

Engines speak their own wire format (SGLang's JSON, mapped in rl-sglang); the rollout builds a
`GenerateRequest`, hands it to a `GenerateFn` (an engine, or the router in front of several), and records
the `GenerateAnswer` on the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rl_core.sample import Sample, SampleStatus

FinishReason = Literal["stop", "length", "abort"]
"""stop: an end token or stop condition; length: the token budget ran out; abort: the request was aborted."""

_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: list[int]
    """The whole context so far: prompt tokens, then every earlier turn's tokens."""
    sampling_params: dict[str, Any]
    """SGLang's sampling parameters (temperature, top_p, top_k, max_new_tokens, stop_token_ids, ...)."""
    request_id: str
    """Unique, and never a prefix of another request's id (SGLang aborts by prefix)."""
    return_logprob: bool = True


@dataclass(frozen=True)
class GenerateAnswer:
    output_ids: list[int]
    """The tokens the engine sampled, exactly (never re-tokenised text)."""
    text: str
    log_probs: list[float] | None
    """Log-prob of each output token under the engine's sampling temperature; None when not asked for."""
    finish_reason: FinishReason
    weight_version: str | None = None
    """Version of the engine weights that sampled the answer."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Engine timings and counters where the engine gives them (prompt/cached tokens, spec-decoding stats)."""

    def __post_init__(self) -> None:
        if self.log_probs is not None and len(self.log_probs) != len(self.output_ids):
            raise ValueError(f"engine returned {len(self.output_ids)} tokens but {len(self.log_probs)} log-probs")

    @property
    def status(self) -> SampleStatus:
        return _STATUS[self.finish_reason]

    def append_to(self, sample: Sample) -> Sample:
        """Add this answer to `sample` as one trained turn (tokens, log-probs, text, weight version, status)."""
        log_probs = self.log_probs if self.log_probs is not None else [0.0] * len(self.output_ids)
        sample.append_response_tokens(
            tokens=self.output_ids, log_probs=log_probs, text=self.text,
            meta_info={"weight_version": self.weight_version},
        )
        if self.log_probs is None and sample.response_length == len(self.output_ids):
            sample.rollout_log_probs = None
        sample.status = self.status
        return sample
