"""Identity from the key (issue 12): what a request from a user key may say, on any server with ``--keys``.

A secure server knows which key each message came with (its User-Id, ``keyring.peer_of``). A request names
its user (``msg.user``, the client's ``-u``); with security on that must be the key's name, and ``unlock
force`` needs a user the server's DIR/admins lists. The agent's direct port and the broker ask the same
question here, so both refuse in the same words.
"""

from __future__ import annotations

from typing import Any

from zdut.common.keyring import KeyRing, Principal
from zdut.protocol import Unlock


def user_refusal(msg: Any, who: Principal, ring: KeyRing, server: str) -> str | None:
    """Why request ``msg`` from user key ``who`` is refused by ``server`` ("agent", "broker"), or None."""
    if msg.user != who.name:
        return (f'user "{msg.user}" refused: this connection\'s key is user "{who.name}" '
                "(with security on, -u must be your key's name)")
    if isinstance(msg, Unlock) and msg.force and not ring.is_admin(who):
        return (f'unlock force refused: user "{who.name}" is not an admin of this {server} '
                f"(the admins are listed in {ring.root / 'admins'})")
    return None
