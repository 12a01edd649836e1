"""SGLang's `sampling_params`, as far as the embedded engine honours them, and the batched sampler."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from rl_sglang.embedded.decode_kernel import triton_available

# SGLang fields the embedded engine does not implement: accepted only at their neutral value.
_NEUTRAL_FIELDS: dict[str, Any] = {
    "min_p": 0.0,
    "min_new_tokens": 0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "n": 1,
}
# SGLang fields that change nothing here (no stop strings to trim, no detokenizer spacing choice).
_IGNORED_FIELDS = {"no_stop_trim", "spaces_between_special_tokens"}
_GREEDY_BELOW = 1e-6  # SGLang treats temperatures below this as greedy
_TINY = torch.finfo(torch.float32).tiny  # an Exp(1) draw of exactly 0 would make p / E a NaN


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW

    @classmethod
    def from_payload(cls, raw: dict[str, Any] | None) -> SamplingParams:
        """Parse `sampling_params`; ValueError names the offending field."""
        raw = dict(raw or {})
        for name in _IGNORED_FIELDS:
            raw.pop(name, None)
        for name, neutral in _NEUTRAL_FIELDS.items():
            if name in raw:
                value = raw.pop(name)
                if value is not None and value != neutral:
                    raise ValueError(f"sampling_params.{name}={value!r} is not supported by the embedded engine")
        stop = raw.pop("stop", None)
        if stop:
            raise ValueError("sampling_params.stop (stop strings) is not supported by the embedded engine; use stop_token_ids")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"sampling_params.{unknown[0]} is not a known sampling parameter")
        try:
            params = cls(
                temperature=float(raw.get("temperature", 1.0)),
                top_p=float(raw.get("top_p", 1.0)),
                top_k=int(raw.get("top_k", -1)),
                max_new_tokens=int(raw.get("max_new_tokens", 128)),
                stop_token_ids=frozenset(int(t) for t in (raw.get("stop_token_ids") or ())),
                ignore_eos=bool(raw.get("ignore_eos", False)),
                skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sampling_params: {exc}") from exc
        if params.temperature < 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {params.top_p}")
        if params.top_k == 0 or params.top_k < -1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {params.top_k}")
        if params.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {params.max_new_tokens}")
        return params


class SamplingBatch:
    """The per-row sampling settings of one step as device tensors, built once per step."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.size = len(params)
        self.greedy = all(p.greedy for p in params)
        self.truncated = any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params)
        self.temperatures = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32).to(device, non_blocking=True)
        if not self.greedy:
            self.sampled = torch.tensor([not p.greedy for p in params]).to(device, non_blocking=True)
        if self.truncated:
            self.top_k = torch.tensor([p.top_k if p.top_k > 0 else 1 << 30 for p in params]).to(device, non_blocking=True)
            self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device, non_blocking=True)


def fused_sampler_applies(device: torch.device, batch: SamplingBatch) -> bool:
    """Whether `sample` takes the one-kernel path: CUDA with Triton, and no row truncated by top-k/top-p."""
    return device.type == "cuda" and not batch.truncated and _triton()


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits` [B, V] on their device; return (tokens [B], log-probs [B]).
    `fused`: allow `fused_sampling`'s kernel where `fused_sampler_applies` (the same draws in law,
    not the same random numbers as the PyTorch path).

    The log-prob is log_softmax(logits / temperature) at the chosen token, taken before top-k/top-p
    truncation, so at temperature 1 it is the model's own distribution (what a trainer recomputes).
    Greedy rows (temperature 0) report log_softmax(logits), i.e. temperature 1, as SGLang does (it
    runs them at temperature 1 with top_k 1). Sampling is an exponential race, argmax(p / E) with
    E ~ Exp(1), which draws from p exactly without a cumulative sum or a sort.
    """
    if fused and fused_sampler_applies(logits.device, batch):
        from rl_sglang.embedded.fused_sampling import fused_sample

        return fused_sample(logits, batch.temperatures, None if batch.greedy else batch.sampled, generator)
    logits = logits.float()
    log_probs = torch.log_softmax(logits / batch.temperatures[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    if not batch.greedy:
        probs = log_probs.exp()
        if batch.truncated:
            probs = _truncate(probs, batch.top_k, batch.top_p)
        race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=_TINY)
        drawn = (probs / race).argmax(dim=-1)
        tokens = torch.where(batch.sampled, drawn, tokens)
    chosen = log_probs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen


@functools.cache
def _triton() -> bool:  # looked up once, not on every step
    return triton_available()


def _truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero what top-k and top-p leave out (the most likely token always stays)."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    keep = ranks[None, :] < top_k[:, None]
    keep &= (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
    return torch.zeros_like(probs).scatter_(1, sorted_ids, sorted_probs * keep)
