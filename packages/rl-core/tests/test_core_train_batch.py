import pytest

from rl_core.sample import Sample
from rl_core.train_batch import TrainBatch


def samples():
    return [Sample(tokens=[1, 2, 3], response_length=2, reward=1.0), Sample(tokens=[4, 5], response_length=1, reward=0.0)]


def test_critic_targets_and_old_values_travel_with_the_batch_and_its_shards():
    batch = TrainBatch.from_samples(samples(), [[0.1, 0.2], [0.3]], returns=[[1.0, 1.0], [0.0]], values=[[0.5, 0.6], [0.2]])
    shard = batch.select([1])
    assert (shard.returns, shard.values, shard.advantages) == ([[0.0]], [[0.2]], [[0.3]])
    assert TrainBatch.from_samples(samples(), [[0.1, 0.2], [0.3]]).returns is None


def test_critic_fields_of_the_wrong_length_name_the_sample():
    with pytest.raises(ValueError, match="sample 1: values length differs"):
        TrainBatch.from_samples(samples(), [[0.1, 0.2], [0.3]], values=[[0.5, 0.6], [0.2, 0.1]])
    with pytest.raises(ValueError, match="TrainBatch.returns has 1 entries"):
        TrainBatch.from_samples(samples(), [[0.1, 0.2], [0.3]], returns=[[1.0, 1.0]])
