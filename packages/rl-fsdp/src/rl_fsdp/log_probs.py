"""Per-token log-probs (and entropy) of response tokens from one forward pass.

The LM head runs on the response positions only (prompt positions get no logits), and with a chunk size
on that many tokens at a time: in a train step each chunk is recomputed in the backward pass, so one
chunk's [chunk, vocab] logits is the most that ever exists. Compiled (on CUDA), the float32 cast, the
log-softmax and the gather fuse into the head's output, so no float32 copy of the logits exists either.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rl_core.algorithms.policy_loss import entropy_from_logits
from rl_core.micro_batches import MicroBatch
from rl_fsdp.packed_attention import packed_samples


def model_inputs(mb: MicroBatch) -> dict:
    """Keyword arguments of a Hugging Face forward over `mb`, packed or padded (a packed one is run inside
    `packed_samples(mb)`)."""
    return dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False)


def response_hidden_states(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """[M, hidden] final hidden states (after the last norm) at the positions predicting the M valid
    response tokens of `mb`, row by row. The model's own LM head runs on one position only.

    The hidden states are taken from the decoder body's output by a hook, not asked for with
    `output_hidden_states`: that makes transformers hook every layer and attention module, and inside a
    compiled layer those hooks read a ContextVar, which dynamo cannot trace (a graph break in each layer)."""
    captured: list[torch.Tensor] = []
    get_decoder = cast(Callable[[], nn.Module], model.get_decoder)  # a Hugging Face model's body, without the head
    decoder = get_decoder()
    handle = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        with packed_samples(mb):
            model(**model_inputs(mb), logits_to_keep=1)
    finally:
        handle.remove()
    return mb.at_responses(captured[0])[mb.response_valid]


def _token_log_probs(
    head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden)
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # float32 at least
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(scaled)
    return log_probs, entropy


_compiled = torch.compile(_token_log_probs)


def _compiled_token_log_probs(
    head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_token_log_probs` compiled for any number of tokens from the first call on (not once for the first
    micro-batch's count and again, shape-dynamic, at the second)."""
    torch._dynamo.maybe_mark_dynamic(hidden, 0)
    torch._dynamo.maybe_mark_dynamic(tokens, 0)
    return _compiled(head, hidden, tokens, temperature, with_entropy, entropy_grad)


def chunked_log_probs(
    head: nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    *,
    with_entropy: bool,
    entropy_grad: bool = False,
    chunk_size: int = -1,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / temperature)[tokens] over [M, hidden] -> [M] (and entropy [M]),
    `chunk_size` rows at a time (-1: all at once); with gradients, each chunk is recomputed in backward.
    `compiled`: through torch.compile (the same values, fused kernels)."""
    token_log_probs = _compiled_token_log_probs if compiled else _token_log_probs
    size = hidden.shape[0] if chunk_size < 0 else chunk_size
    if size >= hidden.shape[0]:
        return token_log_probs(head, hidden, tokens, temperature, with_entropy, entropy_grad)
    recompute = torch.is_grad_enabled()
    parts = []
    for start in range(0, hidden.shape[0], size):
        args = (head, hidden[start : start + size], tokens[start : start + size], temperature, with_entropy, entropy_grad)
        parts.append(checkpoint(token_log_probs, *args, use_reentrant=False) if recompute else token_log_probs(*args))
    log_probs = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if with_entropy else None  # type: ignore[misc]
    return log_probs, entropy


def _to_rows(mb: MicroBatch, flat: torch.Tensor | None) -> torch.Tensor | None:
    """[M] over valid response tokens -> [B, T] with 0 on padding slots."""
    if flat is None:
        return None
    rows = torch.zeros(mb.response_valid.shape, dtype=flat.dtype, device=flat.device)
    return rows.masked_scatter(mb.response_valid, flat)


def response_log_probs(
    model: nn.Module,
    mb: MicroBatch,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = False,
    chunk_size: int = -1,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens under softmax(logits / temperature), and optionally entropy
    (differentiable only with `entropy_grad`, i.e. when an entropy bonus is in the loss: else it would
    keep a [tokens, vocab] softmax alive for the backward pass for a metric).

    The response positions' logits go through a float32 softmax. Padding slots hold 0.
    """
    hidden = response_hidden_states(model, mb)
    output_layer = model.get_output_embeddings  # a PreTrainedModel's, or the one a PeftModel passes on
    assert callable(output_layer), f"{type(model).__name__} has no get_output_embeddings()"
    log_probs, entropy = chunked_log_probs(
        output_layer(), hidden, mb.response_tokens[mb.response_valid], temperature,
        with_entropy=with_entropy, entropy_grad=entropy_grad, chunk_size=chunk_size, compiled=compiled,
    )
    return _to_rows(mb, log_probs), _to_rows(mb, entropy)  # type: ignore[return-value]
