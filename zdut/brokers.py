"""Several brokers for one lab: a client given ``a:1024,b:1024,c:1024`` talks to the first that answers.

Agents register with every broker and own all the state, so any broker serves the same truth and a client may
use whichever is up.  Each client starts at its own place in the list (``common.addresses.start_order``:
CRC-32 of its host name and process id), so a hundred CI jobs given one list spread over it, and a broker that
comes back is used again by the clients that start after it.  With more than one address a broker that does
not answer is given ``TRY_S`` before the next is tried.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from zdut.client import CONNECT_TIMEOUT_S, Client
from zdut.common.addresses import server_list, start_order
from zdut.protocol import Code, ZdutError

#: How long one broker of several is given to answer before the next is tried.
TRY_S = 1.0
#: The failures after which the next broker is tried: nobody there, or not in time.
_MOVE_ON = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


def client_order(servers: str | list[str]) -> list[str]:
    """The addresses of ``servers`` (a comma-separated string or a list) in the order this client tries them;
    InvalidArgument for a list that is not one."""
    try:
        addresses = server_list(servers) if isinstance(servers, str) else [a for s in servers for a in server_list(s)]
    except ValueError as exc:
        raise ZdutError(Code.INVALID_ARGUMENT, f"invalid server address {servers!r}: {exc}") from None
    return start_order(addresses, f"{socket.gethostname()}:{os.getpid()}")


async def connect_first(addresses: list[str], make: Callable[[str, float], Client], after: str = "") -> Client:
    """Connect to the first of ``addresses`` that answers (starting after ``after``, when it is one of them);
    ``make(address, connect_timeout)`` builds each Client.  A broker that refuses us for a reason of its own
    (a key it does not know, an incompatible version) is not passed over silently: that error is raised, as is
    Unavailable naming every broker and why, when none answered."""
    if after in addresses:
        i = addresses.index(after) + 1
        addresses = addresses[i:] + addresses[:i]
    timeout = TRY_S if len(addresses) > 1 else CONNECT_TIMEOUT_S
    problems: list[ZdutError] = []
    for address in addresses:
        client = make(address, timeout)
        try:
            await client.connect()
        except ZdutError as exc:
            if exc.code not in _MOVE_ON or len(addresses) == 1:
                raise
            problems.append(exc)
            continue
        return client
    raise ZdutError(Code.UNAVAILABLE, "no zdut server answered: " + "; ".join(p.message for p in problems))
