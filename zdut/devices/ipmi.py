"""The ipmi module: chassis power control of a BMC over IPMI-over-LAN (RMCP+).

dutctl speaks IPMI natively; zdut drives the ``ipmitool`` binary instead (Debian
package ``ipmitool``), so it needs no extra Python dependency.  Every command is
one ipmitool run and hence one RMCP+ session; a failed run is retried once,
like dutctl's reconnect-and-retry.  The password travels in the environment
(``-E``), never on the command line where ``ps`` would show it.

``ciphersuite`` (default 3) is a zdut addition: without ``-C`` ipmitool first
asks the BMC for its cipher suites, which BMCs that do not implement that
command (ipmi_sim among them) answer only after a 10 s timeout.  Suite 3
(HMAC-SHA1, AES-128) is the one every IPMI 2.0 BMC offers; newer BMCs that
allow only suite 17 need ``ciphersuite: 17``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
from typing import ClassVar

import msgspec

from zdut.common.durations import parse_duration
from zdut.devices.base import ModuleError
from zdut.devices.powerbase import ON, STATUS, PowerModule
from zdut.devices.process import exit_message, run_captured

log = logging.getLogger("zdut.devices.ipmi")

DEFAULT_PORT = 623
DEFAULT_TIMEOUT_S = 10.0
ATTEMPTS = 2  # the first try and one retry
INSTALL_HINT = "install the Debian package 'ipmitool': apt-get install ipmitool"

_STATUS = re.compile(r"Chassis Power is (on|off)", re.I)


class IPMIOptions(msgspec.Struct, forbid_unknown_fields=True):
    host: str = ""
    port: int = DEFAULT_PORT
    user: str = ""
    password: str = ""
    timeout: str = "10s"
    ciphersuite: int = 3


class IPMI(PowerModule[IPMIOptions]):
    id = "ipmi"
    Options = IPMIOptions
    title = "IPMI Power Management Module"
    arguments_note = " (case-insensitive)"
    #: after on and off; every verb but status is also ipmitool's ``chassis power`` verb
    more_verbs: ClassVar[dict[str, str]] = {
        "cycle": "Power cycle (off, then on)",
        "reset": "Reset the device (if supported)",
        STATUS: "Show current power status",
    }

    def __init__(self, options: IPMIOptions) -> None:
        super().__init__(options)
        # Checked here, not in init: the config loader builds every module, so --check-config and start-up
        # both refuse these (a ModuleError from the constructor is a config error).
        if not options.host:
            raise ModuleError("IPMI host is not set")
        if not 0 < self._port < 65536:
            raise ModuleError(f"invalid IPMI port {options.port}")
        if not 0 <= options.ciphersuite <= 17:
            raise ModuleError(f"invalid ciphersuite {options.ciphersuite}: must be 0..17")
        self._tool = ""
        self._timeout = DEFAULT_TIMEOUT_S

    def details(self) -> str:
        return (
            "with: host (required), port (default 623), user, password, timeout (Go duration per attempt,\n"
            "      default 10s), ciphersuite (RMCP+ cipher suite, default 3).\n"
            f"Commands are sent to the BMC at {self.options.host}:{self._port} using ipmitool.\n"
        )

    @property
    def _port(self) -> int:
        return self.options.port or DEFAULT_PORT

    async def init(self) -> None:
        self._timeout = self._parse_timeout(self.options.timeout)
        path = shutil.which("ipmitool")
        if path is None:
            raise ModuleError(f"ipmitool not found on PATH ({INSTALL_HINT})")
        self._tool = path

    @staticmethod
    def _parse_timeout(text: str) -> float:
        # dutctl falls back to the default on a bad value instead of refusing to start.
        try:
            seconds = parse_duration(text) if text else DEFAULT_TIMEOUT_S
        except ValueError:
            log.warning("ipmi: invalid timeout %r, using %gs", text, DEFAULT_TIMEOUT_S)
            return DEFAULT_TIMEOUT_S
        return seconds if seconds > 0 else DEFAULT_TIMEOUT_S

    def argv(self, *command: str) -> list[str]:
        o = self.options
        argv = [self._tool or "ipmitool", "-I", "lanplus", "-H", o.host, "-p", str(self._port)]
        argv += ["-C", str(o.ciphersuite), "-N", str(max(1, math.ceil(self._timeout))), "-R", "1"]
        if o.user:
            argv += ["-U", o.user]
        return [*argv, "-E", *command]  # -E: password from IPMI_PASSWORD; never prompts

    async def _ipmitool_once(self, *command: str) -> str:
        env = dict(os.environ, IPMI_PASSWORD=self.options.password)
        # -R 1 lets ipmitool try twice per run; the margin covers process start-up.
        deadline = 2 * max(1, math.ceil(self._timeout)) + 5
        try:
            async with asyncio.timeout(deadline):
                result = await run_captured(self.argv(*command), env=env)
        except FileNotFoundError:
            raise ModuleError(f"ipmitool not found on PATH ({INSTALL_HINT})") from None
        if result.status != 0:
            detail = " ".join(result.stderr.decode(errors="replace").split()) or exit_message("ipmitool", result.status)
            raise ModuleError(f"BMC {self.options.host}:{self._port}: {detail}")
        return result.stdout.decode(errors="replace")

    async def _ipmitool(self, *command: str) -> str:
        if not self._tool:
            raise ModuleError("IPMI module not initialized: init must run successfully before run")
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._ipmitool_once(*command)
            except (ModuleError, TimeoutError) as exc:
                if attempt == ATTEMPTS:
                    if isinstance(exc, TimeoutError):
                        raise ModuleError(f"BMC {self.options.host}:{self._port}: no answer") from None
                    raise
                log.info("ipmi: %s failed (%s), retrying once", " ".join(command), exc)
        raise AssertionError("unreachable")

    def report(self, on: bool) -> str:
        return f"Device power status: {'On' if on else 'Off'}\n"

    async def read(self) -> bool:
        try:
            out = await self._ipmitool("chassis", "power", STATUS)
        except ModuleError as exc:
            raise ModuleError(f"failed to get chassis status: {exc.message}") from None
        match = _STATUS.search(out)
        if match is None:
            raise ModuleError(f"failed to get chassis status: unexpected ipmitool output {out.strip()!r}")
        return match.group(1).lower() == ON

    async def switch(self, verb: str) -> str:
        try:
            await self._ipmitool("chassis", "power", verb)
        except ModuleError as exc:
            raise ModuleError(f"power {verb} command failed: {exc.message}") from None
        return f"Power {verb.upper()} command sent\n"
