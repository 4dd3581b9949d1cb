"""The client's socket towards its server: a DEALER that fails fast and caps what a server can make it allocate.

ZMQ_MAXMSGSIZE makes libzmq read a frame's size from its header and drop the connection when the frame is
larger than :data:`~zdut.common.limits.CLIENT_MAX_FRAME` (the longest reply there is), before allocating it:
a hostile or broken server costs the client a lost connection, never its memory.
"""

from __future__ import annotations

from typing import Any

import zmq

from zdut.common.limits import CLIENT_MAX_FRAME
from zdut.transport.links import tune


def client_socket(ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    tune(sock)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # fail fast instead of queueing towards nobody
    sock.setsockopt(zmq.MAXMSGSIZE, CLIENT_MAX_FRAME)
    return sock
