r"""A synchronous Python API for lab automation: one open connection, calls well under a millisecond.

    from zdut.api import Lab

    with Lab("localhost:1024", user="ci@rack3") as lab:
        lab.lock("device1", "10m")
        result = lab.run("device1", "status", "hello")
        print(result.text)
        lab.unlock("device1")

        with lab.open("board", "serial", "console") as console:   # an interactive session, pexpect's way
            console.sendline("version")
            console.expect(r"U-Boot (\S+)")

Everything runs on a private event loop driven by each call, so there are no
threads and nothing happens between calls; sessions never outlive a call.
``Lab`` is ``zdut.aio.AsyncLab`` on that loop: the same methods, arguments, results
and errors.  Code that already runs a loop (Jupyter, async tests) uses ``AsyncLab``.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from zdut.aio import AsyncLab, RunResult
from zdut.common.client_config import PathArg
from zdut.expect import DEFAULT_TIMEOUT_S, EOF, TIMEOUT, AsyncConsole, ExpectTimeout, Pattern, SessionEnded
from zdut.protocol import AgentInfo, Code, DeviceInfo, LockState, Unlocked, ZdutError

__all__ = ["EOF", "TIMEOUT", "AsyncLab", "Console", "ExpectTimeout", "Lab", "RunResult", "SessionEnded",
           "ZdutError"]

T = TypeVar("T")


class Lab:
    """A connection to a zdut broker or agent (the arguments are ``zdut.aio.AsyncLab``'s)."""

    def __init__(self, address: str | list[str] | None = None, user: str | None = None, *, timeout: float = 30.0,
                 key: PathArg | None = None, server_key: PathArg | None = None) -> None:
        if _loop_running():  # a blocking call would stall that loop (and asyncio refuses to nest loops)
            raise RuntimeError("zdut.api.Lab blocks; in a thread that runs an event loop (Jupyter, async code) "
                               "use zdut.aio.AsyncLab")
        self._lab = AsyncLab(address, user, timeout=timeout, key=key, server_key=server_key)  # raises: no loop yet
        self._loop = asyncio.new_event_loop()
        try:
            self._call(self._lab.connect())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ZdutError(Code.UNAVAILABLE, "the Lab is closed")
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Cancel what still runs and close the connection; calls after it raise Unavailable."""
        if not self._loop.is_closed():
            self._call(self._lab.close())
            self._loop.close()

    # ------------------------------------------------------------- calls (documented in zdut.aio.AsyncLab)
    def devices(self, match: str = "") -> list[DeviceInfo]:
        """The devices, or those whose names match the glob ``match`` (such as ``"rack3-*"``)."""
        return self._call(self._lab.devices(match))

    def agents(self) -> list[AgentInfo]:
        return self._call(self._lab.agents())

    def commands(self, device: str) -> list[str]:
        return self._call(self._lab.commands(device))

    def descriptions(self, device: str) -> dict[str, str]:
        return self._call(self._lab.descriptions(device))

    def help(self, device: str, command: str) -> str:
        return self._call(self._lab.help(device, command))

    def lock(self, device: str, duration: str | float | datetime.timedelta | None = None, *,
             wait: str | float | datetime.timedelta | None = None) -> LockState:
        return self._call(self._lab.lock(device, duration, wait=wait))

    def lock_any(self, devices: str | list[str], duration: str | float | datetime.timedelta | None = None, *,
                 wait: str | float | datetime.timedelta = "30m") -> tuple[str, LockState]:
        return self._call(self._lab.lock_any(devices, duration, wait=wait))

    def unlock(self, device: str, force: bool = False) -> Unlocked:
        return self._call(self._lab.unlock(device, force))

    def forget(self, agent: str) -> list[str]:
        return self._call(self._lab.forget(agent))

    def open(self, device: str, command: str, *args: str,
             transcript: str | os.PathLike[str] | None = None) -> Console:
        """Start an interactive session and return its console (``zdut.expect``; see ``Console``)."""
        return Console(self, self._call(self._lab.open(device, command, *args, transcript=transcript)))

    def run(self, device: str, command: str, *args: str, stdin: bytes | None = None, check: bool = True,
            timeout: float | None = None) -> RunResult:
        """Run a command to its end.  ``stdin`` is sent then closed (EOF reaches the module).

        With ``check`` (default) a failed command raises ZdutError; otherwise it is in ``result.error``."""
        return self._call(self._lab.run(device, command, *args, stdin=stdin, check=check, timeout=timeout))


class Console:
    """An interactive session (``Lab.open``), pexpect's way: ``send``, ``sendline``, ``expect``, ``read``,
    ``close``, and a context manager that closes it.  ``zdut.expect.AsyncConsole`` documents each; this one
    blocks instead of awaiting.  Between calls nothing runs: what the session prints waits (flow-controlled)
    until the next call."""

    def __init__(self, lab: Lab, console: AsyncConsole) -> None:
        self._lab, self.console = lab, console

    @property
    def before(self) -> str:
        return self.console.before

    @property
    def after(self) -> str | object | None:
        return self.console.after

    @property
    def match(self) -> re.Match[str] | object | None:
        return self.console.match

    @property
    def stderr(self) -> str:
        return self.console.stderr

    @property
    def ended(self) -> bool:
        return self.console.ended

    @property
    def error(self) -> ZdutError | None:
        return self.console.error

    @property
    def linesep(self) -> str:
        return self.console.linesep

    @linesep.setter
    def linesep(self, value: str) -> None:
        self.console.linesep = value

    def send(self, data: bytes | str) -> None:
        self._lab._call(self.console.send(data))

    def sendline(self, text: str = "") -> None:
        self._lab._call(self.console.sendline(text))

    def send_break(self) -> None:
        self.console.send_break()

    def expect(self, pattern: Pattern | Sequence[Pattern], timeout: float | None = DEFAULT_TIMEOUT_S) -> int:
        return self._lab._call(self.console.expect(pattern, timeout))

    def read(self, timeout: float | None = 0.0) -> str:
        return self._lab._call(self.console.read(timeout))

    def close(self) -> None:
        self._lab._call(self.console.close())

    def __enter__(self) -> Console:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
