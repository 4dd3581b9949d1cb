"""Socket plumbing for asyncio peers (agent and client): non-blocking frame I/O.

Reads follow the fast pattern of zeromq-notes 4.1: ``await poll()`` on the
asyncio socket, then drain with non-blocking per-frame ``recv`` on a sync shadow
of the same socket until EAGAIN.  Sends are non-blocking too; a full pipe or an
unreachable peer becomes a ZdutError for the session that tried, never a stall.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from zdut.protocol import WITH_PAYLOAD, Code, Message, ProtocolError, ZdutError, decode

log = logging.getLogger("zdut.link")

#: Payloads this large are sent without copying (zeromq-notes 3.4).
ZERO_COPY_MIN = 65536
#: Generous HWMs: credit bounds what is in flight; these are only the backstop.
HWM = 100_000

#: handler(peer, message, payload)
Handler = Callable[[bytes, Message, Any], None]


def tune(sock: zmq.Socket[Any]) -> None:
    """Options every zdut socket gets."""
    sock.linger = 0
    sock.sndhwm = HWM
    sock.rcvhwm = HWM
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)


class Pump:
    """Receives from one asyncio socket and dispatches every well-formed message.

    Sends on the sync shadow bypass pyzmq's asyncio bookkeeping, and a send can
    consume the edge-triggered FD's "readable" notification of a message that
    arrived meanwhile; so after every send we check ZMQ_EVENTS and, if input is
    waiting, schedule a drain ourselves.  Without this a session can stall."""

    def __init__(self, sock: zmq.asyncio.Socket, with_peer: bool) -> None:
        self.sock = sock
        self.raw = zmq.Socket.shadow(sock.underlying)
        self.with_peer = with_peer
        self.handler: Handler | None = None
        self._scheduled = False

    async def run(self, handler: Handler) -> None:
        """Receive forever, calling handler(peer, message, payload)."""
        self.handler = handler
        while True:
            await self.sock.poll(flags=zmq.POLLIN)
            self.drain()

    def drain(self) -> None:
        self._scheduled = False
        handler, raw, with_peer = self.handler, self.raw, self.with_peer
        if handler is None:
            return
        while True:
            try:
                item = recv_message(raw, with_peer)
            except zmq.Again:
                return
            if item is not None:
                handler(*item)

    def after_send(self) -> None:
        if not self._scheduled and self.raw.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.drain)


class Link(Pump):
    """One socket whose messages start with a peer frame (ROUTER, or a DEALER towards a broker)."""

    def __init__(self, sock: zmq.asyncio.Socket, name: str) -> None:
        super().__init__(sock, with_peer=True)
        self.name = name

    def send(self, peer: bytes, header: bytes, payload: Any = None) -> None:
        raw = self.raw
        try:
            raw.send(peer, zmq.SNDMORE | zmq.NOBLOCK)
            if payload is None:
                raw.send(header, zmq.NOBLOCK)
            else:
                raw.send(header, zmq.SNDMORE | zmq.NOBLOCK)
                raw.send(payload, zmq.NOBLOCK, copy=len(payload) < ZERO_COPY_MIN)
        except zmq.Again:
            raise ZdutError(Code.UNAVAILABLE, f"{self.name}: peer is not keeping up (send queue full)") from None
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                raise ZdutError(Code.UNAVAILABLE, f"{self.name}: peer is gone") from None
            raise
        finally:
            self.after_send()

    def sender(self, peer: bytes) -> Callable[[bytes, Any], None]:
        """A send function bound to one peer (what a session's Stream uses)."""
        return lambda header, payload=None: self.send(peer, header, payload)


def recv_message(raw: zmq.Socket[Any], with_peer: bool) -> tuple[bytes, Message, Any] | None:
    """Read one message frame by frame; None (logged) if it is malformed.  Raises zmq.Again when empty."""
    peer = raw.recv(zmq.NOBLOCK) if with_peer else b""
    if with_peer and not raw.getsockopt(zmq.RCVMORE):
        log.warning("dropped a message without a header frame")
        return None
    header = raw.recv(zmq.NOBLOCK)
    payload = None
    extra = False
    if raw.getsockopt(zmq.RCVMORE):
        frame = raw.recv(zmq.NOBLOCK, copy=False)
        payload = frame.buffer
        while frame.more:  # more frames than any message has: drain them
            frame = raw.recv(zmq.NOBLOCK, copy=False)
            extra = True
    try:
        msg = decode(header)
    except ProtocolError as exc:
        log.warning("dropped an undecodable message: %s", exc)
        return None
    if extra or (payload is None) == isinstance(msg, WITH_PAYLOAD):
        log.warning("dropped %s with a wrong number of frames", type(msg).__name__)
        return None
    return peer, msg, payload
