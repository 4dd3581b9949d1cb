"""What the broker reads: frames one at a time, each message checked for size and shape before use.

Only the header is decoded (into the one tagged union of zdut.protocol); a payload frame is taken as a
``zmq.Frame`` (copy=False) and forwarded untouched.  Whatever is malformed, unexpected or late is dropped
here, counted in the broker's stats and logged at a throttled rate, so nothing a peer sends can desync the
stream, crash the loop or flood the log.  A client's request that is refused unread (its header is over
MAX_HEADER_BYTES) is still answered at once, so that its sender never waits for a reply that cannot come.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq

from zdut.brokerd.outbox import Outbox
from zdut.common.answers import oversized, refusal
from zdut.common.logs import Throttle, hex_id
from zdut.protocol import MAX_HEADER_BYTES, Code, Data, FileChunk, Message, RunOpen, encode

log = logging.getLogger("zdut.broker")

_RCVMORE = int(zmq.RCVMORE)  # a plain int: enum flags cost a little on every call
_PAYLOAD = frozenset({Data, FileChunk})
_decoder = msgspec.msgpack.Decoder(Message)


class Inbox:
    """Reads from ``sock``; answers the requests it refuses through ``outbox``, which also says how much
    waits unread for each client."""

    def __init__(self, sock: zmq.Socket[Any], stats: dict[str, int], throttle: Throttle, outbox: Outbox) -> None:
        self._sock = sock
        self._stats = stats
        self._throttle = throttle
        self._outbox = outbox
        self._send = outbox.send

    def read(
        self, rid: bytes, head: zmq.Frame, limit: int = MAX_HEADER_BYTES, answer: bool = False
    ) -> tuple[Any, Any] | None:
        """Decode the header frame ``head`` and take the payload frame its type calls for; None (logged) if
        malformed.  ``answer``: a request over ``limit`` is refused with an error reply (the sender is a client).
        Frames are read as zmq.Frame because ``.more`` is a field, where getsockopt(RCVMORE) costs an option
        lookup on every message."""
        sock, header, more = self._sock, head.bytes, head.more
        if len(header) > limit:
            self.bad(rid, f"header of {len(header)} bytes exceeds {limit}")
            if answer and not self._outbox.admit(rid):  # a client over its unread budget hears nothing
                reply = oversized(header, limit)  # the agent's words too
                if reply is not None:
                    self._send(rid, encode(reply))
            return None
        try:
            msg = _decoder.decode(header)
        except ValueError as exc:  # msgspec.DecodeError, and UnicodeDecodeError for invalid UTF-8 in a str
            self.bad(rid, f"undecodable header: {exc}")
            return None
        payload = None
        if msg.__class__ in _PAYLOAD:
            if not more:
                self.bad(rid, f"{type(msg).__name__} without its payload frame")
                return None
            payload = sock.recv(copy=False)
            if payload.more:
                self.bad(rid, f"{type(msg).__name__} with extra frames")
                return None
        elif more:
            self.bad(rid, f"{type(msg).__name__} with extra frames")
            return None
        return msg, payload

    def admitted(self, rid: bytes, msg: Any) -> bool:
        """Whether a client's request may be handled.  A client that reads none of its replies (its parked
        queue is over budget: Outbox.admit) gets a small refusal instead, and past that nothing at all."""
        verdict = self._outbox.admit(rid)
        if not verdict:
            return True
        self._stats["refused"] += 1
        queued = self._outbox.cost(rid) >> 20
        if verdict == 1:
            text = f"refused: replies unread ({queued} MiB queued for this connection)"
            key = msg.sid if isinstance(msg, RunOpen) else msg.rid
            reply = refusal(msg.__struct_config__.tag, key, Code.UNAVAILABLE, text)
            if reply is not None:
                self._send(rid, encode(reply))
        self._throttle(
            logging.WARNING,
            "unread",
            "client %s reads none of its replies (%d MiB queued): %s its %s",
            hex_id(rid),
            queued,
            "refused" if verdict == 1 else "dropped",
            type(msg).__name__,
        )
        return False

    def discard_rest(self) -> int:
        """Read and drop the remaining frames of the current message, so the stream never desyncs."""
        sock = self._sock
        n = 0
        while sock.getsockopt(_RCVMORE):
            sock.recv(copy=False)
            n += 1
        return n

    def bad(self, rid: bytes, why: str) -> None:
        """Drop the rest of a malformed message."""
        self.discard_rest()
        self._stats["dropped"] += 1
        self._throttle(logging.WARNING, "bad input", "dropped a message from %s: %s", hex_id(rid), why)

    def unexpected(self, msg: Any, sender: str) -> None:
        """A well-formed message that ``sender`` has no business sending."""
        self._stats["dropped"] += 1
        self._throttle(logging.WARNING, "unexpected", "dropped unexpected %s from %s", type(msg).__name__, sender)

    def late(self, client: bytes, msg: Any) -> None:
        """A message for a session or request that is over (Credit after Done, replies after the agent was
        declared offline...): expected and harmless, counted and logged at debug level."""
        self._stats["late"] += 1
        if log.isEnabledFor(logging.DEBUG):
            self._throttle(
                logging.DEBUG,
                "late",
                "dropped late %s of client %s: no such session or request",
                type(msg).__name__,
                hex_id(client),
            )
