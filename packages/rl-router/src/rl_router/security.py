"""Shared-token check and the rule that only loopback addresses may be bound without a token.

The token travels in clear inside each message: it keeps stray or misconfigured clients on a trusted
cluster network out, not an eavesdropper (use a private network or a tunnel for that).
"""

from __future__ import annotations

import hmac
import ipaddress

# ZeroMQ transports that can reach other machines; ipc/inproc stay local, unknown ones fail to bind.
_NETWORK_TRANSPORTS = ("tcp://", "udp://", "ws://", "wss://", "pgm://", "epgm://", "tipc://", "vmci://")


def is_loopback_address(address: str) -> bool:
    """False only for a network transport on a host other than loopback (127.0.0.0/8, ::1, localhost)."""
    if not address.startswith(_NETWORK_TRANSPORTS):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    host = host.rsplit(";", 1)[-1]  # `tcp://source;host:port` binds `host`
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or `*`: may reach other hosts
        return False


def check_bind_allowed(address: str, auth_token: str | None) -> None:
    """Refuse a token-less router on an address other machines can reach."""
    if auth_token is not None and (not isinstance(auth_token, str) or not auth_token):
        raise ValueError("auth_token must be a non-empty string (or None on a loopback address)")
    if auth_token is None and not is_loopback_address(address):
        raise ValueError(
            f"router address {address!r} is not loopback; pass auth_token= to bind it "
            "(requests without the token are then refused)"
        )


def token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; everything matches when no token is configured."""
    if expected is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
