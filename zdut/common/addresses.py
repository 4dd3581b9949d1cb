"""Server addresses as people type them (``host:port`` or ``tcp://host:port``), checked before anything connects.

A typo such as ``hostwithoutport``, ``http://host:1024`` or ``localhost:99999`` is refused here with one
message, so a front end can make it a usage error naming its flag instead of a socket error later.
"""

from __future__ import annotations


def endpoint(addr: str) -> str:
    """``host:port`` or ``tcp://host:port`` -> a ZeroMQ endpoint.  ``localhost`` means 127.0.0.1
    (libzmq resolves it, but binding it may pick ::1 only)."""
    if "://" in addr:
        return addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid address {addr!r}: want host:port or tcp://host:port")
    if host in ("", "localhost"):
        host = "127.0.0.1"
    elif host == "0.0.0.0":
        host = "*"
    return f"tcp://{host}:{port}"


WANT = "want host:port or tcp://host:port with a port from 1 to 65535"


def server_endpoint(address: str) -> str:
    """The ZeroMQ endpoint of ``address``; ValueError (whose text says what is wanted) if it is not one."""
    try:
        ep = endpoint(address)
    except ValueError:
        raise ValueError(WANT) from None
    scheme, _, rest = ep.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(WANT)
    return ep
