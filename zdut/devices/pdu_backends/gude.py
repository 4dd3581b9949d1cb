"""Gude Expert Power Control: ``ov.html`` switches (1-based ports), ``statusjsn.js`` reports (0-based list)."""

from __future__ import annotations

import json

from zdut.devices.base import ModuleError
from zdut.devices.pdu_backends import PduHost


def set_outlet(host: PduHost, outlet: int, on: bool) -> None:
    host.get("ov.html", f"cmd=1&p={outlet + 1}&s={1 if on else 0}")


def get_outlet(host: PduHost, outlet: int) -> bool:
    try:
        outputs = json.loads(host.get("statusjsn.js", "components=1"))["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModuleError(f"failed to parse Gude status response: {exc}") from None
    if not isinstance(outputs, list) or not outputs:
        raise ModuleError("no outputs found in PDU status response")
    if outlet >= len(outputs):
        raise ModuleError(f"outlet {outlet} not found in PDU status (only {len(outputs)} outlets available)")
    value = outputs[outlet].get("state") if isinstance(outputs[outlet], dict) else None
    if value not in (0, 1):
        raise ModuleError(f"invalid Gude outlet state: {value!r}")
    return value == 1
