"""Terminal bridging for Run sessions, shared by the one-shot CLI and the shell.

Forwards stdin to a session (raw mode on a terminal when the command is
interactive, with Ctrl-] to detach), delivers EOF as a half-close, and passes
window-size changes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from zdut.client import Run

ESCAPE = b"\x1d"  # Ctrl-]: the next key is for zdut (ESCAPE_KEYS), not for the command
READ_SIZE = 64 * 1024
ESCAPE_HELP = ("\r\n[zdut: Ctrl-] then: . or q detach (the command is cancelled), b send a serial break, "
               "Ctrl-] send Ctrl-] itself, ? this list]\r\n")
ESCAPE_UNKNOWN = "\r\n[zdut: unknown escape key; Ctrl-] ? lists them]\r\n"
DETACH, BREAK, HELP, UNKNOWN = "detach", "break", "help", "unknown"
ESCAPE_KEYS = {b".": DETACH, b"q": DETACH, b"b": BREAK, b"?": HELP}


class EscapeKeys:
    """Splits raw console input into bytes for the session and the escape menu's actions, across reads
    (Ctrl-] may end one read and its key start the next)."""

    def __init__(self) -> None:
        self.pending = False  # a Ctrl-] was read, its key not yet

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """("send", bytes) and (action, b"") in input order; nothing after a detach."""
        actions: list[tuple[str, bytes]] = []
        out = bytearray()
        for i in range(len(data)):
            key = data[i : i + 1]
            if not self.pending:
                if key == ESCAPE:
                    self.pending = True
                else:
                    out += key
                continue
            self.pending = False
            if key == ESCAPE:
                out += key  # Ctrl-] twice: one literal Ctrl-]
                continue
            if out:
                actions.append(("send", bytes(out)))
                out.clear()
            actions.append((ESCAPE_KEYS.get(key, UNKNOWN), b""))
            if actions[-1][0] == DETACH:
                return actions
        if out:
            actions.append(("send", bytes(out)))
        return actions


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put a terminal in raw mode and always restore it."""
    saved = termios.tcgetattr(fd)
    attrs = termios.tcgetattr(fd)
    # tty.setraw's input, control and local flags, in one tcsetattr: output processing stays on
    # throughout (so a module's "\n" still starts a new line), even for output written meanwhile
    # by the printer thread.
    attrs[tty.IFLAG] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
    attrs[tty.CFLAG] = (attrs[tty.CFLAG] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    attrs[tty.LFLAG] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
    attrs[tty.OFLAG] |= termios.OPOST | termios.ONLCR
    attrs[tty.CC][termios.VMIN], attrs[tty.CC][termios.VTIME] = 1, 0
    try:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class FdReader:
    """Reads an fd on the event loop, a few chunks ahead at most (then it pauses)."""

    AHEAD = 4

    def __init__(self, fd: int, fast: Callable[[bytes], bool] | None = None) -> None:
        """``fast(data)`` may take a chunk synchronously (returning True) while the consumer is idle:
        that skips a loop iteration per keystroke or line, a good part of a console echo's latency."""
        self.fd = fd
        self._fast = fast
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._paused = False
        self._eof = False
        self._idle = False  # the consumer waits in read() with nothing queued
        self._loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if self._idle and self._fast is not None and data and self._fast(data):
            return
        self._queue.put_nowait(data)
        if not data:
            self._eof = True
        if not data or self._queue.qsize() >= self.AHEAD:
            self._pause()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._loop.remove_reader(self.fd)

    async def read(self) -> bytes:
        self._idle = self._queue.empty()
        try:
            data = await self._queue.get()
        finally:
            self._idle = False
        if self._paused and not self._eof and self._queue.qsize() < self.AHEAD // 2:
            self._paused = False
            self._loop.add_reader(self.fd, self._ready)
        return data

    def close(self) -> None:
        self._pause()


def _reader(fd: int, fast: Callable[[bytes], bool]) -> FdReader | None:
    """An ``FdReader`` for ``fd``, or None for what epoll refuses: a regular file, /dev/null or /dev/zero
    never block, so they are read directly (and an fd that cannot be read at all reads as EOF)."""
    try:
        return FdReader(fd, fast)
    except OSError:
        return None


async def forward_stdin(run: Run, fd: int, raw: bool) -> bool:
    """Copy ``fd`` into the session until EOF (sent as a half-close) or, in raw mode, the escape menu's
    detach (Ctrl-] .).  Returns True if the user detached."""
    keys = EscapeKeys()

    def fast(data: bytes) -> bool:
        return not (raw and (ESCAPE in data or keys.pending)) and run.try_write_stdin(data)

    reader = _reader(fd, fast)
    try:
        while True:
            if reader is not None:
                data = await reader.read()
            else:
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError:
                    data = b""
            if raw and data and (ESCAPE in data or keys.pending):
                if await _escape(run, keys.feed(data)):
                    return True
                continue
            if not data:
                await run.close_stdin()
                return False
            await run.write_stdin(data)
    finally:
        if reader is not None:
            reader.close()


async def _escape(run: Run, actions: list[tuple[str, bytes]]) -> bool:
    """Carry out what EscapeKeys found; True for a detach."""
    for action, data in actions:
        if action == "send":
            await run.write_stdin(data)
        elif action == DETACH:
            return True
        elif action == BREAK:
            run.send_break()
        else:
            os.write(2, (ESCAPE_HELP if action == HELP else ESCAPE_UNKNOWN).encode())
    return False


def terminal_size(fd: int) -> tuple[int, int]:
    size = shutil.get_terminal_size()
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(fd)
    return size.lines, size.columns


@contextlib.contextmanager
def track_resize(run: Run, fd: int) -> Iterator[None]:
    """Send the terminal size now and on every SIGWINCH."""
    loop = asyncio.get_running_loop()
    run.resize(*terminal_size(fd))
    loop.add_signal_handler(signal.SIGWINCH, lambda: run.resize(*terminal_size(fd)))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def attach(run: Run, stdin_fd: int, interactive: bool) -> bool:
    """Bridge the terminal (or pipe) to a started session until it ends; True if the user detached."""
    if interactive and os.isatty(stdin_fd):
        with raw_mode(stdin_fd), track_resize(run, stdin_fd):
            return await _race(run, forward_stdin(run, stdin_fd, raw=True))
    return await _race(run, forward_stdin(run, stdin_fd, raw=False))


async def _race(run: Run, forwarding: Awaitable[bool]) -> bool:
    """Run stdin forwarding until the session ends; a detach cancels the session."""
    fwd = asyncio.ensure_future(forwarding)
    waiters: set[asyncio.Future[Any]] = {fwd, run.finished}
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if fwd in done and not fwd.cancelled() and fwd.exception() is None and fwd.result():
        run.cancel()
        return True
    if run.finished in done:
        fwd.cancel()
        with contextlib.suppress(BaseException):
            await fwd
    return False
