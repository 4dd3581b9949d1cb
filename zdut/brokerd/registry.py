"""The broker's registry: which agent serves which device, who is online, lock copies.

Pure logic with injected clocks (``wall`` for unix times shown to users and lock
expiry, ``mono`` for liveness), so that expiry, takeover and refusal are tested
without sockets or sleeps.  The socket loop (zdut.broker) owns routing ids and
sessions; it stamps ``Agent.last_rx``/``last_tx`` itself on the hot path.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from zdut.brokerd.store import AgentRecord, DeviceRecord
from zdut.common.answers import device_not_found, listing, no_such_command
from zdut.common.durations import format_left
from zdut.common.globs import matching
from zdut.protocol import (
    VERSION,
    AgentInfo,
    Code,
    CommandInfo,
    DeviceInfo,
    LockState,
    Message,
    Register,
    ZdutError,
    check_version,
)

log = logging.getLogger("zdut.broker")

#: Heartbeat intervals an agent may stay silent before it is marked offline.
LIVENESS = 3
#: Offline agents kept, by count and by an estimate of their records' bytes: past either the one seen
#: longest ago goes first, one holding a lock on a device only once no other is left (docs/architecture.md).
MAX_OFFLINE_AGENTS = 1000
MAX_OFFLINE_BYTES = 64 << 20


@dataclass(slots=True, eq=False)
class Agent:
    name: str
    version: str = ""
    instance: str = ""
    address: str = ""
    devices: list[str] = field(default_factory=list)  # sorted
    rid: bytes | None = None  # routing id of its live connection; None = offline
    last_seen: float = 0.0  # unix time of the last message, kept while offline
    last_rx: float = 0.0  # monotonic time of the last message from it
    last_tx: float = 0.0  # monotonic time of the last message to it

    @property
    def online(self) -> bool:
        return self.rid is not None


@dataclass(slots=True, eq=False)
class Device:
    name: str
    agent: Agent
    commands: dict[str, CommandInfo]  # by name
    lock: LockState | None = None  # the agent's effective hold
    busy: LockState | None = None  # a busy hold under that reservation: listed once the reservation expires
    failed: str = ""  # why its modules failed to initialise at the agent
    watchers: int = 0  # as the agent last said; listed while it is online
    waiting: list[str] = field(default_factory=list)  # its lock queue, as the agent last said; listed while online


@dataclass(slots=True)
class Registration:
    """What an accepted Register changed, for the socket loop to act on."""

    agent: Agent
    replaced_rid: bytes | None = None  # the agent's previous connection, now stale
    restarted: bool = False  # a new agent process: sessions of the old one are gone
    moved: list[tuple[str, str]] = field(default_factory=list)  # (device, offline agent it was taken from)
    removed: list[str] = field(default_factory=list)  # devices the agent no longer serves
    displaced: Agent | None = None  # another name this same connection had registered, now offline


class Registry:
    def __init__(
        self,
        heartbeat_s: float = 1.0,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        max_offline: int = MAX_OFFLINE_AGENTS,
        max_offline_bytes: int = MAX_OFFLINE_BYTES,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.wall = wall
        self.mono = mono
        self.max_offline = max_offline
        self.max_offline_bytes = max_offline_bytes
        self.agents: dict[str, Agent] = {}
        self.devices: dict[str, Device] = {}
        self.by_rid: dict[bytes, Agent] = {}
        #: With --keys: a device stays with the agent (key) that registered it, offline or not.
        self.pinned = False
        #: Agents whose persisted record is stale, and agents to delete from the store.
        self.dirty: set[str] = set()
        self.deleted: set[str] = set()
        #: Told whenever ``dirty`` or ``deleted`` grows (the store's AutoSave sets it).
        self.persist: Callable[[], None] = lambda: None
        #: Offline agents, seen longest ago first, with the estimated bytes of each.
        self._offline: dict[str, int] = {}
        self._offline_bytes = 0
        self._listing: list[DeviceInfo] | None = None
        self._listing_valid_until = 0.0  # the earliest reservation expiry in the cached listing
        #: Numbers each listing built, from a random start: a client that moved from another broker cannot
        #: hold a number that means something else here (a shell polls with the one it holds: ListDevices.known).
        self.listing_generation = random.getrandbits(48)

    # ------------------------------------------------------------- persistence
    def load(self, records: Iterable[AgentRecord]) -> None:
        """Agents from the state file: known, and offline until they register again."""
        for rec in sorted(records, key=lambda r: r.last_seen):
            agent = Agent(rec.name, rec.version, rec.instance, rec.address, last_seen=rec.last_seen)
            for dev in rec.devices:
                if dev.name in self.devices:
                    continue  # a unique key in the store; defensive only
                self.devices[dev.name] = Device(dev.name, agent, {c.name: c for c in dev.commands})
                agent.devices.append(dev.name)
            agent.devices.sort()
            if agent.devices:
                self.agents[agent.name] = agent
                self._went_offline(agent)
        self._trim()
        self._changed()

    def record(self, agent: Agent) -> AgentRecord:
        devices = [DeviceRecord(d, [c for _, c in sorted(self.devices[d].commands.items())]) for d in agent.devices]
        return AgentRecord(agent.name, agent.version, agent.instance, agent.address, self.last_seen(agent), devices)

    def take_dirty(self) -> tuple[list[AgentRecord], list[str]]:
        """Records to write and names to delete since the last call."""
        records = [self.record(self.agents[n]) for n in sorted(self.dirty) if n in self.agents]
        deleted = sorted(self.deleted)
        self.dirty.clear()
        self.deleted.clear()
        return records, deleted

    # ------------------------------------------------------------- registration
    def register(self, rid: bytes, msg: Register) -> Registration:
        """Accept ``msg`` from connection ``rid`` or raise ZdutError (the Refused reply)."""
        self._validate(rid, msg)
        old = self.agents.get(msg.agent)
        result = Registration(old or Agent(msg.agent))
        agent = result.agent
        self._came_back(agent.name)  # first: nothing below may evict it as an offline agent
        if old is not None and old.rid is not None and old.rid != rid:
            result.replaced_rid = old.rid
            del self.by_rid[old.rid]
        result.restarted = old is not None and old.instance != msg.instance
        stale = self.by_rid.get(rid)
        if stale is not None and stale is not agent:  # one connection, a new name: the old name goes offline
            self.offline(stale)
            result.displaced = stale
        new_names = sorted(d.name for d in msg.devices)
        result.removed = sorted(set(agent.devices) - set(new_names))
        for name in result.removed:
            del self.devices[name]
        for entry in msg.devices:
            dev = self.devices.get(entry.name)
            if dev is not None and dev.agent is not agent:
                result.moved.append((entry.name, dev.agent.name))
                self._drop_device(dev)
            self.devices[entry.name] = Device(
                entry.name,
                agent,
                {c.name: c for c in entry.commands},
                msg.locks.get(entry.name),
                msg.busy.get(entry.name),
                entry.failed,
            )
        agent.version, agent.instance, agent.address = msg.version, msg.instance, msg.address
        agent.devices = new_names
        agent.rid = rid
        agent.last_rx = self.mono()
        agent.last_seen = self.wall()
        self.agents[agent.name] = agent
        self.by_rid[rid] = agent
        self.deleted.discard(agent.name)
        self._mark(agent.name)
        self._changed()
        return result

    def _validate(self, rid: bytes, msg: Register) -> None:
        """Refuse a registration that is malformed, or that claims a device another agent serves: online, or
        offline with a lock on it (the lock holds until it expires or that agent is forgotten)."""
        check_version("broker", VERSION, msg.version, "agent")
        if not msg.agent:
            raise ZdutError(Code.INVALID_ARGUMENT, "agent name is not set")
        if not msg.devices:
            raise ZdutError(Code.INVALID_ARGUMENT, "empty device list")
        seen: set[str] = set()
        for i, entry in enumerate(msg.devices):
            if not entry.name:
                raise ZdutError(Code.INVALID_ARGUMENT, f"device {i} has empty name")
            if entry.name in seen:
                raise ZdutError(Code.INVALID_ARGUMENT, f'device "{entry.name}" is listed twice')
            seen.add(entry.name)
            holder = self.devices.get(entry.name)
            if holder is None or holder.agent.name == msg.agent:
                continue
            other = holder.agent
            if other.rid is not None and other.rid != rid:
                raise ZdutError(
                    Code.ALREADY_EXISTS,
                    f'device "{entry.name}" is already registered by agent "{other.name}" (online)',
                )
            if self.pinned:
                raise ZdutError(
                    Code.PERMISSION_DENIED,
                    f'device "{entry.name}" is registered by agent "{other.name}" '
                    f'({"online" if other.rid is not None else "offline"}): with security on, only the key of '
                    f'agent "{other.name}" may register it (or "zdut forget {other.name}" once it is offline)',
                )
            if other.rid is None:
                self._check_unlocked(holder)

    def _check_unlocked(self, dev: Device) -> None:
        """A device held at its offline agent stays there."""
        now = self.wall()
        lock = self._current_lock(dev, now)
        if lock is None:
            return
        where = f'"{lock.owner}" at offline agent "{dev.agent.name}"'
        escape = f'after "zdut forget {dev.agent.name}"'
        if lock.expires_at:
            at = dt.datetime.fromtimestamp(lock.expires_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise ZdutError(
                Code.FAILED_PRECONDITION,
                f'device "{dev.name}" is locked by {where} (expires in {format_left(lock.expires_at - now)}, '
                f"at {at}); it can move once the lock expires or {escape}",
            )
        raise ZdutError(
            Code.FAILED_PRECONDITION,
            f'device "{dev.name}" is in use by {where} (a session holds it, no expiry); it can move once that '
            f"agent releases it or {escape}",
        )

    def _drop_device(self, dev: Device) -> None:
        """Take a device away from an offline agent; forget that agent once it serves nothing."""
        prev = dev.agent
        prev.devices.remove(dev.name)
        if not prev.devices:
            self._remove(prev)
            return
        self._mark(prev.name)
        if prev.name in self._offline:  # smaller now, and still as old
            size = self._size(prev)
            self._offline_bytes += size - self._offline[prev.name]
            self._offline[prev.name] = size

    def forget(self, name: str) -> list[str]:
        """Drop offline agent ``name`` and its devices (from the store too); returns those devices."""
        agent = self.agents.get(name)
        if agent is None:
            raise ZdutError(Code.NOT_FOUND, f'agent "{name}": no such agent')
        if agent.online:
            raise ZdutError(
                Code.FAILED_PRECONDITION, f'agent "{name}" is online; only an offline agent can be forgotten'
            )
        self._remove(agent)
        self._changed()
        return list(agent.devices)

    def _remove(self, agent: Agent) -> None:
        """An offline agent leaves the registry and the store, with its devices."""
        for device in agent.devices:
            del self.devices[device]
        del self.agents[agent.name]
        self._came_back(agent.name)
        self.dirty.discard(agent.name)
        self.deleted.add(agent.name)
        self.persist()

    # ------------------------------------------------------------- the bound on offline agents
    def _went_offline(self, agent: Agent) -> None:
        size = self._offline[agent.name] = self._size(agent)
        self._offline_bytes += size

    def _came_back(self, name: str) -> None:
        self._offline_bytes -= self._offline.pop(name, 0)

    def _size(self, agent: Agent) -> int:
        """A rough estimate of what an agent costs in memory and on disk, in bytes."""
        size = 256 + len(agent.name) + len(agent.version) + len(agent.instance) + len(agent.address)
        for name in agent.devices:
            dev = self.devices[name]
            size += 192 + len(name) + sum(96 + len(c.name) + len(c.help) + len(c.desc) for c in dev.commands.values())
        return size

    def _trim(self) -> None:
        """Evict offline agents past MAX_OFFLINE_AGENTS or MAX_OFFLINE_BYTES: the longest offline first, those that
        hold a lock only once no other is left.  It scans only as far as it must: at the bound, each agent going
        offline costs one eviction, not a pass over every offline agent (a pass that took over half the broker's
        time in a storm of 10,000 agents, bench/bench_scale.py)."""
        count, size = len(self._offline), self._offline_bytes
        if count <= self.max_offline and size <= self.max_offline_bytes:
            return
        now = self.wall()
        evict: list[str] = []
        locked: list[tuple[str, int]] = []
        for name, cost in self._offline.items():  # oldest first
            if count <= self.max_offline and size <= self.max_offline_bytes:
                break
            if any(self._current_lock(self.devices[d], now) is not None for d in self.agents[name].devices):
                locked.append((name, cost))
                continue
            evict.append(name)
            count, size = count - 1, size - cost
        for name, cost in locked:  # reached only when evicting every unlocked one was not enough
            if count <= self.max_offline and size <= self.max_offline_bytes:
                break
            evict.append(name)
            count, size = count - 1, size - cost
        for name in evict:
            agent = self.agents[name]
            log.info(
                'forgetting offline agent "%s" (last seen %s, %d devices): more than %d offline agents or %d MiB '
                "of their records",
                name,
                dt.datetime.fromtimestamp(agent.last_seen, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                len(agent.devices),
                self.max_offline,
                self.max_offline_bytes >> 20,
            )
            self._remove(agent)
        self._changed()

    # ------------------------------------------------------------- liveness
    def offline(self, agent: Agent) -> bytes | None:
        """Mark ``agent`` offline; returns the routing id it had."""
        rid = agent.rid
        if rid is None:
            return None
        agent.last_seen = self.last_seen(agent)
        agent.rid = None
        self.by_rid.pop(rid, None)
        self._mark(agent.name)
        self._went_offline(agent)
        self._trim()
        self._changed()
        return rid

    def expired(self) -> list[Agent]:
        """Online agents silent for LIVENESS heartbeat intervals."""
        limit = self.mono() - LIVENESS * self.heartbeat_s
        return [a for a in self.by_rid.values() if a.last_rx < limit]

    def last_seen(self, agent: Agent) -> float:
        """Unix time of the agent's last message (derived from the monotonic stamp while it is online)."""
        if agent.rid is None:
            return agent.last_seen
        return self.wall() - max(0.0, self.mono() - agent.last_rx)

    # ------------------------------------------------------------- locks
    def lock_changed(self, agent: Agent, device: str, lock: LockState | None, busy: LockState | None = None,
                     watchers: int = 0, waiting: list[str] | None = None) -> bool:
        dev = self.devices.get(device)
        if dev is None or dev.agent is not agent:
            return False  # only the owning agent speaks for a device
        dev.lock, dev.busy, dev.watchers, dev.waiting = lock, busy, watchers, list(waiting or ())
        self._mark(agent.name)  # a change of state: its last-seen time is written with it
        self._changed()
        return True

    @staticmethod
    def _current_lock(dev: Device, now: float) -> LockState | None:
        """The device's hold at ``now``: an expired reservation gives way to the busy hold under it, lazily,
        as at the agent."""
        lock = dev.lock
        if lock is not None and lock.expires_at and lock.expires_at <= now:
            lock = dev.lock = dev.busy
            dev.busy = None
        return lock

    # ------------------------------------------------------------- queries
    def answer(self, msg: Message, broker: str) -> Message:
        """The reply of broker ``broker`` to Hello or a listing request; raises ZdutError."""
        return listing(
            msg,
            "broker",
            broker,
            devices=self.device_list,
            commands=self.commands,
            help_text=self.help_text,
            agents=self.agent_list,
            generation=lambda: self.listing_generation,
        )

    def device_list(self, match: str = "") -> list[DeviceInfo]:
        """Every known device whose name matches the glob ``match`` ("" for all), sorted, offline ones included;
        expired reservations left out."""
        now = self.wall()
        if self._listing is None or now >= self._listing_valid_until:
            self._listing, self._listing_valid_until = self._build_listing(now)
            self.listing_generation += 1
        return matching(self._listing, match) if match else self._listing

    def _build_listing(self, now: float) -> tuple[list[DeviceInfo], float]:
        out = []
        valid_until = float("inf")
        for name in sorted(self.devices):
            dev = self.devices[name]
            lock = self._current_lock(dev, now)
            if lock is not None and lock.expires_at:
                valid_until = min(valid_until, lock.expires_at)
            online = dev.agent.rid is not None
            out.append(DeviceInfo(name, lock, dev.agent.name, online, dev.failed, dev.watchers if online else 0,
                                  dev.waiting if online else []))
        return out, valid_until

    def agent_list(self) -> list[AgentInfo]:
        devices = self.devices
        return [
            AgentInfo(a.name, list(a.devices), a.online, self.last_seen(a), a.version, a.address,
                      {d: devices[d].failed for d in a.devices if devices[d].failed})
            for _, a in sorted(self.agents.items())
        ]

    def device(self, name: str) -> Device:
        dev = self.devices.get(name)
        if dev is None:
            raise device_not_found(name)  # dutctl's proxy's words; agents keep no_such_device
        return dev

    def route(self, name: str) -> Agent:
        """The online agent serving device ``name``."""
        agent = self.device(name).agent
        if agent.rid is None:
            raise ZdutError(Code.UNAVAILABLE, f'agent "{agent.name}" serving device "{name}" is offline')
        return agent

    def commands(self, name: str) -> list[tuple[str, str]]:
        """(name, desc) of each command of device ``name``, by name."""
        self.route(name)
        return [(c, info.desc) for c, info in sorted(self.devices[name].commands.items())]

    def help_text(self, name: str, command: str) -> str:
        self.route(name)
        info = self.devices[name].commands.get(command)
        if info is None:
            raise no_such_command(name, command)
        return info.help

    def _mark(self, name: str) -> None:
        self.dirty.add(name)
        self.persist()

    def _changed(self) -> None:
        self._listing = None
