"""Server addresses as people type them (``host:port``, ``tcp://host:port``, or a comma-separated list of
them), checked before anything connects.

A typo such as ``hostwithoutport``, ``http://host:1024`` or ``localhost:99999`` is refused here with one
message, so a front end can make it a usage error naming its flag instead of a socket error later.
"""

from __future__ import annotations

import zlib


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


def server_list(text: str) -> list[str]:
    """A comma-separated list of servers (``a:1024,b:1024``; one server is a list of one) -> the addresses, each
    checked; ValueError saying which entry is wrong and what is wanted."""
    items = [item.strip() for item in text.split(",")]
    if len(items) > 1 and not all(items):
        raise ValueError("an empty entry in the list: want host:port,host:port")
    seen: dict[str, str] = {}
    for item in items:
        try:
            ep = server_endpoint(item)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}" if len(items) > 1 else str(exc)) from None
        if ep in seen:
            raise ValueError(f"{item!r} is listed twice (as {seen[ep]!r})" if item != seen[ep]
                             else f"{item!r} is listed twice")
        seen[ep] = item
    return items


def start_order(addresses: list[str], seed: str) -> list[str]:
    """The order a client tries ``addresses`` in, so that clients given the same list spread over it: from the
    entry at CRC-32 of ``seed`` (the client's host name and process id) modulo the list's length, round the list."""
    start = zlib.crc32(seed.encode()) % len(addresses) if addresses else 0
    return addresses[start:] + addresses[:start]
