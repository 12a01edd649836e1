"""Token-budget micro-batch plans, balanced dealing to ranks, packed micro-batch tensors and the
BackendConfig fields that choose them."""

import itertools
import random
from typing import ClassVar, Literal

import pytest
import torch

from rl_core.backend_config import DEFAULT_MAX_TOKENS_PER_GPU, BackendConfig
from rl_core.micro_batch_plan import Batching, deal_to_ranks, plan_micro_batches
from rl_core.micro_batches import make_micro_batch
from rl_core.train_batch import TrainBatch


def lengths_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(2, 10), rng.randint(20, 60)]) for _ in range(n)]


@pytest.mark.parametrize("world_size, balance", [(1, False), (3, False), (3, True)])
def test_token_budget_plan_places_every_sample_once_within_budget_with_equal_counts(world_size, balance):
    lengths = lengths_of(1, 17) + [90]  # one sample longer than the budget
    plan = plan_micro_batches(lengths, world_size, Batching(max_tokens=64, balance_data=balance))
    assert len({len(rank) for rank in plan}) == 1
    placed = [i for rank in plan for mb in rank for i in mb]
    assert sorted(placed) == list(range(len(lengths)))
    for mb in (mb for rank in plan for mb in rank):
        assert sum(lengths[i] for i in mb) <= 64 or mb == [len(lengths) - 1]


def test_fixed_size_plan_deals_samples_in_turn_as_before():
    plan = plan_micro_batches([5] * 7, 2, Batching(micro_batch_size=2))
    assert plan == [[[0, 2], [4, 6]], [[1, 3], [5]]]
    assert plan_micro_batches([5], 2, Batching(micro_batch_size=2)) == [[[0]], [[]]]


def test_balanced_dealing_comes_close_to_the_best_split_of_tokens():
    lengths = [60, 55, 9, 8, 7, 50, 6, 5, 4, 3]
    world = 2
    loads = lambda ranks: max(sum(lengths[i] for i in r) for r in ranks)  # noqa: E731
    best = min(loads([[i for i, r in enumerate(a) if r == k] for k in range(world)])
               for a in itertools.product(range(world), repeat=len(lengths)))
    balanced = loads(deal_to_ranks(lengths, world, balance=True))
    in_turn = loads(deal_to_ranks(lengths, world, balance=False))
    assert balanced <= best + max(lengths) / world  # the longest-first greedy bound
    assert balanced < in_turn


def test_packed_micro_batch_lays_samples_end_to_end_with_positions_restarting():
    batch = TrainBatch(tokens=[[1, 2, 3, 4], [5, 6, 7]], response_lengths=[2, 1], loss_masks=[[1, 1], [1]],
                       advantages=[[1.0, 1.0], [-1.0]])
    mb = make_micro_batch(batch, [0, 1], torch.device("cpu"), pack=True)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7] and mb.max_seqlen == 4
    # The position before each response token, so at_responses of the inputs gives the previous token.
    assert mb.at_responses(mb.input_ids)[mb.response_valid].tolist() == [2, 3, 6]
    assert mb.response_tokens.tolist() == [[3, 4], [7, 0]]
    padded = make_micro_batch(batch, [0, 1], torch.device("cpu"))
    assert padded.at_responses(padded.input_ids)[padded.response_valid].tolist() == [2, 3, 6]


class Dynamic(BackendConfig):
    type: Literal["dynamic"] = "dynamic"
    supports_dynamic_batch_size: ClassVar[bool] = True


class Fixed(BackendConfig):
    type: Literal["fixed"] = "fixed"
    unsupported_batching_reason: ClassVar[str] = "its pipeline needs one shape"


def test_dynamic_batch_size_is_the_default_unless_a_micro_batch_size_is_given():
    default = Dynamic(model_path=".")
    assert default.use_dynamic_batch_size and default.max_tokens_per_gpu == DEFAULT_MAX_TOKENS_PER_GPU
    assert default.batching(training=False).max_tokens == DEFAULT_MAX_TOKENS_PER_GPU
    assert Dynamic(model_path=".", max_tokens_per_gpu=100, log_probs_max_tokens_per_gpu=300).batching(False).max_tokens == 300
    fixed = Dynamic(model_path=".", micro_batch_size=4)
    assert not fixed.use_dynamic_batch_size and fixed.batching(True) == Batching(micro_batch_size=4)
    assert not Fixed(model_path=".").use_dynamic_batch_size


@pytest.mark.parametrize("cls, fields, named", [
    (Dynamic, dict(use_dynamic_batch_size=True, micro_batch_size=2), "give one of them"),
    (Dynamic, dict(micro_batch_size=2, max_tokens_per_gpu=100), "use_dynamic_batch_size is off"),
    (Dynamic, dict(log_probs_chunk_size=0), "log_probs_chunk_size 0"),
    (Fixed, dict(use_dynamic_batch_size=True), "its pipeline needs one shape"),
    (Fixed, dict(balance_data=True), "balance_data"),
])
def test_contradicting_or_unsupported_batching_fields_are_refused_by_name(cls, fields, named):
    with pytest.raises(ValueError, match=named):
        cls(model_path=".", **fields)


class FixedChunked(Fixed):
    supports_log_probs_chunk_size: ClassVar[bool] = True


def test_a_backend_without_dynamic_batches_may_still_chunk_its_log_probs():
    assert FixedChunked(model_path=".", log_probs_chunk_size=64).log_probs_chunk_size == 64
    with pytest.raises(ValueError, match="use_dynamic_batch_size"):
        FixedChunked(model_path=".", use_dynamic_batch_size=True)
    with pytest.raises(ValueError, match="log_probs_chunk_size: not supported by the 'fixed' backend"):
        Fixed(model_path=".", log_probs_chunk_size=64)
