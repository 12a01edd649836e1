"""Per-token log-probs (and entropy) of response tokens from one forward pass."""

from __future__ import annotations

import torch
from torch import nn

from rl_core.algorithms.policy_loss import entropy_from_logits
from rl_core.micro_batches import MicroBatch


def response_log_probs(
    model: nn.Module, mb: MicroBatch, temperature: float, with_entropy: bool, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the response tokens under softmax(logits / temperature), and optionally entropy
    (differentiable only with `entropy_grad`, i.e. when an entropy bonus is in the loss: else it would
    keep a [B, T, vocab] softmax alive for the backward pass for a metric).

    Only the response positions' logits go through the float32 softmax. Padding slots hold log-prob 0.
    """
    logits = model(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False
    ).logits
    index = mb.response_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    scaled = logits.gather(1, index).float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1).gather(-1, mb.response_tokens.unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(mb.response_valid, log_probs, torch.zeros_like(log_probs))
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(scaled)
    return log_probs, entropy
