"""File transfer inside a Run session, written once for both sides: FileOpen, FileChunk..., FileEnd.

The agent sends files to the client and the client uploads files the agent asks for with exactly the
same messages, so one sender and one receiver serve both.  The sender cuts a file (a path, an open binary
file or an async iterator of bytes) into ``CHUNK_SIZE`` chunks, each waiting for credit on the session's
stream, and ends with the SHA-256 of everything it sent.  The receiver checks that chunks arrive in order,
that no more and no fewer bytes arrive than announced, and that the digest matches; the agent hands what it
receives to a module, the client writes it to disk with ``FileWriter``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterable, Callable
from typing import Any, BinaryIO

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
            with open(source, "rb") as fh:
                return await self.send(fh, os.fstat(fh.fileno()).st_size if size < 0 else size, progress)
        self.size, self._progress = size, progress
        stream, xfer = self.stream, self.xfer
        await stream.send_credited(FileOpen, xfer=xfer, path=self.path, size=size)
        if isinstance(source, AsyncIterable):
            async for data in source:
                for i in range(0, len(data), CHUNK_SIZE):
                    piece = data[i : i + CHUNK_SIZE]
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


class FileWriter(FileReceiver):
    """A received file written beside its destination (``.NAME.*.zdut-part``), renamed into place once verified."""

    def __init__(self, xfer: int, path: str, size: int) -> None:
        super().__init__(xfer, path, size)
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".zdut-part")
        self.fh = os.fdopen(fd, "wb")

    def write(self, offset: int, data: Any) -> None:
        self.chunk(offset, data)
        self.fh.write(data)

    def finish(self, sha256: bytes) -> None:
        self.fh.close()
        try:
            self.end(sha256)
        except ZdutError:
            self.discard()
            raise
        os.chmod(self.tmp, 0o600)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
