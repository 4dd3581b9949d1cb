"""A Run's output on the terminal: the writer thread, the handler that feeds it, and what a closed or full
stdout does.

Output is written on a thread, so a slow terminal or pipe never stalls the session's event loop, and credit
returns only once the bytes are written.  A write that fails (``EPIPE``: the reader went away, as in
``zdut DEV run yes | head -2``; ``ENOSPC``: ``> /dev/full``) ends the command: the printer tells its owner
once, which cancels the remote command, and everything still in flight is dropped instead of written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import threading
from asyncio import AbstractEventLoop
from collections.abc import Callable
from typing import TYPE_CHECKING, Never, TextIO

from zdut.client import RunHandler
from zdut.protocol import STDERR
from zdut.terminal.output import FILE_TRANSFER, MODULE_OUTPUT, Content, Output
from zdut.terminal.safe_text import safe

if TYPE_CHECKING:  # imported where a bar is drawn: tqdm (and importlib.metadata under it) is ~40 ms of start-up
    from tqdm import tqdm

#: Smaller transfers end before a bar could tell anything.
PROGRESS_MIN_BYTES = 1024 * 1024
#: Seconds between redraws of the bar.
PROGRESS_INTERVAL_S = 0.1
#: A shell's status for a command killed by SIGPIPE (128 + 13): what ``zdut ... | head`` ends with.
EXIT_BROKEN_PIPE = 128 + 13


class OutputFailed(Exception):
    """Writing to stdout or stderr failed; ``error`` says why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class GuardedOutput(Output):
    """``Output`` that turns a failed write into :class:`OutputFailed` and remembers the first one.

    The stream that failed is pointed at /dev/null, so nothing written or flushed later (by a late line, or by
    the interpreter's flush at exit) fails again or prints a traceback."""

    failed: OSError | None = None

    def emit(self, content: Content) -> None:
        self._guard(self.err if content.is_error else self.out, lambda: super(GuardedOutput, self).emit(content))

    def raw(self, data: bytes, to_stderr: bool = False) -> None:
        self._guard(self.err if to_stderr else self.out, lambda: super(GuardedOutput, self).raw(data, to_stderr))

    def progress(self, text: str) -> None:
        self._guard(self.err, lambda: (self.err.write(text), self.err.flush()))

    def _guard(self, stream: TextIO, write: Callable[[], object]) -> None:
        try:
            write()
        except OSError as exc:
            if self.failed is None:
                self.failed = exc
            with contextlib.suppress(OSError, ValueError, AttributeError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            raise OutputFailed(exc) from None

    def failure(self) -> tuple[bool, str]:
        """(the reader went away, text for the user) of the first failed write."""
        exc = self.failed
        assert exc is not None
        return exc.errno == errno.EPIPE, f"cannot write the output: {exc.strerror or exc}"


Item = tuple[Callable[[], object], Callable[[], object] | None]


class Printer:
    """Writes run output on a thread; once a write fails, calls ``on_failure`` (on the loop, once) and drops
    the rest, still calling each ``done`` so that credit keeps flowing until the cancel lands."""

    def __init__(self, loop: AbstractEventLoop, on_failure: Callable[[], object] | None = None) -> None:
        self._loop = loop
        self.on_failure = on_failure
        self.failed = False
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._pollers: dict[int, select.poll] = {}  # one per output fd: half the cost of a select() per write
        self._thread = threading.Thread(target=self._work, name="zdut-output", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], object], done: Callable[[], object] | None = None,
               fd: int | None = None, size: int = 0) -> None:
        """Queue ``write``; small writes to an fd that can take them now are done inline (no thread hop,
        which is most of a console echo's latency), as long as nothing is queued before them."""
        if fd is not None and size <= select.PIPE_BUF and self._pending == 0 and self._writable(fd):
            if self._write(write):
                self._fail()
            if done is not None:
                done()
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put((write, done))

    def _writable(self, fd: int) -> bool:
        """Whether a write to ``fd`` goes through now (a reader that went away counts: the write then fails)."""
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLOUT)
        try:
            return any(not events & select.POLLNVAL for _, events in poller.poll(0))
        except (OSError, ValueError):
            return False

    def _write(self, write: Callable[[], object]) -> bool:
        """Write unless an earlier write failed; True if this one is the first to fail."""
        if self.failed:
            return False
        try:
            write()
        except OutputFailed:
            self.failed = True
            return True
        except Exception:  # a rendering bug must not stop the output of everything after it
            pass
        return False

    def _fail(self) -> None:
        if self.on_failure is not None:
            self.on_failure()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            write, done = item
            first_failure = self._write(write)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these any more
                if first_failure:
                    self._loop.call_soon_threadsafe(self._fail)
                if done is not None:
                    self._loop.call_soon_threadsafe(done)
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def drain(self, timeout: float = 30.0) -> None:
        self._idle.wait(timeout)

    def stop(self) -> None:
        self.drain()
        self._queue.put(None)




class CliRunHandler(RunHandler):
    """Prints a Run's output as it arrives, in the chosen format."""

    def __init__(self, out: GuardedOutput, printer: Printer, meta: dict[str, str],
                 warn: Callable[[str], None], raw: bool = False) -> None:
        """``raw``: the output is written as it comes in every format (the agent formatted it: ``DEV log``)."""
        super().__init__()
        self.out, self.printer, self.meta, self.warn = out, printer, meta, warn
        self.raw = raw or (out.fmt == "text" and not out.verbose)
        #: The transfer's bar (tqdm), created, updated and closed on the printer's thread only.
        self._bar: tqdm[Never] | None = None
        self._bars = False  # a bar was asked for: its updates and its end are queued
        #: Set after a detach: output still in flight must not land on the restored terminal.
        self.muted = False

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        if self.muted:
            consumed()
        elif self.raw:
            to_err = stream == STDERR
            self.printer.submit(lambda: self.out.raw(data, to_err), consumed, self.out.fileno(to_err), len(data))
        else:
            content = Content(MODULE_OUTPUT, data, stream == STDERR, self.meta)
            self.printer.submit(lambda: self.out.emit(content), consumed)

    def transferred(self, direction: str, path: str, size: int) -> None:
        self.end_progress()
        self.printer.submit(lambda: self.out.emit(Content(FILE_TRANSFER, (direction, path, size), False, self.meta)))

    def progress(self, direction: str, path: str, done: int, total: int) -> None:
        """A bar with rate and ETA on a terminal's stderr, for text output only (a script reading JSON, or a
        log file taking stderr, gets none of it)."""
        if 0 <= total < PROGRESS_MIN_BYTES or self.out.fmt != "text" or not self.out.err.isatty():
            return
        self._bars = True
        self.printer.submit(lambda: self._draw(direction, path, done, total))

    def _draw(self, direction: str, path: str, done: int, total: int) -> None:
        bar = self._bar
        if bar is None:
            from tqdm import tqdm

            arrow = "↑" if direction == "sent" else "↓"
            bar = self._bar = tqdm(
                total=total if total >= 0 else None, desc=f"{arrow} {safe(path)}", unit="B", unit_scale=True,
                unit_divisor=1024, file=_BarStream(self.out), ncols=_columns(self.out.err),
                mininterval=PROGRESS_INTERVAL_S, leave=False)
        bar.update(done - bar.n)

    def end_progress(self) -> None:
        """Take the bar off the terminal (the transfer ended, or the run did)."""
        if self._bars:
            self._bars = False
            self.printer.submit(self._close_bar)

    def _close_bar(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.refresh()  # the last frame (the total, the mean rate) even when the transfer beat mininterval
            bar.close()

    def warning(self, text: str) -> None:
        self.warn(text)


class _BarStream:
    """Where tqdm draws: the guarded stderr, so that a closed terminal ends the command as any write does."""

    def __init__(self, out: GuardedOutput) -> None:
        self.out = out
        self.encoding = getattr(out.err, "encoding", None) or "ascii"  # tqdm draws Unicode blocks when UTF-8

    def write(self, text: str) -> None:
        self.out.progress(text)

    def flush(self) -> None:
        pass


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns or 80  # a terminal that never said its size (a fresh pty): the classic width
