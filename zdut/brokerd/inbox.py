"""What the broker reads: frames one at a time, each message checked for size and shape before use.

Only the header is decoded (into the one tagged union of zdut.protocol); a payload frame is taken as a
``zmq.Frame`` (copy=False) and forwarded untouched.  Whatever is malformed, unexpected or late is dropped
here, counted in the broker's stats and logged at a throttled rate, so nothing a peer sends can desync the
stream, crash the loop or flood the log.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import zmq

from zdut.common.logs import Throttle, hex_id
from zdut.protocol import MAX_HEADER_BYTES, Data, FileChunk, Message

log = logging.getLogger("zdut.broker")

_RCVMORE = int(zmq.RCVMORE)  # a plain int: enum flags cost a little on every call
_PAYLOAD = frozenset({Data, FileChunk})
_decoder = msgspec.msgpack.Decoder(Message)


class Inbox:
    def __init__(self, sock: zmq.Socket[Any], stats: dict[str, int], throttle: Throttle) -> None:
        self._sock = sock
        self._stats = stats
        self._throttle = throttle

    def read(self, rid: bytes, header: bytes, limit: int = MAX_HEADER_BYTES) -> tuple[Any, Any] | None:
        """Decode the header and take the payload frame its type calls for; None (logged) if malformed."""
        sock = self._sock
        more = sock.getsockopt(_RCVMORE)
        if len(header) > limit:
            self.bad(rid, f"header of {len(header)} bytes exceeds {limit}")
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
