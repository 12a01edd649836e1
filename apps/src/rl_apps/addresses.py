"""Which address each part binds and which one it hands to the others, on one node or on many.

On one node everything stays on loopback, where nothing outside the machine can reach it. On a cluster of
several Ray nodes, an engine on one node is reached by the router (in the rollout manager) and by the trainers'
weight sync from other nodes, so it binds its node's IP (or the address `--sglang-host` gives, as SGLang's
--host) and its URL carries that IP. The router itself stays on loopback: its only clients live in the rollout
manager's process, so its rule that a non-loopback bind needs a shared token never comes into play.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from rl_sglang.launcher import WILDCARD_HOSTS

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: resolved elsewhere, taken as reachable from other nodes
        return False


def alive_node_count() -> int:
    import ray

    return len([node for node in ray.nodes() if node.get("Alive")])


def engine_hosts(sglang_host: str | None, *, node_count: int, node_ip: str) -> tuple[str, str]:
    """(bind, advertise) for an engine on the node at `node_ip`: loopback on a one-node cluster, the node's IP
    on several; `--sglang-host` binds the address given, and a wildcard (0.0.0.0, ::) is advertised as the
    node's IP. A loopback `--sglang-host` on several nodes is refused: the other nodes could not reach it."""
    check_engine_host(sglang_host, node_count)
    if sglang_host is None:
        host = LOOPBACK if node_count == 1 else node_ip
        return host, host
    return sglang_host, node_ip if sglang_host in WILDCARD_HOSTS else sglang_host


def check_engine_host(sglang_host: str | None, node_count: int) -> None:
    """Raise ValueError for a loopback `--sglang-host` on a cluster of several nodes."""
    if sglang_host is not None and is_loopback(sglang_host) and node_count > 1:
        raise ValueError(
            f"--sglang-host {sglang_host}: a loopback address is reachable only from its own node, but the Ray"
            f" cluster has {node_count} nodes (the router and the trainers may run on others); give the node's"
            " address or 0.0.0.0, or drop the flag (engines then bind their node's IP)"
        )


def weight_sync_address(engine_urls: list[str], node_ip: str) -> str:
    """The address engines join the trainer's weight-broadcast group at: loopback when every engine is on
    loopback (so on this node), else this trainer node's IP."""
    hosts = [urlsplit(url).hostname or "" for url in engine_urls]
    return LOOPBACK if all(is_loopback(h) for h in hosts) else node_ip
