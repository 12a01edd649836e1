"""The msgpack wire format between `RouterClient` and `Router` (never pickle).

Requests are `{"id": int, "op": str, "token": str (only when the router wants one), "body": ...}`;
replies are `{"id", "ok": True, "body"}` or
`{"id", "ok": False, "error": str}`. Clients write `id` first so that the router can still read it
from a message it refuses to decode in full (an oversize one) and answer with an error.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard

import msgpack

OPS = frozenset({"generate", "abort", "health", "metrics"})


class MalformedMessage(ValueError):
    """A message the router cannot serve; `reason` is the metrics label, `msg_id` is set if readable."""

    def __init__(self, reason: str, detail: str, msg_id: int | None = None):
        super().__init__(detail)
        self.reason = reason
        self.msg_id = msg_id


class WireRequest(NamedTuple):
    id: int
    op: str
    body: Any
    token: str | None = None


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def encode_request(msg_id: int, op: str, body: Any, token: str | None = None) -> bytes:
    if token is None:
        return encode({"id": msg_id, "op": op, "body": body})
    return encode({"id": msg_id, "op": op, "token": token, "body": body})


def encode_ok(msg_id: int, body: Any) -> bytes:
    return encode({"id": msg_id, "ok": True, "body": body})


def encode_error(msg_id: int, error: str) -> bytes:
    return encode({"id": msg_id, "ok": False, "error": error})


def _is_id(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_abort_body(body: Any) -> bool:
    if body is None:
        return True
    if not isinstance(body, dict):
        return False
    rid = body.get("rid")
    return rid is None or isinstance(rid, str) or (isinstance(rid, list) and all(isinstance(r, str) for r in rid))


def peek_message_id(data: bytes) -> int | None:
    """Read `id` from the leading keys of a msgpack map without decoding the (possibly huge) body."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                return value if _is_id(value) else None
            unpacker.skip()
    except Exception:  # any decoding failure simply means "no readable id"
        return None
    return None


def parse_request(data: bytes, max_bytes: int) -> WireRequest:
    """Decode and validate one request frame; raises `MalformedMessage` naming what is wrong."""
    if len(data) > max_bytes:
        raise MalformedMessage(
            "oversize", f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes", peek_message_id(data)
        )
    try:
        message = decode(data)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedMessage("not_msgpack", f"message is not valid msgpack: {exc}", peek_message_id(data)) from None
    if not isinstance(message, dict):
        raise MalformedMessage("bad_shape", f"message must be a map, got {type(message).__name__}")
    msg_id = message.get("id")
    if not _is_id(msg_id):
        raise MalformedMessage("bad_shape", "field 'id' must be an integer")
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise MalformedMessage("bad_shape", f"field 'op' must be one of {sorted(OPS)}, got {op!r}", msg_id)
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise MalformedMessage("bad_shape", "field 'token' must be a string", msg_id)
    body = message.get("body")
    if op == "generate" and not isinstance(body, dict):
        raise MalformedMessage("bad_shape", "field 'body' of a generate request must be a map", msg_id)
    if op == "abort" and not _is_abort_body(body):
        raise MalformedMessage(
            "bad_shape", "field 'body' of an abort request must be {'rid': str | [str, ...] | None}", msg_id
        )
    return WireRequest(id=msg_id, op=op, body=body, token=token)
