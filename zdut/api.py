"""A synchronous Python API for lab automation: one open connection, calls well under a millisecond.

    from zdut.api import Lab

    with Lab("localhost:1024", user="ci@rack3") as lab:
        lab.lock("device1", "10m")
        result = lab.run("device1", "status", "hello")
        print(result.text)
        lab.unlock("device1")

Everything runs on a private event loop driven by each call, so there are no
threads and nothing happens between calls; sessions never outlive a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from zdut.client import Client, RunHandler
from zdut.common.durations import parse_duration
from zdut.protocol import PRINT, STDERR, STDOUT, AgentInfo, Code, DeviceInfo, LockState, ZdutError

__all__ = ["Lab", "RunResult", "ZdutError"]

T = TypeVar("T")


@dataclass
class RunResult:
    """What a command produced.  ``error`` is None on success."""

    printed: bytes = b""
    stdout: bytes = b""
    stderr: bytes = b""
    transfers: list[tuple[str, str, int]] = field(default_factory=list)
    error: ZdutError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """Printed text and stdout, decoded (the order within each stream is kept)."""
        return (self.printed + self.stdout).decode(errors="replace")


class Lab:
    """A connection to a zdut broker or agent."""

    def __init__(self, address: str | None = None, user: str | None = None, *, timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = Client(address or os.environ.get("ZDUT_SERVER") or "localhost:1024", user,
                              call_timeout=timeout)
        try:
            self._call(self._client.connect())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._call(self._client.close())
            self._loop.close()

    # ------------------------------------------------------------- calls
    def devices(self) -> list[DeviceInfo]:
        return self._call(self._client.list())

    def agents(self) -> list[AgentInfo]:
        return self._call(self._client.agents())

    def commands(self, device: str) -> list[str]:
        return self._call(self._client.commands(device))

    def help(self, device: str, command: str) -> str:
        return self._call(self._client.details(device, command))

    def lock(self, device: str, duration: str | float = 0) -> LockState:
        seconds = parse_duration(duration) if isinstance(duration, str) else duration
        return self._call(self._client.lock(device, int(seconds)))

    def unlock(self, device: str, force: bool = False) -> None:
        self._call(self._client.unlock(device, force))

    def run(self, device: str, command: str, *args: str, stdin: bytes | None = None, check: bool = True,
            timeout: float | None = None) -> RunResult:
        """Run a command to its end.  ``stdin`` is sent then closed (EOF reaches the module).

        With ``check`` (default) a failed command raises ZdutError; otherwise it is in ``result.error``."""
        return self._call(self._run(device, command, list(args), stdin, check, timeout))

    async def _run(self, device: str, command: str, args: list[str], stdin: bytes | None, check: bool,
                   timeout: float | None) -> RunResult:
        handler = RunHandler()
        run = self._client.run(device, command, args, handler)
        result = RunResult()
        with contextlib.suppress(ZdutError):  # the session already ended: wait() says why
            if stdin:
                await run.write_stdin(stdin)
            await run.close_stdin()
        try:
            await asyncio.wait_for(run.wait(), timeout)
        except TimeoutError:
            run.cancel()
            result.error = ZdutError(Code.DEADLINE_EXCEEDED, f"{device} {command}: no result within {timeout}s")
        except ZdutError as exc:
            result.error = exc
        out = handler.output_bytes
        result.printed = bytes(out.get(PRINT, b""))
        result.stdout = bytes(out.get(STDOUT, b""))
        result.stderr = bytes(out.get(STDERR, b""))
        result.transfers = handler.transfers
        if check and result.error is not None:
            raise result.error
        return result
