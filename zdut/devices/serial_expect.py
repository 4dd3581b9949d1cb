"""The serial module's expect engine: read the port, tee everything to the client, match in a rolling window.

``expect`` first checks what is already buffered (output that arrived during an earlier step counts) and
consumes through the end of its match; ``send`` clears the buffer, so the next expect sees only output
produced after it.  Only an expect keeps output: monitor mode and the drain after a final send forward what
they read and keep nothing, so a console that talks for days costs no memory.

The window is bounded: a match may be at most MATCH_WINDOW characters of escape-stripped output long.
After each read the search starts where a match ending in the new output could start, at most
MATCH_WINDOW characters back (``pattern.search(buf, pos)``, so look-behinds still see what comes before),
and the buffer is cut back to MATCH_WINDOW characters whenever it reaches twice that, so each byte of output
costs a bounded amount of work however long the expect waits: time is linear in the output's length.
Searches are batched (every SEARCH_EVERY_S or quarter window of new output, whichever comes first), so a
console that trickles a byte per read costs a search per interval, not one per byte.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re

from zdut.devices.base import Session
from zdut.devices.serial_ansi import KEEP_ALL, STRIP_ALL, EscapeFilter
from zdut.devices.serial_ports import Port

#: The longest match an expect can find, in characters of (escape-stripped) output.
MATCH_WINDOW = 64 * 1024
#: While output keeps coming, an expect searches at most this often (or once per quarter window of output).
SEARCH_EVERY_S = 0.01


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
    """Reads the port, tees everything to the client and, while an expect waits, keeps a rolling window."""

    def __init__(self, port: Port, out: PrintWriter, keep_escapes: bool) -> None:
        self.port = port
        self.out = out
        self.filter = EscapeFilter(KEEP_ALL if keep_escapes else STRIP_ALL)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""  # output no expect has consumed yet: at most MATCH_WINDOW characters between reads

    async def read_more(self, deadline: float | None = None) -> str | None:
        """Read once, forward what arrived and return it (nothing is kept here); None if the loop time
        ``deadline`` passed first."""
        data = await self.port.read(deadline)
        if not data:
            return None
        text = self.decoder.decode(self.filter.feed(data))
        if text:
            await self.out.write(text)
        return text

    async def read_until(self, pattern: re.Pattern[str]) -> None:
        loop = asyncio.get_running_loop()
        buf = self.buf[-MATCH_WINDOW:]  # a local, so that += grows it in place
        self.buf = ""
        pos = 0  # matches must start here or later: earlier starts were tried against all they could reach
        try:
            while True:
                # Check what is already buffered first: output that arrived during an earlier step counts.
                match = pattern.search(buf, pos)
                if match:
                    self.buf = buf[match.end() :]
                    return
                if len(buf) >= 2 * MATCH_WINDOW:
                    buf = buf[-MATCH_WINDOW:]
                searched = len(buf)
                # Gather output for the next search: SEARCH_EVERY_S at most (from this search), or a quarter
                # window, so a console that sends a byte at a time costs a search per interval, not per byte.
                due = loop.time() + SEARCH_EVERY_S
                while len(buf) - searched < MATCH_WINDOW // 4:
                    text = await self.read_more(due if len(buf) > searched else None)
                    if text is None:
                        break
                    buf += text
                # A new match ends in the new text and is at most MATCH_WINDOW long: it starts at or after this.
                pos = max(0, searched + 1 - MATCH_WINDOW)
        except BaseException:
            self.buf = buf[-MATCH_WINDOW:]
            raise

    async def write(self, payload: bytes) -> None:
        await self.port.write(payload)
        self.buf = ""  # the next expect only sees output produced after this send

    async def pump(self) -> None:
        """Forward output until cancelled (monitor mode): nothing is kept."""
        while True:
            await self.read_more()

    async def drain(self, seconds: float) -> None:
        """Show output for a while; read errors end it quietly (the DUT may have just rebooted)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                await self.pump()
