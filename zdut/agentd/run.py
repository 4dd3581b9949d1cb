"""The agent's side of one Run session: the Session that modules see.

Incoming messages arrive synchronously from the agent's receive loop through
``deliver`` and land in queues; modules consume them through the Session API.
Outgoing output waits for the client's credit, so a slow client slows the
module down instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from zdut.agentd.locker import Locker
from zdut.devices.base import ModuleError
from zdut.devices.stdin import StdinBuffer
from zdut.protocol import (
    CHUNK_SIZE,
    INITIAL_WINDOW,
    PRINT,
    STDERR,
    STDIN,
    STDIN_WINDOW,
    STDOUT,
    WINDOW_MAIN,
    WINDOW_STDIN,
    Break,
    Cancel,
    Code,
    Credit,
    Data,
    Done,
    FileAbort,
    FileChunk,
    FileEnd,
    FileOpen,
    FileRequest,
    Ping,
    Resize,
    RunStarted,
    SessionMessage,
    StdinEof,
    ZdutError,
)
from zdut.transport.files import FileReceiver, FileSender, Source
from zdut.transport.links import LoopThrottle
from zdut.transport.stream import SendFrames, Stream

log = logging.getLogger("zdut.session")
#: What peers make the agent log per message is rate-limited (a flood of bad messages is a few lines).
throttled = LoopThrottle(log)


class _Incoming(FileReceiver):
    """A file arriving from the client, iterated by the module."""

    def __init__(self, run: AgentRun, xfer: int, path: str) -> None:
        super().__init__(xfer, path)
        self._run = run
        self.queue: asyncio.Queue[FileOpen | tuple[int, Any] | FileEnd | FileAbort] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        run = self._run
        if run.transfer is not None:
            raise ZdutError(Code.FAILED_PRECONDITION, "a file transfer is already in progress")
        run.transfer = self
        try:
            await run.stream.send_credited(FileRequest, xfer=self.xfer, path=self.path)
            while True:
                item = await self.queue.get()
                if isinstance(item, tuple):
                    data = bytes(item[1])
                    self.chunk(item[0], data)
                    run.stream.consumed(len(data))
                    yield data
                elif isinstance(item, FileOpen):
                    self.size = item.size
                elif isinstance(item, FileEnd):
                    self.end(item.sha256)
                    return
                else:
                    raise ZdutError(item.code or Code.ABORTED, item.message)
        finally:
            run.transfer = None


class AgentRun:
    """Implements devices.base.Session for one Run, and owns the run's lifecycle: busy hold, task, Done."""

    def __init__(
        self,
        sid: int,
        send_frames: SendFrames,
        device: str,
        command: str,
        user: str,
        locker: Locker,
        on_close: Callable[[AgentRun], None],
        stdin_closed: bool = False,
    ) -> None:
        """``stdin_closed``: the client sends no input (RunOpen.stdin_closed); RunStarted says it was taken."""
        self.device, self.command, self.user = device, command, user
        self.stream = Stream(sid, send_frames, granted={WINDOW_MAIN: INITIAL_WINDOW, WINDOW_STDIN: STDIN_WINDOW})
        self.task: asyncio.Task[None] | None = None
        self.transfer: _Incoming | None = None
        self._stdin = StdinBuffer(lambda nbytes: self.stream.consumed(nbytes, WINDOW_STDIN), closed=stdin_closed)
        self._stdin_closed = stdin_closed
        self._xfers = 0
        self._sending: dict[int, FileSender] = {}
        self._term: tuple[int, int] | None = None
        self._locker = locker
        self._on_close = on_close
        self._reason: ZdutError | None = None
        self._held = False
        self._closed = False
        self.interactive = False  # a console session (the client reads the user's keystrokes)
        #: Sees every chunk the module prints (the device's watchers and journal); a watch session has none.
        self.tap: Callable[[AgentRun, int, bytes], None] | None = None
        self.watching = False  # a watch or journal session: it prints what others did, and is not watched
        self.journal_id = 0  # the session's id in the device's journal
        #: Set by a module that can send a serial break (devices.base.Session.on_break).
        self.on_break: Callable[[], None] | None = None
        self.exit: tuple[str, str] = ("", "")  # the Done it sent: (code, message)

    # ------------------------------------------------------------- lifecycle
    def start(self, interactive: bool, body: Callable[[AgentRun], Any], files: dict[str, str] | None = None,
              hold: bool = True) -> None:
        """Take the busy hold (unless ``hold`` is False: a watch or a journal read, which use nothing) and run
        ``body`` in this run's own task; RunStarted tells the client ``files``, the only paths it may send or
        write (``agentd.file_args``).

        From here every path (success, module error, cancel, client lost, a send that fails) ends in
        ``_close``: called at the end of the task, or else by its done callback, which runs even for a task
        cancelled before its first step, whose coroutine body (and any ``finally`` in it) never runs."""
        if hold:
            try:
                self._locker.acquire_busy(self.device, self.user)
            except ZdutError as exc:
                self.refuse(exc)
                return
            self._held = True
        self.interactive = interactive
        self.task = asyncio.get_running_loop().create_task(self._main(interactive, body, files or {}))
        self.task.add_done_callback(self._finished)

    def refuse(self, error: ZdutError) -> None:
        """The run cannot start: say why and close (no hold was taken)."""
        self._close(error.code, error.message)

    async def _main(self, interactive: bool, body: Callable[[AgentRun], Any], files: dict[str, str]) -> None:
        """Run ``body`` and close: here rather than in the done callback, so that Done leaves in the same burst as
        the last output (one wake-up of the IO thread fewer, a loop iteration sooner)."""
        self._close(*await self._outcome(interactive, body, files))

    async def _outcome(self, interactive: bool, body: Callable[[AgentRun], Any],
                       files: dict[str, str]) -> tuple[str, str]:
        try:
            self.stream.send(RunStarted, interactive=interactive, files=files, stdin_closed=self._stdin_closed)
            await body(self)
        except ModuleError as exc:
            return exc.code, f"module failed: {exc.message}"
        except ZdutError as exc:
            return exc.code, exc.message
        except Exception as exc:  # a module bug must never take the agent down
            log.exception("module raised device=%s command=%s", self.device, self.command)
            return Code.INTERNAL, f"module failed: {type(exc).__name__}: {exc}"
        return Code.OK, ""

    def _finished(self, task: asyncio.Task[None]) -> None:
        """The close step of a run that ``_main`` did not close: cancelled (perhaps before its first step), or
        failed with a BaseException."""
        if task.cancelled():
            reason = self._reason or ZdutError(Code.CANCELED, "canceled")
            self._close(reason.code, f"module execution aborted: {reason.message}")
        elif (error := task.exception()) is not None:
            if self._closed:  # the close step itself failed
                log.error("closing the run device=%s command=%s failed", self.device, self.command, exc_info=error)
            self._close(Code.INTERNAL, f"module failed: {error!r}")

    def _close(self, code: str, message: str) -> None:
        """The one close step: release the hold, send Done, end the stream, leave the agent's table (whose
        journal record and log line come after Done: the client is not kept waiting for a disk write)."""
        if self._closed:
            return
        self._closed = True
        self.exit = (code, message)
        if self._held:
            self._held = False
            self._locker.release_busy(self.device, self.user)
        if self.stream.closed is None:
            with contextlib.suppress(ZdutError):  # the client may be gone: nothing more to tell it
                self.stream.send(Done, code=code, message=message)
            self.stream.fail(ZdutError(Code.CANCELED, "session ended"))
        self._on_close(self)
        how = f"{code}: {message}" if code else "ok"
        if self.task is not None:
            log.info("run ended device=%s command=%s user=%s: %s", self.device, self.command, self.user, how)
        else:  # refused before it started: a line any peer can cause per message, so rate-limited
            throttled(logging.INFO, "refused run", "run refused device=%s command=%s user=%s: %s", self.device,
                      self.command, self.user, how)

    @property
    def cancelled(self) -> bool:
        """Whether the run was told to stop (it may still be cleaning up)."""
        return self._reason is not None

    def cancel(self, reason: ZdutError) -> None:
        """End the session now (client cancelled or vanished); Done carries the first reason.

        Only the first call cancels the task: a module cleaning up after its cancellation is not
        interrupted again by the keepalive noticing the same lost client every tick."""
        if self._reason is not None or self._closed:
            return
        self._reason = reason
        if self.task is not None:
            self.task.cancel()

    def notify(self, text: str) -> None:
        """A line for the user from the agent itself, on the run's stderr, if credit allows it now."""
        if self.stream.closed is None and not self._closed:
            with contextlib.suppress(ZdutError):
                self.stream.try_send_credited(Data, text.encode(), stream=STDERR)

    # ------------------------------------------------------------- incoming
    def deliver(self, msg: SessionMessage, payload: Any) -> None:
        """Handle one message from the client; called from the receive loop, never blocks.

        Raises ZdutError (Aborted) for a message that breaks the session's rules (a sequence gap, more than
        the credit we granted); the caller cancels the run with it.  Once the run is cancelled only credit
        still counts (a module cleaning up may print): input is dropped, never queued."""
        if self._reason is not None or self._closed:
            if isinstance(msg, Credit):
                self.stream.granted(msg.nbytes, msg.window)
            return
        self.stream.received(msg, payload)
        match msg:
            case Data() if msg.stream == STDIN:
                self._stdin.feed(bytes(payload))
            case StdinEof():
                self._stdin.close()
            case Credit():
                self.stream.granted(msg.nbytes, msg.window)
            case FileOpen() | FileEnd() | FileAbort() | FileChunk():
                self._deliver_file(msg, payload)
            case Resize():
                self._term = (msg.rows, msg.cols)
            case Cancel():
                self.cancel(ZdutError(Code.CANCELED, "canceled by the client"))
            case Break():
                if self.on_break is not None:
                    self.on_break()
                else:
                    self.notify("\r\n[zdut: this command cannot send a serial break]\r\n")
            case Ping():
                pass
            case _:
                throttled(logging.WARNING, "unexpected in session", "unexpected %s in session %s",
                          type(msg).__name__, self.stream.sid)

    def _deliver_file(self, msg: FileOpen | FileEnd | FileAbort | FileChunk, payload: Any) -> None:
        if not isinstance(msg, FileChunk):
            self.stream.consumed(0)  # control messages cost credit too; chunks return theirs when read
        if isinstance(msg, FileAbort) and (self.transfer is None or self.transfer.xfer != msg.xfer):
            sender = self._sending.get(msg.xfer)
            if sender is not None:  # the client refused a file we are sending; an abort for no such file is dropped
                sender.abort(msg)
            return
        if self.transfer is None or self.transfer.xfer != msg.xfer:
            raise ZdutError(Code.INVALID_ARGUMENT, f"unexpected file transfer {msg.xfer} from the client")
        self.transfer.queue.put_nowait((msg.offset, payload) if isinstance(msg, FileChunk) else msg)

    # ------------------------------------------------------------- Session API
    async def print(self, text: str) -> None:
        await self._out(PRINT, text.encode())

    async def stdout(self, data: bytes) -> None:
        await self._out(STDOUT, data)

    async def stderr(self, data: bytes) -> None:
        await self._out(STDERR, data)

    async def _out(self, stream: int, data: bytes) -> None:
        """To the owner first, then to the tap (journal, watchers): a watched echo is not one send later."""
        if len(data) <= CHUNK_SIZE and self.stream.try_send_credited(Data, data, stream=stream):
            pass  # the common case: credit is there, no coroutine round needed
        else:
            for i in range(0, max(len(data), 1), CHUNK_SIZE):
                await self.stream.send_credited(Data, data[i : i + CHUNK_SIZE], stream=stream)
        if self.tap is not None:
            self.tap(self, stream, data)

    async def read_stdin(self) -> bytes:
        return await self._stdin.read()

    async def readline(self) -> bytes:
        return await self._stdin.readline()

    def record_input(self, data: bytes) -> None:
        if self.tap is not None and data:
            self.tap(self, STDIN, data)

    def request_file(self, name: str) -> _Incoming:
        self._xfers += 1
        return _Incoming(self, self._xfers, name)

    async def send_file(self, name: str, source: Source, size: int = -1) -> None:
        self._xfers += 1
        sender = self._sending[self._xfers] = FileSender(self.stream, self._xfers, name)
        try:
            await sender.send(source, size)
        finally:
            del self._sending[sender.xfer]

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        return self._term

