"""File transfer inside a Run session, written once for both sides: FileOpen, FileChunk..., FileEnd.

The agent sends files to the client and the client uploads files the agent asks for with exactly the
same messages, so one sender and one receiver serve both.  The sender cuts a file (a path, an open binary
file or an async iterator of bytes) into ``CHUNK_SIZE`` chunks, each waiting for credit on the session's
stream, and ends with the SHA-256 of everything it sent.  The receiver checks that chunks arrive in order,
that no more and no fewer bytes arrive than announced, and that the digest matches; the agent hands what it
receives to a module, the client writes it where the user asked with the ``FileWriter`` ``open_writer``
picks: stdout, a FIFO or device as it is, a regular file replaced atomically (see docs/protocol.md, "Files
on the client").  A local file that cannot be read or written is a ZdutError with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import stat
import tempfile
import threading
from collections.abc import AsyncIterable, Callable
from typing import Any, BinaryIO

from zdut.common.daemon import off_loop
from zdut.protocol import CHUNK_SIZE, Code, FileAbort, FileChunk, FileEnd, FileOpen, ZdutError
from zdut.transport.stream import Stream

#: What a file is sent from.
Source = str | os.PathLike[str] | BinaryIO | AsyncIterable[bytes]
#: progress(bytes_done, bytes_total); total is -1 when unknown.
Progress = Callable[[int, int], None]


class FileSender:
    """Sends one file as transfer ``xfer`` on ``stream``; a FileAbort from the receiver stops it."""

    def __init__(self, stream: Stream, xfer: int, path: str) -> None:
        self.stream = stream
        self.xfer = xfer
        self.path = path
        self.size = -1
        self.sent = 0
        self.aborted: FileAbort | None = None
        self._digest = hashlib.sha256()
        self._progress: Progress | None = None

    def abort(self, msg: FileAbort) -> None:
        """The receiver refused or failed the transfer: the next chunk raises instead of going out."""
        self.aborted = msg

    async def send(self, source: Source, size: int = -1, progress: Progress | None = None) -> int:
        """Send everything ``source`` holds; returns the number of bytes sent.

        ``size`` is what FileOpen announces (a path's own size when negative; -1 for an iterator
        means unknown).  Raises ZdutError if the receiver aborts or the session ends."""
        if isinstance(source, (str, os.PathLike)):
            fh, known = await open_source(os.fspath(source))
            with fh:
                return await self.send(fh, known if size < 0 else size, progress)
        self.size, self._progress = size, progress
        stream, xfer = self.stream, self.xfer
        await stream.send_credited(FileOpen, xfer=xfer, path=self.path, size=size)
        if isinstance(source, AsyncIterable):
            async for data in source:
                for i in range(0, len(data), CHUNK_SIZE):
                    piece = data[i : i + CHUNK_SIZE]
                    await stream.send_credited(FileChunk, piece, xfer=xfer, offset=self._next(piece))
        elif _is_stream(source):  # a FIFO or device: its reads may wait, and not on the loop
            while piece := await off_loop(source.read, CHUNK_SIZE):
                await stream.send_credited(FileChunk, piece, xfer=xfer, offset=self._next(piece))
        else:
            read = source.read
            while piece := read(CHUNK_SIZE):
                await stream.send_credited(FileChunk, piece, xfer=xfer, offset=self._next(piece))
        self._check_abort()
        await stream.send_credited(FileEnd, xfer=xfer, sha256=self._digest.digest())
        return self.sent

    def _next(self, piece: bytes) -> int:
        """Account for the chunk about to go out; returns its offset."""
        self._check_abort()
        offset = self.sent
        self._digest.update(piece)
        self.sent = offset + len(piece)
        if self._progress is not None:
            self._progress(self.sent, self.size)
        return offset

    def _check_abort(self) -> None:
        if self.aborted is not None:
            raise ZdutError(self.aborted.code or Code.ABORTED, f'sending "{self.path}": {self.aborted.message}')


async def open_source(path: str) -> tuple[BinaryIO, int]:
    """Open a local file to send: (the file, its size, -1 for a FIFO or device).  Raises ZdutError with one
    clear line for a directory or a file that cannot be opened.  A FIFO's open waits (off the loop) for its
    writer."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ZdutError(Code.FAILED_PRECONDITION, f'cannot read "{path}": it is a directory; name a file')
        flags = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC
        fd = await off_loop(os.open, path, flags) if stat.S_ISFIFO(st.st_mode) else os.open(path, flags)
    except OSError as exc:
        raise cannot("read", path, exc) from None
    return os.fdopen(fd, "rb"), st.st_size if stat.S_ISREG(st.st_mode) else -1




def _is_stream(fh: BinaryIO) -> bool:
    try:
        return not stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
    except (OSError, AttributeError, ValueError):  # not a file with a descriptor (BytesIO): read it inline
        return False


class FileReceiver:
    """Checks one incoming file: chunks in order, the size FileOpen announced, the SHA-256 FileEnd carries."""

    def __init__(self, xfer: int, path: str, size: int = -1) -> None:
        self.xfer = xfer
        self.path = path
        self.size = size  # -1 until FileOpen says (or when the sender does not know)
        self.received = 0
        self._digest = hashlib.sha256()

    def chunk(self, offset: int, data: Any) -> None:
        """Account for the bytes of one FileChunk (raises Aborted if they are out of order or too many)."""
        if offset != self.received:
            raise ZdutError(Code.ABORTED, f'file "{self.path}": chunk at offset {offset}, expected {self.received}')
        self._digest.update(data)
        self.received += len(data)
        if 0 <= self.size < self.received:
            raise ZdutError(Code.ABORTED, f'file "{self.path}": more than the {self.size} bytes announced')

    def end(self, sha256: bytes) -> None:
        """FileEnd arrived: raise Aborted unless everything announced arrived intact."""
        if sha256 != self._digest.digest():
            raise ZdutError(Code.ABORTED, f'file "{self.path}": SHA-256 mismatch after {self.received} bytes')
        if 0 <= self.size != self.received:
            raise ZdutError(Code.ABORTED, f'file "{self.path}": got {self.received} of {self.size} bytes')


#: Output names that mean "this process's standard output": streamed there, never opened or replaced.
STDOUT_NAMES = frozenset({"-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})
#: Where a download to stdout goes: sink(data, consumed), consumed() once the bytes are written.
Sink = Callable[[bytes, Callable[[], None]], None]


def cannot(verb: str, path: str, exc: OSError) -> ZdutError:
    """The one line a local file error becomes."""
    code = Code.PERMISSION_DENIED if isinstance(exc, PermissionError) else \
        Code.NOT_FOUND if isinstance(exc, FileNotFoundError) else Code.ABORTED
    return ZdutError(code, f'cannot {verb} "{path}": {exc.strerror or exc}')


def open_writer(xfer: int, path: str, size: int, stdout: Sink, failed: Callable[[ZdutError], None]) -> FileWriter:
    """The writer for a download to ``path``, chosen (and the destination checked) before any byte moves.

    ``-`` and ``/dev/stdout`` (or anything that is this process's stdout) stream to ``stdout``; a FIFO, a
    character device or a socket is written directly; a symlink is followed; a regular file, or a new one, is
    replaced atomically; a directory is refused.  Raises ZdutError with one clear line."""
    if path in STDOUT_NAMES:
        return SinkWriter(xfer, path, size, stdout)
    try:
        st: os.stat_result | None = os.stat(path)  # follows symlinks: the target is what gets written
    except FileNotFoundError:
        st = None  # a new file (or a dangling symlink: its target is created)
    except OSError as exc:
        raise cannot("write", path, exc) from None
    if st is None or stat.S_ISREG(st.st_mode):
        if st is not None and not os.access(path, os.W_OK):  # a read-only file is not replaced behind its back
            raise ZdutError(Code.PERMISSION_DENIED, f'cannot write "{path}": Permission denied')
        return ReplacingWriter(xfer, path, size, st)
    if stat.S_ISDIR(st.st_mode):
        raise ZdutError(Code.FAILED_PRECONDITION, f'cannot write "{path}": it is a directory; name a file')
    if _is_stdout(st):
        return SinkWriter(xfer, path, size, stdout)
    if not os.access(path, os.W_OK):
        raise ZdutError(Code.PERMISSION_DENIED, f'cannot write "{path}": Permission denied')
    return DirectWriter(xfer, path, size, failed)


def _is_stdout(st: os.stat_result) -> bool:
    try:
        out = os.fstat(1)
    except OSError:
        return False
    return (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino)


def umask_mode() -> int:
    """The mode a new file gets from this process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class FileWriter(FileReceiver):
    """A download being written: ``write`` each chunk, then ``finish`` (verified) or ``discard``.

    ``write`` calls ``consumed`` once the bytes are at their destination, so a slow reader holds the sender
    back through credit.  A writer is settled once nothing of it is in flight; ``when_settled`` runs a
    callback then (``error`` says whether the bytes failed to arrive)."""

    def __init__(self, xfer: int, path: str, size: int) -> None:
        super().__init__(xfer, path, size)
        self.settled = False
        self.error: ZdutError | None = None
        self._waiters: list[Callable[[], None]] = []

    def write(self, offset: int, data: Any, consumed: Callable[[], None]) -> None:
        raise NotImplementedError

    def finish(self, sha256: bytes) -> None:
        """FileEnd arrived: raise ZdutError (and discard) unless the file is intact and in place."""
        try:
            self.end(sha256)
        except ZdutError:
            self.discard()
            raise
        self._complete()

    def _complete(self) -> None:
        """Everything arrived intact: settled once it is where it belongs."""
        self._settle()

    def discard(self) -> None:
        self._settle()

    def when_settled(self, then: Callable[[], None]) -> None:
        if self.settled:
            then()
        else:
            self._waiters.append(then)

    def _settle(self) -> None:
        if not self.settled:
            self.settled = True
            for then in self._waiters:
                then()
            self._waiters.clear()


class SinkWriter(FileWriter):
    """A download to stdout, through the same writer as the command's own output (so in its order)."""

    def __init__(self, xfer: int, path: str, size: int, sink: Sink) -> None:
        super().__init__(xfer, path, size)
        self.sink = sink

    def write(self, offset: int, data: Any, consumed: Callable[[], None]) -> None:
        self.chunk(offset, data)
        self.sink(bytes(data), consumed)


class ReplacingWriter(FileWriter):
    """A regular file, written beside its destination (``.NAME.*.zdut-part``) and renamed into place once
    verified: a symlink's target is replaced (the link kept), an existing file keeps its mode, a new one gets
    the umask's."""

    def __init__(self, xfer: int, path: str, size: int, existing: os.stat_result | None) -> None:
        super().__init__(xfer, path, size)
        self.target = os.path.realpath(path)
        directory, name = os.path.split(self.target)
        try:
            fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".zdut-part")
        except OSError as exc:
            raise cannot("write", path, exc) from None
        self.fh = os.fdopen(fd, "wb")
        try:
            os.fchmod(fd, stat.S_IMODE(existing.st_mode) if existing is not None else umask_mode())
        except OSError as exc:
            self.discard()
            raise cannot("write", path, exc) from None

    def write(self, offset: int, data: Any, consumed: Callable[[], None]) -> None:
        self.chunk(offset, data)
        try:
            self.fh.write(data)
        except OSError as exc:
            self.discard()
            raise cannot("write", self.path, exc) from None
        consumed()

    def finish(self, sha256: bytes) -> None:
        try:
            self.fh.close()  # a full disk may only say so here
            self.end(sha256)
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.discard()
            raise cannot("write", self.path, exc) from None
        except ZdutError:
            self.discard()
            raise
        self._settle()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
        self._settle()


class DirectWriter(FileWriter):
    """A FIFO, character device or socket, opened and written as it is (nothing created, nothing renamed).

    A thread opens it (a FIFO waits there for its reader) and writes, so a slow reader never stalls the
    loop; what waits for it is bounded by the session's credit window, returned chunk by chunk as written.
    A failed write is reported through ``failed`` (on the loop) and the rest is dropped."""

    def __init__(self, xfer: int, path: str, size: int, failed: Callable[[ZdutError], None]) -> None:
        super().__init__(xfer, path, size)
        self._loop = asyncio.get_running_loop()
        self._failed = failed
        self._queue: queue.SimpleQueue[tuple[bytes, Callable[[], None]] | None] = queue.SimpleQueue()
        self._opened = threading.Event()
        self._dropped = False
        threading.Thread(target=self._work, name=f"zdut-write-{xfer}", daemon=True).start()

    def write(self, offset: int, data: Any, consumed: Callable[[], None]) -> None:
        self.chunk(offset, data)
        self._queue.put((bytes(data), consumed))

    def _complete(self) -> None:
        self._queue.put(None)  # settles once everything before it is written

    def discard(self) -> None:
        if self._dropped:
            return
        self._dropped = True
        self._queue.put(None)
        if not self._opened.is_set():  # a FIFO nobody reads: open its other end so the thread's open returns
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def _work(self) -> None:
        fd = -1
        error: ZdutError | None = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            error = cannot("write", self.path, exc)
            self._call(self._fail, error)
        self._opened.set()
        while (item := self._queue.get()) is not None:
            data, consumed = item
            if error is None and not self._dropped:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as exc:
                    error = cannot("write", self.path, exc)
                    self._call(self._fail, error)
            self._call(consumed)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._call(self._done, error)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _fail(self, error: ZdutError) -> None:
        if not self._dropped:
            self._failed(error)

    def _done(self, error: ZdutError | None) -> None:
        self.error = self.error or error
        self._settle()


class Downloads:
    """The files the agent sends one Run: the one being received (FileOpen, FileChunk..., FileEnd; one at a
    time) and finished ones a thread still writes.  ``close`` discards what is unfinished, on every way out.
    ``allowed(path)`` says whether the run declared ``path`` for receiving (RunStarted.files): nothing else is
    opened, not even ``-`` or /dev/stdout."""

    def __init__(self, stream: Stream, allowed: Callable[[str], bool], stdout: Sink,
                 refuse: Callable[[int, str, str], None], failed: Callable[[ZdutError], None],
                 progress: Callable[[str, int, int], None], transferred: Callable[[str, int], None]) -> None:
        self.stream, self.allowed, self.stdout = stream, allowed, stdout
        self.refuse, self.failed, self.progress, self.transferred = refuse, failed, progress, transferred
        self.current: FileWriter | None = None
        self.writing: list[FileWriter] = []  # finished downloads whose bytes a thread still writes
        self.after_done = False  # the session ended (Done) and only our writes keep the run open
        self.closed = False

    def message(self, msg: FileOpen | FileChunk | FileEnd | FileAbort, payload: Any) -> None:
        dl = self.current
        if not isinstance(msg, FileChunk) or dl is None or dl.xfer != msg.xfer:
            self.stream.consumed(len(payload) if payload is not None else 0)  # a chunk's: once written
        if isinstance(msg, FileOpen):
            if dl is not None:  # one at a time: an unfinished one is dropped, its temp file with it
                self.current = None
                dl.discard()
            if not self.allowed(msg.path):
                self.refuse(msg.xfer, Code.PERMISSION_DENIED, f'refusing to write "{msg.path}": the command\'s '
                            'module does not declare it as a file argument to download')
                return
            try:
                self.current = open_writer(msg.xfer, msg.path, msg.size, self.stdout, self._write_failed(msg.xfer))
            except ZdutError as exc:  # a directory, no permission: refused before any byte moves
                self.refuse(msg.xfer, exc.code, exc.message)
        elif dl is None or dl.xfer != msg.xfer:
            pass  # a transfer we refused: drain it
        elif isinstance(msg, FileChunk):
            n = len(payload)
            try:
                dl.write(msg.offset, payload, lambda: self.stream.consumed(n))
            except ZdutError as exc:
                self.stream.consumed(n)
                self._write_failed(msg.xfer)(exc)
                return
            self.progress(dl.path, dl.received, dl.size)
        elif isinstance(msg, FileAbort):
            self.current = None
            dl.discard()  # the agent's module reports the failure in Done
        else:
            self.current = None
            try:
                dl.finish(msg.sha256)
            except ZdutError as exc:
                self.failed(exc)
                return
            self.writing.append(dl)
            dl.when_settled(lambda: self._written(dl))

    def after_writes(self, then: Callable[[], None]) -> None:
        """Run ``then`` (the session's end) once every finished download is written: Done may overtake a
        thread writing a FIFO.  Until then ``after_done`` is set."""
        if self.writing and not self.closed:
            self.after_done = True
            self.writing[0].when_settled(lambda: self.after_writes(then))
        else:
            self.after_done = False
            then()

    def close(self) -> None:
        self.closed, self.after_done = True, False
        for dl in [self.current, *self.writing]:
            if dl is not None:
                dl.discard()
        self.current = None

    def _write_failed(self, xfer: int) -> Callable[[ZdutError], None]:
        def failed(error: ZdutError) -> None:  # the transfer stops and the run fails with this line
            if self.current is not None and self.current.xfer == xfer:
                self.current.discard()
                self.current = None
            self.refuse(xfer, error.code, error.message)

        return failed

    def _written(self, dl: FileWriter) -> None:
        self.writing.remove(dl)
        if dl.error is None and not self.closed:
            self.transferred(dl.path, dl.received)


def allowed_files(files: dict[str, str]) -> dict[str, set[str]]:
    """RunStarted.files as the client checks it: normalised path -> the ways it may move (send, receive)."""
    allowed: dict[str, set[str]] = {}
    for path, way in files.items():
        ways = {"send", "receive"} if way == "both" else {way} & {"send", "receive"}
        allowed.setdefault(os.path.normpath(path), set()).update(ways)
    return allowed
