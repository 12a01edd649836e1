"""HTTP plumbing shared by the embedded engine's route modules: JSON bodies, SGLang's error shapes."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

logger = logging.getLogger("rl_sglang.embedded.server")


class BadRequest(ValueError):
    """Client error; answered with HTTP 400 and the message."""


def weights_answer(success: bool, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


def parse(make):
    try:
        return make()
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    except web.HTTPException:
        raise
    except Exception as exc:
        logger.exception("%s failed", request.path)
        return web.json_response({"error": {"message": f"{type(exc).__name__}: {exc}"}}, status=500)
