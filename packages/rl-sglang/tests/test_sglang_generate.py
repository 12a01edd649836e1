"""/generate on the embedded engine: SGLang's answer shape, log-probs, batching, stopping."""

from __future__ import annotations

import asyncio

import pytest

from rl_sglang.client import SGLangClient
from rl_sglang.errors import EngineError

PROMPT = [5, 9, 14, 3]


async def test_generate_answers_sglang_shape_with_logprobs_equal_to_a_teacher_forced_forward(client, model_dir, ref):
    answer = await asyncio.wait_for(
        client.generate(
            {
                "input_ids": PROMPT,
                "sampling_params": {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "max_new_tokens": 12, "ignore_eos": True},
                "return_logprob": True,
                "rid": "req-1",
            }
        ),
        60,
    )
    assert set(answer) == {"text", "output_ids", "meta_info"}
    meta = answer["meta_info"]
    assert meta["id"] == "req-1"
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (4, 12, 0)
    assert meta["weight_version"] == "default"
    output = answer["output_ids"]
    assert len(output) == 12
    assert [entry[1] for entry in meta["output_token_logprobs"]] == output
    assert all(entry[2] is None for entry in meta["output_token_logprobs"])
    served = [entry[0] for entry in meta["output_token_logprobs"]]
    expected = ref.teacher_forced_logprobs(model_dir, PROMPT, output)  # before top-k/top-p truncation
    assert served == pytest.approx(expected, abs=1e-4)


async def test_logprobs_at_a_lower_temperature_are_those_of_the_tempered_distribution(client, model_dir, ref):
    answer = await asyncio.wait_for(
        client.generate(
            {"input_ids": PROMPT, "sampling_params": {"temperature": 0.5, "max_new_tokens": 6, "ignore_eos": True}, "return_logprob": True}
        ),
        60,
    )
    served = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    expected = ref.teacher_forced_logprobs(model_dir, PROMPT, answer["output_ids"], temperature=0.5)
    assert served == pytest.approx(expected, abs=1e-4)


async def test_logprobs_are_left_out_unless_asked_for(client):
    answer = await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}), 60)
    assert "output_token_logprobs" not in answer["meta_info"]


async def test_greedy_generation_is_deterministic_and_matches_uncached_greedy_decoding(client, model_dir, ref):
    payload = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 15, "ignore_eos": True}}
    first = await asyncio.wait_for(client.generate(payload), 60)
    second = await asyncio.wait_for(client.generate(payload), 60)
    assert first["output_ids"] == second["output_ids"]
    assert first["output_ids"] == ref.greedy(model_dir, PROMPT, 15)


async def test_batched_requests_of_different_lengths_equal_the_same_requests_sent_alone(client):
    prompts = [[7], [3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22], [11, 40, 2, 33, 9]]
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    alone = []
    for prompt in prompts:
        answer = await asyncio.wait_for(
            client.generate({"input_ids": prompt, "sampling_params": params, "return_logprob": True}), 60
        )
        alone.append(answer)
    together = await asyncio.wait_for(
        asyncio.gather(
            *(client.generate({"input_ids": p, "sampling_params": params, "return_logprob": True}) for p in prompts)
        ),
        60,
    )
    for one, batched in zip(alone, together):
        assert batched["output_ids"] == one["output_ids"]
        lp_one = [e[0] for e in one["meta_info"]["output_token_logprobs"]]
        lp_batched = [e[0] for e in batched["meta_info"]["output_token_logprobs"]]
        assert lp_batched == pytest.approx(lp_one, abs=1e-4)


async def test_a_list_of_prompts_in_one_payload_answers_a_list_in_order(client):
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    prompts = [[5, 6], [7, 8, 9]]
    batched = await asyncio.wait_for(client.generate({"input_ids": prompts, "sampling_params": params, "rid": ["a", "b"]}), 60)
    assert [a["meta_info"]["id"] for a in batched] == ["a", "b"]
    for prompt, answer in zip(prompts, batched):
        alone = await asyncio.wait_for(client.generate({"input_ids": prompt, "sampling_params": params}), 60)
        assert answer["output_ids"] == alone["output_ids"]


async def test_stop_token_ids_end_a_sequence_with_finish_reason_stop(client):
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    full = (await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": params}), 60))["output_ids"]
    stop_token = full[5]
    first_hit = full.index(stop_token)
    stopped = await asyncio.wait_for(
        client.generate({"input_ids": PROMPT, "sampling_params": {**params, "stop_token_ids": [stop_token]}}), 60
    )
    assert stopped["output_ids"] == full[: first_hit + 1]  # the matched token is part of the output
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_token}


async def test_max_new_tokens_ends_a_sequence_with_finish_reason_length(client):
    answer = await asyncio.wait_for(
        client.generate({"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}}), 60
    )
    assert len(answer["output_ids"]) == 3
    assert answer["meta_info"]["finish_reason"]["type"] == "length"


async def test_eos_stops_unless_ignore_eos(client, engine, ref):
    # Make EOS the only stop by treating it as a stop token through the model's eos id.
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    full = (await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": params}), 60))["output_ids"]
    engine.runner.eos_token_ids = frozenset({full[4]})  # pretend that token is this model's EOS
    stopped = await asyncio.wait_for(
        client.generate({"input_ids": PROMPT, "sampling_params": {**params, "ignore_eos": False}}), 60
    )
    assert stopped["output_ids"] == full[: full.index(full[4]) + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": full[4]}
    ignored = await asyncio.wait_for(client.generate({"input_ids": PROMPT, "sampling_params": params}), 60)
    assert ignored["output_ids"] == full


async def test_text_prompts_are_tokenized_and_the_answer_is_detokenized(client, engine):
    answer = await asyncio.wait_for(
        client.generate({"text": "hello", "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}}), 60
    )
    tokenizer = engine.runner.tokenizer
    assert answer["meta_info"]["prompt_tokens"] == len(tokenizer.encode("hello"))
    assert answer["text"] == tokenizer.decode(answer["output_ids"], skip_special_tokens=True)
    by_ids = await asyncio.wait_for(
        client.generate(
            {"input_ids": tokenizer.encode("hello"), "sampling_params": {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}}
        ),
        60,
    )
    assert by_ids["output_ids"] == answer["output_ids"]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"input_ids": [1, 999]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
        ({"input_ids": [1], "sampling_params": {"bogus": 1}}, "bogus"),
        ({"sampling_params": {}}, "input_ids"),
    ],
)
async def test_bad_generate_payloads_answer_400_naming_the_field(client, payload, named):
    with pytest.raises(EngineError) as caught:
        await asyncio.wait_for(client.generate(payload), 60)
    assert caught.value.status == 400
    assert named in caught.value.body["error"]["message"]


async def test_an_engine_error_names_route_status_and_body(engine):
    client = SGLangClient(engine.url)
    try:
        with pytest.raises(EngineError, match="/generate answered 400"):
            await asyncio.wait_for(client.generate({"input_ids": [1], "stream": True}), 60)
    finally:
        await client.close()
