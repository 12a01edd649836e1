"""The LM head applied only where log-probs are read: GPTModel hands back its final hidden states, and the
(vocab-parallel) output layer runs on the positions that predict response tokens, optionally a chunk of
them at a time (each chunk recomputed in the backward pass), so the [B, S, V/TP] logits of a micro-batch
never exist (at 8 x 2048 with a 151,936 vocabulary: 4.6 GiB in bfloat16, and the copies made from them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region
from torch.utils.checkpoint import checkpoint

from rl_megatron.vocab_parallel import vocab_parallel_log_probs


def emit_hidden_states(gpt: GPTModel) -> None:
    """Make the last stage's output layer return its input instead of logits: the whole sequence (gathered
    under sequence parallelism, the gather's backward summing the TP ranks' partial gradients). The layer
    keeps its weight, state dict and checkpoint sharding; the forward of this instance alone is replaced
    (megatron-core 0.16 has no hook for a custom head). `head_input` does the rest of the layer's input
    handling once the positions are selected."""
    layer = gpt.output_layer

    def forward(hidden: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None):
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True), None
        return hidden, None

    layer.forward = forward


def head_input(gpt: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """Selected hidden states as the head reads them: without sequence parallelism, marked for the TP
    all-reduce of their gradient (each rank's vocabulary slice gives a partial one), as the layer's own
    input copy does. Here, not in the layer: megatron-core all-reduces a contiguous copy of the gradient
    and drops it, and GPTModel's transpose of its output would hand the layer a non-contiguous one."""
    return hidden if gpt.output_layer.sequence_parallel else copy_to_tensor_model_parallel_region(hidden)


def output_weight(gpt: GPTModel) -> torch.Tensor:
    """This TP rank's [V/TP, H] slice of the output layer (the embedding's, when they are tied)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def head_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int,
    vocab_start: int,
    vocab_size: int,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
    compiled: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N] log-probs (and entropy) of `targets` from [N, H] hidden states through the vocab-parallel head;
    `chunk_size` > 0: that many positions at a time, each chunk's logits recomputed in the backward pass."""

    def chunk(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return vocab_parallel_log_probs(
            F.linear(h, weight), t, vocab_start=vocab_start, vocab_size=vocab_size, temperature=temperature,
            with_entropy=with_entropy, entropy_grad=entropy_grad, compiled=compiled,
        )

    n = hidden.shape[0]
    if chunk_size <= 0 or n <= chunk_size:
        return chunk(hidden, targets)
    parts = []
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        parts.append(checkpoint(chunk, h, t, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, t))
    log_probs = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if with_entropy else None  # type: ignore[misc]
    return log_probs, entropy
