"""zdut-broker: one ROUTER that clients and agents both connect to.

Agents connect out (DEALER) and register their devices; clients talk to the broker exactly as to an
agent.  The broker answers listings from its registry and relays everything else to the owning agent,
prefixed with the client's routing id.  It decodes only the small header and forwards payload frames untouched.

Hot path rules (docs/architecture.md, "Concurrency"): one thread and one poll
loop; frames are read and written one at a time (never *_multipart); every send
is NOBLOCK on a ROUTER_MANDATORY socket and never stalls the loop.

``Broker`` is the dispatch and the policy; its rooms are in zdut/brokerd/:
``inbox`` (reading and checking input), ``outbox`` (sending, parking,
congestion), ``sessions`` (what is relayed for whom, and how each ends),
``registry`` (who serves what), ``membership`` (agents joining and leaving),
``timers`` and ``autosave`` (the SQLite store kept in step), ``guard`` (``--keys``: who may do
what), ``cli`` (the process around it).
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from zdut.brokerd import cli
from zdut.brokerd.autosave import AutoSave
from zdut.brokerd.guard import BrokerGuard
from zdut.brokerd.inbox import Inbox
from zdut.brokerd.membership import Membership
from zdut.brokerd.outbox import HWM, MAX_FRAME, Outbox, bind_router
from zdut.brokerd.registry import Agent, Registry
from zdut.brokerd.sessions import Sessions
from zdut.brokerd.store import Store
from zdut.brokerd.timers import Timers
from zdut.common.addresses import endpoint
from zdut.common.logs import Throttle, hex_id
from zdut.protocol import (
    MAX_HEADER_BYTES,
    SESSION_TIMEOUT_S,
    VERSION,
    Cancel,
    Code,
    Credit,
    Data,
    Done,
    Error,
    FileAbort,
    FileChunk,
    FileEnd,
    FileOpen,
    FileRequest,
    Forget,
    GetDetails,
    Heartbeat,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Lock,
    LockChanged,
    Ping,
    Register,
    Resize,
    RunOpen,
    RunStarted,
    StdinEof,
    Unlock,
    ZdutError,
    check_version,
    encode,
)

log = logging.getLogger("zdut.broker")

#: A session with no message either way for this long is over (both sides ping every second).
SESSION_IDLE_S = 3 * SESSION_TIMEOUT_S
#: Forwarded Lock/Unlock waiting for the agent's reply (the client itself gives up after 30 s).
PENDING_TIMEOUT_S = 60.0
#: Messages handled per wake-up before timers get a turn (heartbeats stay on time under load).
BATCH = 2048

_NB = int(zmq.NOBLOCK)  # plain ints: enum flags cost a little on every call
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)

_FROM_CLIENT = frozenset({Data, StdinEof, FileOpen, FileChunk, FileEnd, FileAbort, Credit, Ping, Cancel, Resize})
#: Everything an agent sends inside a session (agent -> client direction).
_FROM_AGENT = frozenset({RunStarted, Data, FileRequest, FileOpen, FileChunk, FileEnd, FileAbort, Credit, Ping, Done})


class Broker:
    """Reads one message at a time, decides what it means, and hands the rest to its rooms."""

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
        guard: BrokerGuard | None = None,
    ) -> None:
        self.heartbeat_s = heartbeat_s
        self.mono = mono
        self.registry = Registry(heartbeat_s, wall, mono)
        if store is not None:
            self.registry.load(store.load())
        ctx = ctx or zmq.Context.instance()
        self._guard = guard
        if guard is not None:
            guard.bind_zap(ctx)  # before the ROUTER binds: libzmq asks only a bound handler
        self._sock = bind_router(ctx, endpoint(address), hwm, heartbeat_s, guard.secure if guard else None)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.name = name or f"{socket.gethostname()}:{self.endpoint.rpartition(':')[2]}"
        self._poller = zmq.Poller()
        for sock in [self._sock, *(guard.sockets() if guard else ())]:
            self._poller.register(sock, zmq.POLLIN)
        self._events = cast(Callable[[int], int], self._sock.get)  # typed once: cast() per batch shows in profiles
        self._now = mono()
        self._stopping = False
        self._backlog = False
        self._timers = Timers(self._now)
        self._throttle = Throttle(log)
        self.stats = {"relayed": 0, "dropped": 0, "parked": 0, "late": 0, "refused": 0}
        self._outbox = Outbox(self._sock, self._timers, self.stats, self._sessions_of, self._congested)
        self._send = self._outbox.send
        self._inbox = Inbox(self._sock, self.stats, self._throttle, self._outbox)
        self._read, self._late, self._bad = self._inbox.read, self._inbox.late, self._inbox.bad
        self._lost = self._outbox.lost
        self._sessions = Sessions(self._send, self._to_agent)
        self._autosave = AutoSave(self.registry, store, self._timers, self._throttle) if store is not None else None
        self._members = Membership(
            self.name,
            heartbeat_s,
            self.registry,
            self._sessions,
            self._outbox,
            self._timers,
            self._throttle,
            self._to_agent,
            self._registry_changed,
            guard.vet_register if guard else None,
        )
        self._client_handlers: dict[type, Callable[[bytes, Any, bytes], None]] = {
            Hello: self._c_local,
            ListDevices: self._c_local,
            ListCommands: self._c_local,
            GetDetails: self._c_local,
            ListAgents: self._c_local,
            Lock: self._c_forward,
            Unlock: self._c_forward,
            Forget: lambda rid, msg, header: self._send(rid, encode(self._members.forget(msg))),
            RunOpen: self._c_run,
        }
        self._handle: Callable[[bytes, zmq.Frame], None] = self._dispatch  # a message whose first frame is read
        if guard is not None:  # the key checks sit in front; without --keys the hot path is untouched
            guard.attach(self._sock, self._inbox, self._outbox, self.registry, self._sessions, self._members,
                         self._timers, self._throttle, self.stats)
            self._client_handlers = {kind: guard.checked(h) for kind, h in self._client_handlers.items()}
            self._handle = guard.keyed(self._dispatch)
        every = self._timers.every
        every(1.0, self._sweep)
        every(10.0, self._throttle.flush)
        every(60.0, self._log_stats)

    # ================================================================ loop
    def serve(self, stop: Callable[[], bool] | None = None) -> None:
        while not self._stopping and not (stop is not None and stop()):
            self.serve_once()

    def serve_once(self, max_wait_s: float = 0.25) -> None:
        """One poll (until the next timer at most), one batch of messages, the due timers."""
        timers = self._timers
        timeout = 0 if self._backlog else math.ceil(1000 * timers.wait_s(self.mono(), max_wait_s))
        if self._backlog or self._poller.poll(timeout):
            self._now = timers.now = self.mono()
            self._backlog = self._drain()
            if self._guard is not None:  # ZAP and handshake events, between batches: never behind a backlog
                self._guard.service()
            if self._outbox.parked:  # reading may have taken long enough for a full pipe to have room again
                self._outbox.retry()
            if self._lost:
                self._teardown_lost()
        self._now = self.mono()
        timers.run_due(self._now)
        if self._lost:
            self._teardown_lost()

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        if self._autosave is not None:
            self._autosave.close()
        self._sock.close()
        if self._guard is not None:
            self._guard.close()

    def _drain(self) -> bool:
        """Handle up to BATCH messages; True if more may be waiting."""
        recv, dispatch, events = self._sock.recv, self._handle, self._events
        for i in range(BATCH):
            try:
                rid = recv(_NB)
            except zmq.Again:  # ends a long batch: one exception (~8 us) instead of an EVENTS query (~3 us) a message
                return False
            try:
                dispatch(rid, recv(copy=False))  # a ROUTER always delivers at least one frame after the routing id
            except Exception:  # a bug must cost one message, never the broker
                self._throttle(
                    logging.ERROR, "internal", "internal error handling a message from %s", hex_id(rid), exc_info=True
                )
                self._inbox.discard_rest()
            if not i and not events(_EVENTS) & _POLLIN:  # a lone message (light load) ends without that exception
                return False
        return True

    def _log_stats(self) -> None:
        reg = self.registry
        log.debug(
            "stats: %s; %d sessions, %d/%d agents online, %d parked peers",
            self.stats,
            len(self._sessions),
            len(reg.by_rid),
            len(reg.agents),
            len(self._outbox.parked),
        )

    # ================================================================ reading
    def _dispatch(self, rid: bytes, first: zmq.Frame) -> None:
        sock = self._sock
        agent = self.registry.by_rid.get(rid)
        if agent is not None:
            agent.last_rx = self._now
            if not first.more:
                return self._bad(rid, f'agent "{agent.name}" sent a message without a header frame')
            self._from_agent(agent, first.bytes, sock.recv(copy=False))
        elif not len(first):
            self._from_unregistered(rid, first.more)
        elif first.bytes[0] >> 4 == 9:  # a msgpack fixarray: every zdut header starts with one
            self._from_client(rid, first)
        else:
            self._from_stranger(rid)

    # ---------------------------------------------------------------- clients
    def _from_client(self, rid: bytes, head: zmq.Frame) -> None:
        got = self._read(rid, head, answer=True)
        if got is None:
            return
        msg, payload = got
        header = head.bytes
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
            self._inbox.unexpected(msg, f"client {hex_id(rid)}")
            return
        if rid in self._outbox.parked and not self._inbox.admitted(rid, msg):
            return
        handler(rid, msg, header)

    def _c_local(self, rid: bytes, msg: Any, header: bytes) -> None:
        """Requests the registry answers: Hello, ListDevices, ListCommands, GetDetails, ListAgents."""
        try:
            self._check_version(msg)
            reply = self.registry.answer(msg, self.name)
        except ZdutError as exc:
            reply = Error(msg.rid, exc.code, exc.message)
        self._send(rid, encode(reply))

    def _check_version(self, msg: Any) -> None:
        try:
            check_version("broker", VERSION, msg.version)
        except ZdutError as exc:
            self._throttle(
                logging.WARNING, "version", "refused %s from %s: %s", type(msg).__name__, msg.user, exc.message
            )
            raise

    def _c_forward(self, rid: bytes, msg: Any, header: bytes) -> None:
        """Lock and Unlock: the owning agent is the only lock authority."""
        try:
            self._check_version(msg)
            self._sessions.check_room(rid, pending=True)
            agent = self.registry.route(msg.device)
        except ZdutError as exc:
            self._send(rid, encode(Error(msg.rid, exc.code, exc.message)))
            return
        self._sessions.await_reply(rid, msg.rid, agent, self._now + PENDING_TIMEOUT_S)
        self._to_agent(agent, rid, header)

    def _c_run(self, rid: bytes, msg: RunOpen, header: bytes) -> None:
        try:
            self._check_version(msg)
            if (rid, msg.sid) in self._sessions:
                raise ZdutError(Code.ALREADY_EXISTS, f"session {msg.sid} is already open")
            self._sessions.check_room(rid)
            agent = self.registry.route(msg.device)
        except ZdutError as exc:
            self._send(rid, encode(Done(msg.sid, 1, exc.code, exc.message)))
            return
        self._sessions.open(rid, msg.sid, agent, msg.device, self._now, msg.user)
        self._to_agent(agent, rid, header)

    # ---------------------------------------------------------------- agents
    def _from_agent(self, agent: Agent, cid: bytes, head: zmq.Frame) -> None:
        got = self._read(agent.rid or b"", head, MAX_FRAME if not cid else MAX_HEADER_BYTES)
        if got is None:
            return
        msg, payload = got
        header = head.bytes
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
                self._sessions.end(sess)
            return
        self._agent_reply(agent, cid, msg, header)

    def _agent_reply(self, agent: Agent, cid: bytes, msg: Any, header: bytes) -> None:
        """A unary reply: forwarded only to a client that is waiting for it from this agent."""
        rid = getattr(msg, "rid", None)
        if self._sessions.take_reply(cid, rid, agent):
            self._send(cid, header)
            return
        self._late(cid, msg)

    def _agent_control(self, agent: Agent, msg: Any) -> None:
        if isinstance(msg, Heartbeat):
            return  # last_rx is already stamped
        if isinstance(msg, LockChanged):
            self.registry.lock_changed(agent, msg.device, msg.lock, msg.busy, msg.watchers, msg.waiting)
        elif isinstance(msg, Register):
            assert agent.rid is not None
            self._members.register(agent.rid, msg)
        else:
            self._inbox.unexpected(msg, f'agent "{agent.name}"')

    def _from_unregistered(self, rid: bytes, more: bool) -> None:
        """``[b""][header]`` from a connection the broker does not know: Register, or told to register."""
        if not more:
            return self._bad(rid, "empty frame without a header")
        got = self._read(rid, self._sock.recv(copy=False), MAX_FRAME)
        if got is None:
            return
        if isinstance(got[0], Register):
            self._members.register(rid, got[0])
        else:
            self._members.prompt(rid)

    def _from_stranger(self, rid: bytes) -> None:
        """Neither a header nor a control frame: most likely session traffic of an agent connection the
        broker no longer knows (it restarted or expired the agent).  Tell it to register, once a second."""
        extra = self._inbox.discard_rest()
        if not extra:
            self._bad(rid, "a single frame that is not a zdut header")
            return
        self.stats["late"] += 1
        self._members.prompt(rid, at_most_every_s=1.0)

    # ================================================================ writing, peers lost or stuck
    def _to_agent(self, agent: Agent, cid: bytes, header: bytes, payload: Any = None) -> None:
        rid = agent.rid
        if rid is None:
            return  # offline: its sessions were already ended
        agent.last_tx = self._now
        if payload is None:
            self._send(rid, cid, header)
        else:
            self._send(rid, cid, header, payload)

    def _sessions_of(self, rid: bytes) -> int:
        return self._sessions.count(self.registry.by_rid.get(rid), rid)

    def _congested(self, rid: bytes, why: str, undelivered: int) -> None:
        """The outbox gave up on a peer: it fails its sessions."""
        agent = self.registry.by_rid.get(rid)
        who = f'agent "{agent.name}"' if agent is not None else f"client {hex_id(rid)}"
        what = f"{who} is congested ({why}): ending its sessions, {undelivered} messages not delivered"
        self._throttle(logging.WARNING, "congested", "%s", what)
        if agent is not None:
            self._sessions.end_agent(agent, f'agent "{agent.name}" is not keeping up ({why})')
        else:
            self._client_gone(rid)

    def _teardown_lost(self) -> None:
        while self._lost:
            rid = self._lost.pop()
            agent = self.registry.by_rid.get(rid)
            if agent is not None:
                self._members.offline(agent, "connection lost")
            else:
                self._client_gone(rid)

    def _client_gone(self, rid: bytes) -> None:
        self._outbox.drop(rid)
        self._sessions.end_client(rid)

    def _registry_changed(self) -> None:
        if self._autosave is not None:
            self._autosave.schedule()

    def _sweep(self) -> None:
        """Once a second: idle sessions and abandoned Lock/Unlock."""
        self._sessions.end_idle(self._now, SESSION_IDLE_S)
        self._sessions.expire_pending(self._now)


# ==================================================================== process

build_parser = cli.build_parser  # the flags, for tools that read a command line (tests/test_deploy_units.py)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, Broker)


if __name__ == "__main__":
    sys.exit(main())
