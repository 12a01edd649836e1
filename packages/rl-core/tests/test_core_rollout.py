import pytest

from rl_core.generation import GenerateAnswer
from rl_core.metrics import rollout_metrics
from rl_core.protocols import GenerateFn, RewardModel
from rl_core.rollout import RewardFailure, default_generator, generate_samples, request_id, score_samples
from rl_core.sample import Sample, SampleStatus
from rl_core.train_batch import TrainBatch


class EchoGenerate:
    """Answers with the prompt reversed; the last token hits the length limit if long."""

    def __init__(self):
        self.requests = []

    async def __call__(self, request):
        self.requests.append(request)
        out = list(reversed(request.input_ids))[: request.sampling_params["max_new_tokens"]]
        finish = "length" if len(out) == request.sampling_params["max_new_tokens"] else "stop"
        return GenerateAnswer(output_ids=out, text="".join(chr(96 + t) for t in out),
                              log_probs=[-0.5 * (i + 1) for i in range(len(out))], finish_reason=finish, weight_version="3")


class LengthReward:
    last_failed: list[int] = []
    last_errors: list[str] = []

    async def score_batch(self, items):
        return [float(len(item["response"])) for item in items]


class FailingReward:
    """Fails (as a reward hub reports it: error reward 0, the item listed) on the given item indices."""

    def __init__(self, failing):
        self.failing = set(failing)
        self.last_failed, self.last_errors = [], []

    async def score_batch(self, items):
        self.last_failed = sorted(i for i in self.failing if i < len(items))
        self.last_errors = [f"item {i}: TypeError: score() got an unexpected keyword argument 'prompt'\n  more" for i in self.last_failed]
        return [0.0 if i in self.failing else 1.0 for i in range(len(items))]


def test_fakes_satisfy_the_protocols():
    assert isinstance(EchoGenerate(), GenerateFn)
    assert isinstance(LengthReward(), RewardModel)


async def test_generated_samples_carry_tokens_log_probs_version_and_status():
    samples = [Sample(index=0, tokens=[1, 2]), Sample(index=1, tokens=[1, 2, 3, 4])]
    engine = EchoGenerate()
    first, second = await generate_samples(default_generator(engine, {"max_new_tokens": 3}), samples)
    request = engine.requests[0]
    assert (request.input_ids, request.sampling_params, request.return_logprob) == ([1, 2], {"max_new_tokens": 3}, True)
    assert first.tokens == [1, 2, 2, 1] and first.response_length == 2 and first.response == "ba"
    assert first.rollout_log_probs == [-0.5, -1.0] and first.loss_mask == [1, 1]
    assert first.status is SampleStatus.COMPLETED and second.status is SampleStatus.TRUNCATED
    assert second.response_tokens == [4, 3, 2] and first.weight_version == "3"
    await score_samples(LengthReward(), samples)
    assert [s.reward for s in samples] == [2.0, 3.0]
    metrics = rollout_metrics(samples)
    assert metrics["rollout/reward_mean"] == 2.5 and metrics["rollout/truncated_ratio"] == 0.5
    assert metrics["rollout/weight_version_min"] == 3.0


def test_mismatched_log_probs_are_refused():
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        GenerateAnswer(output_ids=[1, 2], text="", log_probs=[-1.0], finish_reason="stop")


async def test_empty_output_is_not_trainable():
    async def nothing(request):
        return GenerateAnswer(output_ids=[], text="", log_probs=[], finish_reason="stop")

    (sample,) = await generate_samples(default_generator(nothing, {}), [Sample(index=0, tokens=[0])])
    assert sample.status is SampleStatus.ABORTED


@pytest.mark.parametrize("count", [200])
def test_request_ids_are_unique_and_never_a_prefix_of_one_another(count):
    ids = [request_id(Sample(index=i % 25)) for i in range(count)]
    assert len(set(ids)) == count
    assert not any(a != b and b.startswith(a) for a in ids for b in ids)


async def test_a_second_turn_appends_to_the_first_with_its_own_weight_version_and_a_masked_tool_turn():
    sample = Sample(index=0, tokens=[1, 2])
    generate = EchoGenerate()
    await default_generator(generate, {"max_new_tokens": 2})(sample)
    sample.append_response_tokens(tokens=[9, 9], trainable=False)  # a tool's answer
    # max_new_tokens bounds the whole response: 4 tokens so far, so 1 more is asked for.
    await default_generator(generate, {"max_new_tokens": 5})(sample)
    assert generate.requests[1].input_ids == [1, 2, 2, 1, 9, 9]  # the whole context goes to the engine
    assert generate.requests[1].sampling_params["max_new_tokens"] == 1
    assert sample.tokens == [1, 2, 2, 1, 9, 9, 9] and sample.response_length == 5
    assert sample.loss_mask == [1, 1, 0, 0, 1] and sample.rollout_log_probs == [-0.5, -1.0, 0.0, 0.0, -0.5]
    assert sample.weight_versions == ["3", "3"] and sample.status is SampleStatus.TRUNCATED


def test_train_batch_checks_lengths_and_selects_shards():
    samples = [Sample(tokens=[1, 2, 3], response_length=2, rollout_log_probs=[-1.0, -2.0], reward=1.0),
               Sample(tokens=[4, 5], response_length=1, rollout_log_probs=[-3.0], reward=0.0)]
    batch = TrainBatch.from_samples(samples, [[0.5, 0.5], [-0.5]])
    assert batch.loss_masks == [[1, 1], [1]] and batch.rewards == [1.0, 0.0]
    shard = batch.select([1])
    assert shard.tokens == [[4, 5]] and shard.rollout_log_probs == [[-3.0]]
    with pytest.raises(ValueError, match="sample 1: loss_mask/advantages length"):
        TrainBatch.from_samples(samples, [[0.5, 0.5], [-0.5, 1.0]])
    with pytest.raises(ValueError, match="response_length 3 outside 1..2"):
        TrainBatch(tokens=[[1, 2]], response_lengths=[3], loss_masks=[[1, 1, 1]], advantages=[[0, 0, 0]])


def test_old_log_probs_are_checked_per_sample_and_travel_with_shards():
    fields = dict(tokens=[[1, 2, 3], [4, 5]], response_lengths=[2, 1], loss_masks=[[1, 1], [1]], advantages=[[0.5, 0.5], [-0.5]])
    batch = TrainBatch(**fields, old_log_probs=[[-1.0, -2.0], [-3.0]])
    assert batch.select([1]).old_log_probs == [[-3.0]] and batch.select([0]).rollout_log_probs is None
    assert TrainBatch(**fields).select([0, 1]).old_log_probs is None
    with pytest.raises(ValueError, match="sample 0: old_log_probs length differs from response_length 2"):
        TrainBatch(**fields, old_log_probs=[[-1.0], [-3.0]])
    with pytest.raises(ValueError, match="TrainBatch.old_log_probs has 1 entries, tokens has 2"):
        TrainBatch(**fields, old_log_probs=[[-1.0, -2.0]])


async def test_a_batch_whose_every_reward_failed_stops_with_the_first_error_and_its_sample():
    samples = [Sample(index=10 + i, prompt=f"p{i}", tokens=[1], response="x") for i in range(4)]
    with pytest.raises(RewardFailure, match=r"every one of the 4 samples failed to grade; the first, sample 10 \(prompt 'p0'\): "
                                            r"TypeError: score\(\) got an unexpected keyword argument 'prompt'$"):
        await score_samples(FailingReward(range(4)), samples, max_error_ratio=1.0)


async def test_failures_up_to_the_ratio_are_tolerated_and_above_it_stop_the_run():
    samples = [Sample(index=i, prompt="p", tokens=[1], response="x") for i in range(8)]
    await score_samples(FailingReward([1, 5]), samples, max_error_ratio=0.25)  # 2 of 8 = 25%: goes on
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    with pytest.raises(RewardFailure, match=r"3 of the 8 samples \(38%\) failed to grade, more than --max-reward-error-ratio 0.25; the first, sample 0"):
        await score_samples(FailingReward([0, 1, 5]), samples, max_error_ratio=0.25)
