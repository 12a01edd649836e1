"""SFT rows -> token ids and loss masks, against masks built by hand from each template's known layout."""

import json

import pytest

from rl_apps.quickstart import build_char_tokenizer
from rl_core.prompt_files import DataError
from rl_core.sft_data import load_sft_examples, sft_example

# Qwen's layout: a default system turn, and an end-of-turn marker that the assistant must learn to emit.
IM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im|>system:be brief<|end|>{% endif %}"
    "{% for m in messages %}<|im|>{{ m['role'] }}:{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im|>assistant:{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "add."},
    {"role": "user", "content": "1+2="},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "and +4?"},
    {"role": "assistant", "content": "7."},
    {"role": "user", "content": "thanks"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def by_hand(tokenizer, pieces):
    """Tokens and 0/1 mask of (text, trained) pieces; the character tokenizer encodes text piece by piece."""
    tokens, mask = [], []
    for text, trained in pieces:
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens += ids
        mask += [int(trained)] * len(ids)
    return tokens, mask


def expect(example, tokens, mask):
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    assert example.tokens == tokens[:last]
    assert example.response_length == last - first
    assert example.loss_mask == mask[first:last]


def test_only_assistant_turns_are_trained_on_under_the_quickstart_template(tokenizer):
    # Template: <|role|>content per message, <|assistant|> as the generation prompt, no end marker.
    example = sft_example({"messages": CONVERSATION}, "x.jsonl:1", tokenizer)
    pieces = []
    for m in CONVERSATION[:5]:  # the trailing user turn is not trained on, so it is dropped
        if m["role"] == "assistant":
            pieces += [("<|assistant|>", False), (m["content"], True)]
        else:
            pieces.append((f"<|{m['role']}|>{m['content']}", False))
    expect(example, *by_hand(tokenizer, pieces))
    assert example.loss_mask.count(1) == len("3") + len("7.")


def test_an_assistant_turn_trains_its_end_marker_but_not_its_header(tokenizer):
    tokenizer.chat_template, saved = IM_TEMPLATE, tokenizer.chat_template
    try:
        messages = CONVERSATION[1:5]  # no system turn: the template adds its default one
        example = sft_example({"messages": messages}, "x.jsonl:1", tokenizer)
    finally:
        tokenizer.chat_template = saved
    pieces = [("<|im|>system:be brief<|end|>", False)]
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|im|>assistant:", False), (m["content"] + "<|end|>", True)]
        else:
            pieces.append((f"<|im|>{m['role']}:{m['content']}<|end|>", False))
    expect(example, *by_hand(tokenizer, pieces))


def test_a_prompt_row_trains_on_its_response_and_eos(tokenizer):
    example = sft_example({"prompt": "2+2=", "response": "4"}, "x.jsonl:1", tokenizer, input_key="prompt",
                          eos_token_id=tokenizer.eos_token_id)
    assert example.tokens == tokenizer.encode("2+2=4", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert example.response_length == 2 and example.loss_mask == [1, 1]
    chat = sft_example({"prompt": "2+2=", "response": "4"}, "x.jsonl:1", tokenizer, input_key="prompt",
                       apply_chat_template=True)
    expect(chat, *by_hand(tokenizer, [("<|user|>2+2=", False), ("<|assistant|>", False), ("4", True)]))


def test_bad_rows_are_named_by_file_and_line(tokenizer, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"messages": CONVERSATION[1:3]}, {"messages": [{"role": "user", "content": "hi"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{data}:2: 'messages' has no assistant message"):
        load_sft_examples(data, tokenizer)
    with pytest.raises(DataError, match=rf"{data}:1: no key 'prompt' \(--input-key\)"):
        load_sft_examples(data, tokenizer, input_key="prompt")
    tokenizer.chat_template, saved = "{{ messages[-1]['content'] }}", tokenizer.chat_template
    try:
        with pytest.raises(DataError, match=rf"{data}:1: the chat template does not render message 1 as an extension"):
            load_sft_examples(f"{data}@[0:1]", tokenizer)
    finally:
        tokenizer.chat_template = saved
