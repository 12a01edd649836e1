import asyncio
import random
import re

import msgpack
import pytest
import zmq
import zmq.asyncio

from rl_router import Router, RouterClient, RouterError
from rl_router.security import is_loopback_address
from rl_router.wire import encode_request

TOKEN = "s3cret-token"


def payload(i):
    return {"rid": f"r{i}", "input_ids": [i, i + 1], "sampling_params": {}}


async def test_requests_without_the_right_token_are_refused_and_counted(fake_engine, serve):
    engine = fake_engine("e0")
    async with asyncio.timeout(10), serve({"e0": engine}, auth_token=TOKEN) as (router, anonymous):
        with pytest.raises(RouterError, match="unauthorized"):
            await anonymous.generate(payload(0))
        impostor = RouterClient(router.address, auth_token="guess")
        trusted = RouterClient(router.address, auth_token=TOKEN)
        try:
            with pytest.raises(RouterError, match="unauthorized"):
                await impostor.metrics()
            with pytest.raises(RouterError, match="unauthorized"):
                await impostor.abort()
            assert (await trusted.generate(payload(1)))["output_ids"] == [2, 1]
            metrics = await trusted.metrics()
        finally:
            impostor.close()
            trusted.close()
    assert metrics["router/unauthorized"] == 3.0
    assert [c["rid"] for c in engine.calls] == ["r1"] and engine.aborts == []


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5555", "tcp://*:0", "tcp://10.1.2.3:7000", "tcp://eth0:0"])
def test_binding_beyond_loopback_without_a_token_is_refused_naming_the_address(fake_engine, address):
    with pytest.raises(ValueError, match=re.escape(f"router address '{address}' is not loopback; pass auth_token=")):
        Router({"e0": fake_engine("e0")}, address=address)
    Router({"e0": fake_engine("e0")}, address=address, auth_token=TOKEN)  # allowed with a token (not started)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:0", True),
        ("tcp://127.3.2.1:9", True),
        ("tcp://localhost:80", True),
        ("tcp://[::1]:80", True),
        ("ipc:///tmp/router.sock", True),
        ("tcp://192.168.0.1:80", False),
        ("tcp://[::]:80", False),
        ("ws://127.0.0.1:80", False),
    ],
)
def test_loopback_addresses_are_told_apart_from_reachable_ones(address, loopback):
    assert is_loopback_address(address) is loopback


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="auth_token must be a non-empty string"):
        Router({}, auth_token="")


def fuzz_messages(rng):
    good = encode_request(1, "generate", payload(1), TOKEN)
    untrusted = encode_request(7, "generate", payload(7))  # bit flips of it that stay valid are unauthorized
    yield from (rng.randbytes(rng.randrange(0, 3000)) for _ in range(300))  # random bytes
    yield from (good[:cut] for cut in range(len(good)))  # truncated msgpack at every length
    yield from (bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in untrusted) for _ in range(200))
    yield b"\x91" * 100_000  # arrays nested 100k deep
    yield b"\xdb\xff\xff\xff\xff" + b"x" * 100  # a string claiming 4 GiB
    yield rng.randbytes(3 * 1024 * 1024)  # huge frame, over the 1 MiB limit
    yield encode_request(2, "generate", {"input_ids": list(range(400_000))}, TOKEN)  # huge but well formed
    yield msgpack.packb({"id": 3, "op": "generate", "token": 42, "body": {}})
    yield msgpack.packb({"id": 4, "op": "generate", "token": TOKEN, "body": {"rid": ["x"]}})
    yield msgpack.packb({"id": 5, "op": "abort", "token": TOKEN, "body": "everything"})
    yield msgpack.packb({"id": -1})
    yield encode_request(6, "generate", payload(6))  # no token


async def test_fuzzed_frames_never_get_an_ok_reply_and_normal_requests_still_work_afterwards(fake_engine, serve):
    rng = random.Random(1234)
    engine = fake_engine("e0")
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    replies = []
    try:
        async with asyncio.timeout(30), serve({"e0": engine}, auth_token=TOKEN, max_message_bytes=1024 * 1024) as (
            router,
            _,
        ):
            raw.connect(router.address)
            sent = 0
            for message in fuzz_messages(rng):
                await raw.send(message)
                sent += 1
            await raw.send_multipart([b"", b"", b"extra", rng.randbytes(10)])
            await raw.send_multipart([rng.randbytes(100)] * 5)
            while await raw.poll(500):
                replies.append(msgpack.unpackb(await raw.recv(), raw=False))
            client = RouterClient(router.address, auth_token=TOKEN)
            try:
                answers = await asyncio.gather(*(client.generate(payload(i)) for i in range(100, 150)))
                metrics = await client.metrics()
            finally:
                client.close()
    finally:
        raw.close()
        context.term()
    assert sent > 500
    assert replies and not any(reply.get("ok") for reply in replies)
    assert [a["output_ids"] for a in answers] == [[i + 1, i] for i in range(100, 150)]
    assert [c["rid"] for c in engine.calls] == [f"r{i}" for i in range(100, 150)]  # no fuzz reached the engine
    assert metrics["router/malformed/oversize"] == 2.0
    # every fuzzed message is counted once, except the well-formed one with a bad rid (an error reply);
    # the two multi-frame messages count as bad frames
    assert metrics["router/malformed_messages"] + metrics["router/unauthorized"] == sent - 1 + 2
    assert metrics["router/malformed/bad_frames"] == 2.0
