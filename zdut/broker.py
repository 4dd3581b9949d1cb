"""zdut-broker: one ROUTER that clients and agents both connect to.

Agents connect out (DEALER) and register their devices; clients talk to the
broker exactly as to an agent.  The broker answers listings from its registry
and relays everything else to the owning agent, prefixed with the client's
routing id.  It decodes only the small header and forwards payload frames
untouched.

Hot path rules (docs/protocol.md, zeromq-notes 4.4): one thread and one poll
loop; frames are read and written one at a time (never *_multipart); every send
is NOBLOCK on a ROUTER_MANDATORY socket, so a gone peer is EHOSTUNREACH (its
sessions end, the other side is told) and a full peer is EAGAIN (the message is
parked in that peer's queue, in order, and retried; a peer that makes no
progress for CONGESTION_S fails its sessions).  Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import logging
import math
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from zdut.brokerd.registry import Agent, Registration, Registry
from zdut.brokerd.store import Store, StoreError, default_state_path
from zdut.common import logs
from zdut.common.memtune import tune_malloc
from zdut.protocol import (
    CHUNK_SIZE,
    INITIAL_WINDOW,
    MAX_HEADER_BYTES,
    SESSION_TIMEOUT_S,
    STDIN_WINDOW,
    VERSION,
    AgentList,
    Cancel,
    Code,
    CommandList,
    Credit,
    Data,
    Details,
    DeviceList,
    Done,
    Error,
    FileAbort,
    FileChunk,
    FileEnd,
    FileOpen,
    FileRequest,
    GetDetails,
    Heartbeat,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Lock,
    LockChanged,
    Message,
    Ping,
    Refused,
    Register,
    Registered,
    Reregister,
    Resize,
    RunOpen,
    RunStarted,
    SessionGone,
    StdinEof,
    Unlock,
    Welcome,
    ZdutError,
    check_client_version,
    encode,
    endpoint,
)

log = logging.getLogger("zdut.broker")

#: libzmq disconnects a peer that sends a larger frame, before buffering it.  Payload chunks are at
#: most CHUNK_SIZE (1 MiB) and headers at most 64 KiB, so nothing legitimate is larger than this;
#: a Register listing many devices with long help texts gets a 4 MiB allowance.
MAX_FRAME = max(4 * 1024 * 1024, CHUNK_SIZE) + MAX_HEADER_BYTES
#: Per-peer pipe limits, in messages.  Credit bounds what is in flight per session (at most
#: INITIAL_WINDOW / MESSAGE_COST = 16 Ki messages, or 16 chunks of 1 MiB); the HWM is the backstop
#: that makes a peer that stops reading visible (EAGAIN) instead of growing libzmq's queue forever.
HWM = 10_000
#: A peer whose parked queue makes no progress this long fails its sessions.
CONGESTION_S = 5.0
#: ... and so does one whose parked queue grows past this plus its sessions' credit windows (only a peer
#: ignoring credit gets there).
PARK_LIMIT = 64 * 1024 * 1024
PARK_RETRY_S = 0.002
#: A session with no message either way for this long is over (both sides ping every second).
SESSION_IDLE_S = 3 * SESSION_TIMEOUT_S
#: Forwarded Lock/Unlock waiting for the agent's reply (the client itself gives up after 30 s).
PENDING_TIMEOUT_S = 60.0
#: Coalescing of registry writes, and the coarse last-seen flush.
SAVE_DELAY_S = 0.2
FLUSH_S = 5.0
#: Messages handled per wake-up before timers get a turn (heartbeats stay on time under load).
BATCH = 2048

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)  # plain ints: enum flags cost a little on every call
_NB = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)

_PAYLOAD = frozenset({Data, FileChunk})
_FROM_CLIENT = frozenset({Data, StdinEof, FileOpen, FileChunk, FileEnd, FileAbort, Credit, Ping, Cancel, Resize})
#: Everything an agent sends inside a session (agent -> client direction).
_FROM_AGENT = frozenset({RunStarted, Data, FileRequest, FileOpen, FileChunk, FileEnd, FileAbort, Credit, Ping, Done})
_decoder = msgspec.msgpack.Decoder(Message)
_HEARTBEAT = encode(Heartbeat())
_REREGISTER = encode(Reregister())


class Throttle:
    """Rate-limited logging per category: a flood of garbage must not become a flood of log lines."""

    def __init__(
        self, logger: logging.Logger, burst: int = 5, per_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._burst = burst
        self._per_s = per_s
        self._clock = clock
        self._state: dict[str, list[float]] = {}  # key -> [window start, logged, suppressed]

    def __call__(self, level: int, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        now = self._clock()
        st = self._state.get(key)
        if st is None or now - st[0] >= self._per_s:
            if st is not None and st[2]:
                self._log.log(level, "(%d similar messages suppressed: %s)", st[2], key)
            if len(self._state) > 1000:
                self._state.clear()  # keys from peer-chosen names must not grow without bound
            st = self._state[key] = [now, 0, 0]
        if st[1] < self._burst:
            st[1] += 1
            self._log.log(level, fmt, *args, exc_info=exc_info)
        else:
            st[2] += 1

    def flush(self) -> None:
        """Report suppressed counts of windows that have ended (nothing else may come to trigger them)."""
        now = self._clock()
        for key, st in list(self._state.items()):
            if now - st[0] >= self._per_s:
                if st[2]:
                    self._log.warning("(%d similar messages suppressed: %s)", st[2], key)
                del self._state[key]


class Session:
    __slots__ = ("agent", "client", "device", "down_seq", "last", "sid")

    def __init__(self, client: bytes, sid: int, agent: Agent, device: str, now: float) -> None:
        self.client = client
        self.sid = sid
        self.agent = agent
        self.device = device
        self.last = now  # monotonic time of the last message either way
        self.down_seq = 0  # last seq the agent sent: a Done the broker makes up follows it


class Pending:
    """A Lock/Unlock forwarded to an agent, waiting for its reply."""

    __slots__ = ("agent", "deadline", "rid")

    def __init__(self, agent: Agent, rid: int, deadline: float) -> None:
        self.agent = agent
        self.rid = rid
        self.deadline = deadline


class Parked:
    """Messages for one peer whose pipe was full, in order."""

    __slots__ = ("items", "nbytes", "progress")

    def __init__(self, now: float) -> None:
        self.items: deque[tuple[Any, ...]] = deque()
        self.nbytes = 0
        self.progress = now  # last time a message to this peer went out


class Timers:
    """A deadline heap; the loop polls until the earliest one."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn))

    def wait_s(self, now: float, cap: float) -> float:
        return min(cap, max(0.0, self._heap[0][0] - now)) if self._heap else cap

    def run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()


def _send_rest(sock: zmq.Socket[Any], a: Any, b: Any, c: Any) -> None:
    """The frames after an accepted routing id.  libzmq has then taken the whole message, so these cannot
    fail.  copy=False matters for payload frames only (received as zmq.Frame: forwarded without a copy)."""
    if b is None:
        sock.send(a, _NB, copy=False)
    elif c is None:
        sock.send(a, _MORE)
        sock.send(b, _NB, copy=False)
    else:
        sock.send(a, _MORE)
        sock.send(b, _MORE)
        sock.send(c, _NB, copy=False)


def _size(frames: tuple[Any, ...]) -> int:
    return sum(len(f) for f in frames if f is not None)


def _hex(rid: bytes) -> str:
    return rid.hex() or "-"


class Broker:
    def __init__(
        self,
        address: str,
        store: Store | None = None,
        heartbeat_s: float = 1.0,
        name: str | None = None,
        hwm: int = HWM,
        ctx: zmq.Context[Any] | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.mono = mono
        self.registry = Registry(heartbeat_s, wall, mono)
        self.store = store
        if store is not None:
            self.registry.load(store.load())
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._bind(endpoint(address), hwm)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.name = name or f"{socket.gethostname()}:{self.endpoint.rpartition(':')[2]}"
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._now = mono()
        self._stopping = False
        self._backlog = False
        self._timers = Timers()
        self._throttle = Throttle(log)
        # Session table: (client rid, sid) -> Session, plus the two indexes that end sessions in bulk.
        self._sessions: dict[tuple[bytes, int], Session] = {}
        self._by_client: dict[bytes, dict[int, Session]] = {}
        self._by_agent: dict[str, dict[tuple[bytes, int], Session]] = {}
        self._pending: dict[tuple[bytes, int], Pending] = {}
        self._parked: dict[bytes, Parked] = {}
        self._lost: set[bytes] = set()  # peers found unreachable, torn down after the current batch
        self._rereg_sent: dict[bytes, float] = {}
        self._takeovers: dict[str, deque[float]] = {}
        self._save_due = False
        self._retry_due = False
        self.stats = {"relayed": 0, "dropped": 0, "parked": 0, "late": 0}
        self._client_handlers: dict[type, Callable[[bytes, Any, bytes], None]] = {
            Hello: self._c_local,
            ListDevices: self._c_local,
            ListCommands: self._c_local,
            GetDetails: self._c_local,
            ListAgents: self._c_local,
            Lock: self._c_forward,
            Unlock: self._c_forward,
            RunOpen: self._c_run,
        }
        self._every(min(0.25, heartbeat_s / 4), self._housekeeping)
        self._every(1.0, self._sweep)
        self._every(10.0, self._throttle.flush)
        self._every(60.0, self._log_stats)
        if store is not None:
            self._every(FLUSH_S, self._flush_last_seen)

    def _bind(self, ep: str, hwm: int) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.BACKLOG, 1024)  # an agent storm after a broker restart: no SYN retransmit waits
        sock.setsockopt(zmq.LINGER, 500)  # replies in flight at shutdown get a moment, never a hang
        # ZMTP heartbeats (C, IO thread) kill dead TCP so that sends to it fail with EHOSTUNREACH.
        ivl = min(max(100, int(self.heartbeat_s * 1000)), 2_000_000)  # libzmq caps the TTL at 6553.5 s
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl)
        try:
            sock.bind(ep)
        except zmq.ZMQError:
            sock.close(0)
            raise
        return sock

    # ================================================================ loop
    def serve(self, stop: Callable[[], bool] | None = None) -> None:
        while not self._stopping and not (stop is not None and stop()):
            self.serve_once()

    def serve_once(self, max_wait_s: float = 0.25) -> None:
        """One poll (until the next timer at most), one batch of messages, the due timers."""
        timeout = 0 if self._backlog else math.ceil(1000 * self._timers.wait_s(self.mono(), max_wait_s))
        if self._backlog or self._poller.poll(timeout):
            self._now = self.mono()
            self._backlog = self._drain()
            if self._parked:  # reading may have taken long enough for a full pipe to have room again
                self._retry_parked()
        self._now = self.mono()
        self._timers.run_due(self._now)

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        if self.store is not None:
            self._save()
            self._flush_last_seen()
            self.store.close()
        self._sock.close()

    def _every(self, interval: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            fn()
            self._timers.at(self._now + interval, tick)

        self._timers.at(self._now + interval, tick)

    def _drain(self) -> bool:
        """Handle up to BATCH messages; True if more may be waiting."""
        recv = self._sock.recv
        dispatch = self._dispatch
        backlog = True
        for _ in range(BATCH):
            try:
                rid = recv(_NB)
            except zmq.Again:
                backlog = False
                break
            try:
                dispatch(rid)
            except Exception:  # a bug must cost one message, never the broker
                self._throttle(
                    logging.ERROR, "internal", "internal error handling a message from %s", _hex(rid), exc_info=True
                )
                self._discard_rest()
        if self._lost:
            self._teardown_lost()
        return backlog

    def _discard_rest(self) -> int:
        """Read and drop the remaining frames of the current message, so the stream never desyncs."""
        sock = self._sock
        n = 0
        while sock.getsockopt(_RCVMORE):
            sock.recv(copy=False)
            n += 1
        return n

    def _late(self, client: bytes, msg: Any) -> None:
        """A message for a session or request that is over (Credit after Done, replies after the agent was
        declared offline...): expected and harmless, counted and logged at debug level."""
        self.stats["late"] += 1
        if log.isEnabledFor(logging.DEBUG):
            self._throttle(
                logging.DEBUG,
                "late",
                "dropped late %s of client %s: no such session or request",
                type(msg).__name__,
                _hex(client),
            )

    def _log_stats(self) -> None:
        reg = self.registry
        log.debug(
            "stats: %s; %d sessions, %d/%d agents online, %d parked peers",
            self.stats,
            len(self._sessions),
            len(reg.by_rid),
            len(reg.agents),
            len(self._parked),
        )

    def _bad(self, rid: bytes, why: str) -> None:
        self._discard_rest()
        self.stats["dropped"] += 1
        self._throttle(logging.WARNING, "bad input", "dropped a message from %s: %s", _hex(rid), why)

    # ================================================================ reading
    def _dispatch(self, rid: bytes) -> None:
        sock = self._sock
        first = sock.recv()  # a ROUTER always delivers at least one frame after the routing id
        agent = self.registry.by_rid.get(rid)
        if agent is not None:
            agent.last_rx = self._now
            if not sock.getsockopt(_RCVMORE):
                return self._bad(rid, f'agent "{agent.name}" sent a message without a header frame')
            self._from_agent(agent, first, sock.recv())
        elif not first:
            self._from_unregistered(rid)
        elif first[0] >> 4 == 9:  # a msgpack fixarray: every zdut header starts with one
            self._from_client(rid, first)
        else:
            self._from_stranger(rid)

    def _read(self, rid: bytes, header: bytes, limit: int = MAX_HEADER_BYTES) -> tuple[Any, Any] | None:
        """Decode the header and take the payload frame its type calls for; None (logged) if malformed."""
        sock = self._sock
        more = sock.getsockopt(_RCVMORE)
        if len(header) > limit:
            self._bad(rid, f"header of {len(header)} bytes exceeds {limit}")
            return None
        try:
            msg = _decoder.decode(header)
        except ValueError as exc:  # msgspec.DecodeError, and UnicodeDecodeError for invalid UTF-8 in a str
            self._bad(rid, f"undecodable header: {exc}")
            return None
        payload = None
        if msg.__class__ in _PAYLOAD:
            if not more:
                self._bad(rid, f"{type(msg).__name__} without its payload frame")
                return None
            payload = sock.recv(copy=False)
            if payload.more:
                self._bad(rid, f"{type(msg).__name__} with extra frames")
                return None
        elif more:
            self._bad(rid, f"{type(msg).__name__} with extra frames")
            return None
        return msg, payload

    # ---------------------------------------------------------------- clients
    def _from_client(self, rid: bytes, header: bytes) -> None:
        got = self._read(rid, header)
        if got is None:
            return
        msg, payload = got
        kind = msg.__class__
        if kind in _FROM_CLIENT:
            sess = self._sessions.get((rid, msg.sid))
            if sess is None:
                self._late(rid, msg)
                return
            sess.last = self._now
            self._to_agent(sess.agent, rid, header, payload)
            self.stats["relayed"] += 1
            return
        handler = self._client_handlers.get(kind)
        if handler is None:
            self.stats["dropped"] += 1
            self._throttle(
                logging.WARNING, "unexpected", "dropped unexpected %s from client %s", kind.__name__, _hex(rid)
            )
            return
        handler(rid, msg, header)

    def _c_local(self, rid: bytes, msg: Any, header: bytes) -> None:
        """Requests the registry answers: Hello, ListDevices, ListCommands, GetDetails, ListAgents."""
        try:
            self._check_version(msg)
            reply = self._answer(msg)
        except ZdutError as exc:
            reply = Error(msg.rid, exc.code, exc.message)
        self._send(rid, encode(reply))

    def _answer(self, msg: Any) -> Message:
        reg = self.registry
        match msg:
            case Hello():
                return Welcome(msg.rid, VERSION, "broker", self.name)
            case ListDevices():
                return DeviceList(msg.rid, reg.device_list())
            case ListCommands():
                return CommandList(msg.rid, reg.commands(msg.device))
            case GetDetails():
                return Details(msg.rid, reg.details(msg.device, msg.command, msg.keyword))
            case ListAgents():
                return AgentList(msg.rid, reg.agent_list())
        raise ZdutError(Code.UNIMPLEMENTED, f"{type(msg).__name__} is not served by the broker")

    def _check_version(self, msg: Any) -> None:
        try:
            check_client_version("broker", VERSION, msg.version)
        except ZdutError as exc:
            self._throttle(
                logging.WARNING, "version", "refused %s from %s: %s", type(msg).__name__, msg.user, exc.message
            )
            raise

    def _c_forward(self, rid: bytes, msg: Any, header: bytes) -> None:
        """Lock and Unlock: the owning agent is the only lock authority."""
        try:
            self._check_version(msg)
            agent = self.registry.route(msg.device)
        except ZdutError as exc:
            self._send(rid, encode(Error(msg.rid, exc.code, exc.message)))
            return
        self._pending[(rid, msg.rid)] = Pending(agent, msg.rid, self._now + PENDING_TIMEOUT_S)
        self._to_agent(agent, rid, header)

    def _c_run(self, rid: bytes, msg: RunOpen, header: bytes) -> None:
        key = (rid, msg.sid)
        try:
            self._check_version(msg)
            if key in self._sessions:
                raise ZdutError(Code.ALREADY_EXISTS, f"session {msg.sid} is already open")
            agent = self.registry.route(msg.device)
        except ZdutError as exc:
            self._send(rid, encode(Done(msg.sid, 1, exc.code, exc.message)))
            return
        sess = Session(rid, msg.sid, agent, msg.device, self._now)
        self._sessions[key] = sess
        self._by_client.setdefault(rid, {})[msg.sid] = sess
        self._by_agent.setdefault(agent.name, {})[key] = sess
        self._to_agent(agent, rid, header)

    # ---------------------------------------------------------------- agents
    def _from_agent(self, agent: Agent, cid: bytes, header: bytes) -> None:
        got = self._read(agent.rid or b"", header, MAX_FRAME if not cid else MAX_HEADER_BYTES)
        if got is None:
            return
        msg, payload = got
        if not cid:
            self._agent_control(agent, msg)
            return
        kind = msg.__class__
        if kind in _FROM_AGENT:
            sess = self._sessions.get((cid, msg.sid))
            if sess is None or sess.agent is not agent:
                self._late(cid, msg)
                return
            sess.last = self._now
            sess.down_seq = msg.seq
            self._send(cid, header, payload)
            self.stats["relayed"] += 1
            if kind is Done:
                self._end_session(sess)
            return
        self._agent_reply(agent, cid, msg, header)

    def _agent_reply(self, agent: Agent, cid: bytes, msg: Any, header: bytes) -> None:
        """A unary reply: forwarded only to a client that is waiting for it from this agent."""
        rid = getattr(msg, "rid", None)
        key = (cid, rid)
        pending = self._pending.get(key) if isinstance(rid, int) else None
        if pending is not None and pending.agent is agent:
            del self._pending[key]
            self._send(cid, header)
            return
        sess = self._sessions.get(key) if isinstance(msg, Error) else None
        if sess is not None and sess.agent is agent:  # an agent may answer a RunOpen with Error
            self._send(cid, header)
            self._end_session(sess)
            return
        self._late(cid, msg)

    def _agent_control(self, agent: Agent, msg: Any) -> None:
        if isinstance(msg, Heartbeat):
            return  # last_rx is already stamped
        if isinstance(msg, LockChanged):
            self.registry.lock_changed(agent, msg.device, msg.lock)
        elif isinstance(msg, Register):
            assert agent.rid is not None
            self._register(agent.rid, msg)
        else:
            self.stats["dropped"] += 1
            self._throttle(
                logging.WARNING, "unexpected", 'dropped unexpected %s from agent "%s"', type(msg).__name__, agent.name
            )

    def _from_unregistered(self, rid: bytes) -> None:
        """``[b""][header]`` from a connection the broker does not know: Register, or told to register."""
        if not self._sock.getsockopt(_RCVMORE):
            return self._bad(rid, "empty frame without a header")
        got = self._read(rid, self._sock.recv(), MAX_FRAME)
        if got is None:
            return
        if isinstance(got[0], Register):
            self._register(rid, got[0])
        else:
            self._send(rid, b"", _REREGISTER)

    def _from_stranger(self, rid: bytes) -> None:
        """Neither a header nor a control frame: most likely session traffic of an agent connection the
        broker no longer knows (it restarted or expired the agent).  Tell it to register, once a second."""
        extra = self._discard_rest()
        if not extra:
            self._bad(rid, "a single frame that is not a zdut header")
            return
        self.stats["late"] += 1
        last = self._rereg_sent.get(rid, -math.inf)
        if self._now - last >= 1.0:
            self._rereg_sent[rid] = self._now
            self._send(rid, b"", _REREGISTER)

    def _register(self, rid: bytes, msg: Register) -> None:
        try:
            reg = self.registry.register(rid, msg)
        except ZdutError as exc:
            self._throttle(
                logging.WARNING,
                f"refused {msg.agent}",
                'refused registration of agent "%s" (%s): %s',
                msg.agent,
                msg.address or _hex(rid),
                exc.message,
            )
            self._send(rid, b"", encode(Refused(exc.code, exc.message)))
            return
        agent = reg.agent
        self._settle(reg)
        self._send(rid, b"", encode(Registered(self.name, VERSION, max(1, round(self.heartbeat_s * 1000)))))
        agent.last_tx = self._now
        self._schedule_save()
        how = (
            " (takeover from its previous connection)" if reg.replaced_rid else " (restarted)" if reg.restarted else ""
        )
        log.info(
            'agent "%s" registered from %s: %d devices, version %s%s',
            agent.name,
            agent.address or _hex(rid),
            len(agent.devices),
            agent.version,
            how,
        )

    def _settle(self, reg: Registration) -> None:
        """What an accepted registration ends: sessions of a replaced connection or an old agent process."""
        agent = reg.agent
        if reg.displaced is not None:
            self._end_agent_sessions(reg.displaced, f'agent "{reg.displaced.name}" re-registered as "{agent.name}"')
        if reg.replaced_rid is not None:
            self._parked.pop(reg.replaced_rid, None)  # queued for a connection the agent has left
            self._check_flapping(agent.name)
        if reg.replaced_rid is not None or reg.restarted:
            why = "restarted" if reg.restarted else "reconnected"
            self._end_agent_sessions(agent, f'agent "{agent.name}" {why}')
        for device, previous in reg.moved:
            log.info('device "%s" moves from offline agent "%s" to agent "%s"', device, previous, agent.name)
        if reg.removed:
            log.info('agent "%s" no longer serves %s', agent.name, ", ".join(reg.removed))

    def _check_flapping(self, name: str) -> None:
        """Two live processes with one agent name take the registration from each other over and over."""
        times = self._takeovers.setdefault(name, deque(maxlen=3))
        times.append(self._now)
        if len(times) == times.maxlen and times[-1] - times[0] < 30.0:
            self._throttle(
                logging.ERROR,
                f"flapping {name}",
                'agent "%s" was taken over %d times in %.0fs: two '
                "agent processes probably use the same name (see zdut-agent --name)",
                name,
                len(times),
                times[-1] - times[0],
            )

    # ================================================================ writing
    def _to_agent(self, agent: Agent, cid: bytes, header: bytes, payload: Any = None) -> None:
        rid = agent.rid
        if rid is None:
            return  # offline: its sessions were already ended
        agent.last_tx = self._now
        if payload is None:
            self._send(rid, cid, header)
        else:
            self._send(rid, cid, header, payload)

    def _send(self, rid: bytes, a: Any, b: Any = None, c: Any = None) -> None:
        """Send ``[rid][a][b?][c?]`` without ever blocking: park on EAGAIN, tear down on EHOSTUNREACH."""
        if self._parked and rid in self._parked:
            self._park(rid, (a, b, c))
            return
        sock = self._sock
        try:
            sock.send(rid, _MORE)
        except zmq.Again:
            self._park(rid, (a, b, c))
            return
        except zmq.ZMQError as exc:
            self._unreachable(rid, exc)
            return
        _send_rest(sock, a, b, c)

    def _unreachable(self, rid: bytes, exc: zmq.ZMQError) -> None:
        if exc.errno != errno.EHOSTUNREACH:
            log.error("send to %s failed: %s", _hex(rid), exc)
        self._lost.add(rid)

    def _park(self, rid: bytes, frames: tuple[Any, ...]) -> None:
        q = self._parked.get(rid)
        if q is None:
            q = self._parked[rid] = Parked(self._now)
            self._schedule_retry()
        q.items.append(frames)
        q.nbytes += _size(frames)
        self.stats["parked"] += 1
        if q.nbytes > PARK_LIMIT and q.nbytes > self._park_limit(rid):
            self._congested(rid, f"{q.nbytes >> 20} MiB queued, more than its sessions' credit allows")

    def _park_limit(self, rid: bytes) -> int:
        """What a peer that respects credit can have queued: every credited message costs at least its frames'
        size (MESSAGE_COST covers the header), so each session adds at most its windows."""
        agent = self.registry.by_rid.get(rid)
        sessions = len(self._by_agent.get(agent.name, ())) if agent else len(self._by_client.get(rid, ()))
        return PARK_LIMIT + sessions * (INITIAL_WINDOW + STDIN_WINDOW)

    def _schedule_retry(self) -> None:
        if not self._retry_due:
            self._retry_due = True
            self._timers.at(self._now + PARK_RETRY_S, self._retry_tick)

    def _retry_tick(self) -> None:
        self._retry_due = False
        self._retry_parked()
        if self._parked:
            self._schedule_retry()

    def _retry_parked(self) -> None:
        """Send what the parked queues can now take; fail peers that made no progress for too long."""
        sock = self._sock
        now = self._now
        for rid, q in list(self._parked.items()):
            if self._parked.get(rid) is not q:
                continue  # dropped meanwhile (its peer was torn down by an earlier iteration)
            items = q.items
            while items:
                frames = items[0]
                try:
                    sock.send(rid, _MORE)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    self._unreachable(rid, exc)
                    break
                items.popleft()
                _send_rest(sock, *frames)
                q.nbytes -= _size(frames)
                q.progress = now
            if not items:
                self._parked.pop(rid, None)
            elif now - q.progress > CONGESTION_S:
                self._congested(rid, f"no progress for {now - q.progress:.1f}s")
        if self._lost:
            self._teardown_lost()

    def _congested(self, rid: bytes, why: str) -> None:
        q = self._parked.pop(rid, None)
        n = len(q.items) if q else 0
        agent = self.registry.by_rid.get(rid)
        if agent is not None:
            log.warning(
                'agent "%s" is congested (%s): ending its sessions, %d messages not delivered', agent.name, why, n
            )
            self._end_agent_sessions(agent, f'agent "{agent.name}" is not keeping up ({why})')
        else:
            log.warning(
                "client %s is congested (%s): ending its sessions, %d messages not delivered", _hex(rid), why, n
            )
            self._client_gone(rid)

    # ================================================================ ending things
    def _teardown_lost(self) -> None:
        while self._lost:
            rid = self._lost.pop()
            agent = self.registry.by_rid.get(rid)
            if agent is not None:
                self._agent_offline(agent, "connection lost")
            else:
                self._client_gone(rid)

    def _end_session(self, sess: Session) -> None:
        key = (sess.client, sess.sid)
        self._sessions.pop(key, None)
        mine = self._by_client.get(sess.client)
        if mine is not None:
            mine.pop(sess.sid, None)
            if not mine:
                del self._by_client[sess.client]
        theirs = self._by_agent.get(sess.agent.name)
        if theirs is not None:
            theirs.pop(key, None)
            if not theirs:
                del self._by_agent[sess.agent.name]

    def _fail_session(self, sess: Session, code: str, message: str) -> None:
        """End a session the broker has to give up: Done to the client, the client's end to the agent."""
        self._end_session(sess)
        self._send(sess.client, encode(Done(sess.sid, sess.down_seq + 1, code, message)))
        if sess.agent.rid is not None:
            self._to_agent(sess.agent, b"", encode(SessionGone(sess.client, sess.sid)))

    def _end_agent_sessions(self, agent: Agent, message: str) -> None:
        """Every session and pending request routed to ``agent`` ends with Unavailable."""
        sessions = list(self._by_agent.get(agent.name, {}).values())
        for sess in sessions:
            self._end_session(sess)
            self._send(sess.client, encode(Done(sess.sid, sess.down_seq + 1, Code.UNAVAILABLE, message)))
        pending = [(k, p) for k, p in self._pending.items() if p.agent is agent]
        for key, p in pending:
            del self._pending[key]
            self._send(key[0], encode(Error(p.rid, Code.UNAVAILABLE, message)))
        if sessions or pending:
            log.info("%s: ended %d sessions and %d pending requests", message, len(sessions), len(pending))

    def _agent_offline(self, agent: Agent, why: str) -> None:
        rid = self.registry.offline(agent)
        if rid is None:
            return
        self._parked.pop(rid, None)
        log.warning(
            'agent "%s" went offline (%s); its %d devices are listed offline', agent.name, why, len(agent.devices)
        )
        self._end_agent_sessions(agent, f'agent "{agent.name}" went offline')
        self._schedule_save()

    def _client_gone(self, rid: bytes) -> None:
        """A client is unreachable: its agents hear SessionGone for each of its sessions."""
        self._parked.pop(rid, None)
        sessions = list(self._by_client.get(rid, {}).values())
        for sess in sessions:
            self._end_session(sess)
            if sess.agent.rid is not None:
                self._to_agent(sess.agent, b"", encode(SessionGone(rid, sess.sid)))
        for key in [k for k in self._pending if k[0] == rid]:
            del self._pending[key]
        if sessions:
            log.info("client %s is unreachable: ended %d sessions", _hex(rid), len(sessions))

    # ================================================================ timers
    def _housekeeping(self) -> None:
        """Agent liveness both ways: expire the silent, heartbeat the idle."""
        for agent in self.registry.expired():
            self._agent_offline(agent, f"no message for {self._now - agent.last_rx:.1f}s")
        idle = self._now - self.heartbeat_s
        for agent in list(self.registry.by_rid.values()):
            if agent.last_tx <= idle:
                self._to_agent(agent, b"", _HEARTBEAT)
        if self._lost:
            self._teardown_lost()

    def _sweep(self) -> None:
        """Once a second: idle sessions, abandoned Lock/Unlock, old Reregister stamps."""
        now = self._now
        for sess in [s for s in self._sessions.values() if now - s.last > SESSION_IDLE_S]:
            log.info(
                "session %d of client %s on device %s idle for %.0fs: ended",
                sess.sid,
                _hex(sess.client),
                sess.device,
                now - sess.last,
            )
            self._fail_session(
                sess, Code.UNAVAILABLE, f"no message either way for {SESSION_IDLE_S:g}s: session ended by the broker"
            )
        for key in [k for k, p in self._pending.items() if p.deadline < now]:
            del self._pending[key]
        for rid in [r for r, t in self._rereg_sent.items() if now - t > 10.0]:
            del self._rereg_sent[rid]
        if self._lost:
            self._teardown_lost()

    def _schedule_save(self) -> None:
        if self.store is not None and not self._save_due:
            self._save_due = True
            self._timers.at(self._now + SAVE_DELAY_S, self._save)

    def _save(self) -> None:
        self._save_due = False
        if self.store is None:
            return
        records, deleted = self.registry.take_dirty()
        if not records and not deleted:
            return
        try:
            self.store.save(records, deleted)
        except StoreError as exc:
            self._throttle(logging.ERROR, "store", "%s (the registry stays in memory; retrying)", exc)
            self.registry.dirty.update(r.name for r in records)
            self.registry.deleted.update(deleted)
            self._timers.at(self._now + FLUSH_S, self._schedule_save)

    def _flush_last_seen(self) -> None:
        if self.store is None or not self.registry.by_rid:
            return
        reg = self.registry
        try:
            self.store.touch([(a.name, reg.last_seen(a)) for a in reg.by_rid.values()])
        except StoreError as exc:
            self._throttle(logging.ERROR, "store", "%s", exc)


# ==================================================================== process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdut-broker",
        description="Let agents register their devices and relay zdut clients to them.",
        allow_abbrev=False,
    )
    p.add_argument(
        "-s",
        "--listen",
        default="localhost:1024",
        metavar="ADDR",
        help="listen on host:port or tcp://host:port (default %(default)s)",
    )
    p.add_argument("--state", type=Path, metavar="PATH", help=f"registry file (default {default_state_path()})")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="heartbeat interval towards agents; silent for 3 intervals = offline (default %(default)s)",
    )
    p.add_argument("--log", "-log", default="info", metavar="LEVEL", help="debug|info|warn|error (default %(default)s)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines")
    p.add_argument("-v", "--version", action="version", version=f"zdut broker {VERSION}")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0.01 <= args.heartbeat <= 3600):
        parser.error("--heartbeat must be between 0.01 and 3600 seconds")
    try:
        ep = endpoint(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    logs.setup(args.log, args.log_json)
    tune_malloc()
    path = args.state or default_state_path()
    try:
        store = Store(path)
    except StoreError as exc:
        print(f"zdut-broker: {exc}", file=sys.stderr)
        return 1
    try:
        broker = Broker(ep, store, heartbeat_s=args.heartbeat)
    except StoreError as exc:
        store.close()
        print(f"zdut-broker: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        store.close()
        print(f"zdut-broker: cannot listen on {ep}: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    reg = broker.registry
    log.info(
        "listening on %s as %s (state %s: %d known agents, %d devices; heartbeat %gs)",
        broker.endpoint,
        broker.name,
        path,
        len(reg.agents),
        len(reg.devices),
        args.heartbeat,
    )
    try:
        broker.serve()
    finally:
        broker.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
