import asyncio
import os
import signal
from collections import Counter

import msgpack
import pytest
import zmq
import zmq.asyncio

from rl_router import MetricsMiddleware, RouterError, is_engine_fault
from rl_router.wire import encode_request

FAST_HEALTH = {"health_interval_s": 0.1, "health_timeout_s": 0.3}


def payload(i, max_new_tokens=2):
    return {"rid": f"r{i}", "input_ids": [i, i + 1], "sampling_params": {"max_new_tokens": max_new_tokens}}


async def send_counting_replies(address, n, *, in_flight=32, on_reply=None, quiet_s=0.5):
    """Sends `n` generate requests on a raw socket (at most `in_flight` at once) and returns every reply
    that arrives, duplicates included: message id -> list of replies."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    replies: dict[int, list] = {}
    window = asyncio.Semaphore(in_flight)
    try:

        async def send_all():
            for i in range(n):
                await window.acquire()
                await sock.send(encode_request(i, "generate", payload(i)))

        sender = asyncio.create_task(send_all())
        while len(replies) < n:
            reply = msgpack.unpackb(await sock.recv(), raw=False)
            replies.setdefault(reply["id"], []).append(reply)
            if len(replies[reply["id"]]) == 1:
                window.release()
                if on_reply is not None:
                    on_reply(len(replies))
        await sender
        while await sock.poll(int(quiet_s * 1000)):  # anything late would be a duplicate
            reply = msgpack.unpackb(await sock.recv(), raw=False)
            replies.setdefault(reply["id"], []).append(reply)
    finally:
        sock.close()
        context.term()
    return replies


def assert_each_request_answered_once_by_its_own_reply(replies, n):
    assert sorted(replies) == list(range(n))
    assert Counter(len(r) for r in replies.values()) == {1: n}
    for i, (reply,) in replies.items():
        assert reply["ok"], reply
        assert reply["body"]["meta_info"]["id"] == f"r{i}"
        assert reply["body"]["output_ids"] == [i + 1, i]


async def wait_until(predicate, timeout_s=5.0):
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_killing_one_of_three_engine_processes_mid_run_loses_and_duplicates_none_of_1000_requests(
    engine_processes, serve
):
    spawned = {name: engine_processes(name) for name in ("e0", "e1", "e2")}
    engines = {name: adapter for name, (_, adapter) in spawned.items()}
    victim = spawned["e1"][0]

    def kill_at_300(answered):
        if answered == 300:
            os.kill(victim.pid, signal.SIGKILL)

    async with asyncio.timeout(60), serve(engines, policy="least_outstanding", engine_timeout_s=5, **FAST_HEALTH) as (
        router,
        _,
    ):
        replies = await send_counting_replies(router.address, 1000, on_reply=kill_at_300)
        metrics = router.metrics()
    assert victim.wait(5) == -signal.SIGKILL
    assert_each_request_answered_once_by_its_own_reply(replies, 1000)
    served_by = Counter(r[0]["body"]["meta_info"]["engine"] for r in replies.values())
    assert served_by["e1"] < 400 and served_by["e0"] + served_by["e2"] > 600, served_by
    assert metrics["router/engines_out"] == 1.0
    assert metrics["router/engine/e1/in_rotation"] == 0.0
    assert metrics["router/engine/e1/faults"] >= 1.0 and metrics["router/engine_faults"] >= 1.0
    assert metrics["router/retries"] >= 1.0  # the requests in flight on e1 when it died


async def test_a_hung_engine_is_taken_out_its_requests_are_retried_and_it_returns_after_it_resumes(
    engine_processes, serve
):
    spawned = {name: engine_processes(name) for name in ("e0", "e1", "e2")}
    engines = {name: adapter for name, (_, adapter) in spawned.items()}
    victim = spawned["e2"][0]

    def stop_at_50(answered):
        if answered == 50:
            os.kill(victim.pid, signal.SIGSTOP)

    async with asyncio.timeout(60), serve(engines, engine_timeout_s=2.0, **FAST_HEALTH) as (router, client):
        replies = await send_counting_replies(router.address, 300, in_flight=16, on_reply=stop_at_50)
        assert router.engines_out == ["e2"]
        stopped_metrics = router.metrics()
        os.kill(victim.pid, signal.SIGCONT)
        await wait_until(lambda: router.engines_out == [], timeout_s=10)
        after = await asyncio.gather(*(client.generate(payload(i)) for i in range(1000, 1030)))
    assert_each_request_answered_once_by_its_own_reply(replies, 300)
    assert stopped_metrics["router/retries"] >= 1.0
    assert stopped_metrics["router/ejections"] >= 1.0
    assert Counter(r["meta_info"]["engine"] for r in after)["e2"] == 10  # round robin includes it again


async def test_an_engine_slower_than_the_timeout_loses_its_requests_to_the_others_but_a_slow_one_within_it_keeps_serving(
    engine_processes, serve
):
    _, fast = engine_processes("fast")
    _, slow = engine_processes("slow", "--token-delay", "0.05")  # 8 tokens: about 0.4 s a request
    async with asyncio.timeout(60):
        async with serve({"fast": fast, "slow": slow}, engine_timeout_s=3.0, **FAST_HEALTH) as (router, client):
            within = await asyncio.gather(*(client.generate(payload(i, 8)) for i in range(10)))
            within_metrics = router.metrics()
        async with serve({"fast": fast, "slow": slow}, engine_timeout_s=0.15, **FAST_HEALTH) as (router, client):
            beyond = await asyncio.gather(*(client.generate(payload(i, 8)) for i in range(10)))
            beyond_metrics = router.metrics()
    assert Counter(r["meta_info"]["engine"] for r in within) == {"fast": 5, "slow": 5}
    assert within_metrics["router/engine_faults"] == 0.0
    assert [r["meta_info"]["id"] for r in beyond] == [f"r{i}" for i in range(10)]
    assert all(r["meta_info"]["engine"] == "fast" for r in beyond)
    assert all(r["meta_info"]["finish_reason"]["type"] == "length" for r in beyond)
    assert beyond_metrics["router/engine/slow/faults"] >= 1.0
    assert beyond_metrics["router/engine/fast/faults"] == 0.0


async def test_abort_reaches_the_engine_processes_and_callers_get_their_partial_aborted_answers(
    engine_processes, serve
):
    engines = {name: engine_processes(name, "--token-delay", "0.02")[1] for name in ("e0", "e1", "e2")}
    async with asyncio.timeout(30), serve(engines, engine_timeout_s=10, **FAST_HEALTH) as (router, client):
        pending = [asyncio.create_task(client.generate(payload(i, 1000))) for i in range(6)]
        await asyncio.sleep(0.3)
        await client.abort("r0")
        first = await pending[0]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in pending[1:])
        await client.abort(["r1", "r2"])
        some = await asyncio.gather(*pending[1:3])
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in pending[3:])
        await client.abort()
        rest = await asyncio.gather(*pending[3:])
        metrics = router.metrics()
    for i, response in enumerate([first, *some, *rest]):
        assert response["meta_info"]["id"] == f"r{i}"
        assert response["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(response["output_ids"]) < 1000
    assert metrics["router/retries"] == 0.0 and metrics["router/engine_faults"] == 0.0


class DiesOnAbort:
    """Holds every request until aborted, then fails it as if the engine had died (connection reset)."""

    def __init__(self):
        self.calls = []
        self._aborted = asyncio.Event()

    async def generate(self, payload):
        self.calls.append(payload["rid"])
        await self._aborted.wait()
        raise ConnectionResetError("engine went away")

    async def abort(self, rid=None):
        self._aborted.set()

    async def is_healthy(self):
        return True


async def test_an_aborted_request_whose_engine_then_fails_is_answered_aborted_and_not_retried(fake_engine, serve):
    dying, spare = DiesOnAbort(), fake_engine("spare")
    async with asyncio.timeout(10), serve({"dying": dying, "spare": spare}, health_interval_s=None) as (router, client):
        pending = asyncio.create_task(client.generate(payload(0)))
        await wait_until(lambda: dying.calls)
        await client.abort("r0")
        response = await pending
        metrics = router.metrics()
    assert response["meta_info"]["finish_reason"]["type"] == "abort"
    assert response["meta_info"]["id"] == "r0"
    assert spare.calls == []
    assert metrics["router/aborted_not_retried"] == 1.0 and metrics["router/retries"] == 0.0


class RefusesConnections:
    def __init__(self):
        self.calls = 0
        self.healthy = False

    async def generate(self, payload):
        self.calls += 1
        raise ConnectionRefusedError("connection refused")

    async def abort(self, rid=None):
        raise ConnectionRefusedError("connection refused")

    async def is_healthy(self):
        return self.healthy


async def test_retries_stop_at_the_limit_with_an_error_naming_the_engines_tried(serve):
    engines = {f"e{i}": RefusesConnections() for i in range(4)}
    metrics = MetricsMiddleware()
    async with asyncio.timeout(10), serve(engines, max_retries=2, health_interval_s=None, middleware=[metrics]) as (
        router,
        client,
    ):
        with pytest.raises(RouterError, match=r"failed \(ConnectionRefusedError.*gave up after 3 attempt\(s\) on \[") as err:
            await client.generate(payload(0))
        assert len(router.engines_out) == 3
        assert all(repr(name) in str(err.value) for name in router.engines_out)
    assert sum(e.calls for e in engines.values()) == 3
    assert metrics.snapshot()["router/retries"] == 2.0 and metrics.snapshot()["router/errors"] == 1.0


async def test_an_engine_out_of_rotation_returns_when_its_health_check_passes(fake_engine, serve):
    flaky, steady = RefusesConnections(), fake_engine("steady")
    async with asyncio.timeout(10), serve({"flaky": flaky, "steady": steady}, **FAST_HEALTH) as (router, client):
        await wait_until(lambda: router.engines_out == ["flaky"])
        assert (await client.generate(payload(1)))["meta_info"]["engine"] == "steady"
        assert flaky.calls == 0
        flaky.healthy = True
        await wait_until(lambda: router.engines_out == [])
        assert router.metrics()["router/readmissions"] == 1.0


async def test_when_every_engine_is_out_callers_get_a_clear_error(serve):
    async with asyncio.timeout(10), serve({"e0": RefusesConnections()}, **FAST_HEALTH) as (router, client):
        await wait_until(lambda: router.engines_out == ["e0"])
        with pytest.raises(RouterError, match="no healthy engines"):
            await client.generate(payload(0))


class HTTPStatusError(RuntimeError):
    """Shaped like rl-sglang's EngineError: an engine answered with a non-200 status."""

    def __init__(self, status):
        super().__init__(f"/generate answered {status}")
        self.status = status


@pytest.mark.parametrize(
    ("exc", "fault"),
    [
        (ConnectionRefusedError(), True),
        (ConnectionResetError(), True),
        (BrokenPipeError(), True),
        (TimeoutError(), True),
        (asyncio.IncompleteReadError(b"", 10), True),
        (type("ServerDisconnectedError", (type("ClientConnectionError", (Exception,), {}),), {})(), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("bad payload"), False),
        (HTTPStatusError(503), True),
        (HTTPStatusError(502), True),
        (HTTPStatusError(504), True),
        (HTTPStatusError(500), False),
        (HTTPStatusError(400), False),
    ],
)
def test_only_connection_level_failures_and_unavailable_servers_count_as_engine_faults(exc, fault):
    assert is_engine_fault(exc) is fault


class AnswersWithStatus:
    def __init__(self, status):
        self.status = status
        self.calls = 0

    async def generate(self, payload):
        self.calls += 1
        raise HTTPStatusError(self.status)

    async def abort(self, rid=None):
        return None

    async def is_healthy(self):
        return True


async def test_a_503_moves_the_request_to_another_engine_but_a_500_reaches_the_caller(fake_engine, serve):
    unavailable, steady = AnswersWithStatus(503), fake_engine("steady")
    async with asyncio.timeout(10), serve({"unavailable": unavailable, "steady": steady}, health_interval_s=None,
                                          policy="round_robin") as (router, client):
        answers = [await client.generate(payload(i)) for i in range(2)]
        metrics = router.metrics()
    assert [a["meta_info"]["engine"] for a in answers] == ["steady", "steady"]
    assert unavailable.calls == 1 and metrics["router/retries"] == 1.0 and router.engines_out == ["unavailable"]

    broken = AnswersWithStatus(500)
    async with asyncio.timeout(10), serve({"broken": broken}, health_interval_s=None) as (router, client):
        with pytest.raises(RouterError, match="answered 500"):
            await client.generate(payload(0))
        assert router.engines_out == [] and router.metrics()["router/retries"] == 0.0
