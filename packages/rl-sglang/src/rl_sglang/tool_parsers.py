"""Tool calls out of generated text, in OpenAI's shape, as SGLang's `--tool-call-parser` gives them.

`qwen25` (alias `hermes`: the same format) reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks, as SGLang's Qwen25Detector does: the content is the text before the first block, stripped (None
when empty), each block's JSON names a function and its arguments (`parameters` is accepted too), calls to
functions not in the request's `tools` are dropped, and text whose blocks do not parse as JSON stays plain
content with no tool calls. `none` never parses: the whole text is the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ParsedOutput:
    content: str | None
    """The text for the message's `content` (None when a tool-call block leaves nothing before it)."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI's `tool_calls` entries: {"id", "type": "function", "function": {"name", "arguments": JSON text}}."""


class ToolCallParser(Protocol):
    def parse(self, text: str, tools: list[dict[str, Any]]) -> ParsedOutput: ...


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    """The function names a request offers (OpenAI's `tools`: [{"type": "function", "function": {"name"}}])."""
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    return {f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)}


def openai_tool_call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class TaggedJsonParser:
    """JSON tool calls between an opening and a closing tag (Qwen 2.5 / Hermes: `<tool_call>`)."""

    def __init__(self, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self._block = re.compile(re.escape(open_tag) + r"(.*?)" + re.escape(close_tag), re.DOTALL)

    def parse(self, text: str, tools: list[dict[str, Any]]) -> ParsedOutput:
        start = text.find(self.open_tag)
        if start == -1:
            return ParsedOutput(content=text)
        try:
            actions = [json.loads(block) for block in self._block.findall(text)]
        except json.JSONDecodeError:
            return ParsedOutput(content=text)
        offered = tool_names(tools)
        calls = []
        for action in actions:
            for act in action if isinstance(action, list) else [action]:
                if isinstance(act, dict) and act.get("name") in offered:
                    arguments = act.get("parameters") or act.get("arguments") or {}
                    calls.append(openai_tool_call(act["name"], arguments))
        return ParsedOutput(content=text[:start].strip() or None, tool_calls=calls)


class NoToolCalls:
    def parse(self, text: str, tools: list[dict[str, Any]]) -> ParsedOutput:
        return ParsedOutput(content=text)


TOOL_CALL_PARSERS = {"qwen25": TaggedJsonParser, "hermes": TaggedJsonParser, "none": NoToolCalls}


def build_tool_call_parser(name: str) -> ToolCallParser:
    """The parser named `name` (SGLang's `--tool-call-parser` names where they match)."""
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]()
