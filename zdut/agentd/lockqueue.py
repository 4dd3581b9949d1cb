"""``zdut DEV lock DURATION --wait MAX``: a first-come, first-served queue per device, at the agent that owns it.

A waiter is a session (protocol mode ``QUEUE``), so one that disappears (Ctrl-C, a killed client, a lost
link) leaves the queue as any session ends: at once, or when the keepalive gives up on it (4 s).  The head
of a device's queue gets the lock the moment the device is free: inside the Locker's change callback when
the holder releases it, or on a timer at the holder's expiry.  Nobody can take the device between one
holder and the next waiter, because the grant happens before the agent handles any other message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from zdut.agentd.locker import Locker
from zdut.agentd.run import AgentRun
from zdut.common.durations import format_duration, format_left
from zdut.protocol import Code, LockState, ZdutError

#: A grant at a holder's expiry comes this much after it, so the Locker sees the reservation as expired.
EXPIRY_SLACK_S = 0.01


class Waiter:
    def __init__(self, session: AgentRun, duration_s: int) -> None:
        self.session, self.user, self.duration_s = session, session.user, duration_s
        self.state: LockState | None = None  # granted
        self.error: ZdutError | None = None  # the grant failed (the lock file could not be written)
        self.wake = asyncio.Event()  # granted, failed, or its place in the queue changed
        self.told = ""  # the last place it was told


class LockQueue:
    """Every device's waiters, oldest first."""

    def __init__(self, locker: Locker, changed: Callable[[str], None]) -> None:
        """``changed(device)``: its queue changed (brokers list it)."""
        self._locker, self._changed = locker, changed
        self._queues: dict[str, list[Waiter]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._granting = False

    def waiting(self, device: str) -> list[str]:
        """Who waits for ``device``, in order."""
        return [waiter.user for waiter in self._queues.get(device, ())]

    async def wait(self, device: str, session: AgentRun, duration_s: int, wait_s: float) -> LockState:
        """Queue ``session``'s user for ``device`` and return the lock once granted; DeadlineExceeded after
        ``wait_s`` seconds.  The session is told its place whenever it changes."""
        waiter = Waiter(session, duration_s)
        self._queues.setdefault(device, []).append(waiter)
        self._changed(device)
        try:
            self.grant(device)
            async with asyncio.timeout(wait_s):
                while waiter.state is None and waiter.error is None:
                    await self._tell_place(device, waiter)
                    waiter.wake.clear()
                    await waiter.wake.wait()
        except TimeoutError:
            holder = self._locker.state(device)
            raise ZdutError(Code.DEADLINE_EXCEEDED, f'device "{device}" did not become free within '
                                                    f'{format_duration(wait_s)}{_held_by(holder)}') from None
        except asyncio.CancelledError:
            if waiter.state is not None:  # granted as the waiter left: the device goes to the next one
                with contextlib.suppress(ZdutError):
                    self._locker.unlock(device, waiter.user, False)
            raise
        finally:
            self._leave(device, waiter)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.state is not None
        return waiter.state

    def grant(self, device: str) -> None:
        """Give ``device`` to the head of its queue if it is free for them; tell the others their new place."""
        if self._granting:
            return  # the grant's own lock change calls back here
        self._granting = True
        try:
            queue = self._queues.get(device, [])
            while queue:
                head = queue[0]
                try:
                    self._locker.check_access(device, head.user)
                except ZdutError:
                    break
                try:
                    head.state = self._locker.lock(device, head.user, head.duration_s)
                except ZdutError as exc:
                    head.error = exc
                queue.pop(0)
                head.wake.set()
            for waiter in queue:
                waiter.wake.set()  # their place, or the holder, may have changed
        finally:
            self._granting = False
        self._expiry_timer(device)

    def _leave(self, device: str, waiter: Waiter) -> None:
        queue = self._queues.get(device, [])
        if waiter in queue:
            queue.remove(waiter)
        if not queue:
            self._queues.pop(device, None)
        self._changed(device)
        self.grant(device)

    def _expiry_timer(self, device: str) -> None:
        """While someone waits for a reservation that will expire, a grant at its expiry."""
        timer = self._timers.pop(device, None)
        if timer is not None:
            timer.cancel()
        holder = self._locker.state(device)
        if device in self._queues and holder is not None and holder.expires_at:
            delay = max(0.0, holder.expires_at - time.time()) + EXPIRY_SLACK_S
            self._timers[device] = asyncio.get_running_loop().call_later(delay, self.grant, device)

    async def _tell_place(self, device: str, waiter: Waiter) -> None:
        queue = self._queues.get(device, [])
        ahead = queue.index(waiter) if waiter in queue else 0
        place = f"{ahead} ahead of you" if ahead else "next in line"
        text = f'[zdut: waiting for "{device}": {place}{_held_by(self._locker.state(device))}]\n'
        if text != waiter.told:
            waiter.told = text
            await waiter.session.stderr(text.encode())


def _held_by(holder: LockState | None) -> str:
    if holder is None:
        return ""
    if holder.expires_at:
        return f'; locked by "{holder.owner}" for {format_left(holder.expires_at - time.time())}'
    return f'; in use by "{holder.owner}"'
