"""`LoopSocket`: a plain (non-asyncio) ZeroMQ socket driven from an asyncio loop's reader callback.

Why not `zmq.asyncio`: it pays a future, a loop callback and an events check per message. Here one
wakeup drains every message that is ready (non-blocking `recv` in a loop) and hands each to a plain
callback. Sends use non-blocking `send`: the first message of a loop turn goes out at once (the
lowest latency for a lone request), later ones are queued and flushed together at the next turn, so
under load ZeroMQ's I/O thread is woken once per burst rather than once per message. A DEALER at its
high-water mark keeps its queue, in order, until ZeroMQ says the socket is writable again (a ROUTER
never blocks).

ZeroMQ's file descriptor is edge-triggered and any `send`/`recv` may consume the edge, so after
sending outside the reader callback the socket's events are checked once more on the next loop turn.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Sequence, cast

import zmq

OnMessage = Callable[[list[bytes]], None]
OnError = Callable[[zmq.ZMQError], None]

_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)

# Messages handled per wakeup before the loop gets a turn (so a flooding peer cannot starve the tasks).
DRAIN_BUDGET = 1024


class LoopSocket:
    """Owns `socket`; calls `on_message(frames)` for every multipart message received on the running loop."""

    def __init__(self, socket: zmq.Socket, on_message: OnMessage, on_error: OnError | None = None):
        self.socket = socket
        self._on_message = on_message
        self._on_error = on_error
        self._fd = socket.fileno()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[Sequence[bytes]] = deque()  # messages not yet handed to ZeroMQ, in order
        self._check_pending = False
        self._closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the socket from `loop` (moving off a previous loop, which may be closed by now)."""
        if loop is self._loop or self._closed:
            return
        self._detach()
        self._loop = loop
        loop.add_reader(self._fd, self._on_events)
        self._schedule_check()  # messages may have arrived before anyone watched

    def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message without blocking: now if it is the first of this loop turn, else
        with the rest of the turn's messages on the next one."""
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket is closed")
        if self._outbox or self._check_pending or not self._try_send(frames):
            self._outbox.append(frames)
        self._schedule_check()  # the send may have consumed the edge of incoming messages

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._outbox.clear()
        self.socket.close(linger=0)

    def _try_send(self, frames: Sequence[bytes]) -> bool:
        try:
            self.socket.send_multipart(frames, _NOBLOCK, copy=len(frames[-1]) < 65536)
        except zmq.Again:
            return False
        return True

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None
        self._check_pending = False  # a check scheduled on the old loop will not run on the new one

    def _schedule_check(self) -> None:
        if not self._check_pending and self._loop is not None and not self._loop.is_closed():
            self._check_pending = True
            self._loop.call_soon(self._on_events)

    def _on_events(self) -> None:
        self._check_pending = False
        socket = self.socket
        # The backend call returns a plain int: no flag-enum arithmetic per message. pyzmq types every option's
        # value as int | bytes; EVENTS is an int.
        get = cast(Callable[[int], int], socket.get)
        try:
            while not self._closed:
                events = get(_EVENTS)
                if self._outbox and events & _POLLOUT and self._flush():
                    continue  # a send may consume the edge: read the events again
                if not events & _POLLIN:
                    return
                for _ in range(DRAIN_BUDGET):
                    try:
                        frames = socket.recv_multipart(_NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)
                    if self._closed:
                        return
                    if not get(_EVENTS) & _POLLIN:  # cheaper than ending the drain on a zmq.Again
                        break
                else:
                    self._schedule_check()
                    return
        except zmq.ZMQError as exc:
            if self._closed:
                return
            if self._on_error is None:
                raise
            self._on_error(exc)

    def _flush(self) -> bool:
        """Hand queued messages to ZeroMQ until it would block; True if any went."""
        outbox = self._outbox
        sent = False
        while outbox and self._try_send(outbox[0]):
            outbox.popleft()
            sent = True
        return sent
