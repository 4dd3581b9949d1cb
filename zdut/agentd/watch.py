"""``zdut DEV watch``: the live output of whatever runs on a device, fanned out read-only to its watchers.

A watcher is offered every chunk the device's sessions print, and takes it only if its own credit allows
it right now: the owner's session never waits for a watcher.  What a watcher could not take is counted and
told to it (``[zdut: N bytes missed]``) as soon as its credit is back, and it carries on from the live
output.  A watch follows the device, not one session: it sees each session start and end, and ends only
when the watcher leaves (or the agent stops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from zdut.agentd.run import AgentRun
from zdut.protocol import CHUNK_SIZE, STDERR, Data

#: How often a watcher that missed output checks whether its credit is back to say so.
MISSED_CHECK_S = 0.1


class Watcher:
    """One watch session's side of the fan-out."""

    def __init__(self, session: AgentRun) -> None:
        self.session = session
        self.missed = 0  # bytes not taken since the last notice
        self._missing = asyncio.Event()

    def offer(self, stream: int, data: bytes) -> None:
        """Send ``data`` now if credit allows, else count it as missed; never waits."""
        if self.missed and not self._tell_missed():
            self.missed += len(data)
            return
        sent = 0
        send = self.session.stream.try_send_credited
        while sent < len(data) and send(Data, data[sent:sent + CHUNK_SIZE], stream=stream):
            sent += CHUNK_SIZE
        if sent < len(data):
            self.missed += len(data) - sent
            self._missing.set()

    def say(self, text: str) -> None:
        """An event line (a session started or ended) on the watcher's stderr, if credit allows."""
        self.offer(STDERR, f"[zdut: {text}]\n".encode())

    def _tell_missed(self) -> bool:
        notice = f"[zdut: {self.missed} bytes missed: this watcher could not keep up]\n".encode()
        if not self.session.stream.try_send_credited(Data, notice, stream=STDERR):
            return False
        self.missed = 0
        self._missing.clear()
        return True

    async def follow(self) -> None:
        """Until cancelled: once output was missed, say how much as soon as credit is back (even if the
        device has gone quiet meanwhile)."""
        while True:
            await self._missing.wait()
            while self.missed and not self._tell_missed():
                await asyncio.sleep(MISSED_CHECK_S)  # credit comes back with the watcher's reads: no event for it


class Watchers:
    """Every device's watchers, and what the device's sessions print."""

    def __init__(self, owners: Callable[[str], Iterable[AgentRun]], changed: Callable[[str], None]) -> None:
        """``owners(device)``: the device's running sessions (not its watchers), told when one attaches;
        ``changed(device)``: its number of watchers changed (brokers list it)."""
        self._owners, self._changed = owners, changed
        self._by_device: dict[str, set[Watcher]] = {}

    def count(self, device: str) -> int:
        return len(self._by_device.get(device, ()))

    def output(self, device: str, stream: int, data: bytes) -> None:
        for watcher in self._by_device.get(device, ()):
            watcher.offer(stream, data)

    def event(self, device: str, text: str) -> None:
        for watcher in self._by_device.get(device, ()):
            watcher.say(text)

    async def watch(self, device: str, session: AgentRun, replay: bytes) -> None:
        """The body of a watch session: the replay, then the live output until the watcher leaves."""
        if replay:
            await session.stdout(replay)
        watcher = Watcher(session)
        watching = self._by_device.setdefault(device, set())
        watching.add(watcher)
        self._changed(device)
        self._tell_owners(device, f"{session.user} is watching ({len(watching)} watching)")
        try:
            await watcher.follow()
        finally:
            watching.discard(watcher)
            if not watching:
                del self._by_device[device]
            self._changed(device)
            self._tell_owners(device, f"{session.user} stopped watching ({len(watching)} watching)")

    def greet_owner(self, owner: AgentRun) -> None:
        """A session starting on a watched device is told so, before its first output."""
        watching = self._by_device.get(owner.device)
        if watching:
            names = ", ".join(sorted({w.session.user for w in watching}))
            owner.notify(f"[zdut: {len(watching)} watching: {names}]\r\n")

    def _tell_owners(self, device: str, text: str) -> None:
        for owner in self._owners(device):
            owner.notify(f"\r\n[zdut: {text}]\r\n")
