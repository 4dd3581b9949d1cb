"""Sockets that face the network: routing ids no peer can predict, and frame sizes no peer can choose.

libzmq gives each anonymous peer of a ROUTER a 5-byte id, a 0 byte then a 32-bit counter that starts at
libc's ``rand()``.  Nothing seeds ``rand()``, so every fresh process starts at the same value
(0x006b8b4567), and a peer that claims one of those ids (ZMQ_ROUTING_ID) makes libzmq abort the whole
process when it later assigns the same id itself (``Assertion failed: ok (src/socket_base.cpp)``).
:func:`new_router` seeds ``rand()`` from the OS before each ROUTER exists, so the next ids are unknown to
everyone outside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

import zmq

#: Largest frame the agent's direct port accepts: a full payload chunk plus its header.
AGENT_MAX_FRAME = 1024 * 1024 + 64 * 1024
#: Largest frame a client accepts from its server: the longest listing (protocol.MAX_REPLY_BYTES).
CLIENT_MAX_FRAME = 64 * 1024 * 1024

_libc: Any = None


def _seed_routing_ids() -> None:
    """Seed libc's ``rand()``, which libzmq's ROUTER takes its first self-assigned id from."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))


def tcp_keepalive_instead_of_zmtp_heartbeats(sock: zmq.Socket[Any], unit_s: float) -> None:
    """No ZMTP heartbeats on a ROUTER that faces the network: libzmq 4.3.5 aborts (stream_engine_base.cpp:310,
    "!_io_error"; libzmq #4364) when its ping timer fires on a connection whose input it stopped (a peer
    sending faster than the loop reads, or reading no replies) and that the peer closed.  The kernel finds
    dead TCP instead: keepalive probes after 3 ``unit_s`` of silence, every ``unit_s``, 3 of them; sends to
    a dead peer then fail with EHOSTUNREACH.  Presence and sessions keep their own heartbeats and pings."""
    def whole_seconds(s: float) -> int:
        return min(max(1, round(s)), 32_767)

    sock.setsockopt(zmq.HEARTBEAT_IVL, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, whole_seconds(3 * unit_s))
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, whole_seconds(unit_s))
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)


def new_router(ctx: zmq.Context[Any], max_frame: int) -> zmq.Socket[Any]:
    """A ROUTER whose self-assigned routing ids are unpredictable and whose peers' frames are capped
    (ZMQ_MAXMSGSIZE: a larger frame closes that peer's connection before it is allocated)."""
    _seed_routing_ids()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    return sock
