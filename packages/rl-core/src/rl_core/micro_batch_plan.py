"""Which samples of a global batch each data-parallel rank runs in each micro-batch: a fixed number of
samples per micro-batch, or as many as fit a token budget (slime's --use-dynamic-batch-size); samples
dealt to ranks in turn, or so that each rank gets about the same number of tokens (--balance-data).

Pure index arithmetic over sample lengths, so every rank computes the same plan from the same batch
without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Batching:
    """How a backend splits its share of a batch: `max_tokens` set means token-budget micro-batches."""

    micro_batch_size: int = 1
    max_tokens: int | None = None
    balance_data: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def dynamic(self) -> bool:
        return self.max_tokens is not None


def deal_to_ranks(lengths: list[int], world_size: int, balance: bool) -> list[list[int]]:
    """Sample indices per rank: i::world_size, or (balance) longest first onto the rank with the fewest
    tokens so far, ties to the rank with fewer samples, then the lower rank."""
    if not balance:
        return [list(range(rank, len(lengths), world_size)) for rank in range(world_size)]
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (tokens[r], len(ranks[r]), r))
        ranks[rank].append(i)
        tokens[rank] += lengths[i]
    return [sorted(r) for r in ranks]


def pack_by_tokens(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: each sample, longest first, joins the first micro-batch it fits in under
    `max_tokens`; a sample longer than the budget gets a micro-batch of its own."""
    bins: list[list[int]] = []
    sums: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for b, total in enumerate(sums):
            if total + lengths[i] <= max_tokens:
                bins[b].append(i)
                sums[b] += lengths[i]
                break
        else:
            bins.append([i])
            sums.append(lengths[i])
    return [sorted(b) for b in bins]


def plan_micro_batches(lengths: list[int], world_size: int, batching: Batching) -> list[list[list[int]]]:
    """For each rank, its micro-batches as lists of sample indices. Every rank gets the same number of
    micro-batches (FSDP runs one set of collectives per forward); a rank short of work gets empty ones,
    which the backend fills with a sample whose loss mask is all zero."""
    shares = deal_to_ranks(lengths, world_size, batching.balance_data)
    plans: list[list[list[int]]] = []
    for share in shares:
        if batching.max_tokens is not None:
            plans.append(pack_by_tokens(share, lengths, batching.max_tokens))
        else:
            size = batching.micro_batch_size
            plans.append([share[k : k + size] for k in range(0, len(share), size)])
    count = max(1, max(len(plan) for plan in plans))
    return [plan + [[] for _ in range(count - len(plan))] for plan in plans]
