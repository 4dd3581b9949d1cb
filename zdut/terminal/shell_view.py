"""What the shell knows about the lab, kept fresh in the background.

``Tracker`` owns the shell's one lasting connection and a cached ``LabView``
(devices, their commands and help texts).  Completion and the toolbar only read
the cache, so typing never waits on the network; the refresh task polls the
device list, turns differences into one-line notices and fetches the commands
of devices it has not seen yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from zdut.brokers import client_order, connect_first
from zdut.client import Client
from zdut.common.backoff import Backoff
from zdut.common.client_config import ClientKeys
from zdut.protocol import Code, DeviceInfo, LockState, ZdutError
from zdut.terminal.safe_text import safe

#: Device list poll period; connection changes and the shell's own commands wake it early.
REFRESH_S = 2.0
#: Commands and help texts are re-read this often (an agent may have restarted with a new config).
COMMANDS_TTL_S = 300.0
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0
#: Completion data is fetched with this many calls in flight, so a big lab does not flood the server.
FETCH_CONCURRENCY = 8
#: A command whose help describes its arguments with one of these words gets local path completion.
FILE_WORDS = re.compile(r"\b(files?|paths?|images?|firmware|src|dst)\b", re.IGNORECASE)
#: The arguments part of a help text: an "Arguments: ..." line and the indented lines under it.
ARGS_SECTION = re.compile(r"arguments?:[^\n]*(?:\n[ \t]+[^\n]*)*", re.IGNORECASE)
#: Words the shell itself takes in first position; everything else is the one-shot CLI's grammar.
KEYWORDS = ("list", "agents", "use", "..", "help", "format", "version", "exit", "quit")
#: Words that mean the same thing with or without a device in use (``forget``, an operator's rare word, is
#: not completed: it would shadow ``format``).
GLOBAL_WORDS = frozenset({*KEYWORDS, "forget"})

#: The help-text cache: entries and characters at most (least recently used out first), and per text.
MAX_HELPS = 4096
MAX_HELP_CHARS = 4 << 20
MAX_HELP_TEXT = 64 << 10

CONNECTING, CONNECTED, DISCONNECTED = "connecting", "connected", "disconnected"


def resolve(words: list[str], device: str | None, view: LabView) -> list[str]:
    """The full CLI words for a line typed while ``device`` is in use.

    Shell keywords stay global, and so does a line that starts with another known device
    (unless the device in use has a command of that name)."""
    if device is None or not words or words[0] in GLOBAL_WORDS:
        return words
    if words[0] in view.devices and words[0] not in view.commands.get(device, ()):
        return words
    return [device, *words]


def takes_files(help_text: str) -> bool:
    """Whether a command's arguments are (local) files, judged from its help text."""
    return any(FILE_WORDS.search(m.group()) for m in ARGS_SECTION.finditer(help_text))


def _join(names: list[str]) -> str:
    return ", ".join(sorted(names))


def _lock_text(lock: LockState) -> str:
    return f'in use by "{lock.owner}"' if not lock.expires_at else f'locked by "{lock.owner}"'


def changes(old: dict[str, DeviceInfo], new: dict[str, DeviceInfo], me: str, now: float,
            released: Collection[str] = ()) -> list[str]:
    """One-line notices for what changed between two device lists.

    Our own locks and busy holds (which come and go with every run) are left out: the user
    saw the result of their own command already.  News about our own lock: its expiry, and its end by
    someone else's ``unlock force`` (any end of a lock with time left that is not in ``released``, the
    devices this shell unlocked itself).  The names and owners in them came from other processes: each notice
    has its control characters escaped."""
    appeared = [n for n in new if n not in old]
    gone = [n for n in old if n not in new]
    offline = [n for n, d in new.items() if n in old and old[n].online and not d.online]
    online = [n for n, d in new.items() if n in old and not old[n].online and d.online]
    notices = []
    if offline:
        notices.append(f"{_join(offline)} went offline")
    if online:
        notices.append(f"{_join(online)} back online")
    if appeared:
        notices.append(f"new: {_join(appeared)}")
    if gone:
        notices.append(f"gone: {_join(gone)}")
    for name in sorted(set(old) & set(new)):
        was, lock = old[name].lock, new[name].lock
        if was == lock:
            continue
        if was is not None and was.owner == me and was.expires_at > now + REFRESH_S and name not in released \
                and (lock is None or lock.owner != me):
            now_held = f": now {_lock_text(lock)}" if lock is not None and lock.expires_at else ""
            notices.append(f"your lock on {name} was broken{now_held}")
        elif lock is not None and lock.owner != me and lock.expires_at:
            notices.append(f"{name} {_lock_text(lock)}")
        elif lock is None and was is not None and was.expires_at:
            if was.owner != me:
                notices.append(f"{name} unlocked")
            elif was.expires_at <= now + REFRESH_S:
                notices.append(f"your lock on {name} expired")
    return [safe(n) for n in notices]


class HelpCache:
    """Help texts by (device, command): a bounded LRU, so a big or hostile lab cannot grow the shell."""

    def __init__(self, max_entries: int = MAX_HELPS, max_chars: int = MAX_HELP_CHARS) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._texts: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.chars = 0

    def get(self, key: tuple[str, str], default: str = "") -> str:
        text = self._texts.get(key)
        if text is None:
            return default
        self._texts.move_to_end(key)
        return text

    def __setitem__(self, key: tuple[str, str], text: str) -> None:
        text = text[:MAX_HELP_TEXT]
        self.pop(key)
        self._texts[key] = text
        self.chars += len(text)
        while len(self._texts) > self.max_entries or self.chars > self.max_chars:
            self.chars -= len(self._texts.popitem(last=False)[1])

    def pop(self, key: tuple[str, str]) -> None:
        self.chars -= len(self._texts.pop(key, ""))

    def drop_device(self, device: str, keep: Iterable[str] = ()) -> None:
        """Forget the texts of ``device``, but those of the commands in ``keep``."""
        kept = set(keep)
        for key in [k for k in self._texts if k[0] == device and k[1] not in kept]:
            self.pop(key)

    def __len__(self) -> int:
        return len(self._texts)


@dataclass
class LabView:
    """A cached snapshot of the lab; only the Tracker writes it."""

    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    helps: HelpCache = field(default_factory=HelpCache)
    fetched: dict[str, float] = field(default_factory=dict)
    #: A first device list (and the commands of its devices) has arrived: later lists bring notices.
    listed: bool = False
    #: Devices this shell unlocked itself since the last list: their locks' end is no news.
    released: set[str] = field(default_factory=set)

    def counts(self) -> tuple[int, int, int]:
        """Online, offline and locked (reserved or busy) devices."""
        online = sum(d.online for d in self.devices.values())
        locked = sum(d.lock is not None for d in self.devices.values())
        return online, len(self.devices) - online, locked

    def watched(self, me: str) -> list[tuple[str, int]]:
        """(device, watchers) of the devices ``me`` holds that someone watches."""
        return [(d.name, d.watchers) for d in self.devices.values()
                if d.watchers and d.lock is not None and d.lock.owner == me]

    def takes_files(self, device: str, command: str) -> bool:
        return takes_files(self.helps.get((device, command), ""))

    def update(self, devices: Iterable[DeviceInfo], me: str, now: float) -> list[str]:
        """Take a new device list; returns the notices (none before the view is ``listed``)."""
        new = {d.name: d for d in devices}
        notices = changes(self.devices, new, me, now, self.released) if self.listed else []
        self.released.clear()
        for name, d in new.items():
            was = self.devices.get(name)
            if was is not None and not was.online and d.online:
                self.fetched.pop(name, None)  # its agent restarted: maybe with another config
        for name in set(self.devices) - set(new):
            self.commands.pop(name, None)
            self.fetched.pop(name, None)
            self.helps.drop_device(name)
        self.devices = new
        return notices

    def stale(self, now: float) -> list[str]:
        """Devices whose commands should be (re)read."""
        return [n for n in self.devices if now - self.fetched.get(n, -COMMANDS_TTL_S) >= COMMANDS_TTL_S]


class Tracker:
    """The shell's connection and its cached view of the lab.

    Connects in the background (the prompt does not wait), retries until a server answers,
    then follows the client's link state: ZeroMQ reconnects by itself, we only report it. A server that refuses
    our key (or wants one) is said once, then retried quietly: its admin may be adding the key right now.
    libzmq gives up a link whose reconnection was refused, so then a new client takes over.  Given several
    brokers (``a:1024,b:1024``), it uses the first that answers and switches to another as soon as its link
    drops, saying so once."""

    def __init__(
        self, address: str, user: str, notify: Callable[[list[str]], None], changed: Callable[[], None],
        keys: ClientKeys | None = None, server_keys: dict[str, ClientKeys | None] | None = None,
    ) -> None:
        self.addresses = client_order(address)
        self.address, self.user, self.keys = self.addresses[0], user, keys
        self._server_keys = server_keys or {}
        self.notify, self.changed = notify, changed
        self.view = LabView()
        self.state = CONNECTING
        self.client: Client | None = None
        self.error = ""
        self._attempted = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The last listing: the client it came from, its generation and its devices. Each poll names that
        #: generation, and a broker whose listing has not changed since sends no devices (100,000 of them
        #: are 3.2 MiB to encode and decode every REFRESH_S).
        self._listed: tuple[Client | None, int, list[DeviceInfo]] = (None, 0, [])

    def start(self, refresh: bool = True) -> None:
        self._tasks.append(asyncio.create_task(self._connect()))
        if refresh:
            self._tasks.append(asyncio.create_task(self._refresh_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    def poke(self) -> None:
        """Refresh soon (after a command that may have changed locks)."""
        self._wake.set()

    async def ready(self) -> Client:
        """The connected client; waits for the first connection attempt, raises if there is none."""
        await self._attempted.wait()
        if self.client is None:
            raise ZdutError(Code.UNAVAILABLE, self.error)
        return self.client

    async def prepare(self, device: str) -> None:
        """Make sure the view can resolve lines typed while ``device`` is in use, even before the
        first refresh (or in script mode, which has no refresh task)."""
        try:
            client = await self.ready()
            if not self.view.listed:
                self.view.update(await client.list(), self.user, time.time())
                self.view.listed = True
            if device not in self.view.commands:
                self.view.commands[device] = await client.commands(device)
        except ZdutError:
            pass  # the command itself will report the problem

    # ------------------------------------------------------------- connection
    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.changed()

    async def _connect(self, told: str = "") -> None:
        """Connect, retrying; ``told`` is the refusal already said (a refusal is said once, not per retry)."""
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        while True:
            try:
                client = await connect_first(self.addresses, self._client_for, after=self.address if told else "")
            except ZdutError as exc:
                self.error = exc.message
                self._attempted.set()
                self._set_state(DISCONNECTED)
                transient = exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)  # nobody there (yet)
                if not transient and exc.message != told:
                    told = exc.message
                    self.notify([exc.message])
                if not transient and exc.code != Code.UNAUTHENTICATED:
                    return  # a bad address, an incompatible server, a user the key does not allow
                await asyncio.sleep(backoff.next_delay())
                continue
            self.client, self.address = client, client.address
            self._attempted.set()
            self._set_state(CONNECTED)
            if told:
                self.notify([f"connected to {self.address}"])
            self._wake.set()
            return

    def _client_for(self, address: str, connect_timeout: float) -> Client:
        client = Client(address, self.user, keys=self._server_keys.get(address, self.keys),
                        connect_timeout=connect_timeout)
        client.on_connection = lambda up, c=client: self._link(c, up)
        client.on_refused = lambda exc, c=client: self._refused(c, exc)
        return client

    def _refused(self, client: Client, exc: ZdutError) -> None:
        """The server refused the handshake of a reconnection (our key removed, security turned on or off):
        libzmq will not try that link again, so a new client does, quietly after this one notice."""
        if client is not self.client:
            return
        self.client, self.error = None, exc.message
        self._set_state(DISCONNECTED)
        self.notify([exc.message])
        self._tasks.append(asyncio.create_task(self._switch(client)))

    def _link(self, client: Client, up: bool) -> None:
        if client is not self.client:
            return  # the handshake of a connection still being set up
        if up and self.state != CONNECTED:
            self.view.fetched.clear()  # the server may have restarted with another config
            self._set_state(CONNECTED)
            self.notify([f"reconnected to {self.address}"])
            self._wake.set()
        elif not up and self.state == CONNECTED:
            self.error = f"lost connection to zdut server at {self.address}"
            self._set_state(DISCONNECTED)
            if len(self.addresses) > 1:  # another broker serves the same lab: go there now
                self.notify([f"{self.error}: switching to another of {', '.join(self.addresses)}"])
                self.client = None
                self._tasks.append(asyncio.create_task(self._switch(client)))
            else:
                self.notify([self.error])

    async def _switch(self, dead: Client) -> None:
        """Replace a client that is no use any more (its link gone or refused), the reason already said."""
        await dead.close()
        await self._connect(told=self.error)

    # ------------------------------------------------------------- refresh
    async def _refresh_loop(self) -> None:
        while True:
            client = self.client
            if client is not None and client.connected:
                with contextlib.suppress(ZdutError):
                    await self._refresh(client)
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for returns a poke that lands in the same turn as
            # a cancel and drops the cancel, so closing the shell waited for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_S):
                    await self._wake.wait()

    async def _refresh(self, client: Client) -> None:
        now = time.time()
        held_from, known, devices = self._listed
        generation, fresh = await client.listing(known=known if held_from is client else 0)
        devices = devices if fresh is None else fresh
        self._listed = (client, generation, devices)
        notices = self.view.update(devices, self.user, now)
        if notices:
            self.notify(notices)
        stale = self.view.stale(time.monotonic())
        if stale:
            limit = asyncio.Semaphore(FETCH_CONCURRENCY)
            await asyncio.gather(*(self._fetch(client, name, limit) for name in stale))
        self.view.listed = True  # the toolbar shows counts from now on: completion data is warm
        self.changed()

    async def _fetch(self, client: Client, device: str, limit: asyncio.Semaphore) -> None:
        """Commands of a device and their help texts; a failure leaves it stale for the next round."""
        try:
            async with limit:
                self.view.commands[device] = commands = await client.commands(device)
            for command in commands:
                async with limit:
                    self.view.helps[(device, command)] = await client.details(device, command, "help")
        except ZdutError:
            return
        self.view.helps.drop_device(device, keep=commands)  # commands it no longer has
        self.view.fetched[device] = time.monotonic()
