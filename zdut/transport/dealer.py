"""The client's socket towards its server: a DEALER that fails fast, caps what a server can make it allocate, and
is a CURVE client when the client holds keys (``common.client_config``).

ZMQ_MAXMSGSIZE makes libzmq read a frame's size from its header and drop the connection when the frame is
larger than :data:`~zdut.common.limits.CLIENT_MAX_FRAME` (the longest reply there is), before allocating it:
a hostile or broken server costs the client a lost connection, never its memory.

libzmq says nothing when it cannot resolve a host name (it retries quietly, as if refused), so
:func:`unresolvable` looks the name up first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from typing import Any

import zmq

from zdut.common.client_config import ClientKeys
from zdut.common.daemon import off_loop
from zdut.common.flags import go_quote
from zdut.common.keyring import secure_client
from zdut.common.limits import CLIENT_MAX_FRAME
from zdut.transport.links import tune


class _HoldingContext(zmq.Context):
    """Keeps its sockets strongly: by the time a garbage-collected client's finalizer runs, the context's own
    weak references to them are gone, and ``term()`` would wait for ever for sockets it cannot close."""

    _held: list[zmq.Socket[Any]]

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_held", [])  # pyzmq's own __setattr__ takes a new name for a socket option

    def socket(self, *args: Any, **kwargs: Any) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = super().socket(*args, **kwargs)
        self._held.append(sock)
        return sock

    def release(self) -> None:
        for sock in self._held:
            sock.close(linger=0)
        self._held.clear()
        self.term()


def client_context(owner: object) -> zmq.Context[Any]:
    """A context closed (linger 0) when ``owner`` is garbage-collected: a client dropped without ``close()``
    would otherwise hang the interpreter in the context's ``__del__`` (``term()``) once its server has gone."""
    ctx = _HoldingContext()
    weakref.finalize(owner, ctx.release)
    return ctx


def client_socket(ctx: zmq.Context[Any], keys: ClientKeys | None = None) -> zmq.Socket[Any]:
    """The DEALER, not yet connected (CURVE options must be set before it connects)."""
    sock = ctx.socket(zmq.DEALER)
    tune(sock)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # fail fast instead of queueing towards nobody
    sock.setsockopt(zmq.MAXMSGSIZE, CLIENT_MAX_FRAME)
    if keys is not None:
        secure_client(sock, keys.pair, keys.server_key)
    return sock


async def unresolvable(ep: str, timeout: float) -> str | None:
    """Why the host of ``tcp://host:port`` cannot be resolved (within ``timeout``), or None if it can.

    The lookup runs on a daemon thread, so a resolver that hangs past the timeout holds up nothing, not even
    the loop's shutdown."""
    host = ep.partition("://")[2].rpartition(":")[0].rpartition(";")[2].strip("[]")
    try:
        ipaddress.ip_address(host)
        return None  # nothing to look up
    except ValueError:
        pass
    def look_up() -> str | None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            return f"cannot resolve host {go_quote(host)}: {exc.args[-1] if exc.args else exc}"
        return None

    try:
        async with asyncio.timeout(timeout):
            return await off_loop(look_up)
    except TimeoutError:
        return f"cannot resolve host {go_quote(host)} within {timeout:g}s"
