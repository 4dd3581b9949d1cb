"""Interactive sessions from Python: a console to send to and ``expect`` from, as pexpect's ``spawn`` is.

    async with AsyncLab() as lab:
        async with await lab.open("board", "serial", "console", transcript="boot.log") as console:
            await console.sendline("version")
            await console.expect(r"U-Boot (\\S+)")
            print(console.match.group(1), "came after", console.before)

``zdut.api.Lab.open`` gives the same console without ``await``.  The vocabulary is pexpect's where the two
overlap: a pattern is a regular expression (``str``, compiled with ``re.DOTALL``, or a compiled pattern) or
a list of them, ``EOF`` and ``TIMEOUT`` may be in the list, ``expect`` returns the index of the pattern that
matched first in the output, and afterwards ``before`` holds the text before the match, ``after`` the
match's text and ``match`` the ``re.Match``.  Not in the list, a timeout raises ``ExpectTimeout``
(``Code.DEADLINE_EXCEEDED``) and the end of the session raises ``SessionEnded`` (``Code.OUT_OF_RANGE``).

Matching runs on the device's output (stdout and printed text) decoded as UTF-8 (undecodable bytes become
U+FFFD).  The agent's own notices on stderr (``[zdut: bob is watching]``) are not matched, so they can never
split a prompt; they are in ``stderr`` and in the transcript.  The transcript file gets every byte the
session printed, as a terminal would show it.  Output no ``expect`` or ``read`` has taken yet is kept, up
to ``BUFFER_CHARS``; beyond that the console stops taking more (the agent waits) until it is read: nothing
is dropped.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import IO, Any

from zdut.client import Run, RunHandler
from zdut.protocol import STDERR, Code, ZdutError

#: Output held for ``expect`` and ``read`` before the console makes the agent wait.
BUFFER_CHARS = 1024 * 1024
#: pexpect's default ``expect`` timeout.
DEFAULT_TIMEOUT_S = 30.0
#: After ``close``, how long to wait for the agent to confirm the end (and free the device).
CLOSE_GRACE_S = 5.0


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: In an ``expect`` list: match the end of the session (``before`` is then all that was left).
EOF = _Sentinel("EOF")
#: In an ``expect`` list: match the timeout running out (``before`` is what came meanwhile, still unread).
TIMEOUT = _Sentinel("TIMEOUT")

Pattern = str | re.Pattern[str] | _Sentinel


class ExpectTimeout(ZdutError):
    """Nothing matched within the timeout (``Code.DEADLINE_EXCEEDED``); ``before`` is the unread output."""

    def __init__(self, message: str, before: str) -> None:
        super().__init__(Code.DEADLINE_EXCEEDED, message)
        self.before = before


class SessionEnded(ZdutError):
    """The session ended before a match (``Code.OUT_OF_RANGE``).  ``before`` is the unread output; ``error``
    is how the session ended (None: it ended well)."""

    def __init__(self, message: str, before: str, error: ZdutError | None) -> None:
        super().__init__(Code.OUT_OF_RANGE, message)
        self.before, self.error = before, error


class _Output(RunHandler):
    """Feeds the console what the session prints."""

    def __init__(self, console: AsyncConsole) -> None:
        super().__init__()
        self._console = console

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        self._console._received(stream, data, consumed)


class AsyncConsole:
    """One interactive session (``AsyncLab.open``): ``send``, ``sendline``, ``expect``, ``read``, ``close``."""

    #: What ``sendline`` appends (pexpect's ``os.linesep``); a board that wants CR sets ``"\r"``.
    linesep = "\n"

    def __init__(self, device: str, command: str, transcript: str | os.PathLike[str] | None = None) -> None:
        """A console for a session still to open: pass ``handler`` to ``Client.run``, then ``attach`` the run."""
        self.device, self.command = device, command
        self.handler: RunHandler = _Output(self)
        self.before = ""
        self.after: str | _Sentinel | None = None
        self.match: re.Match[str] | _Sentinel | None = None
        self.stderr = ""  # the session's stderr, decoded (not matched)
        self._run: Run | None = None
        self._buffer = ""
        self._decoders = {0: _decoder(), STDERR: _decoder()}
        self._deferred: list[Callable[[], None]] = []  # credit held back while the buffer is full
        self._arrived = asyncio.Event()
        self._transcript: IO[bytes] | None = open(transcript, "wb") if transcript is not None else None

    async def attach(self, run: Run) -> AsyncConsole:
        """This console's session, once the agent started it; the agent's refusal (a locked device) raises."""
        self._run = run
        run.finished.add_done_callback(lambda _: self._arrived.set())
        await run.started
        if run.finished.done():
            self._close_transcript()
            await run.wait()  # refused: raises why
        return self

    @property
    def run(self) -> Run:
        if self._run is None:
            raise ZdutError(Code.FAILED_PRECONDITION, "the console is not attached to a session yet")
        return self._run

    # ------------------------------------------------------------- state
    @property
    def ended(self) -> bool:
        """The session is over (what it printed may still be unread)."""
        return self.run.finished.done()

    @property
    def error(self) -> ZdutError | None:
        """How the session ended: None while it runs or when it ended well."""
        run = self.run.finished
        return run.exception() if run.done() and not run.cancelled() else None  # type: ignore[return-value]

    # ------------------------------------------------------------- input
    async def send(self, data: bytes | str) -> None:
        """Send ``data`` (text as UTF-8) to the session's stdin; SessionEnded once it is over."""
        if self.ended:
            raise self._ended_error()
        try:
            await self.run.write_stdin(data.encode() if isinstance(data, str) else data)
        except ZdutError:
            raise self._ended_error() from None

    async def sendline(self, text: str = "") -> None:
        await self.send(text + self.linesep)

    def send_break(self) -> None:
        """A serial break, as Ctrl-] b at a terminal (a command without a serial line says it cannot)."""
        self.run.send_break()

    # ------------------------------------------------------------- output
    async def expect(self, pattern: Pattern | Sequence[Pattern], timeout: float | None = DEFAULT_TIMEOUT_S) -> int:
        """Wait until the output matches; return the index of the pattern (in a list) that matched first in it.

        ``timeout`` seconds (None: no limit).  ``EOF`` / ``TIMEOUT`` in the list are returned instead of raising
        ``SessionEnded`` / ``ExpectTimeout``."""
        patterns = [pattern] if isinstance(pattern, str | re.Pattern | _Sentinel) else list(pattern)
        regexes = [(i, re.compile(p, re.DOTALL) if isinstance(p, str) else p) for i, p in enumerate(patterns)
                   if not isinstance(p, _Sentinel)]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            found = _earliest(regexes, self._buffer)
            if found is not None:
                index, match = found
                self.before, self.after, self.match = self._buffer[: match.start()], match.group(), match
                self._take(match.end())
                return index
            if self.ended:
                if EOF in patterns:
                    self.before, self.after, self.match = self._buffer, EOF, EOF
                    self._take(len(self._buffer))
                    return patterns.index(EOF)
                raise self._ended_error()
            if not await self._wait(deadline):
                self.before = self._buffer
                if TIMEOUT in patterns:
                    self.after = self.match = TIMEOUT
                    return patterns.index(TIMEOUT)
                raise ExpectTimeout(f"{self.device} {self.command}: no match for {_shown(patterns)} within "
                                    f"{timeout:g}s; last output: {self._buffer[-200:]!r}", self._buffer)

    async def read(self, timeout: float | None = 0.0) -> str:
        """What the session printed that nobody read yet, waiting up to ``timeout`` seconds (None: no limit)
        for something to arrive: "" if nothing did; SessionEnded once it is over and all is read."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._buffer and not self.ended and await self._wait(deadline):
            pass
        if not self._buffer and self.ended:
            raise self._ended_error()
        text = self._buffer
        self._take(len(text))
        return text

    # ------------------------------------------------------------- end
    async def close(self) -> None:
        """End the session (cancelled on the agent, so the device is free when this returns)."""
        if not self.ended:
            self.run.cancel()
            try:
                async with asyncio.timeout(CLOSE_GRACE_S):
                    await asyncio.wait({self.run.finished})
            except TimeoutError:
                pass
        self._close_transcript()

    async def __aenter__(self) -> AsyncConsole:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------- internals
    def _received(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        if self._transcript is not None:
            self._transcript.write(data)
            self._transcript.flush()
        text = self._decoders[STDERR if stream == STDERR else 0].decode(data)
        if stream == STDERR:
            self.stderr += text
            consumed()
            return
        self._buffer += text
        if len(self._buffer) > BUFFER_CHARS:
            self._deferred.append(consumed)  # the agent waits until the caller reads
        else:
            consumed()
        self._arrived.set()

    def _take(self, end: int) -> None:
        self._buffer = self._buffer[end:]
        if len(self._buffer) <= BUFFER_CHARS:
            deferred, self._deferred = self._deferred, []
            for consumed in deferred:
                consumed()

    async def _wait(self, deadline: float | None) -> bool:
        """Until more output or the end arrives (True) or the loop time ``deadline`` passes (False)."""
        self._arrived.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True

    def _ended_error(self) -> SessionEnded:
        error = self.error
        how = f"{error.code}: {error.message}" if error is not None else "ok"
        return SessionEnded(f"{self.device} {self.command}: the session ended ({how})", self._buffer, error)

    def _close_transcript(self) -> None:
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _earliest(regexes: list[tuple[int, re.Pattern[str]]], text: str) -> tuple[int, re.Match[str]] | None:
    """The pattern whose match starts first in ``text`` (the earlier in the list on a tie), as pexpect picks."""
    best: tuple[int, re.Match[str]] | None = None
    for index, regex in regexes:
        match = regex.search(text)
        if match is not None and (best is None or match.start() < best[1].start()):
            best = (index, match)
    return best


def _shown(patterns: list[Any]) -> str:
    shown = [p.pattern if isinstance(p, re.Pattern) else p for p in patterns]
    return repr(shown[0]) if len(shown) == 1 else repr(shown)
