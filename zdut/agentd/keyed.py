"""The agent's direct port with security on: a Link that knows which key sent each message (why a peer's
handshake failed is said by ``common.handshakes.HandshakeWatch``, which the broker shares).

libzmq attaches the ZAP handler's User-Id to every frame of an authenticated connection, readable only on a
``zmq.Frame`` (docs/zeromq-notes 2.5, pitfall 4). ``transport.links.recv_message`` reads frames that way but
hands on only the decoded message, so :class:`KeyedLink` gives it a socket stand-in that keeps the frames it
read, and asks ``admit(link, peer, message, principal)`` before the agent's handler sees the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from zdut.common.keyring import Principal, peer_of
from zdut.protocol import Message
from zdut.transport.links import Handler, Link, recv_message

#: admit(link, peer, message, principal): whether the agent's handler gets the message (admit answers a refusal).
Admit = Callable[[Link, bytes, Message, "Principal | None"], bool]


class _Keeping:
    """The direct ROUTER as ``recv_message`` uses it (``recv(flags, copy=False)``), keeping each frame read."""

    __slots__ = ("frames", "sock")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.frames: list[zmq.Frame] = []

    def recv(self, flags: int, copy: bool = False) -> zmq.Frame:
        frame = self.sock.recv(flags, copy=False)
        self.frames.append(frame)
        return frame


class KeyedLink(Link):
    """A Link whose every message is judged by ``admit`` with the principal of the key it came with."""

    def __init__(self, sock: zmq.Socket[Any], name: str, admit: Admit,
                 known: Callable[[Principal | None], bool]) -> None:
        super().__init__(sock, name)
        self.admit, self.known = admit, known
        self._keeping = _Keeping(sock)

    def oversize(self, peer: bytes, header: bytes) -> None:
        """Only a known key's oversized request is answered; anyone else's is dropped."""
        frames = self._keeping.frames
        if self.known(peer_of(frames[1]) if len(frames) > 1 else None):
            super().oversize(peer, header)

    def receive(self) -> tuple[bytes, Message, Any] | None:
        self._keeping.frames.clear()
        return recv_message(self._keeping, True, self.limit, self.oversize)  # type: ignore[arg-type]

    def deliver(self, handler: Handler, item: tuple[bytes, Message, Any]) -> None:
        frames = self._keeping.frames
        who = peer_of(frames[1]) if len(frames) > 1 else None  # the header frame: the peer's own
        frames.clear()
        if self.admit(self, item[0], item[1], who):
            handler(*item)
