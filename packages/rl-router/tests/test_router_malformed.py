import asyncio
import random

import msgpack
import pytest
import zmq
import zmq.asyncio

from rl_router import RouterError
from rl_router.wire import encode_request, peek_message_id


def payload(input_ids):
    return {"input_ids": input_ids, "sampling_params": {}, "return_logprob": False}


async def read_replies(sock, until_id, timeout_s=5.0):
    """Replies by id, read until the one with `until_id` arrives, then a short quiet period for stragglers."""
    replies = {}
    async with asyncio.timeout(timeout_s):
        while until_id not in replies:
            reply = msgpack.unpackb(await sock.recv(), raw=False)
            replies[reply["id"]] = reply
    while await sock.poll(200):
        reply = msgpack.unpackb(await sock.recv(), raw=False)
        replies[reply["id"]] = reply
    return replies


async def test_malformed_messages_are_counted_answered_when_possible_and_the_router_keeps_serving(fake_engine, serve):
    good_request = encode_request(5, "generate", payload([1, 2, 3]))
    bad_messages = [
        b"\xc1" + random.Random(0).randbytes(200),  # random bytes (0xc1 is never valid msgpack)
        good_request[:-3],  # truncated after the id: answered
        good_request[:2],  # truncated before the id: dropped
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"op": "generate", "body": {}}),  # no id
        msgpack.packb({"id": 6, "op": "teleport", "body": {}}),  # unknown op: answered
        msgpack.packb({"id": 7, "op": "generate", "body": [1, 2]}),  # body not a map: answered
        msgpack.packb({"id": 8, "op": "abort", "body": {"rid": ["r1", 3]}}),  # a rid not a string: answered
    ]
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        async with asyncio.timeout(15), serve({"e0": fake_engine("e0")}) as (router, client):
            raw.connect(router.address)
            for message in bad_messages:
                await raw.send(message)
            await raw.send_multipart([b"extra", b"frames", encode_request(9, "health", None)])
            await raw.send(encode_request(10, "metrics", None))
            replies = await read_replies(raw, until_id=10)

            assert (await client.generate(payload([4, 5])))["output_ids"] == [5, 4]
            metrics = await client.metrics()
    finally:
        raw.close()
        context.term()

    assert sorted(replies) == [5, 6, 7, 8, 10]
    assert "not valid msgpack" in replies[5]["error"]
    assert "'op'" in replies[6]["error"] and "'body'" in replies[7]["error"] and "'body'" in replies[8]["error"]
    assert not any(replies[i]["ok"] for i in (5, 6, 7, 8))
    assert metrics["router/malformed_messages"] == 9.0
    assert metrics["router/malformed/not_msgpack"] == 3.0
    assert metrics["router/malformed/bad_shape"] == 5.0
    assert metrics["router/malformed/bad_frames"] == 1.0


async def test_an_oversize_request_is_counted_and_its_sender_gets_an_error(fake_engine, serve):
    engine = fake_engine("e0")
    async with asyncio.timeout(10), serve({"e0": engine}, max_message_bytes=1024) as (_, client):
        with pytest.raises(RouterError, match=r"exceeds the limit of 1024 bytes"):
            await client.generate(payload(list(range(1000, 30000))))
        assert (await client.generate(payload([1])))["output_ids"] == [1]
        metrics = await client.metrics()
    assert metrics["router/malformed/oversize"] == 1.0
    assert [c["input_ids"] for c in engine.calls] == [[1]]


async def test_a_reply_the_wire_cannot_carry_becomes_an_error_reply(serve):
    class ReturnsASet:
        async def generate(self, payload):
            return {"output_ids": {1, 2}}

        async def abort(self, rid=None):
            return None

        async def is_healthy(self):
            return True

    async with asyncio.timeout(10), serve({"odd": ReturnsASet()}) as (_, client):
        with pytest.raises(RouterError, match="not msgpack-serialisable"):
            await client.generate(payload([1]))


def test_the_message_id_is_read_from_the_head_of_a_message_without_decoding_the_body():
    message = encode_request(41, "generate", payload(list(range(10_000))))
    assert peek_message_id(message) == 41
    assert peek_message_id(message[:12]) == 41
    assert peek_message_id(b"\xc1\x00") is None
    assert peek_message_id(msgpack.packb({"id": True})) is None
