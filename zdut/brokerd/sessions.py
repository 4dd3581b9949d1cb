"""The broker's session and pending tables: what it relays for whom, and how each of those ends.

A Run session is keyed by (client routing id, sid); a forwarded Lock/Unlock waiting for its agent's reply
by (client routing id, rid).  This room is their one owner: it opens them, keeps the two indexes that end
them in bulk (all of an agent, all of a client), and sends what each kind of end owes the other side
(docs/protocol.md, "Broker <-> agent"): the client hears Done or Error, the agent hears SessionGone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from zdut.brokerd.registry import Agent
from zdut.common.logs import hex_id
from zdut.protocol import Code, Done, Error, SessionGone, ZdutError, encode

log = logging.getLogger("zdut.broker")

#: Sessions one client connection may have open through the broker at once.
MAX_SESSIONS = 256
#: Forwarded Lock/Unlock one client connection may have waiting for their agents' replies at once.
MAX_PENDING = 64


class Session:
    __slots__ = ("agent", "client", "device", "down_seq", "last", "sid", "user")

    def __init__(self, client: bytes, sid: int, agent: Agent, device: str, now: float, user: str = "") -> None:
        self.client = client
        self.sid = sid
        self.agent = agent
        self.device = device
        self.user = user  # the RunOpen's (with --keys, its key's name): a removed key's sessions end
        self.last = now  # monotonic time of the last message either way
        self.down_seq = 0  # last seq the agent sent: a Done the broker makes up follows it


class Pending:
    """A Lock/Unlock forwarded to an agent, waiting for its reply."""

    __slots__ = ("agent", "deadline", "rid")

    def __init__(self, agent: Agent, rid: int, deadline: float) -> None:
        self.agent = agent
        self.rid = rid
        self.deadline = deadline


class Sessions:
    """Open sessions and pending requests.  ``send(rid, *frames)`` writes to a peer without blocking;
    ``to_agent(agent, cid, header)`` writes to an agent's live connection, if it has one."""

    def __init__(self, send: Callable[..., None], to_agent: Callable[[Agent, bytes, bytes], None]) -> None:
        self._send = send
        self._to_agent = to_agent
        self._by_key: dict[tuple[bytes, int], Session] = {}
        self._by_client: dict[bytes, dict[int, Session]] = {}
        self._by_agent: dict[str, dict[tuple[bytes, int], Session]] = {}
        self._pending: dict[tuple[bytes, int], Pending] = {}
        self._pending_of: dict[bytes, int] = {}  # client -> len of its entries in _pending
        #: The session of (client, sid), or None: a plain dict lookup, for the relay path.
        self.get = self._by_key.get

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return iter(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    # ------------------------------------------------------------- sessions
    def open(self, client: bytes, sid: int, agent: Agent, device: str, now: float, user: str = "") -> Session:
        key = (client, sid)
        sess = Session(client, sid, agent, device, now, user)
        self._by_key[key] = sess
        self._by_client.setdefault(client, {})[sid] = sess
        self._by_agent.setdefault(agent.name, {})[key] = sess
        return sess

    def end(self, sess: Session) -> None:
        """Forget a session whose end both sides already know (its Done or Error was relayed)."""
        key = (sess.client, sess.sid)
        self._by_key.pop(key, None)
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

    def fail(self, sess: Session, code: str, message: str) -> None:
        """End a session the broker gives up: Done to the client, the client's end to the agent."""
        self.end(sess)
        self._send(sess.client, encode(Done(sess.sid, sess.down_seq + 1, code, message)))
        self._to_agent(sess.agent, b"", encode(SessionGone(sess.client, sess.sid)))

    def end_idle(self, now: float, limit_s: float) -> None:
        """Fail the sessions with no message either way for longer than ``limit_s`` (both sides ping every
        second, so one of them is gone without a trace)."""
        for sess in [s for s in self._by_key.values() if now - s.last > limit_s]:
            log.info(
                "session %d of client %s on device %s idle for %.0fs: ended",
                sess.sid,
                hex_id(sess.client),
                sess.device,
                now - sess.last,
            )
            self.fail(sess, Code.UNAVAILABLE, f"no message either way for {limit_s:g}s: session ended by the broker")

    def check_room(self, client: bytes, pending: bool = False) -> None:
        """Raise Unavailable if ``client`` already has MAX_SESSIONS sessions open (or, with ``pending``,
        MAX_PENDING forwarded requests waiting)."""
        if pending and self._pending_of.get(client, 0) >= MAX_PENDING:
            raise ZdutError(Code.UNAVAILABLE, f"refused: {MAX_PENDING} requests of this connection already wait")
        if not pending and len(self._by_client.get(client, ())) >= MAX_SESSIONS:
            raise ZdutError(Code.UNAVAILABLE, f"refused: {MAX_SESSIONS} sessions of this connection already open")

    def count(self, agent: Agent | None, client: bytes) -> int:
        """Sessions routed to ``agent``, or (for None) opened by ``client``."""
        return len(self._by_agent.get(agent.name, ())) if agent is not None else len(self._by_client.get(client, ()))

    # ------------------------------------------------------------- pending requests
    def await_reply(self, client: bytes, rid: int, agent: Agent, deadline: float) -> None:
        key = (client, rid)
        if key not in self._pending:
            self._pending_of[client] = self._pending_of.get(client, 0) + 1
        self._pending[key] = Pending(agent, rid, deadline)

    def _forget(self, key: tuple[bytes, int]) -> None:
        del self._pending[key]
        left = self._pending_of[key[0]] - 1
        if left:
            self._pending_of[key[0]] = left
        else:
            del self._pending_of[key[0]]

    def take_reply(self, client: bytes, rid: Any, agent: Agent) -> bool:
        """True (and forgotten) if ``client`` waits for reply ``rid`` from ``agent``."""
        key = (client, rid)
        pending = self._pending.get(key) if isinstance(rid, int) else None
        if pending is None or pending.agent is not agent:
            return False
        self._forget(key)
        return True

    def expire_pending(self, now: float) -> None:
        """Forget requests whose agent never answered (the client has given up long before)."""
        for key in [k for k, p in self._pending.items() if p.deadline < now]:
            self._forget(key)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------- ends in bulk
    def end_agent(self, agent: Agent, message: str) -> None:
        """Every session and pending request routed to ``agent`` ends with Unavailable."""
        sessions = list(self._by_agent.get(agent.name, {}).values())
        for sess in sessions:
            self.end(sess)
            self._send(sess.client, encode(Done(sess.sid, sess.down_seq + 1, Code.UNAVAILABLE, message)))
        pending = [(k, p) for k, p in self._pending.items() if p.agent is agent]
        for key, p in pending:
            self._forget(key)
            self._send(key[0], encode(Error(p.rid, Code.UNAVAILABLE, message)))
        if sessions or pending:
            log.info("%s: ended %d sessions and %d pending requests", message, len(sessions), len(pending))

    def end_user(self, user: str, message: str) -> int:
        """Fail every session of ``user`` (its key was removed) with PermissionDenied; returns how many."""
        sessions = [s for s in self._by_key.values() if s.user == user]
        for sess in sessions:
            self.fail(sess, Code.PERMISSION_DENIED, message)
        return len(sessions)

    def end_client(self, client: bytes) -> None:
        """A client is unreachable: its agents hear SessionGone for each of its sessions."""
        sessions = list(self._by_client.get(client, {}).values())
        for sess in sessions:
            self.end(sess)
            self._to_agent(sess.agent, b"", encode(SessionGone(client, sess.sid)))
        if client in self._pending_of:
            for key in [k for k in self._pending if k[0] == client]:
                self._forget(key)
        if sessions:
            log.info("client %s is unreachable: ended %d sessions", hex_id(client), len(sessions))
