"""A client socket's connection events, from libzmq's socket monitor: up, down, and why it never came up.

ZeroMQ reconnects silently underneath, so a client learns about its connection only by asking: the
monitor socket reports each TCP connect, handshake and disconnect. From them it tells the causes apart:
connection retries with no TCP connection ever accepted mean nobody listens there (refused); a connection
accepted and then dropped or failed in the handshake means the port speaks something other than ZMTP (an
HTTP or SSH server, a listener sending garbage); a connection accepted with no greeting at all means a
listener that says nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.transport.links import EVENTS, NOBLOCK, POLLIN, int_option

_WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

#: An accepted connection that has not greeted in this long is not a ZMTP peer (a zdut server greets at once).
GREETING_S = 1.2
REFUSED = "connection refused"
NOT_ZMTP = "the port answered, but not in ZMTP: is it a zdut server?"


def silent(greeting_s: float) -> str:
    return f"the port accepted the connection but sent no ZMTP greeting within {greeting_s:g}s: is it a zdut server?"


class ConnectionMonitor:
    """Calls ``on_up`` after each handshake and ``on_down`` after each disconnect; until the first handshake,
    resolves ``failed`` with why it is not coming, ``refused_grace_s`` after the first failed attempt: the
    latest attempt's outcome, :data:`REFUSED` (no TCP connection accepted) or :data:`NOT_ZMTP` (accepted, then
    dropped or failed in the handshake); or :func:`silent` when an accepted connection has not greeted
    within ``greeting_s``.

    Create it before ``sock.connect`` so that no event is missed."""

    def __init__(self, sock: zmq.Socket[Any], on_up: Callable[[], None], on_down: Callable[[], None],
                 refused_grace_s: float, greeting_s: float = GREETING_S) -> None:
        self._monitor = sock.get_monitor_socket(_WATCHED)
        self._option = int_option(self._monitor)
        self._on_up, self._on_down = on_up, on_down
        self._grace, self._greeting = refused_grace_s, greeting_s
        self._loop = asyncio.get_running_loop()
        self._decision: asyncio.TimerHandle | None = None  # the verdict, a grace after the first failure
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._outcome = ""
        self._connected_since_retry = False
        self.up = False
        self.failed: asyncio.Future[str] = self._loop.create_future()

    async def run(self) -> None:
        """Handle events until cancelled."""
        fd = self._monitor.fileno()
        self._loop.add_reader(fd, self._ready)
        try:
            self._ready()
            await self._loop.create_future()
        finally:
            self._loop.remove_reader(fd)
            self._stop_timers()

    def _ready(self) -> None:
        while not self._monitor.closed and self._option(EVENTS) & POLLIN:
            self._event(parse_monitor_message(self._monitor.recv_multipart(NOBLOCK))["event"])

    def _event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._stop_timers()
            self._outcome = ""
            self.up = True
            self._on_up()
        elif event == zmq.EVENT_DISCONNECTED and self.up:
            self.up = False
            self._on_down()
        elif self.up or self.failed.done():
            return
        elif event == zmq.EVENT_CONNECTED:
            self._connected_since_retry = True
            if self._greeting_timer is None:
                self._greeting_timer = self._loop.call_later(self._greeting, self._give_up, silent(self._greeting))
        elif event & _HANDSHAKE_FAILED or event == zmq.EVENT_DISCONNECTED:
            self._failed(NOT_ZMTP)
        elif event == zmq.EVENT_CONNECT_RETRIED:
            if not self._connected_since_retry:  # this attempt never got a TCP connection
                self._failed(REFUSED)
            self._connected_since_retry = False

    def _failed(self, outcome: str) -> None:
        """The latest attempt failed: the verdict is the latest outcome, a grace after the first failure (a
        server restarting as we connect gets a moment to come back)."""
        self._outcome = outcome
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
            self._greeting_timer = None
        if self._decision is None:
            self._decision = self._loop.call_later(self._grace, self._give_up, "")

    def _stop_timers(self) -> None:
        for timer in (self._decision, self._greeting_timer):
            if timer is not None:
                timer.cancel()
        self._decision = self._greeting_timer = None

    def _give_up(self, why: str) -> None:
        self._decision = self._greeting_timer = None
        if not self.up and not self.failed.done():
            self.failed.set_result(why or self._outcome)
