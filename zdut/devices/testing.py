"""An in-process Session for exercising modules without an agent.

Module authors (and zdut's own unit tests) run a module against ``LocalSession``:
output is collected in memory, stdin comes from a byte string, and file
requests are served from a local directory.  End-to-end behaviour is covered by
tests that run the real agent; this is for fast, focused module tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from zdut.devices.stdin import StdinBuffer
from zdut.protocol import CHUNK_SIZE, Code, ZdutError


class _LocalIncoming:
    def __init__(self, path: Path, name: str) -> None:
        self.path = name
        self._file = path
        self.size = path.stat().st_size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with open(self._file, "rb") as fh:
            while chunk := fh.read(CHUNK_SIZE):
                yield chunk


class LocalSession:
    """A Session whose client is this process: records what the module does."""

    def __init__(
        self,
        stdin: bytes = b"",
        files_dir: str | os.PathLike[str] | None = None,
        device: str = "dut",
        command: str = "cmd",
        user: str = "tester@local",
        terminal_size: tuple[int, int] | None = None,
    ) -> None:
        self.device, self.command, self.user = device, command, user
        self.prints: list[str] = []
        self.out = bytearray()
        self.err = bytearray()
        #: Every output event in order: ("print"|"stdout"|"stderr", bytes)
        self.events: list[tuple[str, bytes]] = []
        self.sent_files: dict[str, bytes] = {}
        self._stdin = StdinBuffer()
        if stdin:
            self._stdin.feed(stdin)
        self._files_dir = Path(files_dir) if files_dir else None
        self._terminal_size = terminal_size
        self.on_break: Callable[[], None] | None = None
        self.recorded_input = bytearray()  # what the module asked to keep of its input (record_input)

    # -- feeding the module
    def feed_stdin(self, data: bytes) -> None:
        self._stdin.feed(data)

    def close_stdin(self) -> None:
        self._stdin.close()

    @property
    def text(self) -> str:
        """Everything printed and written to stdout, in order."""
        return b"".join(d for kind, d in self.events if kind != "stderr").decode(errors="replace")

    # -- Session API
    async def print(self, text: str) -> None:
        self.prints.append(text)
        self.events.append(("print", text.encode()))

    async def stdout(self, data: bytes) -> None:
        self.out += data
        self.events.append(("stdout", bytes(data)))

    async def stderr(self, data: bytes) -> None:
        self.err += data
        self.events.append(("stderr", bytes(data)))

    async def read_stdin(self) -> bytes:
        return await self._stdin.read()

    async def readline(self) -> bytes:
        return await self._stdin.readline()

    def record_input(self, data: bytes) -> None:
        self.recorded_input += data

    def request_file(self, name: str) -> _LocalIncoming:
        if self._files_dir is None:
            raise ZdutError(Code.INVALID_ARGUMENT, f"no client files available for {name!r}")
        path = self._files_dir / name
        if not path.is_file():
            raise ZdutError(Code.NOT_FOUND, f"client file {name!r} not found")
        return _LocalIncoming(path, name)

    async def send_file(
        self, name: str, source: str | os.PathLike[str] | AsyncIterator[bytes], size: int = -1
    ) -> None:
        buf = bytearray()
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fh:
                buf += fh.read()
        else:
            async for chunk in source:
                buf += chunk
        self.sent_files[name] = bytes(buf)

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        return self._terminal_size
