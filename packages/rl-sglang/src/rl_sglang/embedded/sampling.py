"""SGLang's `sampling_params`, as far as the embedded engine honours them, and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of `logits` [B, V]; return (tokens [B], log-probs [B]).

    The log-prob is log_softmax(logits / temperature) at the chosen token, taken before top-k/top-p
    truncation, so at temperature 1 it is the model's own distribution (what a trainer recomputes).
    Greedy rows (temperature 0) report log_softmax(logits), i.e. temperature 1.
    """
    logits = logits.float()
    device = logits.device
    vocab = logits.shape[-1]
    temperatures = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    log_probs = torch.log_softmax(logits / temperatures[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)

    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=device)
        probs = log_probs[rows].exp()
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else vocab for i in sampled_rows], device=device)
        top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=device)
        ranks = torch.arange(vocab, device=device)
        keep = ranks[None, :] < top_k[:, None]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= mass_before < top_p[:, None]  # the most likely token is always kept
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        tokens[rows] = sorted_ids.gather(1, choice).squeeze(1)

    chosen = log_probs.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen
