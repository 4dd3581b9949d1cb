"""Intellinet 163682 and compatibles (LogiLink PDU8P01): ``control_outlet.htm`` switches, ``status.xml`` reports."""

from __future__ import annotations

import re

from zdut.devices.base import ModuleError
from zdut.devices.pdu_backends import PduHost

ON, OFF, TOGGLE = "0", "1", "2"  # the device's own (inverted-looking) op codes


def set_outlet(host: PduHost, outlet: int, on: bool) -> None:
    host.get("control_outlet.htm", f"outlet{outlet}=1&op={ON if on else OFF}")


def toggle_outlet(host: PduHost, outlet: int) -> bool:
    host.get("control_outlet.htm", f"outlet{outlet}=1&op={TOGGLE}")
    try:
        return get_outlet(host, outlet)  # the control page does not echo the new state
    except ModuleError as exc:
        raise ModuleError(f"toggled outlet {outlet} but could not read back the resulting state: {exc}") from None


def get_outlet(host: PduHost, outlet: int) -> bool:
    body = host.get("status.xml").decode(errors="replace")
    match = re.search(rf"<outletStat{outlet}>(.*?)</outletStat{outlet}>", body, re.S)
    if match is None:
        raise ModuleError(f"outlet {outlet} not found in PDU status")
    value = match.group(1).strip()
    if value not in ("on", "off"):
        raise ModuleError(f"unexpected outlet state {value!r} for outlet {outlet}")
    return value == "on"
