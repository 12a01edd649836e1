"""Supervised fine-tuning rows (JSONL or Parquet) as token ids with a loss mask, ready for a TrainBatch.

A row is either chat `messages` (a list of {role, content}), trained on its assistant turns only, or a
prompt with a response, trained on the response. Chat rows are rendered with the tokenizer's chat
template one turn at a time: each turn's tokens are what the template adds to the conversation before
it, and an assistant turn is split into its header (the template's generation prompt, not trained on)
and the rest (content and end-of-turn marker, trained on). Token ids so match what an engine sees at
inference: the prompt rendered with the generation prompt, then the sampled answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rl_core.data_source import PromptTokenizer
from rl_core.prompt_files import DataError, read_records
from rl_core.train_batch import TrainBatch


@dataclass(frozen=True)
class SFTExample:
    """One row as a training sample: the trained part is a suffix of `tokens` (the TrainBatch response)."""

    where: str
    """`path:line` (JSONL) or `path: row N` (Parquet) of the row."""
    tokens: list[int]
    """Every token up to the last trained one (a trailing turn that is not trained on is dropped)."""
    response_length: int
    """Tokens from the first trained token to the end."""
    loss_mask: list[int]
    """Over the response part: 1 on assistant (response) tokens, 0 on the user/system/tool turns between them."""


def _render(tokenizer: PromptTokenizer, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def chat_pieces(tokenizer: PromptTokenizer, messages: list[dict[str, Any]], where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the rendered conversation, turn by turn."""
    pieces: list[tuple[str, bool]] = []
    before = ""

    def extend(text: str, turn: int, trained: bool) -> None:
        nonlocal before
        if not text.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render message {turn} as an extension of the messages"
                " before it (it rewrites earlier turns), so the assistant tokens cannot be located turn by turn"
            )
        pieces.append((text[len(before) :], trained))
        before = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(_render(tokenizer, messages[:i], generation_prompt=True), i, False)
            extend(_render(tokenizer, messages[: i + 1], generation_prompt=False), i, True)
        else:
            extend(_render(tokenizer, messages[: i + 1], generation_prompt=False), i, False)
    return pieces


def _check_messages(messages: Any, where: str, key: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of chat messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} of {key!r} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {key!r} has no assistant message, so nothing to train on")
    return messages


def _example(where: str, pieces: Sequence[tuple[list[int], bool]]) -> SFTExample:
    tokens = [t for ids, _ in pieces for t in ids]
    mask = [int(trained) for ids, trained in pieces for _ in ids]
    if 1 not in mask:
        raise DataError(f"{where}: the response tokenizes to no tokens, so nothing to train on")
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    if first == 0:
        raise DataError(f"{where}: the first trained token is the row's first token; it needs a prompt token before it")
    return SFTExample(where, tokens[:last], last - first, mask[first:last])


def sft_example(
    record: Any,
    where: str,
    tokenizer: PromptTokenizer,
    *,
    input_key: str = "messages",
    response_key: str = "response",
    apply_chat_template: bool = False,
    eos_token_id: int | None = None,
) -> SFTExample:
    """One row as an SFTExample. `record[input_key]` is chat messages (a `record[response_key]` string,
    when present, is appended as the final assistant turn) or a prompt string with its response in
    `record[response_key]`: rendered as a user and an assistant turn with `apply_chat_template`, else
    prompt tokens then response tokens then `eos_token_id` (when given), so the model learns to stop."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if input_key not in record:
        raise DataError(f"{where}: no key {input_key!r} (--input-key); keys are {sorted(record)}")
    prompt, response = record[input_key], record.get(response_key)
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: {response_key!r} (--response-key) must be a string")
    if isinstance(prompt, str):
        if response is None:
            raise DataError(f"{where}: {input_key!r} is a prompt string but the row has no {response_key!r} (--response-key)")
        if not apply_chat_template:
            response_ids = tokenizer.encode(response, add_special_tokens=False) + ([] if eos_token_id is None else [eos_token_id])
            return _example(where, [(tokenizer.encode(prompt, add_special_tokens=False), False), (response_ids, True)])
        prompt = [{"role": "user", "content": prompt}]
    messages = _check_messages(prompt + ([{"role": "assistant", "content": response}] if response is not None else []),
                               where, input_key)
    try:
        pieces = chat_pieces(tokenizer, messages, where)
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: the tokenizer's chat template failed on this row ({e})") from None
    return _example(where, [(tokenizer.encode(text, add_special_tokens=False), trained) for text, trained in pieces])


def load_sft_examples(path: str | Path, tokenizer: PromptTokenizer, **options: Any) -> list[SFTExample]:
    """Every row of a JSONL/Parquet file (or its `path@[start:end]` slice) as an SFTExample; the first bad row
    raises a DataError naming its file and line. `options` are `sft_example`'s keywords."""
    examples = [sft_example(record, where, tokenizer, **options) for where, record in read_records(path)]
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def sft_batch(examples: Sequence[SFTExample]) -> TrainBatch:
    """The TrainBatch of some examples (advantages are zero: the SFT loss does not read them)."""
    return TrainBatch(
        tokens=[list(e.tokens) for e in examples],
        response_lengths=[e.response_length for e in examples],
        loss_masks=[list(e.loss_mask) for e in examples],
        advantages=[[0.0] * e.response_length for e in examples],
    )
