"""OpenAI's /v1/chat/completions on the gateway: tool calls in OpenAI's shape, and every session's trajectory
exactly the tokens the engine was sent and sampled, driven with the openai client."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import AsyncOpenAI, BadRequestError
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from rl_core.sample import Sample, SampleStatus
from rl_core.trajectory import apply_trajectory
from rl_sglang.chat import SESSION_HEADER, pop_session
from rl_sglang.client import SGLangClient
from rl_sglang.gateway import GenerateGateway
from rl_sglang.tokenizer import load_tokenizer
from rl_sglang.tool_parsers import build_tool_call_parser

# A ChatML-like template that shows tools and renders tool calls with json's default spacing.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<unk>"]
ADD_TOOL = [{"type": "function", "function": {"name": "add", "description": "a + b",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Characters, plus one merge "ab": sampling "a" then "b" decodes to text that re-encodes as one token."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["ab"])}
    core = Tokenizer(BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


class ScriptedEngine:
    """Answers call k with the text `replies[k]` sampled one character per token (so "a","b" stay apart),
    then the end-of-turn token unless the reply is cut (`cut`: finish by length); records what it was sent."""

    def __init__(self, tokenizer, replies, cut=()):
        self.tokenizer, self.replies, self.cut = tokenizer, list(replies), set(cut)
        self.calls: list[dict] = []
        self.answers: list[dict] = []

    async def generate(self, payload):
        k = len(self.calls)
        self.calls.append(payload)
        ids = [self.tokenizer.convert_tokens_to_ids(c) for c in self.replies[k]]
        if k not in self.cut:
            ids.append(self.tokenizer.eos_token_id)
        logprobs = [-0.001 * (100 * (k + 1) + j) for j in range(len(ids))]
        answer = {
            "text": self.tokenizer.decode(ids, skip_special_tokens=True),
            "output_ids": ids,
            "meta_info": {"id": payload["rid"], "finish_reason": {"type": "length" if k in self.cut else "stop"},
                          "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids)],
                          "weight_version": f"v{k}"},
        }
        self.answers.append(answer)
        return answer


async def served(engine, tokenizer, **kwargs):
    gateway = GenerateGateway(engine, tokenizer=tokenizer, **kwargs)
    await gateway.start()
    return gateway


async def test_a_three_turn_tool_calling_conversation_is_retrieved_exactly_as_the_engine_saw_and_sampled_it():
    tokenizer = bpe_tokenizer()
    engine = ScriptedEngine(tokenizer, [
        'ab first<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>',
        '<tool_call>{"name":"add","arguments":{"a":3,"b":4}}</tool_call>',
        "ab is 7",
    ])
    gateway = await served(engine, tokenizer)
    client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", default_headers={SESSION_HEADER: "s1"})
    messages = [{"role": "user", "content": "add 1 and 2, then 3 and 4"}]
    replies = []
    try:
        async with asyncio.timeout(30):
            for _ in range(3):  # the usual agent loop: call, run the tools asked for, call again
                response = await client.chat.completions.create(model="m", messages=messages, tools=ADD_TOOL,
                                                                temperature=1.0, max_tokens=64)
                message = response.choices[0].message
                replies.append(response)
                messages.append(message.model_dump(exclude_none=True))
                for call in message.tool_calls or []:
                    args = json.loads(call.function.arguments)
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(args["a"] + args["b"])})
            (trajectory,) = await pop_session(f"{gateway.url}/v1", "s1")
    finally:
        await client.close()
        await gateway.stop()

    # OpenAI's shape, as SGLang's qwen25 parser gives it.
    first, second, third = (r.choices[0] for r in replies)
    assert (first.finish_reason, first.message.content) == ("tool_calls", "ab first")
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in first.message.tool_calls] == [("function", "add", {"a": 1, "b": 2})]
    assert first.message.tool_calls[0].id.startswith("call_")
    assert (second.finish_reason, second.message.content, second.message.tool_calls[0].function.arguments) == ("tool_calls", None, '{"a": 3, "b": 4}')
    assert (third.finish_reason, third.message.content, third.message.tool_calls) == ("stop", "ab is 7", None)

    # Each call was sent the previous call's tokens and the engine's sampled tokens unchanged, then the
    # template's text for the new messages only.
    sent = [c["input_ids"] for c in engine.calls]
    outputs = [a["output_ids"] for a in engine.answers]
    assert sent[0] == tokenizer.apply_chat_template(messages[:1], tools=ADD_TOOL, add_generation_prompt=True, tokenize=True, return_dict=False)
    after_tool = "\n<|im_start|>tool\n{}<|im_end|>\n<|im_start|>assistant\n"  # the turn's end, the tool, the next turn
    for k, result in ((1, "3"), (2, "7")):
        assert sent[k][: len(sent[k - 1]) + len(outputs[k - 1])] == sent[k - 1] + outputs[k - 1]
        assert tokenizer.decode(sent[k][len(sent[k - 1]) + len(outputs[k - 1]):]) == after_tool.format(result)
    engine_tokens = sent[2] + outputs[2]
    assert trajectory.token_ids == engine_tokens
    assert trajectory.prompt_length == len(sent[0])
    sampled = set()
    for k in range(3):
        sampled |= set(range(len(sent[k]), len(sent[k]) + len(outputs[k])))
    assert trajectory.loss_mask == [int(i in sampled) for i in range(len(engine_tokens))]
    engine_logprobs = {len(sent[k]) + j: e[0] for k, a in enumerate(engine.answers)
                       for j, e in enumerate(a["meta_info"]["output_token_logprobs"])}
    assert trajectory.log_probs == [engine_logprobs.get(i, 0.0) for i in range(len(engine_tokens))]
    assert trajectory.weight_versions == ["v0", "v1", "v2"] and trajectory.finish_reason == "stop"
    # What this avoids: rendering the finished conversation again gives other tokens (merged "ab", and
    # the tool calls re-serialised with other spacing).
    rerendered = tokenizer.apply_chat_template(messages, tools=ADD_TOOL, tokenize=True, return_dict=False)
    assert rerendered != engine_tokens

    sample = apply_trajectory(Sample(prompt="add", tokens=[9]), trajectory)
    assert sample.tokens == engine_tokens and sample.prompt_length == len(sent[0])
    assert sample.loss_mask == trajectory.loss_mask[len(sent[0]):]
    assert sample.rollout_log_probs == trajectory.log_probs[len(sent[0]):]
    assert sample.weight_versions == ["v0", "v1", "v2"] and sample.weight_version == "v2"
    assert sample.status == SampleStatus.COMPLETED
    assert sample.response == tokenizer.decode(engine_tokens[len(sent[0]):])


async def test_a_reply_cut_by_length_gets_the_templates_turn_end_as_unsampled_tokens_and_the_session_url_works():
    tokenizer = bpe_tokenizer()
    engine = ScriptedEngine(tokenizer, ["ab ab", "ok"], cut={0})
    gateway = await served(engine, tokenizer)
    client = AsyncOpenAI(base_url=f"{gateway.url}/sessions/s2/v1", api_key="unused")  # the session in the URL
    messages = [{"role": "user", "content": "hi"}]
    try:
        async with asyncio.timeout(30):
            first = await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
            assert first.choices[0].finish_reason == "length"
            messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "go on"}]
            await client.chat.completions.create(model="m", messages=messages, max_tokens=5)
            (trajectory,) = await pop_session(f"{gateway.url}/v1", "s2")
    finally:
        await client.close()
        await gateway.stop()
    sent, outputs = [c["input_ids"] for c in engine.calls], [a["output_ids"] for a in engine.answers]
    between = sent[1][len(sent[0]) + len(outputs[0]):]
    assert tokenizer.decode(between) == "<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"
    assert trajectory.token_ids == sent[1] + outputs[1]
    assert trajectory.loss_mask == [0] * len(sent[0]) + [1] * len(outputs[0]) + [0] * len(between) + [1] * len(outputs[1])


async def test_a_request_that_does_not_continue_the_conversation_starts_a_second_trajectory_and_streaming_works():
    tokenizer = bpe_tokenizer()
    engine = ScriptedEngine(tokenizer, ["one", '<tool_call>{"name":"add","arguments":{"a":1,"b":1}}</tool_call>'])
    gateway = await served(engine, tokenizer)
    client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    headers = {SESSION_HEADER: "s3"}
    try:
        async with asyncio.timeout(30):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], extra_headers=headers)
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}],
                                                          tools=ADD_TOOL, stream=True, extra_headers=headers)
            chunks = [chunk async for chunk in stream]
            trajectories = await pop_session(f"{gateway.url}/v1", "s3")
            with pytest.raises(RuntimeError, match="404"):
                await pop_session(f"{gateway.url}/v1", "s3")
    finally:
        await client.close()
        await gateway.stop()
    assert [t.token_ids for t in trajectories] == [c["input_ids"] + a["output_ids"] for c, a in zip(engine.calls, engine.answers)]
    delta = chunks[0].choices[0].delta
    assert delta.tool_calls[0].function.name == "add" and json.loads(delta.tool_calls[0].function.arguments) == {"a": 1, "b": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_requests_the_endpoint_cannot_serve_as_asked_are_refused_with_the_reason():
    tokenizer = bpe_tokenizer()
    engine = ScriptedEngine(tokenizer, [])
    gateway = await served(engine, tokenizer)
    client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "a"}]
    try:
        async with asyncio.timeout(30):
            for kwargs, reason in (({"n": 2}, "n=2"), ({"tool_choice": "required", "tools": ADD_TOOL}, "tool_choice"),
                                   ({"seed": 1}, "seed"), ({"logprobs": True}, "logprobs")):
                with pytest.raises(BadRequestError, match=reason):
                    await client.chat.completions.create(model="m", messages=messages, **kwargs)
            with pytest.raises(BadRequestError, match="messages"):
                await client.chat.completions.create(model="m", messages=[])
            tokenizer.chat_template = None
            with pytest.raises(BadRequestError, match="no chat template"):
                await client.chat.completions.create(model="m", messages=messages)
    finally:
        await client.close()
        await gateway.stop()
    assert engine.calls == []


async def test_a_session_past_max_turns_is_refused_and_its_trajectory_ends_truncated_while_other_sessions_go_on():
    tokenizer = bpe_tokenizer()
    engine = ScriptedEngine(tokenizer, ["one", "two", "three"])
    gateway = await served(engine, tokenizer, max_turns=2)
    client = AsyncOpenAI(base_url=f"{gateway.url}/sessions/s5/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "a"}]
    try:
        async with asyncio.timeout(30):
            for _ in range(2):
                reply = await client.chat.completions.create(model="m", messages=messages)
                messages += [reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
            with pytest.raises(BadRequestError, match="max-turns"):
                await client.chat.completions.create(model="m", messages=messages)
            (trajectory,) = await pop_session(f"{gateway.url}/v1", "s5")
            other = AsyncOpenAI(base_url=f"{gateway.url}/sessions/s6/v1", api_key="unused", max_retries=0)
            await other.chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}])
            await other.close()
    finally:
        await client.close()
        await gateway.stop()
    assert len(engine.calls) == 3  # two for s5, none for its refused third call, one for s6
    assert trajectory.token_ids == engine.calls[1]["input_ids"] + engine.answers[1]["output_ids"]
    sample = apply_trajectory(Sample(prompt="a"), trajectory)
    assert trajectory.finish_reason == "length" and sample.status is SampleStatus.TRUNCATED


def test_the_qwen25_parser_reads_tagged_json_calls_drops_unknown_functions_and_keeps_malformed_text_as_content():
    parser = build_tool_call_parser("qwen25")
    text = ' thinking \n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "nope", "arguments": {}}</tool_call>' \
           '<tool_call>{"name": "add", "parameters": {"b": 2}}</tool_call>'
    parsed = parser.parse(text, ADD_TOOL)
    assert parsed.content == "thinking"
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == \
           [("function", "add", {"a": 1}), ("function", "add", {"b": 2})]
    assert len({c["id"] for c in parsed.tool_calls}) == 2
    broken = 'x<tool_call>{"name": "add", </tool_call>'
    assert (parser.parse(broken, ADD_TOOL).content, parser.parse(broken, ADD_TOOL).tool_calls) == (broken, [])
    assert build_tool_call_parser("none").parse(text, ADD_TOOL).content == text
    with pytest.raises(ValueError, match="unknown tool-call parser 'llama9'"):
        build_tool_call_parser("llama9")


# The conftest's character tokenizer knows lowercase letters, digits and " .,!?": a template in those.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }} {{ m.content }}. {% endfor %}"
                  "{% if add_generation_prompt %}assistant {% endif %}")


class Recording:
    def __init__(self, engine):
        self.engine, self.calls, self.answers = engine, [], []

    async def generate(self, payload):
        self.calls.append(payload)
        self.answers.append(await self.engine.generate(payload))
        return self.answers[-1]


async def test_a_two_turn_chat_on_the_embedded_engine_records_the_sampled_tokens_with_their_true_log_probs(engine, model_dir, ref):
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = PLAIN_TEMPLATE
    sglang = SGLangClient(engine.url, timeout_s=60)
    recording = Recording(sglang)
    gateway = await served(recording, tokenizer, tool_call_parser="none")
    client = AsyncOpenAI(base_url=f"{gateway.url}/sessions/e1/v1", api_key="unused")
    messages = [{"role": "user", "content": "hello"}]
    try:
        async with asyncio.timeout(60):
            for _ in range(2):
                response = await client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=1.0,
                                                                extra_body={"ignore_eos": True})
                messages += [response.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
            (trajectory,) = gateway.chat.pop("e1")
    finally:
        await client.close()
        await gateway.stop()
        await sglang.close()
    sent, outputs = [c["input_ids"] for c in recording.calls], [a["output_ids"] for a in recording.answers]
    assert trajectory.token_ids == sent[1] + outputs[1] and sent[1][: len(sent[0]) + 6] == sent[0] + outputs[0]
    assert trajectory.finish_reason == "length" and trajectory.weight_versions == ["default", "default"]
    sampled = [i for i, m in enumerate(trajectory.loss_mask) if m]
    assert sampled == list(range(len(sent[0]), len(sent[0]) + 6)) + list(range(len(sent[1]), len(sent[1]) + 6))
    # Independent check: the recorded log-probs are the model's, by one teacher-forced forward over the whole.
    whole = ref.teacher_forced_logprobs(model_dir, trajectory.token_ids[:1], trajectory.token_ids[1:])
    assert [trajectory.log_probs[i] for i in sampled] == pytest.approx([whole[i - 1] for i in sampled], abs=1e-4)
