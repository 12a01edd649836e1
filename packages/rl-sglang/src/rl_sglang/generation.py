"""rl-core's generation records on SGLang's wire format: a `GenerateFn` over anything that answers SGLang
`/generate` payloads (an `SGLangClient`, the embedded engine's client, or the router's client)."""

from __future__ import annotations

from typing import Any, Protocol

from rl_core.generation import GenerateAnswer, GenerateRequest


class PayloadEngine(Protocol):
    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]: ...


def sglang_payload(request: GenerateRequest) -> dict[str, Any]:
    """The `/generate` body of one request (token ids in, SGLang's `rid`)."""
    return {
        "input_ids": list(request.input_ids),
        "sampling_params": dict(request.sampling_params),
        "return_logprob": request.return_logprob,
        "rid": request.request_id,
    }


_META_KEPT = ("prompt_tokens", "cached_tokens", "completion_tokens", "e2e_latency", "spec_accept_token_num",
              "spec_draft_token_num", "spec_verify_ct", "reasoning_tokens")


def parse_answer(output: dict[str, Any]) -> GenerateAnswer:
    """A `/generate` answer as rl-core's record: SGLang puts per-token log-probs in
    meta_info.output_token_logprobs as [log_prob, token_id, text] triples."""
    meta = output.get("meta_info") or {}
    logprobs = meta.get("output_token_logprobs")
    finish = (meta.get("finish_reason") or {}).get("type", "stop")
    version = meta.get("weight_version")
    return GenerateAnswer(
        output_ids=[int(t) for t in output.get("output_ids") or []],
        text=output.get("text", ""),
        log_probs=None if logprobs is None else [float(entry[0]) for entry in logprobs],
        finish_reason=finish if finish in ("stop", "length", "abort") else "stop",
        weight_version=None if version is None else str(version),
        meta={key: meta[key] for key in _META_KEPT if key in meta},
    )


class SGLangGenerate:
    """`rl_core.protocols.GenerateFn` through an engine (or router) that speaks SGLang's `/generate`."""

    def __init__(self, engine: PayloadEngine) -> None:
        self.engine = engine

    async def __call__(self, request: GenerateRequest) -> GenerateAnswer:
        return parse_answer(await self.engine.generate(sglang_payload(request)))
