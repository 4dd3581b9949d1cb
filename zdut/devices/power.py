"""Network power switches: pdu (Intellinet, Gude) and wifisocket (Tasmota).

Plain HTTP GETs with the standard library, run in a thread so the event loop
keeps serving other sessions.  Proxies from the environment are ignored on
purpose: these devices sit on the lab network and an inherited http_proxy
would only break them.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import ClassVar

import msgspec

from zdut.devices.base import Module, ModuleError, Session

HTTP_TIMEOUT_S = 10.0
MAX_BODY = 1024 * 1024  # status pages are a few KiB; never buffer a runaway response
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HTTPStatusError(ModuleError):
    """The device answered with a non-200 status."""


def basic_auth(user: str, password: str) -> dict[str, str]:
    if not (user and password):
        return {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def _get(url: str, headers: dict[str, str], what: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.read(MAX_BODY)
    except urllib.error.HTTPError as exc:
        body = exc.read(512).decode(errors="replace").strip()
        raise HTTPStatusError(f"{what} request failed with status {exc.code} {exc.reason}: {body}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise ModuleError(f"{what} did not answer within {timeout:g}s") from None
        raise ModuleError(f"cannot reach {what}: {exc.reason}") from None
    except TimeoutError:
        raise ModuleError(f"{what} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ModuleError(f"cannot reach {what}: {exc}") from None
    except http.client.HTTPException as exc:  # not HTTP at all, or a connection cut mid-answer
        raise ModuleError(f"bad answer from {what}: {exc!r}") from None


async def http_get(url: str, headers: dict[str, str], what: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    """GET url and return the body of a 200 answer; ModuleError naming ``what`` otherwise."""
    return await asyncio.to_thread(_get, url, headers, what, timeout)


def join_url(base: str, path: str, query: str = "") -> str:
    """base URL + one path segment (keeping any path prefix of base) + query."""
    url = base.rstrip("/") + "/" + path
    return f"{url}?{query}" if query else url


# ---------------------------------------------------------------- PDU

ON, OFF, TOGGLE, STATUS = "on", "off", "toggle", "status"
PDU_COMMANDS = (ON, OFF, TOGGLE, STATUS)


class PDUOptions(msgspec.Struct, forbid_unknown_fields=True):
    vendor: str = "intellinet"
    host: str = ""
    user: str = ""
    password: str = ""
    outlet: int = 0


class _Backend:
    """One vendor's HTTP API: set an outlet and read it back."""

    def __init__(self, base: str, headers: dict[str, str], what: str) -> None:
        self.base, self.headers, self.what = base, headers, what

    async def get(self, path: str, query: str = "") -> bytes:
        return await http_get(join_url(self.base, path, query), self.headers, self.what)

    async def set_power(self, outlet: int, action: str) -> str:
        raise NotImplementedError

    async def state(self, outlet: int) -> str:
        raise NotImplementedError


class Intellinet(_Backend):
    """Intellinet 163682 and compatibles (LogiLink PDU8P01): control_outlet.htm + status.xml."""

    OPS: ClassVar[dict[str, str]] = {ON: "0", OFF: "1", TOGGLE: "2"}  # the device's own (inverted-looking) encoding

    async def set_power(self, outlet: int, action: str) -> str:
        await self.get("control_outlet.htm", f"outlet{outlet}=1&op={self.OPS[action]}")
        if action != TOGGLE:
            return action
        try:
            return await self.state(outlet)  # the control page does not echo the new state
        except ModuleError as exc:
            raise ModuleError(f"toggled outlet {outlet} but could not read back the resulting state: {exc}") from None

    async def state(self, outlet: int) -> str:
        body = (await self.get("status.xml")).decode(errors="replace")
        match = re.search(rf"<outletStat{outlet}>(.*?)</outletStat{outlet}>", body, re.S)
        if match is None:
            raise ModuleError(f"outlet {outlet} not found in PDU status")
        value = match.group(1).strip()
        if value not in (ON, OFF):
            raise ModuleError(f"unexpected outlet state {value!r} for outlet {outlet}")
        return value


class Gude(_Backend):
    """Gude Expert Power Control: ov.html switches (1-based ports), statusjsn.js reports (0-based list)."""

    async def set_power(self, outlet: int, action: str) -> str:
        if action == TOGGLE:
            try:
                current = await self.state(outlet)
            except ModuleError as exc:
                raise ModuleError(f"could not read outlet {outlet} state to toggle it: {exc}") from None
            action = OFF if current == ON else ON
        await self.get("ov.html", f"cmd=1&p={outlet + 1}&s={1 if action == ON else 0}")
        return action

    async def state(self, outlet: int) -> str:
        body = await self.get("statusjsn.js", "components=1")
        try:
            outputs = json.loads(body)["outputs"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModuleError(f"failed to parse Gude status response: {exc}") from None
        if not isinstance(outputs, list) or not outputs:
            raise ModuleError("no outputs found in PDU status response")
        if outlet >= len(outputs):
            raise ModuleError(f"outlet {outlet} not found in PDU status (only {len(outputs)} outlets available)")
        value = outputs[outlet].get("state") if isinstance(outputs[outlet], dict) else None
        if value not in (0, 1):
            raise ModuleError(f"invalid Gude outlet state: {value!r}")
        return ON if value == 1 else OFF


VENDORS: dict[str, type[_Backend]] = {"intellinet": Intellinet, "gude": Gude}


def absolute_url(host: str, what: str) -> str:
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ModuleError(
            f"invalid {what} host {host!r}: must be an absolute URL including scheme (e.g. http://10.0.0.5)"
        )
    return host


class PDU(Module):
    id = "pdu"
    Options = PDUOptions

    def __init__(self, options: msgspec.Struct) -> None:
        super().__init__(options)
        self._backend: _Backend | None = None

    def help(self) -> str:
        o = self.options
        return (
            "PDU module: control of a Power Distribution Unit (PDU) via HTTP.\n"
            "Arguments: on|off|toggle|status (one is required)\n"
            "  on      - Power on the outlet\n"
            "  off     - Power off the outlet\n"
            "  toggle  - Toggle the outlet power\n"
            "  status  - Report the current power state\n"
            "with: vendor (intellinet (default) | gude), host (required, absolute URL such as http://10.0.0.5),\n"
            "      user + password (HTTP Basic auth; both or neither), outlet (0-based, default 0).\n"
            f"Controls outlet {o.outlet} of the PDU at {o.host} via the {o.vendor or 'intellinet'} API.\n"
        )

    async def init(self) -> None:
        o = self.options
        if not o.host:
            raise ModuleError("PDU host address not configured")
        base = absolute_url(o.host, "PDU")
        if o.outlet < 0:
            raise ModuleError(f"invalid outlet number {o.outlet}: outlet must be 0 or greater")
        if bool(o.user) != bool(o.password):
            raise ModuleError("PDU authentication requires both user and password to be set, or neither")
        vendor = (o.vendor or "intellinet").lower()
        backend = VENDORS.get(vendor)
        if backend is None:
            raise ModuleError(f"unknown PDU vendor {o.vendor!r} (supported: {', '.join(VENDORS)})")
        self._backend = backend(base, basic_auth(o.user, o.password), f"PDU at {base}")

    async def run(self, session: Session, args: list[str]) -> None:
        if self._backend is None:
            raise ModuleError("PDU backend not initialized: init must run successfully before run")
        commands = ", ".join(PDU_COMMANDS)
        if not args:
            raise ModuleError(f"no command specified, available commands: {commands}")
        cmd = args[0].lower()
        outlet = self.options.outlet
        if cmd == STATUS:
            state = await self._backend.state(outlet)
            await session.print(f"PDU outlet {outlet} state: {state}\n")
        elif cmd in (ON, OFF, TOGGLE):
            state = await self._backend.set_power(outlet, cmd)
            await session.print(f"PDU outlet {outlet} powered {state}\n")
        else:
            raise ModuleError(f"unknown command {cmd!r}, available commands: {commands}")


# ---------------------------------------------------------------- Tasmota WiFi socket


class WifiSocketOptions(msgspec.Struct, forbid_unknown_fields=True):
    host: str = ""
    user: str = ""
    password: str = ""
    channel: int = 1


class WifiSocket(Module):
    """A Tasmota socket (``/cm?cmnd=Power ON``).

    Tasmota answers wrong credentials with HTTP 200 and a JSON WARNING; zdut reports
    that as an error where dutctl would claim the requested state.  Credentials go
    both as Tasmota's ``user``/``password`` query arguments (what the firmware checks)
    and as HTTP Basic auth (what dutctl sends)."""

    id = "wifisocket"
    Options = WifiSocketOptions

    def __init__(self, options: msgspec.Struct) -> None:
        super().__init__(options)
        self._base = ""

    def help(self) -> str:
        return (
            "WiFi Socket (Tasmota) module.\n"
            "Arguments: on|off|toggle|status\n"
            "  on      - Power on the socket\n"
            "  off     - Power off the socket\n"
            "  toggle  - Toggle the socket\n"
            "  status  - Query the current state\n"
            "with: host (required; http://IP[:PORT], a bare IP gets http://), user + password (optional; sent\n"
            "      as Tasmota's user/password arguments and as HTTP Basic auth), channel (relay number, default 1).\n"
        )

    @property
    def channel(self) -> int:
        return self.options.channel if self.options.channel > 0 else 1

    @property
    def _power(self) -> str:
        return "Power" if self.channel == 1 else f"Power{self.channel}"

    async def init(self) -> None:
        o = self.options
        host = o.host.strip()
        if not host:
            raise ModuleError("wifisocket: host must be configured")
        if not host.startswith(("http://", "https://")):
            host = "http://" + host
        self._base = absolute_url(host.rstrip("/"), "wifisocket")
        if bool(o.user) != bool(o.password):
            raise ModuleError("wifisocket authentication requires both user and password to be set, or neither")

    async def _command(self, cmnd: str) -> bytes:
        if not self._base:
            raise ModuleError("wifisocket not initialized: init must run successfully before run")
        o = self.options
        query = "cmnd=" + urllib.parse.quote(cmnd, safe="")
        if o.user and o.password:
            # Tasmota itself checks user/password query arguments; the Basic header is
            # what dutctl sends (and what an authenticating proxy in front expects).
            creds = urllib.parse.urlencode({"user": o.user, "password": o.password}, quote_via=urllib.parse.quote)
            query = f"{creds}&{query}"
        url = join_url(self._base, "cm", query)
        return await http_get(url, basic_auth(o.user, o.password), f"WiFi socket at {self._base}")

    def parse_state(self, body: bytes) -> str:
        """'on'/'off' from Tasmota's {"POWER": "ON"} or {"POWERn": ...}; ModuleError otherwise."""
        text = body.decode(errors="replace").strip()
        if not text:
            raise ModuleError("empty response from the WiFi socket")
        try:
            data = json.loads(text)
        except ValueError:
            raise ModuleError(f"invalid JSON response from the WiFi socket: {text[:200]}") from None
        if not isinstance(data, dict):
            raise ModuleError(f"unexpected device response: {text[:200]}")
        for key in ("POWER", f"POWER{self.channel}"):
            value = data.get(key)
            if isinstance(value, str) and value.strip().upper() in ("ON", "OFF"):
                return value.strip().lower()
        raise ModuleError(f"unexpected device response: {text[:200]}")

    @staticmethod
    def _check_warning(body: bytes) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            return
        if isinstance(data, dict) and "WARNING" in data:
            raise ModuleError(f"WiFi socket refused the command: {data['WARNING']}")

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            await session.print("No command specified. Call 'help' for usage.\n")
            return
        cmd = args[0].lower()
        if cmd == STATUS:
            body = await self._command(self._power)
            self._check_warning(body)
            await session.print(f"WiFi socket channel {self.channel} state: {self.parse_state(body)}\n")
        elif cmd in (ON, OFF, TOGGLE):
            body = await self._command(f"{self._power} {cmd.upper()}")
            self._check_warning(body)
            try:
                state = self.parse_state(body)
            except ModuleError:
                state = cmd  # dutctl's fallback: report what was asked when the answer is unreadable
            await session.print(f"WiFi socket channel {self.channel} set to '{state}'\n")
        else:
            await session.print(f"Unknown command: {cmd}\nAvailable commands: on, off, toggle, status\n")
