"""One side of a Run session's message stream: sequence numbers, credit and liveness.

The agent and the client both own one ``Stream`` per session; it stamps outgoing
messages with the next sequence number, makes flow-controlled messages wait for
credit, checks incoming sequence numbers and returns credit as the owner
consumes what it received.  It never touches a socket: ``send_frames`` does.

Credit is enforced by the receiver too: every flow-controlled message that arrives is charged against the
window this side granted the peer (the same cost the sender takes), and a peer that sends past it has its
session aborted before the message is queued anywhere, so nothing a peer sends can grow memory beyond
the windows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from zdut import protocol as wire
from zdut.protocol import (
    INITIAL_WINDOW,
    MESSAGE_COST,
    SESSION_PING_S,
    SESSION_TIMEOUT_S,
    STDIN,
    WINDOW_MAIN,
    WINDOW_STDIN,
    Code,
    Credit,
    Data,
    FileChunk,
    FileEnd,
    FileOpen,
    FileRequest,
    Ping,
    StdinEof,
    ZdutError,
    encode,
)

#: send_frames(header_bytes, payload_or_None) -> None; raises ZdutError if the peer is gone.
SendFrames = Callable[[bytes, Any], None]

#: The messages a sender sends with ``send_credited`` (so the receiver charges them): what each costs is
#: ``credit_cost``.  Everything else (Credit, Ping, Cancel, Resize, FileAbort, RunStarted, Done) is free.
CREDITED = (Data, StdinEof, FileRequest, FileOpen, FileChunk, FileEnd)
_WINDOW_NAMES = {WINDOW_MAIN: "main", WINDOW_STDIN: "stdin"}


def credit_cost(msg: wire.SessionMessage, payload: Any) -> tuple[int, int] | None:
    """(window, bytes) a flow-controlled message costs, as its sender took them; None if it is free."""
    if not isinstance(msg, CREDITED):
        return None
    window = WINDOW_STDIN if isinstance(msg, StdinEof) or (isinstance(msg, Data) and msg.stream == STDIN) \
        else WINDOW_MAIN
    return window, MESSAGE_COST + (len(payload) if payload is not None else 0)



class _Window:
    """Credit towards the peer for one class of messages."""

    def __init__(self, size: int) -> None:
        self.available = size
        self._waiters: list[asyncio.Future[None]] = []

    async def take(self, n: int) -> None:
        while self.available < n:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        self.available -= n

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def give(self, n: int) -> None:
        self.available += n
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def fail(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)


class Stream:
    """Sequence, credit and liveness bookkeeping for one session on one side."""

    def __init__(self, sid: int, send_frames: SendFrames, windows: dict[int, int] | None = None,
                 granted: dict[int, int] | None = None) -> None:
        """``windows``: the credit the peer gives us, per window; ``granted``: the credit we give the peer."""
        self.sid = sid
        self._send_frames = send_frames
        self._tx_seq = 0
        self._rx_seq = 0
        self._windows = {w: _Window(size) for w, size in (windows or {WINDOW_MAIN: INITIAL_WINDOW}).items()}
        self._granted = dict(granted or {WINDOW_MAIN: INITIAL_WINDOW})
        self._rx_credit = dict(self._granted)  # what the peer may still send us, per window
        self._consumed: dict[int, int] = {}
        self.last_rx = self.last_tx = time.monotonic()
        self.closed: ZdutError | None = None

    # ------------------------------------------------------------- sending
    def send(self, cls: type[wire.SessionMessage], payload: Any = None, **fields: Any) -> None:
        """Send a message that needs no credit (control, or credit already taken)."""
        if self.closed is not None:
            raise self.closed
        self._tx_seq += 1
        header = encode(cls(sid=self.sid, seq=self._tx_seq, **fields))
        self.last_tx = time.monotonic()
        self._send_frames(header, payload)

    async def send_credited(
        self, cls: type[wire.SessionMessage], payload: Any = None, window: int = WINDOW_MAIN, **fields: Any
    ) -> None:
        """Wait for credit, then send a flow-controlled message."""
        if self.closed is not None:
            raise self.closed
        await self._windows[window].take(MESSAGE_COST + (len(payload) if payload is not None else 0))
        self.send(cls, payload, **fields)

    def try_send_credited(self, cls: type[wire.SessionMessage], payload: Any = None, window: int = WINDOW_MAIN,
                          **fields: Any) -> bool:
        """Send a flow-controlled message at once if its credit is there and nobody waits before it."""
        w = self._windows[window]
        need = MESSAGE_COST + (len(payload) if payload is not None else 0)
        if self.closed is not None or w.waiting or w.available < need:
            return False
        w.available -= need
        self.send(cls, payload, **fields)
        return True

    def fail(self, error: ZdutError) -> None:
        """The session is over: wake and fail every sender waiting for credit."""
        if self.closed is None:
            self.closed = error
            for w in self._windows.values():
                w.fail(error)

    # ------------------------------------------------------------- receiving
    def received(self, msg: wire.SessionMessage, payload: Any = None) -> None:
        """Check an incoming message: its sequence number and, if it is flow-controlled, that it fits the
        credit we granted (raises Aborted on a gap or a peer past its window; the message must then be
        dropped, not queued)."""
        self.last_rx = time.monotonic()
        seq = msg.seq
        if seq != self._rx_seq + 1:
            raise ZdutError(
                Code.ABORTED, f"session {self.sid}: sequence gap: expected message {self._rx_seq + 1}, got {seq}"
            )
        self._rx_seq = seq
        cost = credit_cost(msg, payload)
        if cost is None:
            return
        window, nbytes = cost
        left = self._rx_credit.get(window, 0) - nbytes
        if left < 0:
            size = self._granted.get(window, 0)
            raise ZdutError(
                Code.ABORTED,
                f"session {self.sid}: the peer sent past its {_WINDOW_NAMES.get(window, str(window))} credit "
                f"window ({type(msg).__name__} of {nbytes} bytes with {nbytes + left} of {size} bytes of credit "
                "left): it does not wait for credit",
            )
        self._rx_credit[window] = left

    def granted(self, nbytes: int, window: int) -> None:
        """The peer returned credit."""
        w = self._windows.get(window)
        if w is not None:
            w.give(nbytes)

    def consumed(self, nbytes: int, window: int = WINDOW_MAIN) -> None:
        """We consumed a flow-controlled message: return its credit in batches of a quarter window."""
        total = self._consumed.get(window, 0) + nbytes + MESSAGE_COST
        if total >= self._granted.get(window, INITIAL_WINDOW) // 4:
            total_sent, total = total, 0
            if self.closed is None:
                self._grant(total_sent, window)
        self._consumed[window] = total

    def flush_credit(self) -> None:
        """Return all credit consumed so far (used when a stream goes idle)."""
        for window, total in self._consumed.items():
            if total and self.closed is None:
                self._consumed[window] = 0
                self._grant(total, window)

    def _grant(self, nbytes: int, window: int) -> None:
        self.send(Credit, nbytes=nbytes, window=window)
        self._rx_credit[window] = self._rx_credit.get(window, 0) + nbytes

    # ------------------------------------------------------------- liveness
    def tick(self, now: float) -> ZdutError | None:
        """Send a Ping if we have been quiet; return an error if the peer has been silent too long."""
        if now - self.last_rx > SESSION_TIMEOUT_S:
            return ZdutError(Code.UNAVAILABLE, f"no message from the peer for {SESSION_TIMEOUT_S:g}s")
        if now - self.last_tx >= SESSION_PING_S and self.closed is None:
            self.flush_credit()
            if now - self.last_tx >= SESSION_PING_S:
                self.send(Ping)
        return None


#: Each (stream, on_lost) pair: on_lost(error) ends the session whose peer went silent.
Watched = Iterable[tuple[Stream, Callable[[ZdutError], None]]]

#: How often session keepalive runs.
TICK_S = 0.5


async def keep_alive(sessions: Callable[[], Watched]) -> None:
    """Forever: ping quiet sessions and end those whose peer has been silent too long."""
    while True:
        await asyncio.sleep(TICK_S)
        now = time.monotonic()
        for stream, on_lost in list(sessions()):
            try:
                error = stream.tick(now)
            except ZdutError as exc:  # the ping could not be sent: the peer is gone
                error = exc
            if error is not None:
                on_lost(error)
