"""Socket plumbing for asyncio peers (agent and client): non-blocking frame I/O.

Reads register the socket's ZMQ_FD with the asyncio loop and drain with
non-blocking per-frame ``recv`` while input is waiting.
Sends are non-blocking too; a full pipe or an unreachable peer becomes a
ZdutError for the session that tried, never a stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from zdut.common.answers import oversized
from zdut.common.logs import Throttle
from zdut.common.memtune import gc_paused
from zdut.protocol import MAX_HEADER_BYTES, WITH_PAYLOAD, Code, Message, ProtocolError, ZdutError, decode, encode

log = logging.getLogger("zdut.link")


class LoopThrottle(Throttle):
    """``common.logs.Throttle`` whose "N similar messages suppressed" summary comes out even when the flood
    stops: while lines go through it, a flush is kept scheduled on the running event loop."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        super().__init__(logger, per_s=period)
        self._period = period
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, level: int, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        super().__call__(level, key, fmt, *args, exc_info=exc_info)
        self._last = time.monotonic()
        if self._timer is None:
            self._schedule(self._period)

    def _schedule(self, delay: float) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)
        except RuntimeError:  # no loop (a synchronous caller): summaries wait for the next line
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        due = self._last + self._period - time.monotonic()  # when the newest window ends
        if due > 0:
            self._schedule(due + 0.05)


#: Lines about malformed input, rate-limited: a peer's flood of garbage is a few lines and a summary.
dropped = LoopThrottle(log)

# Peers send payloads with copy=True: a zero-copy send of a Python bytes object is only released through
# pyzmq's GC thread, and for 256 KiB chunks the copy measured the same file throughput (~370 MB/s round
# trip). The broker forwards received frames zero-copy, which needs no such thread.
#: Generous HWMs: credit bounds what is in flight; these are only the backstop.
HWM = 100_000

# Plain ints: combining pyzmq's enum flags (SNDMORE | NOBLOCK) costs microseconds per call on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
EVENTS, RCVMORE, POLLIN = int(zmq.EVENTS), int(zmq.RCVMORE), int(zmq.POLLIN)
#: pyzmq's Cython send without its Python wrapper, whose routing_id/group/copy_threshold checks cost ~0.4 us
#: a frame (bench/bench_wakeups.py counts what an echo pays); frames here are bytes, sent with copy=True.
_send = zmq.backend.Socket.send

#: handler(peer, message, payload)
Handler = Callable[[bytes, Message, Any], None]
#: Messages one wake-up handles before it yields to the loop (signals, timers, other sockets): a peer that
#: keeps the socket full can slow the others down, never hold up a SIGTERM or a keepalive.
BATCH = 256
#: A header this large is a bulk reply (a listing): decoded with the garbage collector paused.
BULK_HEADER_BYTES = 1 << 20


def int_option(sock: zmq.Socket[Any]) -> Callable[[int], int]:
    """``sock.getsockopt`` for integer options (EVENTS, RCVMORE, FD), which pyzmq types as ``int | bytes``."""
    return cast(Callable[[int], int], sock.getsockopt)


def tune(sock: zmq.Socket[Any]) -> None:
    """Options every zdut socket gets."""
    sock.linger = 0
    sock.sndhwm = HWM
    sock.rcvhwm = HWM
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)


class Pump:
    """Receives from one socket inside the asyncio loop and dispatches every well-formed message.

    The socket's ZMQ_FD is registered with the event loop directly (cheaper than
    zmq.asyncio's poll futures: one loop callback per burst).  That FD is
    edge-like: it only says "events changed", so each wake-up drains while
    ZMQ_EVENTS reports input, and every send checks ZMQ_EVENTS too, because a
    send can consume the notification of a message that arrived meanwhile."""

    def __init__(self, sock: zmq.Socket[Any], with_peer: bool, limit: int = MAX_HEADER_BYTES) -> None:
        self.sock = sock
        self._option = int_option(sock)
        self.with_peer = with_peer
        self.limit = limit
        self.handler: Handler | None = None
        self._scheduled = False

    async def run(self, handler: Handler) -> None:
        """Receive until cancelled, calling handler(peer, message, payload)."""
        self.handler = handler
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        loop.add_reader(fd, self.drain)
        try:
            self.drain()
            await loop.create_future()  # runs until cancelled
        finally:
            loop.remove_reader(fd)

    def drain(self) -> None:
        self._scheduled = False
        handler, raw, option = self.handler, self.sock, self._option
        if handler is None or raw.closed:
            return
        for _ in range(BATCH):
            if not option(EVENTS) & POLLIN:
                return
            try:
                item = self.receive()
            except zmq.Again:
                return
            if item is not None:
                try:
                    self.deliver(handler, item)
                except Exception:  # one bad message must not stop the socket
                    dropped(logging.ERROR, "handler error", "error handling %s", type(item[1]).__name__,
                            exc_info=True)
        if not raw.closed:  # more waiting: go on after whatever else the loop has to do (ZMQ_FD will not tell)
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.drain)

    def receive(self) -> tuple[bytes, Message, Any] | None:
        """One message from the socket (None: dropped as malformed); zmq.Again when there is none."""
        return recv_message(self.sock, self.with_peer, self.limit, self.oversize)

    def deliver(self, handler: Handler, item: tuple[bytes, Message, Any]) -> None:
        """Hand one received message on (a subclass may judge it first)."""
        handler(*item)

    def oversize(self, peer: bytes, header: bytes) -> None:
        """A header over ``limit`` (the frame itself is capped by ZMQ_MAXMSGSIZE): dropped, logged."""
        dropped(logging.WARNING, "dropped: undecodable", "dropped an undecodable message: header of %d bytes "
                "exceeds %d", len(header), self.limit)

    def send_frames(self, header: bytes, payload: Any = None, peer: bytes | None = None) -> None:
        """Send ``[peer][header][payload]`` without blocking; zmq errors propagate to the caller."""
        raw = self.sock
        try:
            if peer is not None:
                _send(raw, peer, MORE)
            if payload is None:
                _send(raw, header, NOBLOCK)
            else:
                _send(raw, header, MORE)
                _send(raw, payload, NOBLOCK)
        finally:
            self.after_send()

    def after_send(self) -> None:
        if not self._scheduled and self._option(EVENTS) & POLLIN:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.drain)


class Link(Pump):
    """One socket whose messages start with a peer frame (ROUTER, or a DEALER towards a broker)."""

    def __init__(self, sock: zmq.Socket[Any], name: str) -> None:
        super().__init__(sock, with_peer=True)
        self.name = name

    def send(self, peer: bytes, header: bytes, payload: Any = None) -> None:
        try:
            self.send_frames(header, payload, peer)
        except zmq.Again:
            raise ZdutError(Code.UNAVAILABLE, f"{self.name}: peer is not keeping up (send queue full)") from None
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                raise ZdutError(Code.UNAVAILABLE, f"{self.name}: peer is gone") from None
            raise

    def sender(self, peer: bytes) -> Callable[[bytes, Any], None]:
        """A send function bound to one peer (what a session's Stream uses)."""
        return functools.partial(self.send, peer)

    def oversize(self, peer: bytes, header: bytes) -> None:
        """A request whose header is over the limit is answered at once (an Error, or the Done of the Run it
        tried to open), never left to time out; anything else is dropped as the base class does."""
        reply = oversized(header, self.limit)
        if reply is None:
            super().oversize(peer, header)
            return
        dropped(logging.WARNING, "refused: oversize", "refused a request from %s: its header of %d bytes exceeds %d",
                peer.hex(), len(header), self.limit)
        with contextlib.suppress(ZdutError):
            self.send(peer, encode(reply))


def recv_message(
    raw: zmq.Socket[Any], with_peer: bool, limit: int = MAX_HEADER_BYTES,
    oversize: Callable[[bytes, bytes], None] | None = None,
) -> tuple[bytes, Message, Any] | None:
    """Read one message frame by frame; None (logged, or given to ``oversize(peer, header)`` if its header
    is over ``limit``) if it is malformed.  Raises zmq.Again when empty."""
    # Frames as zmq.Frame: .more is a field read, where getsockopt(RCVMORE) costs an enum lookup and a call.
    peer = b""
    if with_peer:
        first = raw.recv(NOBLOCK, copy=False)
        if not first.more:
            dropped(logging.WARNING, "dropped: no header frame", "dropped a message without a header frame")
            return None
        peer = first.bytes
    head = raw.recv(NOBLOCK, copy=False)
    header = head.bytes
    payload = None
    extra = False
    if head.more:
        frame = raw.recv(NOBLOCK, copy=False)
        payload = frame.buffer
        while frame.more:  # more frames than any message has: drain them
            frame = raw.recv(NOBLOCK, copy=False)
            extra = True
    if len(header) > limit and oversize is not None:
        oversize(peer, header)
        return None
    try:
        if len(header) < BULK_HEADER_BYTES:
            msg = decode(header, limit)
        else:  # a listing of 100,000 devices: the collector would rescan its objects, which hold no cycles
            with gc_paused():
                msg = decode(header, limit)
    except ProtocolError as exc:
        dropped(logging.WARNING, "dropped: undecodable", "dropped an undecodable message: %s", exc)
        return None
    if extra or (payload is None) == isinstance(msg, WITH_PAYLOAD):
        dropped(logging.WARNING, "dropped: wrong frame count", "dropped %s with a wrong number of frames",
                type(msg).__name__)
        return None
    return peer, msg, payload
