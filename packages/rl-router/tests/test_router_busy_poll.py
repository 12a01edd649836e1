import asyncio
import selectors
import socket
import threading
import time

import pytest

from rl_router import BusyPollSelector, Router, RouterClient, RouterThread, busy_poll_loop


@pytest.fixture
def base_select_timeouts(monkeypatch):
    """Every timeout the BusyPollSelector hands to the platform selector underneath it."""
    timeouts = []
    base = selectors.DefaultSelector.select

    def recording(self, timeout=None):
        timeouts.append(timeout)
        return base(self, timeout)

    monkeypatch.setattr(selectors.DefaultSelector, "select", recording)
    return timeouts


def test_a_message_arriving_within_the_spin_is_seen_without_the_selector_ever_blocking(base_select_timeouts):
    reader, writer = socket.socketpair()
    selector = BusyPollSelector(spin_s=5.0)
    selector.register(reader, selectors.EVENT_READ)
    threading.Timer(0.02, writer.send, args=(b"x",)).start()
    try:
        start = time.perf_counter()
        ready = selector.select(timeout=None)
        elapsed = time.perf_counter() - start
    finally:
        selector.close()
        reader.close()
        writer.close()
    assert [key.fileobj for key, _ in ready] == [reader]
    assert elapsed < 4.0
    assert len(base_select_timeouts) > 1 and set(base_select_timeouts) == {0}


def test_with_nothing_to_read_it_spins_then_blocks_for_the_rest_of_the_timeout(base_select_timeouts):
    reader, writer = socket.socketpair()
    selector = BusyPollSelector(spin_s=0.01)
    selector.register(reader, selectors.EVENT_READ)
    try:
        start = time.perf_counter()
        ready = selector.select(timeout=0.1)
        elapsed = time.perf_counter() - start
    finally:
        selector.close()
        reader.close()
        writer.close()
    assert ready == []
    assert elapsed >= 0.09
    blocking = [t for t in base_select_timeouts if t != 0]
    assert len(blocking) == 1 and 0.0 < blocking[0] <= 0.1 - 0.01 + 1e-3


def test_zero_spin_passes_the_timeout_straight_through(base_select_timeouts):
    selector = BusyPollSelector(spin_s=0.0)
    try:
        assert selector.select(timeout=0.01) == []
    finally:
        selector.close()
    assert base_select_timeouts == [0.01]


def test_a_timer_on_a_busy_poll_loop_is_not_delayed_by_a_longer_spin():
    async def sleep_briefly():
        start = time.perf_counter()
        await asyncio.sleep(0.02)
        return time.perf_counter() - start

    with asyncio.Runner(loop_factory=lambda: busy_poll_loop(10.0)) as runner:
        assert 0.015 <= runner.run(sleep_briefly()) < 2.0


def test_negative_spin_is_refused():
    with pytest.raises(ValueError, match="spin_s"):
        BusyPollSelector(spin_s=-1.0)
    with pytest.raises(ValueError, match="busy_poll_s"):
        RouterThread(Router({}), busy_poll_s=-1.0)


def test_a_router_thread_on_a_busy_poll_loop_serves_every_request(fake_engine):
    async def send_all(address):
        client = RouterClient(address)
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(client.generate({"input_ids": [n, 1], "rid": f"r{n}"}) for n in range(200))), 20
            )
            for n in range(50):  # one at a time too: each reply lands while the router's loop is spinning
                replies.append(await asyncio.wait_for(client.generate({"input_ids": [n, 2], "rid": f"s{n}"}), 10))
            return replies
        finally:
            client.close()

    engine = fake_engine("e0")
    with Router({"e0": engine}).run_in_thread(busy_poll_s=0.001) as thread:
        assert isinstance(thread._loop._selector, BusyPollSelector)
        replies = asyncio.run(send_all(thread.address))
    assert [r["output_ids"] for r in replies] == [[1, n] for n in range(200)] + [[2, n] for n in range(50)]
    assert len(engine.calls) == 250
