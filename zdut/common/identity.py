"""Identity from the key (issue 12): what a request from a user key may say, on any server with ``--keys``.

A secure server knows which key each message came with (its User-Id, ``keyring.peer_of``). A request names
its user (``msg.user``, the client's ``-u``); with security on that must be the key's name, and ``unlock
force`` and ``forget`` need a user the server's DIR/admins lists. The agent's direct port and the broker ask the same
question here, so both refuse in the same words.
"""

from __future__ import annotations

from typing import Any

from zdut.common.keyring import KeyRing, Principal
from zdut.protocol import Forget, Unlock


def user_refusal(msg: Any, who: Principal, ring: KeyRing, server: str) -> str | None:
    """Why request ``msg`` from user key ``who`` is refused by ``server`` ("agent", "broker"), or None."""
    if msg.user != who.name:
        return (f'user "{msg.user}" refused: this connection\'s key is user "{who.name}" '
                "(with security on, -u must be your key's name)")
    action = admin_action(msg)
    if action is not None and not ring.is_admin(who):
        return (f'{action} refused: user "{who.name}" is not an admin of this {server} '
                f"(the admins are listed in {ring.root / 'admins'})")
    return None


def admin_action(msg: Any) -> str | None:
    """The name of what ``msg`` asks that only an admin may (breaking another's lock, dropping an agent from the
    broker, which frees its device names for another agent key), or None."""
    if isinstance(msg, Unlock) and msg.force:
        return "unlock force"
    if isinstance(msg, Forget):
        return "forget"
    return None
