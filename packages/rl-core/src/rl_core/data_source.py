"""Prompt data from a JSONL or Parquet file: validated up front, grouped, shuffled per epoch, resumable."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from rl_core.prompt_files import DataError, read_records
from rl_core.protocols import BufferFilter
from rl_core.sample import Sample, SampleStatus

__all__ = ["DataError", "JsonlDataSource", "PromptRow", "PromptTokenizer", "load_prompt_rows", "pop_first"]


class PromptTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the data source uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict[str, Any]]
    text: str
    """The prompt as the engine sees it: the chat template applied if asked for."""
    token_ids: list[int]
    label: Any
    metadata: dict[str, Any]


def _render(
    prompt: str | list[dict[str, Any]],
    tokenizer: PromptTokenizer,
    apply_chat_template: bool,
    tools: list[Any] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    if apply_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        kwargs = dict(template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if not isinstance(prompt, str):
        raise TypeError("chat messages need --apply-chat-template")
    return prompt


def load_prompt_rows(
    path: str | Path,
    *,
    input_key: str = "prompt",
    label_key: str | None = "label",
    metadata_key: str = "metadata",
    tokenizer: PromptTokenizer,
    apply_chat_template: bool = False,
    max_prompt_len: int | None = None,
    tool_key: str | None = None,
    apply_chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[PromptRow]:
    """Read, check and tokenize every row of a JSONL or Parquet file, or of its `path@[start:end]` slice; the
    first bad row raises a DataError naming `path:line` (JSONL) or `path: row N` (Parquet). The tokenizer is
    required: a prompt without token ids reaches the engine as an empty request. A row's `tool_key` list (or
    its JSON string) goes to the chat template as `tools=` and into the sample's metadata["tools"], as slime does."""
    rows: list[PromptRow] = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if input_key not in record:
            raise DataError(f"{where}: no key {input_key!r} (--input-key); keys are {sorted(record)}")
        prompt = record[input_key]
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(m, dict) for m in prompt)):
            raise DataError(f"{where}: {input_key!r} must be a string or a list of chat messages")
        if label_key is not None and label_key not in record:
            raise DataError(f"{where}: no key {label_key!r} (--label-key); keys are {sorted(record)}")
        tools = _tools(record, tool_key, where)
        try:
            text = _render(prompt, tokenizer, apply_chat_template, tools, apply_chat_template_kwargs)
        except TypeError as e:
            raise DataError(f"{where}: {e}") from None
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if max_prompt_len is not None and len(token_ids) > max_prompt_len:
            raise DataError(
                f"{where}: prompt is {len(token_ids)} tokens, longer than rollout_max_prompt_len ({max_prompt_len})"
            )
        metadata = record.get(metadata_key) or {}
        if not isinstance(metadata, dict):
            raise DataError(f"{where}: {metadata_key!r} must be an object")
        label = record.get(label_key) if label_key is not None else None
        metadata = dict(metadata)
        if tools is not None:
            metadata["tools"] = tools
        rows.append(PromptRow(prompt, text, list(token_ids), label, metadata))
    if not rows:
        raise DataError(f"{path}: no prompts in file")
    return rows


def _tools(record: Mapping[str, Any], tool_key: str | None, where: str) -> list[Any] | None:
    """The row's tool list under `tool_key` (a list, or a JSON string of one); None when the row has none."""
    if tool_key is None or record.get(tool_key) is None:
        return None
    tools = record[tool_key]
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {tool_key!r} (--tool-key) is a string but not JSON ({e})") from None
    if not isinstance(tools, list):
        raise DataError(f"{where}: {tool_key!r} (--tool-key) must be a list of tools, got {type(tools).__name__}")
    return tools


def pop_first(buffer: Sequence[list[Sample]], num_groups: int) -> list[int]:
    """The default buffer selection: the oldest groups first."""
    return list(range(min(num_groups, len(buffer))))


def _fresh(sample: Sample) -> Sample:
    """The sample as it was before generation: prompt tokens only, nothing sampled or scored."""
    return Sample(
        group_index=sample.group_index,
        index=sample.index,
        prompt=sample.prompt,
        label=sample.label,
        tokens=sample.tokens[: sample.prompt_length],
        metadata=sample.metadata,
    )


def _continued(sample: Sample) -> Sample:
    """The sample with its tokens so far, to be generated on: PENDING again, not scored."""
    return sample.model_copy(update={"status": SampleStatus.PENDING, "reward": None}, deep=True)


class JsonlDataSource:
    """Serves `n_samples_per_prompt` copies of each prompt as one group, epoch after epoch.

    Groups handed back with `add_samples` (aborted or filtered out) wait in a buffer and are served before
    new prompts; `buffer_filter` picks which of them go first (slime's --buffer-filter-path).
    The rows may come from JSONL or Parquet: the name is kept for the callers.
    """

    def __init__(
        self,
        rows: list[PromptRow],
        *,
        n_samples_per_prompt: int,
        shuffle: bool = False,
        seed: int = 42,
        buffer_filter: BufferFilter = pop_first,
    ) -> None:
        self.rows = rows
        self.n_samples_per_prompt = n_samples_per_prompt
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_filter = buffer_filter
        self.epoch = 0
        self.offset = 0
        self.next_group_index = 0
        self.next_sample_index = 0
        self._order = self._epoch_order(0)
        self._returned: list[list[Sample]] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def _next_row(self) -> PromptRow:
        if self.offset == len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order(self.epoch)
        row = self.rows[self._order[self.offset]]
        self.offset += 1
        return row

    def _group(self, row: PromptRow) -> list[Sample]:
        group = []
        for _ in range(self.n_samples_per_prompt):
            group.append(
                Sample(
                    group_index=self.next_group_index,
                    index=self.next_sample_index,
                    prompt=row.text,
                    label=row.label,
                    tokens=list(row.token_ids),
                    metadata=dict(row.metadata),
                )
            )
            self.next_sample_index += 1
        self.next_group_index += 1
        return group

    def _take_from_buffer(self, num_prompts: int) -> list[list[Sample]]:
        if not self._returned:
            return []
        picked = list(self.buffer_filter(self._returned, num_prompts))
        if len(set(picked)) != len(picked) or len(picked) > num_prompts or not all(0 <= i < len(self._returned) for i in picked):
            raise ValueError(
                f"buffer_filter returned indices {picked}: expected at most {num_prompts} distinct indices"
                f" into a buffer of {len(self._returned)} groups"
            )
        groups = [self._returned[i] for i in picked]
        chosen = set(picked)
        self._returned = [g for i, g in enumerate(self._returned) if i not in chosen]
        return groups

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        groups = self._take_from_buffer(num_prompts)
        while len(groups) < num_prompts:
            groups.append(self._group(self._next_row()))
        return groups

    def add_samples(self, groups: list[list[Sample]], *, partial: bool = False) -> None:
        """Take groups back, served again before new prompts. `partial` keeps what was generated so far
        (partial rollout: they are continued, not regenerated); else they start afresh from the prompt."""
        for group in groups:
            self._returned.append([_continued(s) if partial else _fresh(s) for s in group])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "next_group_index": self.next_group_index,
            "next_sample_index": self.next_sample_index,
            "returned": [[s.model_dump(mode="json") for s in g] for g in self._returned],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.next_group_index = int(state["next_group_index"])
        self.next_sample_index = int(state["next_sample_index"])
        self._order = self._epoch_order(self.epoch)
        self._returned = [[Sample.model_validate(s) for s in g] for g in state.get("returned", [])]
