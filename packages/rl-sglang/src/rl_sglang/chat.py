"""OpenAI's `/v1/chat/completions` in front of a payload engine, recording each conversation token for token.

An agent written against the OpenAI client talks text; training needs the exact tokens the engine saw and
sampled. Each request names a session (`X-Session-Id` header, or the `/sessions/{id}/v1` base URL); the
session keeps the conversation's token ids, loss mask and log-probs. A request that continues the
session's conversation (the same earlier messages and tools, then the assistant reply this endpoint gave,
then new messages) is sent to the engine as the recorded tokens plus the chat template's rendering of the
new messages only, so the sampled tokens stay exactly as sampled even where re-tokenising their text, or
the template's re-rendering of an assistant turn (tool calls re-serialised), would give other tokens. A
request that does not continue it starts a new trajectory in the session. See docs/agents.md.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout

from rl_core.generation import FinishReason
from rl_core.trajectory import Trajectory
from rl_sglang.generation import PayloadEngine, parse_answer
from rl_sglang.tool_parsers import build_tool_call_parser

SESSION_HEADER = "X-Session-Id"

# OpenAI request fields -> SGLang sampling_params (SGLang's own extras pass under their names).
_RENAMED = {"max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens"}
_PASSED = ("temperature", "top_p", "stop", "frequency_penalty", "presence_penalty", "top_k", "min_p",
           "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "skip_special_tokens")
_IGNORED = {"model", "messages", "tools", "tool_choice", "stream", "stream_options", "n", "user", "metadata",
            "parallel_tool_calls", "chat_template_kwargs", "store"}


class ChatRequestError(ValueError):
    """A request this endpoint cannot serve as asked (answered with HTTP 400 and this message)."""


class TurnLimitError(ChatRequestError):
    """A session asked for more calls than `max_turns` (rl-train's --max-turns). A 400, not slime's 429:
    OpenAI clients retry a 429 with back-off, which would only delay the same answer."""


@dataclass
class _Branch:
    """One linear conversation: its tokens so far and what the last call was asked and answered."""

    token_ids: list[int]
    loss_mask: list[int]
    log_probs: list[float]
    prompt_length: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    reply: dict[str, Any] = field(default_factory=dict)
    last_output_ids: list[int] = field(default_factory=list)
    weight_versions: list[str] = field(default_factory=list)
    finish_reason: FinishReason = "stop"


@dataclass
class ChatSession:
    session_id: str
    branches: list[_Branch] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    calls: int = 0


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ChatRequestError(f"{where}.content: only text (a string or text parts) is supported")


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _clean(messages: Any) -> list[dict[str, Any]]:
    """The request's messages without null fields (as compared between turns)."""
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatRequestError(f"messages[{i}] must be an object with a 'role'")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates expect them: text content, tool-call arguments as objects."""
    rendered = []
    for i, m in enumerate(messages):
        r = {k: v for k, v in m.items() if k in ("role", "name", "tool_call_id", "reasoning_content")}
        r["content"] = _text_content(m.get("content"), f"messages[{i}]")
        if m.get("tool_calls"):
            r["tool_calls"] = [
                {**call, "function": {**call.get("function", {}), "arguments": _arguments(call.get("function", {}).get("arguments"))}}
                for call in m["tool_calls"]
            ]
        rendered.append(r)
    return rendered


def _reply_key(message: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies an assistant reply when an agent echoes it back (ids and null fields aside)."""
    calls = tuple((c.get("function", {}).get("name"), json.dumps(_arguments(c.get("function", {}).get("arguments")), sort_keys=True))
                  for c in message.get("tool_calls") or ())
    return message.get("role"), _text_content(message.get("content"), "assistant message"), calls


def _overlap(text: str, closing: str) -> int:
    """Length of the longest head of `closing` that `text` already ends with."""
    for k in range(min(len(text), len(closing)), 0, -1):
        if text.endswith(closing[:k]):
            return k
    return 0


class ChatCompletions:
    """The endpoint's logic, apart from HTTP: `create` answers one request, `trajectories` / `pop` give a
    session's recorded trajectories. `tokenizer` is the served model's; requests are refused while it has no
    chat template. With `max_turns`, a session's call past that many is refused (`TurnLimitError`) and its
    last trajectory ends as cut by length (a TRUNCATED sample)."""

    def __init__(self, engine: PayloadEngine, tokenizer: Any, *, tool_call_parser: str = "qwen25",
                 max_sessions: int = 100_000, max_turns: int | None = None) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.max_turns = max_turns
        self.parser = build_tool_call_parser(tool_call_parser)
        self.max_sessions = max_sessions
        self.model_name = str(getattr(tokenizer, "name_or_path", "") or "model")
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._sentinel = f"rlsentinel{uuid.uuid4().hex}"

    # --- one request -----------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], session_id: str | None = None) -> dict[str, Any]:
        """The OpenAI chat.completion answer to `body`; recorded under `session_id` when given."""
        messages, tools, sampling_params, template_kwargs = self._parse(body)
        session = self._session(session_id) if session_id else ChatSession("")
        async with session.lock:
            if self.max_turns is not None and session_id and session.calls >= self.max_turns:
                if session.branches:
                    session.branches[-1].finish_reason = "length"
                raise TurnLimitError(f"session {session_id!r} has had its {self.max_turns} calls (--max-turns);"
                                     " its trajectory ends here, truncated")
            session.calls += 1
            branch, new_ids = self._extend(session, messages, tools, template_kwargs)
            input_ids = branch.token_ids + new_ids
            output = await self.engine.generate({"input_ids": input_ids, "sampling_params": sampling_params,
                                                 "return_logprob": True, "rid": f"chat-{uuid.uuid4().hex}"})
            answer = parse_answer(output)
            if answer.log_probs is None:
                raise RuntimeError("the engine answered without log-probs (return_logprob was asked)")
            parsed = self.parser.parse(answer.text, tools or [])
            reply: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                reply["tool_calls"] = parsed.tool_calls
            self._record(session, branch, new_ids, answer, messages, tools, reply)
        finish = "tool_calls" if parsed.tool_calls and answer.finish_reason == "stop" else answer.finish_reason
        return self._response(body, reply, finish, len(input_ids), len(answer.output_ids))

    def _parse(self, body: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any], dict[str, Any]]:
        if not isinstance(body, dict):
            raise ChatRequestError("body must be a JSON object")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatRequestError(f"the tokenizer of {self.model_name} has no chat template; /v1/chat/completions needs one")
        if body.get("n", 1) != 1:
            raise ChatRequestError(f"n={body['n']} is not supported: send one request per sample")
        if body.get("logprobs") or body.get("top_logprobs"):
            raise ChatRequestError("logprobs are not returned here; the session records them (see docs/agents.md)")
        if body.get("response_format") not in (None, {"type": "text"}):
            raise ChatRequestError("response_format other than text is not supported")
        tools = body.get("tools") or None
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ChatRequestError("'tools' must be a list of objects")
        choice = body.get("tool_choice", "auto")
        if choice == "none":
            tools = None  # as SGLang: the template is not shown the tools
        elif choice not in ("auto", None):
            raise ChatRequestError(f"tool_choice={choice!r} is not supported (it needs constrained decoding); use 'auto'")
        unknown = sorted(set(body) - _IGNORED - set(_RENAMED) - set(_PASSED) - {"logprobs", "top_logprobs", "response_format", "seed"})
        if unknown:
            raise ChatRequestError(f"request field {unknown[0]!r} is not supported")
        if body.get("seed") is not None:
            raise ChatRequestError("'seed' is not supported: the engines seed themselves")
        sampling_params = {name: body[name] for name in _PASSED if body.get(name) is not None}
        for name, target in _RENAMED.items():
            if body.get(name) is not None:
                sampling_params[target] = body[name]
        template_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(template_kwargs, dict):
            raise ChatRequestError("'chat_template_kwargs' must be an object")
        return _clean(body.get("messages")), tools, sampling_params, template_kwargs

    # --- the session's tokens --------------------------------------------------------------------

    def _session(self, session_id: str) -> ChatSession:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = ChatSession(session_id)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        self._sessions.move_to_end(session_id)
        return session

    def _render(self, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool, kwargs: dict[str, Any]) -> str:
        return self.tokenizer.apply_chat_template(_for_template(messages), tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt, **kwargs)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _continues(self, branch: _Branch, messages: list[dict[str, Any]], tools: Any) -> bool:
        n = len(branch.messages)
        return (len(messages) > n and tools == branch.tools and messages[:n] == branch.messages
                and messages[n].get("role") == "assistant" and _reply_key(messages[n]) == _reply_key(branch.reply))

    def _extend(self, session: ChatSession, messages, tools, kwargs) -> tuple[_Branch, list[int]]:
        """The branch this request continues (or a new one) and the new tokens to send after its tokens."""
        branch = session.branches[-1] if session.branches else None
        if branch is None or not self._continues(branch, messages, tools):
            prompt = self._encode(self._render(messages, tools, True, kwargs))
            return _Branch([], [], [], len(prompt)), prompt
        # The template's rendering of what follows the assistant turn: render the earlier messages with a
        # sentinel reply, with and without the new messages; the difference is the new messages' text, and
        # what follows the sentinel is the template's end of an assistant turn.
        n = len(branch.messages)
        base = branch.messages + [{"role": "assistant", "content": self._sentinel}]
        base_text = self._render(base, tools, False, kwargs)
        full_text = self._render(base + messages[n + 1 :], tools, True, kwargs)
        if self._sentinel not in base_text or not full_text.startswith(base_text):
            raise ChatRequestError("the chat template renders earlier turns differently once new messages follow; "
                                   "the recorded tokens cannot be extended (start a new session)")
        closing = base_text[base_text.rindex(self._sentinel) + len(self._sentinel) :]
        sampled = self.tokenizer.decode(branch.last_output_ids, skip_special_tokens=False)
        closing = closing[_overlap(sampled, closing) :]  # the part of the turn's end the engine did not sample
        return branch, self._encode(closing + full_text[len(base_text) :])

    def _record(self, session, branch, new_ids, answer, messages, tools, reply) -> None:
        if not session.branches or session.branches[-1] is not branch:
            session.branches.append(branch)
        branch.token_ids += new_ids + answer.output_ids
        branch.loss_mask += [0] * len(new_ids) + [1] * len(answer.output_ids)
        branch.log_probs += [0.0] * len(new_ids) + list(answer.log_probs or [])
        if answer.weight_version is not None:
            branch.weight_versions.append(answer.weight_version)
        branch.messages, branch.tools, branch.reply = messages, tools, reply
        branch.last_output_ids, branch.finish_reason = list(answer.output_ids), answer.finish_reason

    def _response(self, body, reply, finish, prompt_tokens, completion_tokens) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    # --- retrieval -------------------------------------------------------------------------------

    def trajectories(self, session_id: str) -> list[Trajectory]:
        """The session's trajectories (one per conversation it held), oldest first; KeyError when unknown."""
        return [self._trajectory(b) for b in self._sessions[session_id].branches]

    def pop(self, session_id: str) -> list[Trajectory]:
        """`trajectories`, and forget the session."""
        found = self.trajectories(session_id)
        del self._sessions[session_id]
        return found

    def _trajectory(self, branch: _Branch) -> Trajectory:
        response = branch.token_ids[branch.prompt_length :]
        return Trajectory(token_ids=branch.token_ids, loss_mask=branch.loss_mask, log_probs=branch.log_probs,
                          prompt_length=branch.prompt_length, weight_versions=branch.weight_versions,
                          finish_reason=branch.finish_reason,
                          response_text=self.tokenizer.decode(response, skip_special_tokens=False))


def stream_chunks(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat.completion as OpenAI's stream of chat.completion.chunk objects (the whole message in one delta)."""
    choice = answer["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    head = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    return [
        head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]},
        head | {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}]},
    ]


async def pop_session(base_url: str, session_id: str) -> list[Trajectory]:
    """The trajectories recorded under `session_id` by the endpoint at `base_url` (".../v1"), which then
    forgets the session."""
    async with ClientSession(timeout=ClientTimeout(total=60)) as http:
        async with http.delete(f"{base_url.rstrip('/')}/sessions/{session_id}") as response:
            body = await response.text()
    if response.status >= 400:
        raise RuntimeError(f"DELETE {base_url}/sessions/{session_id} answered {response.status}: {body[:500]}")
    return [Trajectory.model_validate(t) for t in json.loads(body)["trajectories"]]


__all__ = ["SESSION_HEADER", "ChatCompletions", "ChatRequestError", "ChatSession", "TurnLimitError", "pop_session",
           "stream_chunks"]
