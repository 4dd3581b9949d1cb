"""Why a peer's CURVE handshake with a secure server failed, said once per cause (issue 12).

A handshake refused or broken is invisible to the application (docs/zeromq-notes 2.5, pitfall 3): a server
socket's monitor reports it. The agent's direct port and the broker's ROUTER both hand the monitor's failure
events (:data:`FAILED_EVENTS`) to a :class:`HandshakeWatch`, which says in one line what the peer got wrong.
"""

from __future__ import annotations

import logging
import os

import zmq

FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                 | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def server_failure(event: int, value: int, keys: str, port: str, server: str) -> tuple[str, str] | None:
    """(cause, line) for a failed handshake on a CURVE server socket (``port``: what the line calls the socket,
    ``server``: what it calls its process); None for what the ZAP handler already logged (an unknown key: it
    names the address and the key)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "null", ("refused a connection without CURVE (a client not given a key pair, or a server with "
                        f"security off): {port} takes only the keys in {keys}")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "server key", ("refused a connection whose CURVE hello does not decrypt: the peer holds the wrong "
                              f"server key for {server} (give it the public key of {keys}/server.key_secret)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol {value:#x}", f"a CURVE handshake failed: ZMTP protocol error {value:#x}"
    # NO_DETAIL: the peer hung up during the handshake. A NULL peer can end that way (seen under load, as EPIPE):
    # it read our CURVE greeting and dropped the connection before we read its own; libzmq does not retry after a
    # protocol error, so this may be the only trace it leaves.
    return "hung up", (f"a peer hung up during its CURVE handshake ({os.strerror(value) if value else 'no detail'}):"
                       f" most likely a client without a key pair, which {port} refuses (it takes only the keys in "
                       f"{keys}), or one that gave up")


class HandshakeWatch:
    """Logs the failed handshakes a server socket's monitor reports, once per cause.

    libzmq 4.3 without its draft API names only our own endpoint in a monitor event, never the peer's address
    (and the accepted connection's fd is closed by the time the event is read), so "once per peer" is once per
    cause here: a NULL peer, a peer holding the wrong server key, a peer that hung up mid-handshake. Unknown keys
    are the ZAP handler's to log (once per address and key), so they are only a debug line here."""

    def __init__(self, keys: str, log: logging.Logger, port: str = "this agent's direct port",
                 server: str = "this agent") -> None:
        self._keys, self._log, self._port, self._server = keys, log, port, server
        self._told: set[str] = set()

    def event(self, event: int, value: int) -> None:
        failure = server_failure(event, value, self._keys, self._port, self._server)
        if failure is None:
            self._log.debug("a handshake refused by ZAP (again): it logs each address and key once")
            return
        cause, line = failure
        if cause in self._told:
            self._log.debug("%s (again)", line)
        else:
            self._told.add(cause)
            self._log.warning("%s", line)
