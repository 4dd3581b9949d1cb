"""The agent's direct port with security on: a Link that knows which key sent each message, and a socket
monitor that says (once) why a peer's handshake failed.

libzmq attaches the ZAP handler's User-Id to every frame of an authenticated connection, readable only on a
``zmq.Frame`` (docs/zeromq-notes 2.5, pitfall 4). ``transport.links.recv_message`` reads frames that way but
hands on only the decoded message, so :class:`KeyedLink` gives it a socket stand-in that keeps the frames it
read, and asks ``admit(link, peer, message, principal)`` before the agent's handler sees the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from zdut.common.keyring import Principal, peer_of
from zdut.protocol import Message
from zdut.transport.links import Handler, Link, recv_message

log = logging.getLogger("zdut.agent")

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


FAILED_EVENTS = _FAILED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def server_failure(event: int, value: int, keys: str) -> tuple[str, str] | None:
    """(cause, line) for a failed handshake on the CURVE direct port; None for what the ZAP handler already
    logged (an unknown key: it names the address and the key) and for a plain disconnect."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "null", ("refused a connection without CURVE (a client not given a key pair, or a server with "
                        f"security off): this agent's direct port takes only the keys in {keys}")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "server key", ("refused a connection whose CURVE hello does not decrypt: the peer holds the wrong "
                              f"server key for this agent (give it the public key of {keys}/server.key_secret)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol {value:#x}", f"a CURVE handshake failed: ZMTP protocol error {value:#x}"
    return None  # NO_DETAIL: the peer hung up (or the TCP connection broke) during the handshake


class HandshakeWatch:
    """Logs the failed handshakes the direct ROUTER's socket monitor reports, once per cause.

    libzmq allows one monitor per socket, so the monitor is the worker's (it counts connected peers too) and
    hands failure events here: :data:`FAILED_EVENTS` are the ones to ask it for. libzmq 4.3 without its draft
    API names only our own endpoint in a monitor event, never the peer's address (and the accepted
    connection's fd is closed by the time the event is read), so "once per peer" is once per cause here: a
    NULL peer, a peer holding the wrong server key. Unknown keys are the ZAP handler's to log (once per address
    and key), so they are only a debug line here."""

    def __init__(self, keys: str) -> None:
        self._keys = keys
        self._told: set[str] = set()

    def event(self, event: int, value: int) -> None:
        failure = server_failure(event, value, self._keys)
        if failure is None:
            log.debug("%s", "a handshake refused by ZAP (again): it logs each address and key once"
                      if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else f"a peer left during its handshake ({value})")
            return
        cause, line = failure
        if cause in self._told:
            log.debug("%s (again)", line)
        else:
            self._told.add(cause)
            log.warning("%s", line)
