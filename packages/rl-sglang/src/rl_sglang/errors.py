"""Errors shared by the client, the launcher and the weight transports (no torch import here)."""

from __future__ import annotations

from typing import Any


class EngineError(RuntimeError):
    """An engine answered a route with a non-success status or `success: false`."""

    def __init__(self, route: str, status: int, body: Any):
        self.route = route
        self.status = status
        self.body = body
        super().__init__(f"{route} answered {status}: {body!r}")
