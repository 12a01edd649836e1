"""Engines on a cluster of several nodes: they bind an address other nodes reach, the URLs the router and the
weight sync use carry it, and an engine bound to a non-loopback address of this machine is reached through it."""

import asyncio
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import torch
from transformers import AutoModelForCausalLM

from rl_apps.addresses import engine_hosts, is_loopback, weight_sync_address
from rl_apps.engine_supervision import HoldingForwarder
from rl_router import Router, RouterClient
from rl_sglang.client import SGLangClient
from rl_sglang.launcher import free_port, http_url, launch_engine
from rl_sglang.weight_sync import BroadcastWeightTransport

NODE_IP = "10.0.0.7"
PROMPT = [3, 5, 7, 9]
GREEDY = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}


@pytest.mark.parametrize(
    ("sglang_host", "node_count", "expected"),
    [
        (None, 1, ("127.0.0.1", "127.0.0.1")),  # one node: nothing leaves loopback
        (None, 3, (NODE_IP, NODE_IP)),  # several: the node's own IP, bound and advertised
        ("0.0.0.0", 1, ("0.0.0.0", NODE_IP)),  # a wildcard bind is advertised as the node's IP
        ("::", 2, ("::", NODE_IP)),
        ("10.9.9.9", 2, ("10.9.9.9", "10.9.9.9")),  # SGLang's --host: bound and advertised as given
        ("127.0.0.1", 1, ("127.0.0.1", "127.0.0.1")),
    ],
)
def test_an_engine_binds_loopback_on_one_node_and_an_address_other_nodes_reach_on_several(sglang_host, node_count, expected):
    assert engine_hosts(sglang_host, node_count=node_count, node_ip=NODE_IP) == expected


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_a_loopback_sglang_host_on_several_nodes_is_refused_naming_the_flag(host):
    with pytest.raises(ValueError, match=f"--sglang-host {host}: a loopback address .* cluster has 2 nodes"):
        engine_hosts(host, node_count=2, node_ip=NODE_IP)


def test_engines_join_the_weight_broadcast_at_loopback_only_when_every_engine_is_on_loopback():
    assert weight_sync_address(["http://127.0.0.1:1", "http://[::1]:2"], NODE_IP) == "127.0.0.1"
    assert weight_sync_address(["http://127.0.0.1:1", "http://10.0.0.8:2"], NODE_IP) == NODE_IP


def _non_loopback_local_address() -> str:
    """This machine's own IP when it has one besides loopback, else 127.0.0.2 (Linux routes all of 127/8 to lo,
    and a socket bound to 127.0.0.2 is not reachable at 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only asks the kernel for the outgoing address
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if is_loopback(address):
        return "127.0.0.2"
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return "127.0.0.2"
    return address


def _greedy_reference(model: torch.nn.Module) -> list[int]:
    """Greedy tokens by a full forward per step (no cache): what an engine serving `model` must answer."""
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(GREEDY["sampling_params"]["max_new_tokens"]):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module")
def remote_engine(tiny_task):
    """An embedded engine as EngineActor starts it on a node of a two-node cluster: bound to that node's IP
    (here a non-loopback address of this machine), its URL carrying that IP."""
    address = _non_loopback_local_address()
    bind, advertised = engine_hosts(None, node_count=2, node_ip=address)
    process = launch_engine("embedded", str(tiny_task / "model"), host=bind, advertise_host=advertised,
                            sglang_args={"device": "cpu", "max_running_requests": 4})
    try:
        process.wait_until_healthy(180)
        yield address, process
    finally:
        process.terminate()


def test_the_router_reaches_an_engine_bound_to_a_non_loopback_address_through_the_url_it_advertises(remote_engine, tiny_task):
    address, process = remote_engine
    url = urlsplit(process.url)
    assert url.hostname == address
    with pytest.raises((urllib.error.URLError, OSError)):  # nothing listens on loopback: only the advertised URL works
        urllib.request.urlopen(f"http://127.0.0.1:{url.port}/health", timeout=5)

    async def generate() -> dict:
        async with Router({"engine0": SGLangClient(process.url, timeout_s=120)}, health_interval_s=None) as router:
            async with RouterClient(router.address) as client:
                return await asyncio.wait_for(client.generate(GREEDY), 120)

    answer = asyncio.run(generate())
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "model", dtype=torch.float32).eval()
    assert answer["output_ids"] == _greedy_reference(model)


def test_the_weight_broadcast_reaches_an_engine_bound_to_a_non_loopback_address(remote_engine, tiny_task):
    address, process = remote_engine
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "model", dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    before = asyncio.run(_generate_direct(process.url))
    master = weight_sync_address([process.url], node_ip=address)
    transport = BroadcastWeightTransport([process.url], master, backend="gloo", timeout_s=120)
    try:
        transport.update(model.named_parameters(), "moved-1")
    finally:
        transport.close()
    after = asyncio.run(_generate_direct(process.url))
    assert after["meta_info"]["weight_version"] == "moved-1"
    assert after["output_ids"] == _greedy_reference(model) != before["output_ids"]


async def _generate_direct(url: str) -> dict:
    client = SGLangClient(url, timeout_s=120)
    try:
        return await asyncio.wait_for(client.generate(GREEDY), 120)
    finally:
        await client.close()


def test_the_restart_forwarder_listens_on_the_engines_address_and_reaches_it_there(remote_engine):
    address, process = remote_engine
    forwarder = HoldingForwarder(free_port(address), host=address, hold_s=10)
    try:
        forwarder.open(int(urlsplit(process.url).port))
        with urllib.request.urlopen(http_url(address, forwarder.port) + "/health", timeout=60) as response:
            assert response.status == 200
    finally:
        forwarder.close()
