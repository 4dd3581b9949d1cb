"""Network power switches: pdu (a vendor backend per PDU make) and wifisocket (Tasmota).

Both speak HTTP through ``httpget``; the pdu module's vendor protocols live in
``pdu_backends`` (one small file each, more through an entry-point group).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from typing import ClassVar

import msgspec

from zdut.devices import pdu_backends
from zdut.devices.base import ModuleError, Session
from zdut.devices.httpget import absolute_url, basic_auth, http_get, join_url
from zdut.devices.pdu_backends import DEFAULT_VENDOR, Backend, PduHost
from zdut.devices.powerbase import STATUS, TOGGLE, PowerModule, on_off

# ---------------------------------------------------------------- PDU


class PDUOptions(msgspec.Struct, forbid_unknown_fields=True):
    vendor: str = DEFAULT_VENDOR
    host: str = ""
    user: str = ""
    password: str = ""
    outlet: int = 0


class PDU(PowerModule[PDUOptions]):
    id = "pdu"
    Options = PDUOptions
    title = "PDU module: control of a Power Distribution Unit (PDU) via HTTP."
    arguments_note = " (one is required)"
    powers = "outlet"
    more_verbs: ClassVar[dict[str, str]] = {TOGGLE: "Toggle the outlet power", STATUS: "Report the current power state"}

    def __init__(self, options: PDUOptions) -> None:
        super().__init__(options)
        self.vendor = (options.vendor or DEFAULT_VENDOR).lower()
        try:
            backend = pdu_backends.lookup(self.vendor)
        except Exception as exc:  # a registered third-party backend whose code does not import
            raise ModuleError(f"PDU vendor {self.vendor!r} cannot be loaded: {exc}") from exc
        if backend is None:
            known = ", ".join(pdu_backends.vendors())
            raise ModuleError(f"unknown PDU vendor {options.vendor!r} (known vendors: {known})")
        self._backend: Backend = backend
        self._host: PduHost | None = None
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        if not options.host:
            raise ModuleError("PDU host address not configured")
        self._url = absolute_url(options.host, "PDU")
        if options.outlet < 0:
            raise ModuleError(f"invalid outlet number {options.outlet}: outlet must be 0 or greater")
        if bool(options.user) != bool(options.password):
            raise ModuleError("PDU authentication requires both user and password to be set, or neither")

    def details(self) -> str:
        o = self.options
        others = [v for v in pdu_backends.vendors() if v != DEFAULT_VENDOR]
        vendors = " | ".join([f"{DEFAULT_VENDOR} (default)", *others])
        return (
            f"with: vendor ({vendors}), host (required, absolute URL such as\n"
            "      http://10.0.0.5), user + password (HTTP Basic auth; both or neither), outlet (0-based, default 0).\n"
            f"Controls outlet {o.outlet} of the PDU at {o.host} via the {self.vendor} API.\n"
        )

    @property
    def subject(self) -> str:
        return f"PDU outlet {self.options.outlet}"

    async def init(self) -> None:
        self._host = PduHost(self._url, self.options.user, self.options.password)

    @property
    def host(self) -> PduHost:
        if self._host is None:
            raise ModuleError("PDU backend not initialized: init must run successfully before run")
        return self._host

    async def no_verb(self, session: Session) -> None:
        raise ModuleError(f"no command specified, available commands: {self.available}")

    async def unknown_verb(self, session: Session, verb: str) -> None:
        raise ModuleError(f"unknown command {verb!r}, available commands: {self.available}")

    async def read(self) -> bool:
        return await asyncio.to_thread(self._backend.get_outlet, self.host, self.options.outlet)

    async def switch(self, verb: str) -> str:
        host, outlet = self.host, self.options.outlet
        toggle = getattr(self._backend, "toggle_outlet", None)
        if verb == TOGGLE and toggle is not None:
            on = bool(await asyncio.to_thread(toggle, host, outlet))
        else:
            try:
                on = await self.target(verb)
            except ModuleError as exc:
                raise ModuleError(f"could not read outlet {outlet} state to toggle it: {exc}") from None
            await asyncio.to_thread(self._backend.set_outlet, host, outlet, on)
        return f"PDU outlet {outlet} powered {on_off(on)}\n"


# ---------------------------------------------------------------- Tasmota WiFi socket


class WifiSocketOptions(msgspec.Struct, forbid_unknown_fields=True):
    host: str = ""
    user: str = ""
    password: str = ""
    channel: int = 1


class WifiSocket(PowerModule[WifiSocketOptions]):
    """A Tasmota socket (``/cm?cmnd=Power ON``).

    Tasmota answers wrong credentials with HTTP 200 and a JSON WARNING; zdut reports
    that as an error where dutctl would claim the requested state.  Credentials go
    both as Tasmota's ``user``/``password`` query arguments (what the firmware checks)
    and as HTTP Basic auth (what dutctl sends)."""

    id = "wifisocket"
    Options = WifiSocketOptions
    title = "WiFi Socket (Tasmota) module."
    powers = "socket"
    more_verbs: ClassVar[dict[str, str]] = {TOGGLE: "Toggle the socket", STATUS: "Query the current state"}

    def __init__(self, options: WifiSocketOptions) -> None:
        super().__init__(options)
        self._base = ""  # set by init
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        host = options.host.strip()
        if not host:
            raise ModuleError("wifisocket: host must be configured")
        if not host.startswith(("http://", "https://")):
            host = "http://" + host
        self._url = absolute_url(host.rstrip("/"), "wifisocket")
        if bool(options.user) != bool(options.password):
            raise ModuleError("wifisocket authentication requires both user and password to be set, or neither")

    def details(self) -> str:
        return (
            "with: host (required; http://IP[:PORT], a bare IP gets http://), user + password (optional; sent\n"
            "      as Tasmota's user/password arguments and as HTTP Basic auth), channel (relay number, default 1).\n"
        )

    @property
    def channel(self) -> int:
        return self.options.channel if self.options.channel > 0 else 1

    @property
    def subject(self) -> str:
        return f"WiFi socket channel {self.channel}"

    @property
    def _power(self) -> str:
        return "Power" if self.channel == 1 else f"Power{self.channel}"

    async def init(self) -> None:
        self._base = self._url

    async def _command(self, cmnd: str) -> bytes:
        """Run one Tasmota command; the JSON answer, a ModuleError if the socket refused it."""
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
        body = await http_get(url, basic_auth(o.user, o.password), f"WiFi socket at {self._base}")
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and "WARNING" in data:
            raise ModuleError(f"WiFi socket refused the command: {data['WARNING']}")
        return body

    def parse_state(self, body: bytes) -> bool:
        """Whether Tasmota's {"POWER": "ON"} or {"POWERn": ...} says on; ModuleError if it says neither."""
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
                return value.strip().upper() == "ON"
        raise ModuleError(f"unexpected device response: {text[:200]}")

    async def no_verb(self, session: Session) -> None:
        await session.print("No command specified. Call 'help' for usage.\n")

    async def read(self) -> bool:
        return self.parse_state(await self._command(self._power))

    async def switch(self, verb: str) -> str:
        body = await self._command(f"{self._power} {verb.upper()}")
        try:
            state = on_off(self.parse_state(body))
        except ModuleError:
            state = verb  # dutctl's fallback: report what was asked when the answer is unreadable
        return f"WiFi socket channel {self.channel} set to '{state}'\n"
