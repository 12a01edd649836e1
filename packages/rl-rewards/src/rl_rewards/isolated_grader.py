"""Runs a grader in a pool of worker processes with a memory limit, so sympy cannot eat the trainer's memory.

A thread cannot be killed and a timeout cannot take memory back; a process can be, and the kernel takes
its memory back. Each worker (`rl_rewards.isolated_worker`) has `RLIMIT_AS` set; a call that overruns
`timeout_s` SIGKILLs its worker, and a new one is started in its place at once. Requests and replies are
JSON lines over the worker's stdin/stdout (no pickle), so labels must be JSON-serialisable.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from rl_rewards.types import RewardValue


class WorkerTimeoutError(TimeoutError):
    """A grader call overran its timeout; its worker was killed and replaced."""


class WorkerCrashedError(RuntimeError):
    """A worker died (killed by the kernel, or crashed) before replying; it was replaced."""


class _Worker:
    """One worker process and the reading end of its line protocol."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),
            "LANG": "C.UTF-8",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rl_rewards.isolated_worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.ready = False
        self._buffer = b""

    def read_line(self, deadline: float) -> dict[str, Any] | None:
        """The next reply, or None at the deadline; raises WorkerCrashedError on end of stream."""
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(stdout.fileno(), 1 << 16)
            if not chunk:
                raise WorkerCrashedError(f"grader worker exited with status {self._exit_status()} before replying")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError as error:
            raise WorkerCrashedError(f"grader worker sent a line that is not JSON: {line[:100]!r}") from error

    def _exit_status(self) -> int | None:
        try:
            return self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerCrashedError(f"grader worker is gone: {error}") from error

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()


class IsolatedGrader:
    """A sync grader that forwards each call to one of `workers` processes running `target`.

    `target` is `module:function` or `path/to/file.py:function`; with `factory_options` it is a factory
    called with them in each worker. `startup_timeout_s` bounds a worker's start (importing sympy takes
    seconds); `timeout_s` bounds each call. `restarts` counts workers killed or lost.
    """

    def __init__(
        self,
        target: str,
        *,
        factory_options: dict[str, Any] | None = None,
        workers: int = 2,
        memory_mb: int = 1024,
        timeout_s: float = 5.0,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (the worker imports sympy), got {memory_mb}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self._spec = {"target": target, "factory_options": factory_options, "memory_bytes": memory_mb * 2**20}
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)
        self._live: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._live)

    def _spawn(self) -> _Worker:
        worker = _Worker(self._spec)
        with self._lock:
            self._live.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker | None:
        """Kill `worker` and start its replacement now, so the next caller does not pay the whole start.

        None (a slot that spawns on next use) when the new process cannot be started.
        """
        worker.kill()
        with self._lock:
            if worker in self._live:
                self._live.remove(worker)
            self.restarts += 1
        try:
            return self._spawn()
        except OSError:
            return None

    def _await_ready(self, worker: _Worker) -> None:
        if worker.ready:
            return
        reply = worker.read_line(time.monotonic() + self.startup_timeout_s)
        if reply is None:
            raise WorkerTimeoutError(f"grader worker for {self.target!r} did not start in {self.startup_timeout_s}s")
        if not reply.get("ready"):
            raise WorkerCrashedError(f"grader worker for {self.target!r} sent {reply!r} instead of ready")
        worker.ready = True

    def start(self) -> None:
        """Start every worker now and wait until they are ready, instead of on first use."""
        taken = [self._idle.get() for _ in range(self._idle.qsize())]
        try:
            for index, worker in enumerate(taken):
                taken[index] = worker = worker or self._spawn()
                self._await_ready(worker)
        finally:
            for worker in taken:
                self._idle.put(worker)

    def __call__(self, *, prompt: str, response: str, label: Any, metadata: dict[str, Any]) -> RewardValue:
        if self._closed:
            raise RuntimeError(f"IsolatedGrader for {self.target!r} is closed")
        request = {"prompt": prompt, "response": response, "label": label, "metadata": metadata}
        try:
            json.dumps(request)
        except (TypeError, ValueError) as error:
            raise TypeError(f"isolated grader: the sample is not JSON-serialisable: {error}") from error
        worker = self._idle.get() or self._spawn()
        reply = None
        try:
            self._await_ready(worker)
            worker.send(request)
            reply = worker.read_line(time.monotonic() + self.timeout_s)
        finally:
            self._idle.put(worker if reply is not None else self._replace(worker))
        if reply is None:
            raise WorkerTimeoutError(f"grader call exceeded {self.timeout_s}s; its worker was killed and replaced")
        if "error" in reply:
            raise RuntimeError(f"in grader worker: {reply['error']}")
        return reply["value"]

    def close(self) -> None:
        """Kill every worker; later calls raise."""
        self._closed = True
        self._finalizer()
