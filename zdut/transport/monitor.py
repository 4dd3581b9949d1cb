"""A client socket's connection events, from libzmq's socket monitor: up, down, and refused.

ZeroMQ reconnects silently underneath, so a client learns about its connection only by asking: the
monitor socket reports each handshake and disconnect, and connection retries that go on for a grace
period mean nobody listens at the address at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.transport.links import EVENTS, NOBLOCK, POLLIN, int_option

_WATCHED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class ConnectionMonitor:
    """Calls ``on_up`` after each handshake and ``on_down`` after each disconnect; resolves ``refused``
    once connecting has been retried for ``refused_grace_s`` without ever succeeding.

    Create it before ``sock.connect`` so that no event is missed."""

    def __init__(self, sock: zmq.Socket[Any], on_up: Callable[[], None], on_down: Callable[[], None],
                 refused_grace_s: float) -> None:
        self._monitor = sock.get_monitor_socket(_WATCHED)
        self._option = int_option(self._monitor)
        self._on_up, self._on_down = on_up, on_down
        self._grace = refused_grace_s
        self._first_retry: float | None = None
        self.up = False
        self.refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        """Handle events until cancelled."""
        loop = asyncio.get_running_loop()
        fd = self._monitor.fileno()
        loop.add_reader(fd, self._ready)
        try:
            self._ready()
            await loop.create_future()
        finally:
            loop.remove_reader(fd)

    def _ready(self) -> None:
        while not self._monitor.closed and self._option(EVENTS) & POLLIN:
            self._event(parse_monitor_message(self._monitor.recv_multipart(NOBLOCK))["event"])

    def _event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._first_retry = None
            self.up = True
            self._on_up()
        elif event == zmq.EVENT_DISCONNECTED:
            self.up = False
            self._on_down()
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.up:
            now = time.monotonic()
            self._first_retry = self._first_retry or now
            if now - self._first_retry >= self._grace and not self.refused.done():
                self.refused.set_result(None)
