"""Restarting a dead or hung engine (slime's --use-fault-tolerance), for the engine's Ray actor.

The router knows an engine by one URL for the whole run. That URL is a `HoldingForwarder` owned by the engine's
actor: it pipes connections to the engine process while the engine serves, and holds new ones while the engine is
restarted. A request in flight on the dead process fails and the router retries it elsewhere; requests that arrive
during the restart (health checks, the next weight update) wait and then reach the new process, which by then holds
the current policy weights. So the restarted engine never answers with the weights it was started from.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable


class HoldingForwarder:
    """A TCP port on `host` (the engine's bind address) that forwards each connection to the engine's port on
    the same address while open, and holds new connections (accepting them, sending nothing) while closed, up to
    `hold_s` seconds, then drops them."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", hold_s: float = 600.0) -> None:
        from rl_sglang.launcher import local_host

        self.port = port
        self.host = host
        self._target_host = local_host(host)
        self.hold_s = hold_s
        self._target: int | None = None
        self._opened = threading.Event()
        self._pipes: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"engine-forwarder-{port}", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, host, port, reuse_address=True))

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def open(self, target_port: int) -> None:
        """Forward to `target_port` from now on, the connections held meanwhile included."""
        self._target = target_port
        self._loop.call_soon_threadsafe(self._opened.set)

    def hold(self) -> None:
        """Stop forwarding: connections already piped to the old target are cut, new ones wait for `open`."""
        self._opened.clear()
        self._target = None

        async def cut() -> None:
            for writer in list(self._pipes):
                writer.close()

        self._call(cut())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + self.hold_s
        while not self._opened.is_set():
            if time.monotonic() > deadline:
                writer.close()
                return
            await asyncio.sleep(0.05)
        target = self._target
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._target_host, target)
        except OSError:
            writer.close()
            return
        self._pipes.update((writer, upstream_writer))
        try:
            # The engine closing (or dying) ends the client's connection too, so a client does not keep a
            # pooled connection to a dead process; the client closing only half-closes towards the engine.
            await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer, close_at_eof=True))
        finally:
            self._pipes.difference_update((writer, upstream_writer))
            writer.close()
            upstream_writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in list(self._pipes):
                writer.close()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close_at_eof: bool = False) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if close_at_eof or not writer.can_write_eof():
            writer.close()
        else:
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def newest_weights(directory: Path) -> tuple[Path, str] | None:
    """The newest complete version DiskWeightTransport wrote under `directory` (its index is written last),
    as (folder, weight version); None before the first weight update."""
    found = []
    for folder in directory.glob("weights_*") if directory.is_dir() else []:
        match = re.fullmatch(r"weights_(\d+)(?:-\d+)?", folder.name)
        if match and (folder / "model.safetensors.index.json").is_file():
            found.append((int(match.group(1)), folder.stat().st_mtime, folder))
    if not found:
        return None
    version, _, folder = max(found)
    return folder, str(version)


def answers_ping(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def load_weights_from_disk(url: str, folder: Path, version: str, timeout_s: float = 600.0) -> None:
    """POST /update_weights_from_disk to one engine; raises unless it answers success."""
    body = json.dumps({"model_path": str(folder), "weight_version": version}).encode()
    request = urllib.request.Request(url + "/update_weights_from_disk", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer = json.loads(response.read() or b"{}")
    if not answer.get("success", False):
        raise RuntimeError(f"engine at {url} refused the weights in {folder}: {answer.get('message')}")


class EngineSupervisor:
    """Watches one engine process and restarts it when it dies or stops answering /ping, at most
    `max_restarts` times, waiting 1, 2, 4 ... (at most 30) seconds before each attempt. `launch()` starts a
    fresh process and returns it healthy (an rl_sglang EngineProcess); `weights_dir` is where the disk weight
    transport writes the policy's versions."""

    def __init__(
        self,
        process: Any,
        forwarder: HoldingForwarder,
        launch: Callable[[], Any],
        *,
        weights_dir: Path,
        max_restarts: int,
        first_wait_s: float,
        interval_s: float,
        timeout_s: float,
        log: Callable[[str], None] = print,
    ) -> None:
        self.process = process
        self.forwarder = forwarder
        self.launch = launch
        self.weights_dir = weights_dir
        self.max_restarts = max_restarts
        self.first_wait_s = first_wait_s
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.log = log
        self.restarts = 0
        self.failed_attempts = 0
        self.gave_up = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()

    def _healthy(self) -> bool:
        return self.process.process.poll() is None and answers_ping(self.process.url, self.timeout_s)

    def _watch(self) -> None:
        if self._stop.wait(self.first_wait_s):
            return
        while not self._stop.wait(self.interval_s):
            if not self._healthy() and not self._stop.is_set():
                self._restart()
                if self.gave_up:
                    return

    def _restart(self) -> None:
        with self._lock:
            self.forwarder.hold()
            reason = "died" if self.process.process.poll() is not None else "stopped answering /ping"
            self.log(f"engine at {self.forwarder.port} {reason}; restarting it")
            self.process.terminate()
            while self.restarts + self.failed_attempts < self.max_restarts and not self._stop.is_set():
                attempt = self.restarts + self.failed_attempts
                time.sleep(min(2.0**attempt, 30.0))
                try:
                    process = self.launch()
                    latest = newest_weights(self.weights_dir)
                    if latest is not None:  # the policy's current version, before any request reaches it
                        load_weights_from_disk(process.url, *latest)
                except Exception as e:  # noqa: BLE001 - each failed attempt is counted and the next one tried
                    self.failed_attempts += 1
                    self.log(f"engine restart attempt {attempt + 1} failed: {e}")
                    continue
                self.process = process
                self.restarts += 1
                self.forwarder.open(int(process.url.rsplit(":", 1)[1]))
                self.log(f"engine at {self.forwarder.port} restarted" + (f" with weights {latest[1]}" if latest else ""))
                return
            self.gave_up = True
            self.log(f"engine at {self.forwarder.port}: no restart left ({self.max_restarts}); it stays out of rotation")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        with self._lock:
            self.process.terminate()
