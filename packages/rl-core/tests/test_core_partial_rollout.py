"""Partial rollout: once enough groups are done the rest are aborted, kept with their tokens, and continued
in the next rollout (also after a checkpoint), never regenerated, lost or doubled."""

import asyncio

from rl_core.data_source import JsonlDataSource, PromptRow
from rl_core.generation import GenerateAnswer
from rl_core.rollout import default_generator, default_rollout


class SlowForSomeEngine:
    """Prompts in `slow` stream 2 tokens, then wait until aborted; the others answer 3 tokens at once."""

    def __init__(self, slow, version="v1"):
        self.slow, self.version, self.requests = set(slow), version, []
        self.aborted = asyncio.Event()

    async def __call__(self, request):
        self.requests.append(request)
        prompt_id = request.input_ids[0]
        if prompt_id in self.slow:
            await self.aborted.wait()
            return GenerateAnswer(output_ids=[7, 7], text="..", log_probs=[-1.0, -1.0], finish_reason="abort",
                                  weight_version=self.version)
        n = min(3, request.sampling_params["max_new_tokens"])
        return GenerateAnswer(output_ids=[5] * n, text="x" * n, log_probs=[-0.5] * n, finish_reason="length",
                              weight_version=self.version)

    async def abort(self):
        self.aborted.set()


class Reward:
    last_failed: list[int] = []
    last_errors: list[str] = []

    async def score_batch(self, items):
        return [float(len(item["response"])) for item in items]


def source():
    rows = [PromptRow(prompt=f"p{i}", text=f"p{i}", token_ids=[i, 100], label=None, metadata={}) for i in range(4)]
    return JsonlDataSource(rows, n_samples_per_prompt=2)


async def rollout(engine, data, mask_offpolicy=False):
    generator = default_generator(engine, {"max_new_tokens": 5}, mask_offpolicy=mask_offpolicy)
    return await default_rollout(generator, Reward(), data, num_groups=2, over_sampling_batch_size=4, abort=engine.abort)


async def test_unfinished_groups_are_aborted_kept_and_continued_next_rollout():
    data = source()
    first = await rollout(SlowForSomeEngine(slow={2, 3}), data)
    assert [[s.prompt for s in g] for g in first.groups] == [["p0", "p0"], ["p1", "p1"]]
    assert first.metrics["rollout/partial/continued_groups"] == 2.0

    engine = SlowForSomeEngine(slow=set(), version="v2")
    second = await rollout(engine, data)
    continued = [s for g in second.groups for s in g]
    assert {s.prompt for s in continued} == {"p2", "p3"}  # served before any new prompt
    for sample in continued:
        # The 2 tokens of the aborted part, then 3 more: the engine was asked for the rest of the budget only.
        assert sample.response_tokens == [7, 7, 5, 5, 5] and sample.weight_versions == ["v1", "v2"]
        assert sample.rollout_log_probs == [-1.0, -1.0, -0.5, -0.5, -0.5] and sample.loss_mask == [1] * 5
    asked = [r for r in engine.requests if r.input_ids[0] in (2, 3)]
    assert all(r.input_ids[2:] == [7, 7] and r.sampling_params["max_new_tokens"] == 3 for r in asked)
    indices = [s.index for g in first.groups + second.groups for s in g]
    assert len(indices) == len(set(indices)) == 8  # every sample trained once


async def test_a_checkpointed_data_source_continues_the_partial_samples_and_masks_off_policy_tokens():
    data = source()
    await rollout(SlowForSomeEngine(slow={2, 3}), data)
    resumed = source()
    resumed.load_state_dict(data.state_dict())
    second = await rollout(SlowForSomeEngine(slow=set(), version="v2"), resumed, mask_offpolicy=True)
    for sample in (s for g in second.groups for s in g):
        assert sample.response_tokens == [7, 7, 5, 5, 5]
        assert sample.loss_mask == [0, 0, 1, 1, 1]  # the tokens of the older policy are not trained on
