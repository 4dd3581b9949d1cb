"""Waiting for a device: ``zdut DEV lock 30m --wait 10m``, ``lab.lock(..., wait=...)`` and ``lab.lock_any``.

Each device's queue lives at the agent that owns it (``agentd.lockqueue``); the client waits in it through
a session (``protocol.QUEUE``) that ends with the granted lock.  Several devices (a list, or a glob matched
against the listing) are waited for at once, each in its own queue: the first to be granted wins, the other
waits are cancelled, and a lock granted in the same moment to a loser is given back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

import msgspec

from zdut.client import Client, RunHandler
from zdut.common.globs import is_glob
from zdut.protocol import QUEUE, STDERR, STDOUT, Code, LockState, ZdutError

#: A wait cancelled just as its lock was granted: how long to wait for the agent's answer, to give it back.
GIVE_BACK_S = 5.0


class _QueueHandler(RunHandler):
    """Collects the granted lock (stdout) and passes on each place in the queue (stderr)."""

    def __init__(self, device: str, on_place: Callable[[str, str], None] | None) -> None:
        super().__init__()
        self.device, self.granted, self._on_place = device, bytearray(), on_place

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        if stream == STDOUT:
            self.granted += data
        elif stream == STDERR and self._on_place is not None:
            self._on_place(self.device, data.decode(errors="replace").strip())
        consumed()


async def wait_for_lock(client: Client, device: str, duration_s: int, wait_s: float,
                        on_place: Callable[[str, str], None] | None = None) -> LockState:
    """Wait in ``device``'s queue up to ``wait_s`` seconds; the lock once granted.  ``on_place(device, text)``
    hears each change of place (``[zdut: waiting for "board": 1 ahead of you; ...]``).  DeadlineExceeded when
    the wait runs out; cancelling the awaiting task leaves the queue."""
    handler = _QueueHandler(device, on_place)
    run = client.run(device, "lock", [str(duration_s), repr(wait_s)], handler, QUEUE)
    try:
        await run.wait()
    except asyncio.CancelledError:
        run.cancel()
        with contextlib.suppress(ZdutError, TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(GIVE_BACK_S):
                await asyncio.shield(run.finished)  # the agent's answer: it may have granted it just before
        if run.finished.done() and run.finished.exception() is None and handler.granted:
            await _give_back(client, device)
        raise
    try:
        return msgspec.json.decode(bytes(handler.granted), type=LockState)
    except msgspec.DecodeError:
        raise ZdutError(Code.INTERNAL, f"the agent of {device} answered the lock queue with "
                                       f"{bytes(handler.granted)[:80]!r}") from None


async def matching_devices(client: Client, patterns: Iterable[str]) -> list[str]:
    """Device names for ``patterns`` (names, or globs matched against the listing), in order, once each;
    NotFound for a glob that matches nothing."""
    names: list[str] = []
    for pattern in patterns:
        if is_glob(pattern):
            found = [d.name for d in await client.list(pattern)]  # the server filters: one reply per glob
            if not found:
                raise ZdutError(Code.NOT_FOUND, f"no device matches {pattern!r}")
        else:
            found = [pattern]
        names += [name for name in found if name not in names]
    return names


async def lock_first(client: Client, patterns: Iterable[str], duration_s: int, wait_s: float,
                     on_place: Callable[[str, str], None] | None = None) -> tuple[str, LockState]:
    """Wait for every device ``patterns`` name at once; return the first granted (name, lock).  The last
    error (NotFound, DeadlineExceeded...) when none is granted."""
    devices = await matching_devices(client, patterns)
    if len(devices) == 1:
        return devices[0], await wait_for_lock(client, devices[0], duration_s, wait_s, on_place)
    waits = {asyncio.ensure_future(wait_for_lock(client, d, duration_s, wait_s, on_place)): d for d in devices}
    pending = set(waits)
    winner: tuple[str, LockState] | None = None
    error: BaseException | None = None
    try:
        while pending and winner is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None and winner is None:
                    winner = (waits[task], task.result())
                elif task.exception() is None:
                    await _give_back(client, waits[task])  # granted in the same moment as the winner
                else:
                    error = task.exception()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in pending:  # each left its queue; one granted as it was cancelled gives the device back
            if not task.cancelled() and task.exception() is None:
                await _give_back(client, waits[task])
    if winner is None:
        assert error is not None
        raise error
    return winner


async def _give_back(client: Client, device: str) -> None:
    with contextlib.suppress(ZdutError):
        await client.unlock(device)
