"""The serial module's expect engine: read the port, tee everything to the client, match in a rolling window.

``expect`` first checks what is already buffered (output that arrived during an earlier step counts) and
consumes through the end of its match; ``send`` clears the buffer, so the next expect sees only output
produced after it.  The window keeps the last MATCH_WINDOW characters of escape-stripped output.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re

from zdut.devices.base import Session
from zdut.devices.serial_ansi import KEEP_ALL, STRIP_ALL, EscapeFilter
from zdut.devices.serial_ports import Port

#: How far back one expect may reach, in characters of (escape-stripped) output.
MATCH_WINDOW = 64 * 1024


class PrintWriter:
    """Serial output to the client as Print text; markers always start on a fresh line."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.at_line_start = True

    async def write(self, text: str) -> None:
        if text:
            await self.session.print(text)
            self.at_line_start = text.endswith("\n")

    async def marker(self, text: str) -> None:
        await self.write(text if self.at_line_start else "\n" + text)


class Engine:
    """Reads the port, tees everything to the client and keeps a rolling window to match against."""

    def __init__(self, port: Port, out: PrintWriter, keep_escapes: bool) -> None:
        self.port = port
        self.out = out
        self.filter = EscapeFilter(KEEP_ALL if keep_escapes else STRIP_ALL)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""

    async def read_more(self) -> None:
        text = self.decoder.decode(self.filter.feed(await self.port.read()))
        if text:
            await self.out.write(text)
            self.buf += text

    async def read_until(self, pattern: re.Pattern[str]) -> None:
        while True:
            # Check what is already buffered first: output that arrived during an earlier step counts.
            match = pattern.search(self.buf)
            if match:
                self.buf = self.buf[match.end() :]
                return
            if len(self.buf) > MATCH_WINDOW:
                self.buf = self.buf[-MATCH_WINDOW:]
            await self.read_more()

    async def write(self, payload: bytes) -> None:
        await self.port.write(payload)
        self.buf = ""  # the next expect only sees output produced after this send

    async def pump(self) -> None:
        while True:
            await self.read_more()

    async def drain(self, seconds: float) -> None:
        """Show output for a while; read errors end it quietly (the DUT may have just rebooted)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                await self.pump()
