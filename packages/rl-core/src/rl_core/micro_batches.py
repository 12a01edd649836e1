"""A rank's share of a TrainBatch as micro-batch tensors, the same way for every backend: samples
right-padded into rows, or packed without padding into one row (token-budget micro-batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rl_core.algorithms.policy_loss import LossDenominators
from rl_core.losses import LossInputs
from rl_core.micro_batch_plan import Batching, plan_micro_batches
from rl_core.train_batch import TrainBatch


@dataclass
class MicroBatch:
    """Tensors of a few samples. Sequence tensors are [B, L] right-padded, or [1, N] when packed (every
    sample's tokens one after another, positions restarting at 0 for each). Response tensors are always
    [B, T], one row per sample, T the longest response: the loss sees the same shapes either way."""

    sample_indices: list[int]
    """Indices into the global batch; empty for a filler micro-batch."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_positions: torch.Tensor
    """Sequence position whose logits predict each response token (token t comes from position t - 1),
    within the sample's row; when packed, within the one packed row."""
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
    cu_seqlens: torch.Tensor | None = None
    """Packed only: int32 [samples + 1] start offsets of the samples in the row (flash-attn's cu_seqlens)."""
    sample_offsets: tuple[int, ...] = ()
    """Packed only: cu_seqlens as Python ints, for code that must not wait on the device to read them."""
    max_seqlen: int = 0
    """Packed only: the longest sample, in tokens."""

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def at_responses(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] from a [rows, L, ...] per-position output: the entries that predict each response
        token, in the loss's layout (padding slots hold whatever position 0 holds: mask them)."""
        if self.packed:
            return per_position[0][self.response_positions]
        index = self.response_positions
        if per_position.dim() > 2:
            index = index.reshape(*index.shape, *[1] * (per_position.dim() - 2)).expand(-1, -1, *per_position.shape[2:])
        return per_position.gather(1, index)


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


def make_micro_batch(batch: TrainBatch, indices: list[int], device: torch.device, *, pack: bool = False) -> MicroBatch:
    """Pad `indices` of `batch` (or with `pack`, lay them end to end in one row); with no indices, a
    one-sample filler whose loss mask is all zero.

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

    sequence: dict[str, Any]
    if pack:
        offsets = [0]
        for n in seq_lens:
            offsets.append(offsets[-1] + n)
        sequence = dict(
            input_ids=torch.tensor([[t for tokens in part.tokens for t in tokens]], dtype=torch.long, device=device),
            attention_mask=torch.ones(1, offsets[-1], dtype=torch.long, device=device),
            position_ids=torch.tensor([[p for n in seq_lens for p in range(n)]], dtype=torch.long, device=device),
            response_positions=_pad([[start + p for p in row] for start, row in zip(offsets, positions)], 0, torch.long, device),
            cu_seqlens=torch.tensor(offsets, dtype=torch.int32, device=device),
            sample_offsets=tuple(offsets),
            max_seqlen=max(seq_lens),
        )
    else:
        sequence = dict(
            input_ids=_pad(part.tokens, 0, torch.long, device),
            attention_mask=_pad([[1] * n for n in seq_lens], 0, torch.long, device),
            position_ids=_pad([list(range(n)) for n in seq_lens], 0, torch.long, device),
            response_positions=_pad(positions, 0, torch.long, device),
        )
    return MicroBatch(
        sample_indices=list(indices),
        **sequence,
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
    """This rank's samples (rank::world_size) in padded micro-batches; every rank gets the same count."""
    return planned_micro_batches(batch, rank, world_size, Batching(micro_batch_size=micro_batch_size), device)


def planned_micro_batches(
    batch: TrainBatch, rank: int, world_size: int, batching: Batching, device: torch.device
) -> list[MicroBatch]:
    """This rank's micro-batches as `batching` plans them (`rl_core.micro_batch_plan`): packed when
    formed by a token budget, padded otherwise; every rank gets the same count."""
    plan = plan_micro_batches([len(t) for t in batch.tokens], world_size, batching)[rank]
    return [make_micro_batch(batch, indices, device, pack=batching.dynamic) for indices in plan]


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
