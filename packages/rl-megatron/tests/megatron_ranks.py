"""Forked CPU ranks (gloo) for the Megatron backend tests, in a module of its own so that the forkserver's
children can import it by name (pytest's importlib mode gives test files names no other process knows)."""

from __future__ import annotations

import faulthandler
import importlib.util
import io
import multiprocessing
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn_file: str, fn_name: str, rank: int, world_size: int, port: int, results, args: tuple, timeout: float) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    # A rank that hangs says where (on stderr, which pytest shows with the failure).
    faulthandler.dump_traceback_later(max(timeout - 5.0, 1.0), exit=False)
    torch.set_num_threads(1)
    try:
        # The test file by path: the forkserver's child has none of pytest's module names.
        spec = importlib.util.spec_from_file_location("megatron_backend_ranks", fn_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # The rank owns the process group, so backends built one after another in it share the group
        # (re-creating a group on the same port races with its previous store).
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        # As bytes: a tensor put on the queue travels as a shared-memory handle that dies with this process.
        buffer = io.BytesIO()
        torch.save(getattr(module, fn_name)(rank, *args), buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        results.put((rank, None, traceback.format_exc()))


# Ranks fork from a forkserver that imported megatron-core once (a spawned rank would re-import it, ~100 s on
# 2 cores), not from this test process: CI runs every package's tests in one process, and a rank forked
# from it hung in its first torch.tensor() on a lock another thread held at the fork.
_RANKS = multiprocessing.get_context("forkserver")
_RANKS.set_forkserver_preload(["torch", "transformers", "rl_megatron.backend", "rl_core.rl_step"])


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """`fn(rank, *args)` (a module-level function of a test file) on `world_size` ranks; their return values by rank.
    Ranks still alive after the deadline or after a peer failed are killed."""
    results = _RANKS.Queue()
    port = _free_port()
    procs = [_RANKS.Process(target=_rank_main, args=(fn.__code__.co_filename, fn.__name__, r, world_size, port, results, args, timeout))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, value, error = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s") from None
            if error is not None:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            values[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [values[r] for r in range(world_size)]
