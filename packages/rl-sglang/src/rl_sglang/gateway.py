"""SGLang's `/generate` over HTTP in front of any payload engine (in rl-train: the router's client).

slime's custom generate functions post SGLang payloads to `http://{args.sglang_router_ip}:
{args.sglang_router_port}/generate`; this gateway is that address here, so such functions reach the router
(and its middleware, retries and engine faults) unchanged. `post` is slime's helper of the same name.

Given the model's tokenizer, it also serves OpenAI's `/v1/chat/completions` (see `rl_sglang.chat` and
docs/agents.md), so an agent written against the OpenAI client reaches the same engines.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, web

from rl_sglang.chat import SESSION_HEADER, ChatCompletions, ChatRequestError, TurnLimitError, stream_chunks
from rl_sglang.generation import PayloadEngine


class GenerateGateway:
    """`POST /generate` (an SGLang payload in, its answer out) and `GET /health`, on a loopback port; with a
    `tokenizer`, also `POST /v1/chat/completions` (or `/sessions/{id}/v1/chat/completions`), `GET /v1/models`
    and `GET` / `DELETE /v1/sessions/{id}` (a session's recorded trajectories). `tool_call_parser` and
    `max_turns` are the chat endpoint's (`rl_sglang.chat.ChatCompletions`)."""

    def __init__(self, engine: PayloadEngine, host: str = "127.0.0.1", port: int = 0, *, tokenizer: Any = None,
                 tool_call_parser: str = "qwen25", max_turns: int | None = None) -> None:
        self.engine = engine
        self.host, self.port = host, port
        self.chat = None if tokenizer is None else ChatCompletions(engine, tokenizer, tool_call_parser=tool_call_parser,
                                                                   max_turns=max_turns)
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Serve on the event loop this is awaited on; returns the base URL."""
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/health", self._health)
        if self.chat is not None:
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/sessions/{session_id}/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/v1/sessions/{session_id}", self._session)
            app.router.add_delete("/v1/sessions/{session_id}", self._session)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _chat_completions(self) -> ChatCompletions:
        """The chat routes are served only when there is a tokenizer, hence a ChatCompletions."""
        if self.chat is None:
            raise RuntimeError("the gateway serves no chat routes without a tokenizer")
        return self.chat

    async def _generate(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except json.JSONDecodeError as e:
            return web.json_response({"error": f"body is not JSON: {e}"}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            answer = await self.engine.generate(payload)
        except Exception as e:  # noqa: BLE001 - the caller gets the engine's or router's error, not a dropped connection
            status = getattr(e, "status", None)
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=status if isinstance(status, int) else 502)
        return web.json_response(answer)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info.get("session_id") or request.headers.get(SESSION_HEADER) or None
        try:
            body = await request.json()
            answer = await self._chat_completions().create(body, session_id)
        except TurnLimitError as e:
            return _openai_error(str(e), 400, "max_turns_exceeded")
        except (json.JSONDecodeError, ChatRequestError) as e:
            return _openai_error(str(e), 400, "invalid_request_error")
        except Exception as e:  # noqa: BLE001 - as /generate: the engine's or router's error reaches the agent
            status = getattr(e, "status", None)
            return _openai_error(f"{type(e).__name__}: {e}", status if isinstance(status, int) else 502, "engine_error")
        if not body.get("stream"):
            return web.json_response(answer)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await stream.prepare(request)
        for chunk in stream_chunks(answer):
            await stream.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self._chat_completions().model_name, "object": "model", "created": 0, "owned_by": "rl"}
        return web.json_response({"object": "list", "data": [model]})

    async def _session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        try:
            chat = self._chat_completions()
            found = chat.pop(session_id) if request.method == "DELETE" else chat.trajectories(session_id)
        except KeyError:
            return _openai_error(f"no session {session_id!r} (never used, already deleted, or evicted)", 404, "not_found")
        return web.json_response({"session_id": session_id, "trajectories": [t.model_dump() for t in found]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _openai_error(message: str, status: int, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status)


async def post(url: str, payload: dict[str, Any], max_retries: int = 1, headers: dict[str, str] | None = None) -> Any:
    """POST `payload` as JSON and return the decoded answer (slime's `slime.utils.http_utils.post`). A refused
    connection is retried up to `max_retries` times; an error status raises at once with the server's message."""
    for attempt in range(max(1, max_retries)):
        try:
            async with ClientSession(timeout=ClientTimeout(total=None)) as session:
                async with session.post(url, json=payload, headers=headers) as response:
                    body = await response.text()
        except ClientConnectionError:
            if attempt + 1 >= max_retries:
                raise
            continue
        if response.status >= 400:
            raise RuntimeError(f"POST {url} answered {response.status}: {body[:500]}")
        return json.loads(body)
    raise AssertionError("unreachable")
