"""A synchronous Python API for lab automation: one open connection, calls well under a millisecond.

    from zdut.api import Lab

    with Lab("localhost:1024", user="ci@rack3") as lab:
        lab.lock("device1", "10m")
        result = lab.run("device1", "status", "hello")
        print(result.text)
        lab.unlock("device1")

Everything runs on a private event loop driven by each call, so there are no
threads and nothing happens between calls; sessions never outlive a call.
``Lab`` is ``zdut.aio.AsyncLab`` on that loop: the same methods, arguments, results
and errors.  Code that already runs a loop (Jupyter, async tests) uses ``AsyncLab``.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from zdut.aio import AsyncLab, RunResult
from zdut.common.client_config import PathArg
from zdut.protocol import AgentInfo, Code, DeviceInfo, LockState, Unlocked, ZdutError

__all__ = ["AsyncLab", "Lab", "RunResult", "ZdutError"]

T = TypeVar("T")


class Lab:
    """A connection to a zdut broker or agent (the arguments are ``zdut.aio.AsyncLab``'s)."""

    def __init__(self, address: str | None = None, user: str | None = None, *, timeout: float = 30.0,
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
    def devices(self) -> list[DeviceInfo]:
        return self._call(self._lab.devices())

    def agents(self) -> list[AgentInfo]:
        return self._call(self._lab.agents())

    def commands(self, device: str) -> list[str]:
        return self._call(self._lab.commands(device))

    def descriptions(self, device: str) -> dict[str, str]:
        return self._call(self._lab.descriptions(device))

    def help(self, device: str, command: str) -> str:
        return self._call(self._lab.help(device, command))

    def lock(self, device: str, duration: str | float | datetime.timedelta | None = None) -> LockState:
        return self._call(self._lab.lock(device, duration))

    def unlock(self, device: str, force: bool = False) -> Unlocked:
        return self._call(self._lab.unlock(device, force))

    def forget(self, agent: str) -> list[str]:
        return self._call(self._lab.forget(agent))

    def run(self, device: str, command: str, *args: str, stdin: bytes | None = None, check: bool = True,
            timeout: float | None = None) -> RunResult:
        """Run a command to its end.  ``stdin`` is sent then closed (EOF reaches the module).

        With ``check`` (default) a failed command raises ZdutError; otherwise it is in ``result.error``."""
        return self._call(self._lab.run(device, command, *args, stdin=stdin, check=check, timeout=timeout))


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
