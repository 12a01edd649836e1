import pytest

from rl_core.metrics import rollout_metrics
from rl_core.protocols import RewardModel, RolloutEngine
from rl_core.rollout import apply_generate_output, generate_payload, generate_samples, score_samples
from rl_core.sample import Sample, SampleStatus
from rl_core.train_batch import TrainBatch


class EchoEngine:
    """Answers with the prompt reversed, SGLang-shaped; the last token hits the length limit if long."""

    def __init__(self):
        self.payloads = []

    async def generate(self, payload):
        self.payloads.append(payload)
        out = list(reversed(payload["input_ids"]))[: payload["sampling_params"]["max_new_tokens"]]
        finish = "length" if len(out) == payload["sampling_params"]["max_new_tokens"] else "stop"
        return {
            "text": "".join(chr(96 + t) for t in out),
            "output_ids": out,
            "meta_info": {
                "finish_reason": {"type": finish},
                "output_token_logprobs": [[-0.5 * (i + 1), t, None] for i, t in enumerate(out)],
                "weight_version": "3",
            },
        }

    async def abort(self, rid=None):
        return None


class LengthReward:
    async def score_batch(self, items):
        return [float(len(item["response"])) for item in items]


def test_fakes_satisfy_the_protocols():
    assert isinstance(EchoEngine(), RolloutEngine)
    assert isinstance(LengthReward(), RewardModel)


async def test_generated_samples_carry_tokens_log_probs_version_and_status():
    samples = [Sample(index=0, tokens=[1, 2]), Sample(index=1, tokens=[1, 2, 3, 4])]
    engine = EchoEngine()
    await generate_samples(engine, samples, {"max_new_tokens": 3})
    payload = dict(engine.payloads[0])
    assert payload.pop("rid").startswith("sample-0-")
    assert payload == {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}, "return_logprob": True}
    first, second = samples
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
    output = {"output_ids": [1, 2], "meta_info": {"output_token_logprobs": [[-1.0, 1, None]]}}
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        apply_generate_output(Sample(index=7, tokens=[0]), output)


def test_empty_output_is_not_trainable():
    sample = apply_generate_output(Sample(tokens=[0]), {"output_ids": [], "meta_info": {"finish_reason": {"type": "stop"}}})
    assert sample.status is SampleStatus.ABORTED


def test_payload_copies_sampling_params():
    params = {"temperature": 1.0}
    payload = generate_payload(Sample(index=1, tokens=[5]), params)
    payload["sampling_params"]["temperature"] = 0.0
    assert params["temperature"] == 1.0


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


def test_no_request_id_is_a_prefix_of_another_even_across_indices_and_repeats():
    # SGLang's /abort_request stops every request whose rid starts with the given one
    samples = [Sample(index=i, tokens=[1]) for i in (1, 10, 11, 100, 1, 1)]
    rids = [generate_payload(s, {})["rid"] for s in samples]
    assert len(set(rids)) == len(rids)
    assert not [(a, b) for a in rids for b in rids if a != b and b.startswith(a)]
    assert all(rid.startswith(f"sample-{s.index}-") for rid, s in zip(rids, samples))
