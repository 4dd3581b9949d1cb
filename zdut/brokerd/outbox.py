"""The broker's ROUTER socket and everything sent on it, without ever blocking the loop.

Every send is NOBLOCK on a ROUTER_MANDATORY socket, one frame at a time (never *_multipart):

* EHOSTUNREACH: the peer is gone.  Its routing id goes to ``lost`` and the broker ends its sessions after
  the current batch (their other sides are told).
* EAGAIN: the peer's pipe is full.  The message is parked in that peer's queue, behind which everything
  else for it waits, in order, and retried from the loop.  A peer whose queue makes no progress for
  CONGESTION_S, or grows past what credit allows, is reported to ``on_congested``.

Nothing is dropped silently.  See docs/architecture.md, "Flow control and liveness".
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from zdut.brokerd.timers import Coalesced, Timers
from zdut.common.limits import new_router, tcp_keepalive_instead_of_zmtp_heartbeats
from zdut.common.logs import hex_id
from zdut.protocol import CHUNK_SIZE, INITIAL_WINDOW, MAX_HEADER_BYTES, STDIN_WINDOW

log = logging.getLogger("zdut.broker")

#: libzmq disconnects a peer that sends a larger frame, before buffering it.  Payload chunks are at
#: most CHUNK_SIZE (1 MiB) and headers at most 64 KiB, so nothing legitimate is larger than this;
#: a Register listing many devices with long help texts gets a 4 MiB allowance.
MAX_FRAME = max(4 * 1024 * 1024, CHUNK_SIZE) + MAX_HEADER_BYTES
#: Per-peer pipe limits, in messages.  Credit bounds what is in flight per session (at most
#: INITIAL_WINDOW / MESSAGE_COST = 16 Ki messages, or 16 chunks of 1 MiB); the HWM is the backstop
#: that makes a peer that stops reading visible (EAGAIN) instead of growing libzmq's queue forever.
#: libzmq holds up to SNDHWM messages for a peer that reads nothing, whatever their size (a
#: 1,000-device listing is 21 KB: 210 MB at 10,000, 21 MB at 1,000), so the sending side gets the
#: smaller limit; what does not fit waits parked, counted in bytes (CLIENT_QUEUE_BYTES).  File
#: transfers keep 16 chunks in flight per session, far below it.
HWM = 10_000
SNDHWM = 1_000
#: A peer whose parked queue makes no progress this long fails its sessions.
CONGESTION_S = 5.0
#: ... and so does one whose parked queue grows past this plus its sessions' credit windows (only a peer
#: ignoring credit gets there).
PARK_LIMIT = 64 * 1024 * 1024
PARK_RETRY_S = 0.002
#: What a parked message costs besides its frames (the Python objects that hold it), so that a flood
#: of tiny replies is bounded too.
PARK_OVERHEAD = 2 * 1024
#: A client whose parked queue costs more than this (plus its sessions' credit windows) has its new
#: requests refused with a small error; past twice this they are dropped unanswered.
CLIENT_QUEUE_BYTES = 8 * 1024 * 1024

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: enum flags cost a little on every call
_NB = int(zmq.NOBLOCK)
#: pyzmq's Cython send without its Python wrapper (routing_id/group checks, ~0.4 us a frame); it applies
#: copy_threshold itself, so small frames sent with copy=False are still copied.
_send = zmq.backend.Socket.send


def bind_router(
    ctx: zmq.Context[Any], ep: str, hwm: int, heartbeat_s: float,
    prepare: Callable[[zmq.Socket[Any]], None] | None = None,
) -> zmq.Socket[Any]:
    """The broker's one socket, with the options the rules above rely on.  new_router: no peer can
    predict (and claim) the routing ids it assigns, and no frame over MAX_FRAME is ever allocated.
    ``prepare`` sets what must be set before the bind (with --keys: CURVE, ZAP, the socket monitor)."""
    sock = new_router(ctx, MAX_FRAME)
    sock.setsockopt(zmq.SNDHWM, min(hwm, SNDHWM) if hwm else 0)  # hwm 0: no limits (benchmarks)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.BACKLOG, 4096)  # a storm of agents (after a restart): fewer SYN retransmit waits (Linux caps
    # it at net.core.somaxconn, 4096 by default; 10,000 agents at once overflowed 1024 four times as often)
    sock.setsockopt(zmq.LINGER, 500)  # replies in flight at shutdown get a moment, never a hang
    tcp_keepalive_instead_of_zmtp_heartbeats(sock, heartbeat_s)  # docs/architecture.md, "Flow control and liveness"
    try:
        if prepare is not None:
            prepare(sock)
        sock.bind(ep)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


def _send_rest(sock: zmq.Socket[Any], a: Any, b: Any, c: Any) -> None:
    """The frames after an accepted routing id.  libzmq has then taken the whole message, so these cannot
    fail.  copy=False matters for payload frames only (received as zmq.Frame: forwarded without a copy)."""
    if b is None:
        _send(sock, a, _NB, copy=False)
    elif c is None:
        _send(sock, a, _MORE)
        _send(sock, b, _NB, copy=False)
    else:
        _send(sock, a, _MORE)
        _send(sock, b, _MORE)
        _send(sock, c, _NB, copy=False)


def _size(frames: tuple[Any, ...]) -> int:
    return sum(len(f) for f in frames if f is not None)


class Parked:
    """Messages for one peer whose pipe was full, in order."""

    __slots__ = ("items", "nbytes", "progress")

    def __init__(self, now: float) -> None:
        self.items: deque[tuple[Any, ...]] = deque()
        self.nbytes = 0
        self.progress = now  # last time a message to this peer went out


class Outbox:
    """Sends ``[rid][a][b?][c?]`` on ``sock``, parking and retrying for full peers.

    ``sessions_of(rid)`` says how many sessions run through a peer (each may have its credit windows in
    flight); ``on_congested(rid, why, undelivered)`` is told about a peer given up on, after its queue
    was dropped.  Times come from ``timers.now``.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        timers: Timers,
        stats: dict[str, int],
        sessions_of: Callable[[bytes], int],
        on_congested: Callable[[bytes, str, int], None],
    ) -> None:
        self._sock = sock
        self._timers = timers
        self._stats = stats
        self._sessions_of = sessions_of
        self._on_congested = on_congested
        self.parked: dict[bytes, Parked] = {}
        #: Peers found unreachable; the broker tears them down after the current batch.
        self.lost: set[bytes] = set()
        #: What a peer may have parked: park_limit, plus per_session for each of its sessions.
        self.park_limit = PARK_LIMIT
        self.per_session = INITIAL_WINDOW + STDIN_WINDOW
        self._retry_soon = Coalesced(timers, PARK_RETRY_S, self._retry_tick)

    def send(self, rid: bytes, a: Any, b: Any = None, c: Any = None) -> None:
        """Send without ever blocking: park on EAGAIN, mark lost on EHOSTUNREACH."""
        if self.parked and rid in self.parked:
            self._park(rid, (a, b, c))
            return
        sock = self._sock
        try:
            _send(sock, rid, _MORE)
        except zmq.Again:
            self._park(rid, (a, b, c))
            return
        except zmq.ZMQError as exc:
            self._unreachable(rid, exc)
            return
        _send_rest(sock, a, b, c)

    def cost(self, rid: bytes) -> int:
        """What is parked for a peer, in bytes: its frames plus PARK_OVERHEAD per message."""
        q = self.parked.get(rid)
        return 0 if q is None else q.nbytes + PARK_OVERHEAD * len(q.items)

    def admit(self, rid: bytes) -> int:
        """May a client's new request be answered?  0: yes; 1: refuse it with a small error; 2: drop it
        (its replies are not being read: its parked queue is over CLIENT_QUEUE_BYTES, or twice that,
        beyond what its sessions' credit allows)."""
        over = self.cost(rid) - self._sessions_of(rid) * self.per_session
        return 0 if over <= CLIENT_QUEUE_BYTES else 1 if over <= 2 * CLIENT_QUEUE_BYTES else 2

    def drop(self, rid: bytes) -> None:
        """Forget what is parked for a peer that is gone or replaced."""
        self.parked.pop(rid, None)

    def _unreachable(self, rid: bytes, exc: zmq.ZMQError) -> None:
        if exc.errno != errno.EHOSTUNREACH:
            log.error("send to %s failed: %s", hex_id(rid), exc)
        self.lost.add(rid)

    def _park(self, rid: bytes, frames: tuple[Any, ...]) -> None:
        q = self.parked.get(rid)
        if q is None:
            q = self.parked[rid] = Parked(self._timers.now)
            self._retry_soon.request()
        q.items.append(frames)
        q.nbytes += _size(frames)
        self._stats["parked"] += 1
        if q.nbytes > self.park_limit and q.nbytes > self.park_limit + self._sessions_of(rid) * self.per_session:
            # Every credited message costs at least its frames' size (MESSAGE_COST covers the header), so
            # a peer that respects credit never has more than its sessions' windows queued.
            self._congested(rid, f"{q.nbytes >> 20} MiB queued, more than its sessions' credit allows")

    def _retry_tick(self) -> None:
        self.retry()
        if self.parked:
            self._retry_soon.request()

    def retry(self) -> None:
        """Send what the parked queues can now take; give up on peers that made no progress for too long."""
        sock = self._sock
        now = self._timers.now
        for rid, q in list(self.parked.items()):
            if self.parked.get(rid) is not q:
                continue  # dropped meanwhile (its peer was torn down by an earlier iteration)
            items = q.items
            while items:
                frames = items[0]
                try:
                    _send(sock, rid, _MORE)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    self._unreachable(rid, exc)
                    break
                items.popleft()
                _send_rest(sock, *frames)
                q.nbytes -= _size(frames)
                q.progress = now
            if not items:
                self.parked.pop(rid, None)
            elif now - q.progress > CONGESTION_S:
                self._congested(rid, f"no progress for {now - q.progress:.1f}s")

    def _congested(self, rid: bytes, why: str) -> None:
        q = self.parked.pop(rid, None)
        self._on_congested(rid, why, len(q.items) if q else 0)
