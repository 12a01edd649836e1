"""Router overhead on loopback: added latency and requests per second against calling the engine directly.

The router (with MetricsMiddleware + RequestLogMiddleware, as the app runs it, plus health checks) runs
in its own process with one trivial in-process engine; clients are `RouterClient`s in other processes.

    uv run --frozen python bench/router/bench_router.py [--requests 20000] [--in-flight 256] [--clients 1]
        [--repeats 3] [--engine-timeout 600] [--busy-poll-us 0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import statistics
import time

import msgpack
import zmq
import zmq.asyncio

from rl_router import MetricsMiddleware, RequestLogMiddleware, Router, RouterClient, busy_poll_loop
from rl_router.metrics import nearest_rank_percentile

PAYLOAD = {"input_ids": list(range(64)), "sampling_params": {"max_new_tokens": 1}, "return_logprob": True}


class TrivialEngine:
    """Answers at once with one token: all the time measured is the caller's and the router's."""

    async def generate(self, payload):
        return {
            "text": "x",
            "output_ids": [7],
            "meta_info": {"id": payload.get("rid"), "finish_reason": {"type": "length", "length": 1},
                          "output_token_logprobs": [[-0.1, 7, None]], "weight_version": "0"},
        }

    async def abort(self, rid=None):
        return None

    async def is_healthy(self):
        return True


def percentiles_us(seconds):
    ordered = sorted(seconds)
    return {p: nearest_rank_percentile(ordered, p) * 1e6 for p in (50, 99)}


async def direct_latency(n):
    engine = TrivialEngine()
    times = []
    for i in range(n):
        start = time.perf_counter()
        await engine.generate({**PAYLOAD, "rid": f"d{i}"})
        times.append(time.perf_counter() - start)
    return times


def serve_echo(address_queue):
    """The transport floor: a bare zmq.asyncio ROUTER that decodes each request and answers it at once."""

    async def main():
        sock = zmq.asyncio.Context().socket(zmq.ROUTER)
        address_queue.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
        while True:
            identity, data = await sock.recv_multipart()
            message = msgpack.unpackb(data, raw=False)
            reply = await TrivialEngine().generate(message["body"])
            await sock.send_multipart([identity, msgpack.packb({"id": message["id"], "ok": True, "body": reply})])

    asyncio.run(main())


def serve_router(address_queue, stop_event, engine_timeout_s, cpu_queue, busy_poll_s):
    """Serves until `stop_event`; puts (router CPU seconds, requests served) for each (start, stop) pair
    of `cpu_queue` marks, so CPU per request is measured inside the router process."""

    async def main():
        logging.getLogger("rl_router.requests").setLevel(logging.WARNING)
        metrics = MetricsMiddleware()
        router = Router({"e0": TrivialEngine()}, middleware=[metrics, RequestLogMiddleware()],
                        engine_timeout_s=engine_timeout_s)
        async with router:
            address_queue.put(router.address)
            mark = None
            while not stop_event.is_set():
                await asyncio.sleep(0.01)
                while not cpu_queue.empty():
                    cpu_queue.get()
                    now = (time.process_time(), metrics.snapshot()["router/requests"])
                    if mark is None:
                        mark = now
                    else:
                        address_queue.put((now[0] - mark[0], now[1] - mark[1]))
                        mark = None

    with asyncio.Runner(loop_factory=(lambda: busy_poll_loop(busy_poll_s)) if busy_poll_s else None) as runner:
        runner.run(main())


async def router_latency(address, n):
    client = RouterClient(address)
    try:
        for i in range(200):  # warm up the connection
            await client.generate({**PAYLOAD, "rid": f"w{i}"})
        times = []
        for i in range(n):
            start = time.perf_counter()
            await client.generate({**PAYLOAD, "rid": f"l{i}"})
            times.append(time.perf_counter() - start)
        return times
    finally:
        client.close()


async def router_throughput(address, n, in_flight, tag):
    """`in_flight` callers on one `RouterClient`, each sending its next request as soon as the last is answered."""
    client = RouterClient(address)

    async def caller(k, count):
        for i in range(count):
            await client.generate({**PAYLOAD, "rid": f"{tag}-{k}-{i}"})

    def shares(total):
        return [total // in_flight + (k < total % in_flight) for k in range(in_flight)]

    try:
        await asyncio.gather(*(caller(k, c) for k, c in enumerate(shares(min(n, 2000)))))  # warm up
        start, cpu_start = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(k, c) for k, c in enumerate(shares(n))))
        return n, time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        client.close()


def throughput_worker(address, n, in_flight, tag, results):
    results.put(asyncio.run(router_throughput(address, n, in_flight, tag)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-requests", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=20000, help="per client process, for throughput")
    parser.add_argument("--in-flight", type=int, default=256, help="per client process")
    parser.add_argument("--clients", type=int, default=1, help="client processes for the throughput run")
    parser.add_argument("--engine-timeout", type=float, default=600.0, help="0: no per-request engine timeout")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs (median reported)")
    parser.add_argument("--busy-poll-us", type=float, default=0.0,
                        help="run the router's loop on a BusyPollSelector polling this long before it sleeps")
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    ctx = mp.get_context("spawn")
    address_queue, stop = ctx.Queue(), ctx.Event()
    echo = ctx.Process(target=serve_echo, args=(address_queue,), daemon=True)
    echo.start()
    try:
        floor = percentiles_us(asyncio.run(router_latency(address_queue.get(timeout=30), args.latency_requests)))
    finally:
        echo.kill()
        echo.join(10)
    cpu_marks = ctx.Queue()
    server = ctx.Process(target=serve_router, args=(address_queue, stop, args.engine_timeout or None, cpu_marks, args.busy_poll_us * 1e-6),
                         daemon=True)
    server.start()
    try:
        address = address_queue.get(timeout=30)
        direct = percentiles_us(asyncio.run(direct_latency(args.latency_requests)))
        cpu_marks.put("start")
        routed = percentiles_us(asyncio.run(router_latency(address, args.latency_requests)))
        cpu_marks.put("stop")
        latency_cpu_s, latency_served = address_queue.get(timeout=30)
        results = ctx.Queue()
        rates, cpu_per_request, client_cpu_per_request = [], [], []
        for repeat in range(args.repeats):
            cpu_marks.put("start")
            workers = [ctx.Process(target=throughput_worker,
                                   args=(address, args.requests, args.in_flight, f"r{repeat}c{k}", results))
                       for k in range(args.clients)]
            for w in workers:
                w.start()
            runs = [results.get(timeout=600) for _ in workers]
            for w in workers:
                w.join(30)
            cpu_marks.put("stop")
            cpu_s, served = address_queue.get(timeout=30)
            rates.append(sum(n for n, _, _ in runs) / max(t for _, t, _ in runs))
            cpu_per_request.append(cpu_s / served)
            client_cpu_per_request.extend(cpu / n for n, _, cpu in runs)
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
    rates.sort()
    print(f"direct engine call     p50 {direct[50]:8.1f} us   p99 {direct[99]:8.1f} us")
    print(f"bare zmq.asyncio echo  p50 {floor[50]:8.1f} us   p99 {floor[99]:8.1f} us   (transport floor, same client)")
    print(f"through the router     p50 {routed[50]:8.1f} us   p99 {routed[99]:8.1f} us   (1 request in flight)")
    print(f"added by the router    p50 {routed[50] - direct[50]:8.1f} us   p99 {routed[99] - direct[99]:8.1f} us")
    print(f"router above the floor p50 {routed[50] - floor[50]:8.1f} us   p99 {routed[99] - floor[99]:8.1f} us")
    print(f"throughput             {statistics.median(rates):8.0f} req/s median of {args.repeats} "
          f"(min {rates[0]:.0f}, max {rates[-1]:.0f}; {args.clients} client process(es) x {args.in_flight} in flight, "
          f"{args.requests} requests each)")
    print(f"router CPU, 1 in flight {latency_cpu_s / latency_served * 1e6:8.1f} us per request (busy polling included)")
    print(f"router CPU per request {statistics.median(cpu_per_request) * 1e6:8.1f} us   median "
          f"(router process CPU time, its ZeroMQ I/O thread included, / requests served, warm-up included)")
    print(f"client CPU per request {statistics.median(client_cpu_per_request) * 1e6:8.1f} us   median "
          f"(one client process, bench callers included)")
    print(f"router busy poll       {args.busy_poll_us:g} us")
    print(f"load average before    {load_before}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
