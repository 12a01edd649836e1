"""`--normalize-advantages`: masked whitening with statistics over the whole global batch.

Each data-parallel rank holds a shard of the batch; the mean and variance must be those of all shards
together, or every rank would shift and scale its advantages differently. Passing the data-parallel
process group makes the statistics global (two all-reduces, three numbers in all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _all_reduce(stats: torch.Tensor, process_group: ProcessGroup | None) -> torch.Tensor:
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(stats, group=process_group)
    return stats


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps), mean and unbiased variance over the entries where mask is 1.

    As slime's `distributed_masked_whiten`: Bessel's correction when there are at least 2 entries,
    every entry transformed (masked ones too, they are never trained on), `shift_mean=False` scales
    only. `process_group`: the statistics cover every rank of it; None means this process's values only.
    Sums are taken in float64, the mean first and then squared deviations (no E[x^2] - E[x]^2
    cancellation); the result has the dtype of `values`.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    x = values.double()
    m = mask.to(torch.float64)
    totals = _all_reduce(torch.stack([(x * m).sum(), m.sum()]), process_group)
    count = float(totals[1])
    if count == 0:
        raise ValueError("cannot whiten advantages: the loss mask selects no token in the whole batch")
    mean = totals[0] / count
    squared = _all_reduce(((x - mean).pow(2) * m).sum().reshape(1), process_group)[0]
    var = squared / (count - 1) if count >= 2 else squared / count
    scale = torch.rsqrt(var + eps)
    out = (x - mean) * scale if shift_mean else x * scale
    return out.to(values.dtype)


def whiten_advantages(
    advantages: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
    *,
    process_group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """`masked_whiten` over ragged per-sample advantages; same shapes back."""
    if len(advantages) != len(loss_masks):
        raise ValueError(f"{len(advantages)} advantage tensors but {len(loss_masks)} loss masks")
    lengths = [a.numel() for a in advantages]
    for i, (a, m) in enumerate(zip(advantages, loss_masks)):
        if a.numel() != m.numel():
            raise ValueError(f"sample {i}: {a.numel()} advantages but a loss mask of {m.numel()} tokens")
    flat = torch.cat(list(advantages)) if advantages else torch.zeros(0)
    flat_mask = torch.cat([m.to(flat.dtype) for m in loss_masks]) if loss_masks else torch.zeros(0)
    return list(masked_whiten(flat, flat_mask, process_group=process_group).split(lengths))
