"""The client library: one connection to a broker or agent, unary calls and Run sessions.

The CLI, the shell and automation scripts all use it; it prints nothing.  One
``Client`` keeps one DEALER connection open, so a call costs a round trip, not
a process start.  Everything is asyncio; ``zdut.api`` wraps it for plain
synchronous scripts.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import zmq

from zdut.common.addresses import server_endpoint
from zdut.common.answers import encode_request
from zdut.common.client_config import ClientKeys, default_user
from zdut.common.globs import matching
from zdut.common.limits import CLIENT_MAX_FRAME
from zdut.protocol import (
    INITIAL_WINDOW,
    MAX_REPLY_BYTES,
    SESSION,
    STDIN,
    STDIN_WINDOW,
    STDOUT,
    VERSION,
    WINDOW_MAIN,
    WINDOW_STDIN,
    AgentInfo,
    AgentList,
    Break,
    Cancel,
    Code,
    CommandList,
    Credit,
    Data,
    Details,
    DeviceInfo,
    DeviceList,
    Done,
    Error,
    FileAbort,
    FileChunk,
    FileEnd,
    FileOpen,
    FileRequest,
    Forget,
    Forgotten,
    GetDetails,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Lock,
    LockResult,
    LockState,
    Message,
    Ping,
    Resize,
    RunOpen,
    RunStarted,
    SessionMessage,
    StdinEof,
    Unlock,
    Unlocked,
    Welcome,
    ZdutError,
    version_drift,
)
from zdut.transport.dealer import client_context, client_socket, unresolvable
from zdut.transport.files import Downloads, FileSender, allowed_files, open_source
from zdut.transport.links import Pump
from zdut.transport.monitor import ConnectionMonitor, LinkDown, Verdict, settled
from zdut.transport.stream import Stream, Watched, keep_alive

CONNECT_TIMEOUT_S = 10.0
#: Console input goes out in pieces well under the stdin window (a piece must always fit in it).
STDIN_CHUNK = STDIN_WINDOW // 4
CALL_TIMEOUT_S = 30.0
#: A connection that fails (refused, not ZMTP) for this long will not come up.
REFUSED_GRACE_S = 1.0
#: A host name that takes longer than this to resolve is reported as such.
RESOLVE_TIMEOUT_S = 1.5


class RunHandler:
    """Receives what a Run session produces.  The defaults collect everything in memory."""

    def __init__(self) -> None:
        self.output_bytes: dict[int, bytearray] = {}
        self.transfers: list[tuple[str, str, int]] = []
        self.warnings: list[str] = []

    def started(self, interactive: bool) -> None:
        """The command passed the lock check and runs."""

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        """Output of stream PRINT/STDOUT/STDERR; call ``consumed`` once it is written (returns credit)."""
        self.output_bytes.setdefault(stream, bytearray()).extend(data)
        consumed()

    def transferred(self, direction: str, path: str, size: int) -> None:
        """A file was ``sent`` to or ``received`` from the agent."""
        self.transfers.append((direction, path, size))

    def progress(self, direction: str, path: str, done: int, total: int) -> None:
        """Transfer progress, called per chunk."""

    def warning(self, text: str) -> None:
        self.warnings.append(text)


class Run:
    """A Run session seen from the client."""

    def __init__(self, client: Client, sid: int, device: str, command: str, args: list[str],
                 handler: RunHandler, stdin_closed: bool = False) -> None:
        self.client, self.sid, self.handler = client, sid, handler
        self._stdin_closed = stdin_closed  # RunOpen said so, or StdinEof went out
        self.device, self.command, self.args = device, command, args
        self.stream = Stream(sid, client._send, {WINDOW_MAIN: INITIAL_WINDOW, WINDOW_STDIN: STDIN_WINDOW})
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[bool] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._allowed: dict[str, set[str]] = {}  # RunStarted.files: until it says, no file moves
        self._downloads = Downloads(  # a download to - or /dev/stdout is the command's stdout, in its order
            self.stream, functools.partial(self._allowed_path, "receive"),
            lambda data, consumed: handler.output(STDOUT, data, consumed),
            self._refuse, self._verify_failed, functools.partial(handler.progress, "received"),
            functools.partial(handler.transferred, "received"))
        self._tasks: set[asyncio.Task[None]] = set()
        self._local_error: ZdutError | None = None

    # ------------------------------------------------------------- user actions
    def try_write_stdin(self, data: bytes) -> bool:
        """Send a small stdin chunk now if credit allows (no await); False if the caller must queue it."""
        return len(data) <= STDIN_CHUNK and self.stream.try_send_credited(
            Data, data, window=WINDOW_STDIN, stream=STDIN)

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), STDIN_CHUNK):
            await self.stream.send_credited(Data, data[i : i + STDIN_CHUNK], window=WINDOW_STDIN, stream=STDIN)

    async def close_stdin(self) -> None:
        if not self._stdin_closed:
            self._stdin_closed = True
            await self.stream.send_credited(StdinEof, window=WINDOW_STDIN)

    def cancel(self) -> None:
        if self._downloads.after_done:  # the agent is done; we only wait for a reader: stop writing
            self.end(ZdutError(Code.CANCELED, "canceled while writing a download"))
        elif not self.finished.done():
            with contextlib.suppress(ZdutError):
                self.stream.send(Cancel)

    def send_break(self) -> None:
        self._control(Break)

    def resize(self, rows: int, cols: int) -> None:
        self._control(Resize, rows=rows, cols=cols)

    def _control(self, cls: type[Break | Resize], **fields: int) -> None:
        if not self.finished.done():
            with contextlib.suppress(ZdutError):
                self.stream.send(cls, **fields)

    async def wait(self) -> None:
        """Wait for the end; raise ZdutError if the command failed."""
        await asyncio.shield(self.finished)

    # ------------------------------------------------------------- incoming
    def deliver(self, msg: SessionMessage, payload: Any) -> None:
        try:
            self.stream.received(msg, payload)  # sequence and credit: a peer past its window aborts
            self._deliver(msg, payload)
        except ZdutError as exc:
            self.cancel()
            self.end(exc)

    def _deliver(self, msg: SessionMessage, payload: Any) -> None:
        match msg:
            case Data():
                n = len(payload)
                self.handler.output(msg.stream, bytes(payload), lambda: self.stream.consumed(n))
            case RunStarted():
                if self._stdin_closed and not msg.stdin_closed:  # an agent from before RunOpen.stdin_closed
                    self.stream.try_send_credited(StdinEof, window=WINDOW_STDIN)  # the window is whole yet
                if not self.started.done():
                    self._allowed = allowed_files(msg.files)
                    self.started.set_result(msg.interactive)
                self.handler.started(msg.interactive)
            case Credit():
                self.stream.granted(msg.nbytes, msg.window)
            case FileRequest():
                self.stream.consumed(0)
                task = asyncio.get_running_loop().create_task(self._upload(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            case FileOpen() | FileChunk() | FileEnd() | FileAbort():
                self._downloads.message(msg, payload)
            case Done():
                error = ZdutError(msg.code, msg.message) if msg.code else None
                if self._downloads.writing:  # the session is over: no keepalive, only our writes remain
                    self.client._runs.pop(self.sid, None)
                self._downloads.after_writes(lambda: self.end(error))
            case Ping():
                pass

    def end(self, error: ZdutError | None) -> None:
        if self.finished.done():
            return
        if error is None or error.code == Code.CANCELED:  # our own Cancel's answer: say why we cancelled
            error = self._local_error or error
        self.stream.fail(error or ZdutError(Code.CANCELED, "session ended"))
        for task in self._tasks:
            task.cancel()
        self._downloads.close()
        if not self.started.done():
            self.started.set_result(False)
        if error is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(error)
            self.finished.exception()  # retrieved: callers may not wait
        self.client._runs.pop(self.sid, None)

    def _refuse(self, xfer: int, code: str, text: str) -> None:
        self._local_error = self._local_error or ZdutError(code, text)
        with contextlib.suppress(ZdutError):
            self.stream.send(FileAbort, xfer=xfer, code=code, message=text)

    def _allowed_path(self, way: str, path: str) -> bool:
        """Whether the command's modules declared ``path`` as a file argument the client may ``way``."""
        return way in self._allowed.get(os.path.normpath(path), ())

    # ------------------------------------------------------------- files
    async def _upload(self, req: FileRequest) -> None:
        """The agent asks for one of our files."""
        path = req.path
        if not self._allowed_path("send", path):
            self._refuse(req.xfer, Code.PERMISSION_DENIED, f'refusing to send "{path}": the command\'s module does '
                         'not declare it as a file argument to upload')
            return
        try:
            fh, size = await open_source(path)
        except ZdutError as exc:
            self._refuse(req.xfer, exc.code, exc.message)
            return
        with fh:
            try:
                sent = await FileSender(self.stream, req.xfer, path).send(
                    fh, size, functools.partial(self.handler.progress, "sent", path))
            except OSError as exc:  # the agent's module must not wait for the rest for ever
                self._refuse(req.xfer, Code.ABORTED, f'cannot read "{path}": {exc.strerror}')
                return
            except ZdutError:
                return  # the session ended; end() reports why
        self.handler.transferred("sent", path, sent)

    def _verify_failed(self, error: ZdutError) -> None:
        """A download arrived damaged (and was discarded): stop the run and say so."""
        self._local_error = error
        self.cancel()


class Client:
    """One connection to a zdut server (broker or agent); with ``keys`` (``client_config.client_keys``) a CURVE
    one, whose user is the key's name unless ``user`` says otherwise (which a secure server refuses)."""

    def __init__(self, address: str, user: str | None = None, *, connect_timeout: float = CONNECT_TIMEOUT_S,
                 call_timeout: float = CALL_TIMEOUT_S, keys: ClientKeys | None = None) -> None:
        self.address, self.keys = address, keys
        self.user = user if user is not None else default_user(keys)
        self.connect_timeout, self.call_timeout = connect_timeout, call_timeout
        self.server_version = self.server_role = self.server_name = ""  # what Welcome says
        self.warnings: list[str] = []
        self._ctx: zmq.Context[Any] | None = None
        self._pump: Pump | None = None
        self._rids, self._sids = itertools.count(1), itertools.count(1)
        self._calls: dict[int, asyncio.Future[Message]] = {}
        self._runs: dict[int, Run] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self.on_connection: Callable[[bool], None] | None = None
        #: The server refused a reconnection's handshake (a key removed, security switched): this link is over.
        self.on_refused: Callable[[ZdutError], None] | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- connection
    async def connect(self) -> None:
        """Connect and exchange versions; raises Unavailable if nobody answers, InvalidArgument for an address
        that is not ``host:port`` or ``tcp://host:port``.  A failed attempt leaves nothing open behind it."""
        try:
            ep = server_endpoint(self.address)
        except ValueError as exc:
            raise ZdutError(Code.INVALID_ARGUMENT, f"invalid server address {self.address!r}: {exc}") from None
        try:
            await self._open(ep)
        except BaseException:
            await self.close()  # the context, its sockets and threads, the monitor and our tasks
            raise

    async def _open(self, ep: str) -> None:
        problem = await unresolvable(ep, min(self.connect_timeout, RESOLVE_TIMEOUT_S))
        if problem:
            raise self._unreachable(problem)
        self._ctx = client_context(self)
        sock = client_socket(self._ctx, self.keys)
        pump = self._pump = Pump(sock, with_peer=False, limit=MAX_REPLY_BYTES)
        monitor = ConnectionMonitor(sock, self._up, self._down, REFUSED_GRACE_S, self.keys, self._refused)
        sock.connect(ep)
        self._tasks.append(asyncio.create_task(monitor.run()))
        self._tasks.append(asyncio.create_task(pump.run(lambda _, msg, payload: self._dispatch(msg, payload))))
        self._tasks.append(asyncio.create_task(keep_alive(self._watched)))
        waiter = asyncio.ensure_future(self._connected.wait())
        either: set[asyncio.Future[Any]] = {waiter, monitor.failed}
        done, _ = await asyncio.wait(either, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not self._connected.is_set():
            failed = monitor.failed
            verdict = failed.result() if failed in done else Verdict(f"no connection within {self.connect_timeout:g}s")
            raise self._unreachable(*await settled(verdict, ep, self.keys))
        reply = await self._call(lambda rid: Hello(rid, VERSION, self.user))
        assert isinstance(reply, Welcome)
        self.server_version, self.server_role, self.server_name = reply.version, reply.role, reply.name
        drift = version_drift(VERSION, self.server_role, self.server_version)
        if drift:
            self.warnings.append(drift)

    def _unreachable(self, why: str, code: str = Code.UNAVAILABLE) -> ZdutError:
        return LinkDown(code, f"cannot reach zdut server at {self.address} ({why})")

    def _refused(self, verdict: Verdict) -> None:
        if self.on_refused:
            self.on_refused(self._unreachable(*verdict))

    async def close(self) -> None:
        for run in list(self._runs.values()):
            run.cancel()
            run.end(ZdutError(Code.CANCELED, "client closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._pump = None
        self._connected.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _up(self) -> None:
        self._connected.set()
        if self.on_connection:
            self.on_connection(True)

    def _down(self) -> None:
        """The link dropped: deliver what came before it (a Done often precedes an agent's close), fail the rest."""
        self._connected.clear()
        if self._pump is not None:
            self._pump.drain()
        self._fail_all(LinkDown(Code.UNAVAILABLE, f"lost connection to zdut server at {self.address} (closed by "
                                 f"the server or the network, or it sent a frame over {CLIENT_MAX_FRAME >> 20} MiB)"))
        if self.on_connection:
            self.on_connection(False)

    def _fail_all(self, error: ZdutError) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        for run in list(self._runs.values()):
            run.end(error)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------- frames
    def _send(self, header: bytes, payload: Any = None) -> None:
        if self._pump is None:
            raise ZdutError(Code.UNAVAILABLE, "client is closed")
        try:
            self._pump.send_frames(header, payload)
        except zmq.Again:
            raise self._unreachable("not connected") from None

    def _dispatch(self, msg: Message, payload: Any) -> None:
        if isinstance(msg, SESSION):
            run = self._runs.get(msg.sid)
            if run is not None:
                run.deliver(msg, payload)
            return
        fut = self._calls.pop(getattr(msg, "rid", -1), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _watched(self) -> Watched:
        """Sessions for keep_alive: a silent server ends the run with Unavailable."""
        return [(run.stream, functools.partial(self._lost, run)) for run in self._runs.values()]

    def _lost(self, run: Run, error: ZdutError) -> None:
        run.end(ZdutError(Code.UNAVAILABLE, f"lost contact with the session at {self.address} ({error.message})"))

    # ------------------------------------------------------------- unary calls
    async def _call(self, make: Callable[[int], Message]) -> Message:
        """Send the request ``make(rid)`` and wait for its reply."""
        rid = next(self._rids)
        msg = make(rid)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        try:
            self._send(encode_request(msg))
            async with asyncio.timeout(self.call_timeout):
                reply = await fut
        except TimeoutError:
            raise ZdutError(Code.DEADLINE_EXCEEDED,
                            f"no answer from {self.address} within {self.call_timeout:g}s") from None
        finally:
            self._calls.pop(rid, None)
        if isinstance(reply, Error):
            raise ZdutError(reply.code, reply.message)
        return reply

    async def list(self, match: str = "") -> list[DeviceInfo]:
        """The devices whose names match the glob ``match`` ("" for all); a server before globs sends all."""
        return matching((await self.listing(match))[1] or [], match)

    async def listing(self, match: str = "", known: int = 0) -> tuple[int, builtins.list[DeviceInfo] | None]:
        """(generation, devices) as ``list``; None for the devices when ``known``, the generation of a listing the
        caller holds (for this ``match``), is still current: a broker then sends a few bytes, not 100,000 devices."""
        reply = await self._call(lambda rid: ListDevices(rid, VERSION, self.user, match, known))
        assert isinstance(reply, DeviceList)
        return reply.generation, None if known and reply.generation == known else reply.devices

    async def commands(self, device: str) -> builtins.list[str]:
        return [name for name, _ in await self.described_commands(device)]

    async def described_commands(self, device: str) -> builtins.list[tuple[str, str]]:
        """(name, desc) of each of ``device``'s commands; desc is "" where the config gives none."""
        reply = await self._call(lambda rid: ListCommands(rid, VERSION, self.user, device))
        assert isinstance(reply, CommandList)
        descs = reply.descs[: len(reply.commands)]  # a server from before descs sends none
        return list(zip(reply.commands, [*descs, *[""] * (len(reply.commands) - len(descs))], strict=True))

    async def details(self, device: str, command: str, keyword: str = "help") -> str:
        reply = await self._call(lambda rid: GetDetails(rid, VERSION, self.user, device, command, keyword))
        assert isinstance(reply, Details)
        return reply.text

    async def lock(self, device: str, duration_s: int = 0) -> LockState:
        reply = await self._call(lambda rid: Lock(rid, VERSION, self.user, device, duration_s))
        assert isinstance(reply, LockResult)
        return reply.lock

    async def unlock(self, device: str, force: bool = False) -> Unlocked:
        """The reply says whose lock a forced unlock broke, and how many of their sessions it cancelled."""
        reply = await self._call(lambda rid: Unlock(rid, VERSION, self.user, device, force))
        assert isinstance(reply, Unlocked)
        return reply

    async def forget(self, agent: str) -> builtins.list[str]:
        """Drop an offline agent and its devices from a broker; returns those devices."""
        reply = await self._call(lambda rid: Forget(rid, VERSION, self.user, agent))
        assert isinstance(reply, Forgotten)
        return reply.devices

    async def agents(self) -> builtins.list[AgentInfo]:
        reply = await self._call(lambda rid: ListAgents(rid, VERSION, self.user))
        assert isinstance(reply, AgentList)
        return reply.agents

    # ------------------------------------------------------------- Run
    def run(self, device: str, command: str, args: builtins.list[str] | None = None,
            handler: RunHandler | None = None, mode: str = "", stdin_closed: bool = False) -> Run:
        """Open a Run session; await ``run.wait()`` for its end; ``mode``: protocol.WATCH or JOURNAL.
        ``stdin_closed``: the command gets no input (EOF at once, one message fewer than ``close_stdin``)."""
        args = list(args or [])
        sid = next(self._sids)
        run = Run(self, sid, device, command, args, handler or RunHandler(), stdin_closed)
        self._runs[sid] = run
        try:
            self._send(encode_request(RunOpen(sid, VERSION, self.user, device, command, args, mode, stdin_closed)))
        except ZdutError as exc:
            run.end(exc)
        return run

