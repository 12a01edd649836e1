"""PPO's value model: a causal LM's transformer body with a scalar value head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rl_core.micro_batches import MicroBatch
from rl_fsdp.log_probs import model_inputs
from rl_fsdp.packed_attention import packed_samples


class ValueModel(nn.Module):
    """A causal LM's transformer body (no LM head) and a Linear(hidden, 1) head: one value per position.

    The head starts at zero, so every value is 0 before the first update whatever the body: GAE then
    begins as plain discounted returns instead of noise from a random projection.
    """

    def __init__(self, body: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, **model_inputs: Any) -> torch.Tensor:
        """Values [rows, L] from a Hugging Face forward's keyword arguments (`rl_fsdp.log_probs.model_inputs`)."""
        hidden = self.body(**model_inputs).last_hidden_state
        # A sum over the size-1 dim rather than squeeze: FSDP2 warns about root outputs that are views.
        return self.value_head(hidden).sum(dim=-1, dtype=torch.float32)


def response_values(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Values [B, T] of a `ValueModel` (sharded or not) at the states before each response token (the position whose logits predict it, as
    for log-probs); padding slots hold 0."""
    with packed_samples(mb):
        values = mb.at_responses(model(**model_inputs(mb)))
    return torch.where(mb.response_valid, values, torch.zeros_like(values))
