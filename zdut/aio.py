"""The asyncio Python API, for callers that already run an event loop (Jupyter, async tests, asyncio services).

    from zdut.aio import AsyncLab

    async with AsyncLab("localhost:1024", user="ci@rack3") as lab:
        await lab.lock("device1", "10m")
        result = await lab.run("device1", "status", "hello")
        print(result.text)
        await lab.unlock("device1")

``zdut.api.Lab`` is this class driven by a private loop: the same methods, arguments, results and errors,
without ``await``.  Every failure is a ZdutError whose ``code`` is one of ``zdut.protocol.Code``.  Calls may
run concurrently on one AsyncLab (one connection); cancelling a ``run`` cancels the command on the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from zdut.brokers import client_order, connect_first
from zdut.client import CONNECT_TIMEOUT_S, Client, Run, RunHandler
from zdut.common.client_config import KeyConfigError, PathArg, client_keys, default_server
from zdut.common.durations import lock_seconds
from zdut.common.watch_args import MAX_WAIT_S
from zdut.expect import AsyncConsole
from zdut.lock_queue import lock_first, wait_for_lock
from zdut.protocol import PRINT, STDERR, STDOUT, AgentInfo, Code, DeviceInfo, LockState, Unlocked, ZdutError
from zdut.transport.monitor import LinkDown

__all__ = ["AsyncLab", "RunResult", "ZdutError"]

log = logging.getLogger("zdut.api")
T = TypeVar("T")

#: After a run's timeout, how long to wait for the agent to confirm the cancel (and release the device).
CANCEL_GRACE_S = 5.0


@dataclass
class RunResult:
    """What a command produced, in the order it came, and how it ended.

    ``output`` holds every chunk as ``(stream, bytes)`` in arrival order, ``stream`` being ``PRINT``,
    ``STDOUT`` or ``STDERR`` of ``zdut.protocol``; ``printed``, ``stdout`` and ``stderr`` are the streams on
    their own, ``combined`` all of them interleaved.  ``code`` is ``Code.OK`` ("") on success, else the
    failure's code with ``message`` saying why; ``error`` is the same as a ZdutError (None on success)."""

    output: list[tuple[int, bytes]] = field(default_factory=list)
    transfers: list[tuple[str, str, int]] = field(default_factory=list)
    error: ZdutError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def code(self) -> str:
        return self.error.code if self.error is not None else Code.OK

    @property
    def message(self) -> str:
        return self.error.message if self.error is not None else ""

    def of(self, *streams: int) -> bytes:
        """The output of ``streams``, interleaved in the order it came."""
        return b"".join(data for stream, data in self.output if stream in streams)

    @property
    def printed(self) -> bytes:
        return self.of(PRINT)

    @property
    def stdout(self) -> bytes:
        return self.of(STDOUT)

    @property
    def stderr(self) -> bytes:
        return self.of(STDERR)

    @property
    def combined(self) -> bytes:
        """Everything, interleaved as it came (what ``zdut`` shows on a terminal)."""
        return self.of(PRINT, STDOUT, STDERR)

    @property
    def text(self) -> str:
        """Printed text and stdout, interleaved as they came, decoded."""
        return self.of(PRINT, STDOUT).decode(errors="replace")


class _Collector(RunHandler):
    """Keeps every output chunk with its stream, in arrival order."""

    def __init__(self, output: list[tuple[int, bytes]]) -> None:
        super().__init__()
        self._chunks = output

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        self._chunks.append((stream, data))
        consumed()


class AsyncLab:
    """A connection to a zdut broker or agent, for coroutines.  ``address`` defaults to $ZDUT_SERVER, then the
    config file's ``server`` (``~/.config/zdut/config.toml``), then ``localhost:1024``; ``timeout`` bounds each
    unary call.  ``key`` (your ``NAME.key_secret``) and ``server_key`` (the server's public key file) make it a
    CURVE connection, for a server with security on; each defaults to $ZDUT_KEY / $ZDUT_SERVER_KEY, then the
    config file, as for ``zdut``.  A key that cannot be used, a bad config file, or half a pair: InvalidArgument,
    before anything connects.  ``user`` defaults to the key's name with a key (a secure server takes no other),
    else ``$USER@hostname``.

    ``address`` may list several brokers of one lab (``"a:1024,b:1024"`` or a list): the first that answers is
    used (zdut.brokers), and when its connection dies the next call switches to another, saying so once in the
    ``zdut.api`` log; a unary call cut off by the death is made again there, a run or console is not."""

    def __init__(self, address: str | list[str] | None = None, user: str | None = None, *, timeout: float = 30.0,
                 key: PathArg | None = None, server_key: PathArg | None = None) -> None:
        try:
            self._addresses = client_order(address or default_server()[0])
            self._keys = {a: client_keys(a, key, server_key, given_as=("key=", "server_key="))
                          for a in self._addresses}
        except KeyConfigError as exc:
            raise ZdutError(Code.INVALID_ARGUMENT, str(exc)) from None
        self._user, self._timeout = user, timeout
        self.client = self._client_for(self._addresses[0], CONNECT_TIMEOUT_S)
        self._closed = False

    def _client_for(self, address: str, connect_timeout: float) -> Client:
        return Client(address, self._user, call_timeout=self._timeout, keys=self._keys[address],
                      connect_timeout=connect_timeout)

    async def connect(self) -> AsyncLab:
        """Connect and exchange versions: Unavailable if nobody answers, InvalidArgument for a bad address."""
        self.client = await connect_first(self._addresses, self._client_for)
        return self

    async def _live(self, dead: bool = False) -> Client:
        """The connection, switched to another broker of the list if this one died (or is ``dead``)."""
        client = self.client
        if (client.connected and not dead) or len(self._addresses) == 1 or self._closed:
            return client
        await client.close()
        self.client = await connect_first(self._addresses, self._client_for, after=client.address)
        log.warning("lost the connection to %s: now using %s", client.address, self.client.address)
        return self.client

    async def _unary(self, call: Callable[[Client], Awaitable[T]]) -> T:
        """``call`` on the live connection; made once more on another broker if the connection died under it."""
        client = await self._live()
        try:
            return await call(client)
        except LinkDown:
            if len(self._addresses) == 1:
                raise
        return await call(await self._live(dead=True))

    async def close(self) -> None:
        """Cancel what still runs and close the connection; calls after it raise Unavailable."""
        self._closed = True
        await self.client.close()

    async def __aenter__(self) -> AsyncLab:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- unary calls
    async def devices(self, match: str = "") -> list[DeviceInfo]:
        """The devices, or those whose names match the glob ``match`` (the server filters)."""
        return await self._unary(lambda c: c.list(match))

    async def agents(self) -> list[AgentInfo]:
        """The agents a broker knows (an agent lists itself)."""
        return await self._unary(lambda c: c.agents())

    async def commands(self, device: str) -> list[str]:
        return await self._unary(lambda c: c.commands(device))

    async def descriptions(self, device: str) -> dict[str, str]:
        """Each of ``device``'s commands, in order, with the config's ``desc`` of it ("" where there is none)."""
        return dict(await self._unary(lambda c: c.described_commands(device)))

    async def help(self, device: str, command: str) -> str:
        return await self._unary(lambda c: c.details(device, command))

    async def lock(self, device: str, duration: str | float | datetime.timedelta | None = None, *,
                   wait: str | float | datetime.timedelta | None = None) -> LockState:
        """Reserve ``device``, or extend your reservation (never shortened).  ``duration`` as on the CLI: a Go
        duration string (``"10m"``, ``"1h30m"``), seconds as a number, or a timedelta; None is the agent's
        default (30m).  Zero, negative or malformed: InvalidArgument, before anything is sent.  ``wait`` (a
        duration too): if someone else holds it, wait in its queue that long (DeadlineExceeded after)."""
        if wait is None:
            seconds = lock_seconds(duration)
            return await self._unary(lambda c: c.lock(device, seconds))
        return await wait_for_lock(await self._live(), device, lock_seconds(duration), _wait_seconds(wait))

    async def lock_any(self, devices: str | list[str], duration: str | float | datetime.timedelta | None = None, *,
                       wait: str | float | datetime.timedelta = "30m") -> tuple[str, LockState]:
        """Lock the first of ``devices`` (names or globs such as ``"board-*"``) to be free, waiting up to
        ``wait`` in each one's queue; returns (its name, the lock).  NotFound for a glob matching nothing,
        DeadlineExceeded when none became free."""
        patterns = [devices] if isinstance(devices, str) else list(devices)
        return await lock_first(await self._live(), patterns, lock_seconds(duration), _wait_seconds(wait))

    async def unlock(self, device: str, force: bool = False) -> Unlocked:
        """Release your reservation; ``force`` breaks anyone's and cancels their sessions on the device.
        The answer's ``broke`` names the owner whose lock a forced unlock broke, ``cancelled`` counts them."""
        return await self._unary(lambda c: c.unlock(device, force))

    async def forget(self, agent: str) -> list[str]:
        """Drop an offline agent and its devices from a broker; returns those devices."""
        return await self._unary(lambda c: c.forget(agent))

    # ------------------------------------------------------------- Run
    async def open(self, device: str, command: str, *args: str,
                   transcript: str | os.PathLike[str] | None = None) -> AsyncConsole:
        """Start an interactive session and return its console (``zdut.expect``): ``send``, ``sendline``,
        ``expect``, ``read``, ``close``; also an async context manager that closes it.  ``transcript``: a file
        that gets everything the session prints.  The agent's refusal (a device locked by someone else, a
        command that does not exist) raises its ZdutError here."""
        console = AsyncConsole(device, command, transcript)
        run = (await self._live()).run(device, command, list(args), console.handler)
        try:
            return await console.attach(run)
        except asyncio.CancelledError:
            run.cancel()
            raise

    async def run(self, device: str, command: str, *args: str, stdin: bytes | None = None, check: bool = True,
                  timeout: float | None = None) -> RunResult:
        """Run a command to its end.  ``stdin`` is sent then closed (EOF reaches the module).

        With ``check`` (default) a failed command raises its ZdutError; otherwise it is in ``result.error``.
        After ``timeout`` seconds the command is cancelled and fails with DeadlineExceeded; cancelling the
        awaiting task cancels it on the agent too."""
        result = RunResult()
        run = (await self._live()).run(device, command, list(args), _Collector(result.output), stdin_closed=not stdin)
        try:
            async with asyncio.timeout(timeout):
                await _feed_and_wait(run, stdin)
        except TimeoutError:
            await _cancelled(run)
            result.error = ZdutError(Code.DEADLINE_EXCEEDED, f"{device} {command}: no result within {timeout:g}s")
        except ZdutError as exc:
            result.error = exc
        except asyncio.CancelledError:
            run.cancel()
            raise
        result.transfers = run.handler.transfers
        if check and result.error is not None:
            raise result.error
        return result


async def _feed_and_wait(run: Run, stdin: bytes | None) -> None:
    if stdin:  # else RunOpen said there is none
        with contextlib.suppress(ZdutError):  # the session already ended: wait() says why
            await run.write_stdin(stdin)
            await run.close_stdin()
    await run.wait()


async def _cancelled(run: Run) -> None:
    """Cancel ``run`` and give the agent a moment to end it, so the device is free when the caller goes on."""
    run.cancel()
    with contextlib.suppress(ZdutError, TimeoutError):
        async with asyncio.timeout(CANCEL_GRACE_S):
            await run.wait()


def _wait_seconds(wait: str | float | datetime.timedelta) -> float:
    """A lock wait as seconds, read as a lock duration is; InvalidArgument past ``MAX_WAIT_S``."""
    seconds = lock_seconds(wait) if wait != "" else 0  # whole seconds, a fraction rounded up
    if not 0 < seconds <= MAX_WAIT_S:
        raise ZdutError(Code.INVALID_ARGUMENT, f"a lock wait must be more than 0s and at most {MAX_WAIT_S:g}s, "
                                               f"got {wait!r}")
    return float(seconds)
