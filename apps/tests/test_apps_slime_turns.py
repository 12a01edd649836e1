"""`rl_apps.slime_api.generate_turn` / `append_observation`, the turn loop of the multi-turn examples, against
a real `/generate` gateway whose engine answers planned texts (so the test knows what was sampled)."""

from __future__ import annotations

from argparse import Namespace

import pytest

from rl_apps.slime_api import Sample, append_observation, generate_turn
from rl_sglang.gateway import GenerateGateway

SAMPLING = {"temperature": 1.0, "max_new_tokens": 64}


class PlannedEngine:
    """Samples the next planned text (as many of its tokens as `max_new_tokens` allows), with log-prob
    -(i + 1) / 100 for its i-th token; records every payload."""

    def __init__(self, tokenizer, texts: list[str], finish: str | None = None) -> None:
        self.tokenizer, self.texts, self.finish = tokenizer, list(texts), finish
        self.payloads: list[dict] = []

    async def generate(self, payload: dict) -> dict:
        self.payloads.append(payload)
        planned = self.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"]
        limit = payload["sampling_params"]["max_new_tokens"]
        ids = planned[:limit]
        finish = self.finish or ("length" if len(planned) > limit else "stop")
        return {"text": self.tokenizer.decode(ids), "output_ids": ids,
                "meta_info": {"finish_reason": {"type": finish}, "weight_version": "7",
                              "output_token_logprobs": [[-(i + 1) / 100, t, None] for i, t in enumerate(ids)]}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from rl_apps.quickstart import build_char_tokenizer

    directory = tmp_path_factory.mktemp("char_tokenizer")
    build_char_tokenizer(directory)
    return directory


@pytest.fixture
async def serve(tokenizer_dir):
    """`serve(texts, max_context=None, finish=None)`: (slime args naming a gateway over a PlannedEngine, the
    engine, the tokenizer)."""
    from rl_apps.slime_api import GenerateState

    gateways = []

    async def start(texts, max_context=None, finish=None):
        tokenizer = GenerateState(Namespace(hf_checkpoint=str(tokenizer_dir), rollout_temperature=1.0, rollout_top_p=1.0,
                                            rollout_top_k=-1, rollout_max_response_len=64,
                                            rollout_stop_token_ids=None)).tokenizer
        engine = PlannedEngine(tokenizer, texts, finish)
        gateway = GenerateGateway(engine)
        gateways.append(gateway)
        await gateway.start()
        args = Namespace(hf_checkpoint=str(tokenizer_dir), sglang_router_ip=gateway.host, sglang_router_port=gateway.port,
                         rollout_max_context_len=max_context)
        return args, engine, tokenizer

    yield start
    for gateway in gateways:
        await gateway.stop()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_a_turn_keeps_the_sampled_tokens_through_the_first_stop_string_with_their_log_probs(serve):
    args, engine, tokenizer = await serve(["go <search>tower</search> junk </answer>"])
    sample = Sample(prompt="q", tokens=encode(tokenizer, "question: "))
    prompt = list(sample.tokens)
    turn = await generate_turn(args, sample, SAMPLING, stop=("</answer>", "</search>"))
    kept = "go <search>tower</search>"  # the text through the earliest closing tag, whichever is listed first
    assert turn.text == kept and turn.finish_reason == "stop"
    assert sample.tokens == prompt + encode(tokenizer, kept) and sample.response == kept
    n = len(encode(tokenizer, kept))
    assert sample.rollout_log_probs == [-(i + 1) / 100 for i in range(n)] and sample.loss_mask == [1] * n
    assert sample.weight_versions == ["7"]
    assert engine.payloads[0]["input_ids"] == prompt and engine.payloads[0]["return_logprob"] is True


async def test_a_turn_without_a_stop_string_keeps_every_sampled_token_and_the_engines_finish_reason(serve):
    args, engine, tokenizer = await serve(["abcdef", "ab<eos>"])
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))
    turn = await generate_turn(args, sample, {**SAMPLING, "max_new_tokens": 4}, stop=("</answer>",))
    assert (turn.text, turn.finish_reason, sample.response_length) == ("abcd", "length", 4)
    # The engine's text skips special tokens (SGLang's default), and so does the turn's.
    turn = await generate_turn(args, sample, SAMPLING)
    assert (turn.text, turn.finish_reason, sample.response_length) == ("ab", "stop", 7)
    assert sample.response == "abcdab" and sample.tokens[-1] == tokenizer.eos_token_id


async def test_an_aborted_turn_leaves_the_sample_as_it_was_and_aborted(serve):
    args, engine, tokenizer = await serve(["abc"], finish="abort")
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))
    assert await generate_turn(args, sample, SAMPLING) is None
    assert sample.status is Sample.Status.ABORTED and sample.response_length == 0 and sample.tokens == encode(tokenizer, "q: ")


async def test_an_observation_joins_the_response_with_loss_mask_and_log_prob_zero(serve):
    args, engine, tokenizer = await serve(["ab"])
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))
    await generate_turn(args, sample, SAMPLING)
    append_observation(args, sample, " <information>x</information> ")
    n = len(encode(tokenizer, " <information>x</information> "))
    assert sample.loss_mask == [1, 1] + [0] * n and sample.rollout_log_probs == [-0.01, -0.02] + [0.0] * n
    assert sample.tokens[-n:] == encode(tokenizer, " <information>x</information> ")
    assert sample.response == "ab <information>x</information> "


async def test_a_turn_asks_for_no_more_new_tokens_than_the_context_has_room_for(serve):
    args, engine, tokenizer = await serve(["abcdefgh"], max_context=10)
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))  # 3 tokens: room for 7
    turn = await generate_turn(args, sample, SAMPLING)
    assert engine.payloads[0]["sampling_params"]["max_new_tokens"] == 7
    assert turn.finish_reason == "length" and len(sample.tokens) == 10
    assert await generate_turn(args, sample, SAMPLING) is None and sample.status is Sample.Status.TRUNCATED
    assert len(engine.payloads) == 1  # no call with no room


async def test_an_observation_past_the_context_limit_is_cut_to_fit_and_truncates_the_sample(serve):
    observation = " <information>doc 1: the tower is in paris.</information> "
    args, engine, tokenizer = await serve(["ab", "cd"], max_context=20)
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))
    await generate_turn(args, sample, SAMPLING)  # 5 tokens
    assert append_observation(args, sample, " <i>x</i> ") is True  # 10 more: 15, room left
    assert sample.status is Sample.Status.PENDING
    assert append_observation(args, sample, observation) is False
    # Its first 5 tokens (the room left) joined the response; the sample is full and truncated.
    assert sample.tokens[-5:] == encode(tokenizer, observation)[:5] and len(sample.tokens) == 20
    assert sample.response == "ab <i>x</i> " + observation[:5] and sample.loss_mask == [1, 1] + [0] * 15
    assert sample.status is Sample.Status.TRUNCATED and sample.rollout_log_probs[-15:] == [0.0] * 15
    assert await generate_turn(args, sample, SAMPLING) is None and len(engine.payloads) == 1


async def test_an_observation_that_exactly_fills_the_context_is_kept_whole_and_truncates_the_sample(serve):
    args, engine, tokenizer = await serve(["ab"], max_context=10)
    sample = Sample(prompt="q", tokens=encode(tokenizer, "q: "))
    await generate_turn(args, sample, SAMPLING)
    assert append_observation(args, sample, " <x> ") is False  # 3 + 2 + 5 = 10
    assert sample.response == "ab <x> " and len(sample.tokens) == 10 and sample.status is Sample.Status.TRUNCATED
