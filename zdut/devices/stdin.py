"""The client's stdin as a Session hands it to a module: chunks in order, lines, and EOF once."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class StdinBuffer:
    """Chunks fed by the transport, read by the module; ``on_consumed(nbytes)`` fires as each chunk is taken.

    ``b""`` fed (or ``close()``) is EOF: every read after it returns ``b""``.  ``closed``: at EOF from the start
    (a client that sends no input says so when it opens the session).
    """

    def __init__(self, on_consumed: Callable[[int], None] | None = None, closed: bool = False) -> None:
        # A deque and one waiter, not an asyncio.Queue: a console echo pays for every step of this hop.
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._buffer = b""
        self._eof = closed
        self._on_consumed = on_consumed

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.feed(b"")

    async def _take(self) -> bytes:
        while not self._chunks:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        if self._on_consumed is not None:
            self._on_consumed(len(chunk))
        if not chunk:
            self._eof = True
        return chunk

    async def read(self) -> bytes:
        """The next chunk (what is left of one a readline split first), b"" at EOF."""
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        if self._eof:
            return b""
        return await self._take()

    async def readline(self) -> bytes:
        """One line including its newline; the final partial line at EOF; b"" after EOF."""
        while b"\n" not in self._buffer and not self._eof:
            self._buffer += await self._take()
        line, sep, self._buffer = self._buffer.partition(b"\n")
        return line + sep
