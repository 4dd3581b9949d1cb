"""The serial module's background reader (``background: true``): the port's output while nobody is attached.

It keeps the port open and hands what the board prints to the agent (``Capture``: the device's journal and
its watchers), so a boot log at 3 a.m. is there to replay when someone attaches.  A session that claims the
port (``serial_ports.claim_port``) gets it exclusively: the reader closes it first and reopens it when the
session is done, and meanwhile the session's own output is recorded as that session's.  When the port goes
away (a USB adapter unplugged, a pty's other end closed) the reader says so, looks for it again every
``REOPEN_S`` and, once it is back, notes the gap.
"""

from __future__ import annotations

import asyncio
import time

from zdut.common.durations import format_duration
from zdut.devices.base import Capture, ModuleError
from zdut.devices.serial_ansi import KEEP_DISPLAY, EscapeFilter
from zdut.devices.serial_ports import Port, add_yielding, os_text, remove_yielding

#: How often a reader whose port is gone tries to open it again.
REOPEN_S = 1.0


class BackgroundReader:
    """Reads one port whenever no session holds it, until cancelled (``run``)."""

    def __init__(self, path: str, baud: int, capture: Capture) -> None:
        self.path, self.baud, self.capture = path, baud, capture
        self._reading: asyncio.Task[None] | None = None
        self._lost_at: float | None = None  # when the port went away (wall clock), while it is gone
        self._lost_why = ""
        self._stopped = False

    async def run(self) -> None:
        add_yielding(self)
        try:
            self.capture.note(f"reading {self.path} in the background while no session uses it")
            self.resume()
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._stopped = True  # a session that ends after this must not start reading again
            remove_yielding(self)
            await self.pause()

    async def pause(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    def resume(self) -> None:
        if not self._stopped:
            self._reading = asyncio.ensure_future(self._read(self._reading))

    async def _read(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # a pause that was itself cancelled: that reader closes the port first
            await asyncio.gather(previous, return_exceptions=True)
        while True:
            try:
                port = await Port.open(self.path, self.baud)
            except ModuleError as exc:
                self._lost(exc.message)
                await asyncio.sleep(REOPEN_S)
                continue
            self._back()
            try:
                escapes = EscapeFilter(KEEP_DISPLAY)  # as a console shows it: no queries a watcher's terminal answers
                while True:
                    self.capture.output(escapes.feed(await port.read()))
            except OSError as exc:
                self._lost(os_text(exc))
            finally:
                port.close()

    def _lost(self, why: str) -> None:
        if self._lost_at is None:
            self._lost_at, self._lost_why = time.time(), why
            self.capture.note(f"{self.path} is gone ({why}): opening it again as soon as it is back")

    def _back(self) -> None:
        if self._lost_at is not None:
            away = format_duration(round(time.time() - self._lost_at, 1))
            self.capture.gap(f"{self.path} was gone for {away} ({self._lost_why}): what the board printed "
                             "meanwhile is lost")
            self._lost_at = None
