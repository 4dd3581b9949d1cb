"""A third-party PDU backend as a package would ship it: Shelly Gen1 relays (``relay/<N>?turn=on|off``).

Registered through the ``zdut.pdu_backends`` entry-point group (or ``pdu_backends.register``), never by
editing zdut; it has no toggle of its own, so the pdu module toggles by reading, then setting.
"""

from __future__ import annotations

import json

from zdut.devices.base import ModuleError
from zdut.devices.pdu_backends import PduHost


def set_outlet(host: PduHost, outlet: int, on: bool) -> None:
    host.get(f"relay/{outlet}", f"turn={'on' if on else 'off'}")


def get_outlet(host: PduHost, outlet: int) -> bool:
    try:
        return bool(json.loads(host.get(f"relay/{outlet}"))["ison"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModuleError(f"bad Shelly relay answer: {exc!r}") from None
