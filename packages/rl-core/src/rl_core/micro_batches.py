"""Padding a rank's share of a TrainBatch into micro-batch tensors, the same way for every backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_core.algorithms.policy_loss import LossDenominators
from rl_core.losses import LossInputs
from rl_core.train_batch import TrainBatch


@dataclass
class MicroBatch:
    """Right-padded tensors of a few samples. Response tensors are [B, T] with T the longest response."""

    sample_indices: list[int]
    """Indices into the global batch; empty for a filler micro-batch."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_positions: torch.Tensor
    """Sequence position whose logits predict each response token (token t comes from position t - 1)."""
    response_tokens: torch.Tensor
    response_valid: torch.Tensor
    """True inside each sample's response, False on padding."""
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_log_probs: torch.Tensor | None
    old_log_probs: torch.Tensor | None
    """The batch's `old_log_probs` (the policy before the rollout's first step), when it carries them."""
    returns: torch.Tensor | None = None
    """The critic's regression targets, when the batch carries them (ppo)."""
    values: torch.Tensor | None = None
    """The critic's rollout-time values, the old values of the clipped value loss (ppo)."""


def validate_batch(batch: TrainBatch, vocab_size: int) -> None:
    """Refuse token ids the embedding cannot look up, and responses with no prompt token before them."""
    if len(batch) == 0:
        raise ValueError("TrainBatch is empty")
    for i, tokens in enumerate(batch.tokens):
        if tokens and not (0 <= min(tokens) and max(tokens) < vocab_size):
            position, token = next((p, t) for p, t in enumerate(tokens) if not 0 <= t < vocab_size)
            raise ValueError(
                f"TrainBatch sample {i}: token id {token} at position {position} is outside the model's"
                f" vocabulary (0..{vocab_size - 1})"
            )
        if batch.response_lengths[i] >= len(tokens):
            raise ValueError(
                f"TrainBatch sample {i}: response_length {batch.response_lengths[i]} leaves no prompt token;"
                " the first response token needs at least one token before it"
            )


def _pad(rows: list[list], value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype, device=device)


def make_micro_batch(batch: TrainBatch, indices: list[int], device: torch.device) -> MicroBatch:
    """Pad `indices` of `batch`; with no indices, a one-sample filler whose loss mask is all zero.

    Fillers keep every rank running the same number of forward/backward passes, which FSDP's
    collectives require when the global batch does not split evenly.
    """
    if indices:
        part = batch.select(indices)
    else:
        part = TrainBatch(tokens=[[0, 0]], response_lengths=[1], loss_masks=[[0]], advantages=[[0.0]])
    seq_lens = [len(t) for t in part.tokens]
    positions = [
        list(range(length - response_length - 1, length - 1))
        for length, response_length in zip(seq_lens, part.response_lengths)
    ]

    def optional(name: str) -> torch.Tensor | None:
        """A per-token field the batch may lack; a filler gets one too, so every rank runs the same loss."""
        if getattr(batch, name) is None:
            return None
        return _pad(getattr(part, name) if indices else [[0.0]], 0.0, torch.float32, device)

    return MicroBatch(
        sample_indices=list(indices),
        input_ids=_pad(part.tokens, 0, torch.long, device),
        attention_mask=_pad([[1] * n for n in seq_lens], 0, torch.long, device),
        position_ids=_pad([list(range(n)) for n in seq_lens], 0, torch.long, device),
        response_positions=_pad(positions, 0, torch.long, device),
        response_tokens=_pad([t[len(t) - r :] for t, r in zip(part.tokens, part.response_lengths)], 0, torch.long, device),
        response_valid=_pad([[True] * r for r in part.response_lengths], False, torch.bool, device),
        loss_mask=_pad(part.loss_masks, 0, torch.float32, device),
        advantages=_pad(part.advantages, 0.0, torch.float32, device),
        rollout_log_probs=optional("rollout_log_probs"),
        old_log_probs=optional("old_log_probs"),
        returns=optional("returns"),
        values=optional("values"),
    )


def rank_micro_batches(
    batch: TrainBatch, rank: int, world_size: int, micro_batch_size: int, device: torch.device
) -> list[MicroBatch]:
    """This rank's samples (rank::world_size) in micro-batches; every rank gets the same count."""
    mine = list(range(rank, len(batch), world_size))
    per_rank = -(-len(batch) // world_size)
    count = -(-per_rank // micro_batch_size)
    chunks = [mine[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(count)]
    return [make_micro_batch(batch, chunk, device) for chunk in chunks]


def batch_denominators(batch: TrainBatch) -> LossDenominators:
    """The global batch's loss-mask tokens and samples, which every micro-batch's loss share divides by."""
    return LossDenominators(num_tokens=float(sum(sum(mask) for mask in batch.loss_masks)), num_samples=float(len(batch)))


def loss_inputs(mb: MicroBatch, denominators: LossDenominators, **outputs: torch.Tensor | None) -> LossInputs:
    """The loss's view of `mb` with this forward's `outputs` (log_probs, entropy, ref_log_probs, values)."""
    return LossInputs(
        loss_mask=mb.loss_mask,
        denominators=denominators,
        advantages=mb.advantages,
        old_log_probs=mb.old_log_probs,
        rollout_log_probs=mb.rollout_log_probs,
        returns=mb.returns,
        old_values=mb.values,
        **outputs,
    )
