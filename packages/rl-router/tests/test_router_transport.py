import asyncio
import socket

import msgpack
import zmq

from rl_router.transport import DRAIN_BUDGET, LoopSocket


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_dealer_at_its_high_water_mark_queues_messages_and_delivers_all_in_order_once_a_peer_binds():
    context = zmq.Context()
    address = f"tcp://127.0.0.1:{free_port()}"
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.SNDHWM, 2)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)  # nobody listens yet: ZeroMQ takes 2 messages, the rest wait in the outbox
    sender = LoopSocket(dealer, on_message=lambda frames: None)
    sender.attach(asyncio.get_running_loop())
    for n in range(100):
        sender.send([msgpack.packb(n)])
    await asyncio.sleep(0.05)
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    received = []
    try:
        async with asyncio.timeout(10):
            while len(received) < 100:
                if router.poll(0):
                    received.append(msgpack.unpackb(router.recv_multipart()[-1]))
                else:
                    await asyncio.sleep(0.001)  # give the sender's loop turns to flush
    finally:
        sender.close()
        router.close()
        context.term()
    assert received == list(range(100))


async def test_every_message_of_a_burst_larger_than_one_drain_is_handed_over_exactly_once():
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    received = []
    done = asyncio.Event()
    total = 3 * DRAIN_BUDGET + 7

    def on_message(frames):
        received.append(msgpack.unpackb(frames[-1]))
        if len(received) == total:
            done.set()

    listener = LoopSocket(router, on_message)
    listener.attach(asyncio.get_running_loop())
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        for n in range(total):
            dealer.send(msgpack.packb(n))
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.05)  # nothing further may arrive
    finally:
        listener.close()
        dealer.close()
        context.term()
    assert received == list(range(total))
