"""``zdut-broker --keys DIR``: who may reach the broker, and what each key may do there (issue 12).

DIR (``zdut.common.keyring``)::

    DIR/server.key_secret   the broker's own pair: its CURVE server key (clients and agents are given the
                            public half, e.g. as brokers/NAME.key in an agent's --keys DIR)
    DIR/users/NAME.key      a user: its requests act as user NAME, and only as NAME
    DIR/agents/NAME.key     an agent: it may register as agent NAME, and only as NAME
    DIR/admins              users who may ``unlock force`` through this broker, one a line

The ROUTER is a CURVE server whose ZAP handler (bound in its context before it binds) the broker's own poll
loop answers, after every batch of messages, so a handshake never waits behind a flood. A NULL peer or an
unknown key never completes the handshake; the ZAP handler logs an unknown key once per address and key,
the socket monitor (``common.handshakes.HandshakeWatch``) a NULL peer, a wrong server key or a peer that hung
up mid-handshake once per cause.

Identity comes from the key: :meth:`BrokerGuard.keyed` puts a check in front of the broker's dispatch that
reads the User-Id libzmq attached to the message's first frame (once per message, never per payload frame):

* a user key may send requests and session traffic, never register; each request must name the key's user,
  and ``unlock force`` needs an admin (:meth:`checked`, in the same words as the agent's direct port);
* an agent key may register only as the agent its key names (:meth:`vet_register`) and never act as a user;
  with security on a device never moves to another agent key (``Registry.pinned``);
* a key no longer in DIR gets nothing: its requests are refused, whatever else it sends is dropped.

Since every request's user is its key's, the headers the broker forwards to agents carry the authenticated
user; an agent trusts them because the broker's key is in its brokers/.

Every RELOAD_S the ring re-reads DIR: a key added gets in at its next handshake; a user key removed ends its
sessions through the broker (Done PermissionDenied to the client, SessionGone to the agent, as when a client
disappears); an agent key removed takes that agent offline, its sessions with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.brokerd.inbox import Inbox
from zdut.brokerd.membership import Membership
from zdut.brokerd.outbox import MAX_FRAME, Outbox
from zdut.brokerd.registry import Agent, Registry
from zdut.brokerd.sessions import Sessions
from zdut.brokerd.timers import Timers
from zdut.common.answers import refusal
from zdut.common.handshakes import FAILED_EVENTS, HandshakeWatch
from zdut.common.identity import user_refusal
from zdut.common.keyring import AGENT, BROKER_KINDS, RELOAD_S, USER, KeyRing, Principal, ZapHandler
from zdut.common.logs import Throttle, hex_id
from zdut.protocol import MAX_HEADER_BYTES, Code, Refused, Register, RunOpen, encode

log = logging.getLogger("zdut.broker")

#: ``dispatch(rid, first_frame)``: the broker's reading of one message whose routing id and first frame are in.
Dispatch = Callable[[bytes, zmq.Frame], None]
#: A client request handler of the broker: ``handler(rid, msg, header)``.
Handler = Callable[[bytes, Any, bytes], None]


class BrokerGuard:
    """The ring of ``--keys DIR``, its ZAP handler and socket monitor, and the checks of every message."""

    def __init__(self, root: str | Path) -> None:
        self.ring = KeyRing(root, BROKER_KINDS)  # KeyFileError: the caller's one-line exit
        self.root = self.ring.root
        self.zap: ZapHandler | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.watch = HandshakeWatch(str(self.root), log, "this broker", "this broker")
        #: The principal of the message being handled (set by the keyed dispatch, read by the checks after it).
        self.current: Principal | None = None
        #: User-Id -> principal, for the keys DIR holds now (Frame.get is typed int | str: no cast per message)
        self._held: dict[int | str, Principal] = {}
        self._rebuild()

    # ------------------------------------------------------------- sockets
    def bind_zap(self, ctx: zmq.Context[Any]) -> None:
        """Bind the ZAP handler in ``ctx``: before the ROUTER binds, since libzmq asks only a bound handler.
        It logs each refused address and key once; a peer making up a key per attempt would still make a line
        per attempt, so those lines go through the broker's log throttle too (which counts what it leaves out)."""
        self.zap = ZapHandler(ctx, self.ring, lambda text: self._throttle(logging.WARNING, "refused keys", "%s", text))

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make the ROUTER (before it binds) a CURVE server behind ZAP, watched by a socket monitor."""
        self.ring.secure_server(sock)
        self.monitor = sock.get_monitor_socket(FAILED_EVENTS)

    def sockets(self) -> list[zmq.Socket[Any]]:
        """What the broker's poller waits on beside the ROUTER."""
        return [s for s in (self.zap.sock if self.zap else None, self.monitor) if s is not None]

    def service(self) -> None:
        """Answer every ZAP request waiting and log the failed handshakes reported; never blocks."""
        if self.zap is not None:
            self.zap.drain()
        monitor = self.monitor
        while monitor is not None and cast(int, monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            self.watch.event(event["event"], event["value"])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(0)
        if self.zap is not None:
            self.zap.close()

    # ------------------------------------------------------------- the broker's parts
    def attach(self, sock: zmq.Socket[Any], inbox: Inbox, outbox: Outbox, registry: Registry, sessions: Sessions,
               members: Membership, timers: Timers, throttle: Throttle, stats: dict[str, int]) -> None:
        """What the checks read and act on; the ring is re-read every RELOAD_S from here on."""
        self._sock, self._inbox, self._outbox, self._stats = sock, inbox, outbox, stats
        self._registry, self._sessions, self._members, self._throttle = registry, sessions, members, throttle
        registry.pinned = True
        timers.every(RELOAD_S, self.reload)

    # ------------------------------------------------------------- every message
    def keyed(self, dispatch: Dispatch) -> Dispatch:
        """``dispatch`` behind the key check: what the broker's read loop calls with security on. The principal
        is looked up once per message, from its first frame; whatever is not let through goes to :meth:`_turn_away`."""
        guard, by_rid = self, self._registry.by_rid

        def keyed_dispatch(rid: bytes, first: zmq.Frame) -> None:
            try:
                who = guard.current = guard._held.get(first.get("User-Id"))
            except zmq.ZMQError:  # no User-Id: a NULL connection, which a CURVE socket never has
                who = guard.current = None
            if who is not None:
                agent = by_rid.get(rid)
                if agent is not None:  # a registered agent's connection: its key was checked when it registered
                    if who.kind == AGENT and who.name == agent.name:
                        dispatch(rid, first)
                        return
                # a user's request or session traffic ([header]: a msgpack fixarray first), or an agent's control
                # or stale session traffic
                elif who.kind == (USER if len(first) and first.bytes[0] >> 4 == 9 else AGENT):
                    dispatch(rid, first)
                    return
            guard._turn_away(rid, first, who, by_rid.get(rid))

        return keyed_dispatch

    def _turn_away(self, rid: bytes, first: zmq.Frame, who: Principal | None, agent: Agent | None) -> None:
        """A message its key may not send: a request or Register is answered with why, anything else dropped."""
        if agent is not None:
            self._drop(rid, f'a message on agent "{agent.name}"\'s connection came with another key')
        elif who is None:
            self._refuse(rid, first, who, f"this connection's key was removed from {self.root}: connect with a "
                         "key it lists")
        elif who.kind == AGENT:
            self._refuse(rid, first, who, f'key "{who.name}" is an agent key: it registers devices and cannot act '
                         f"as a user (a user needs a key of {self.root / 'users'})")
        elif not len(first):
            self._refuse(rid, first, who, f'key "{who.name}" is a user key: only an agent key '
                         f"({self.root / 'agents'}/NAME.key) may register")
        else:
            self._drop(rid, f'user key "{who.name}" sent a message that is not a request')

    def _drop(self, rid: bytes, why: str) -> None:
        self._inbox.discard_rest()
        self._stats["dropped"] += 1
        self._throttle(logging.WARNING, "dropped: key", "dropped a message from %s: %s", hex_id(rid), why)

    def _refuse(self, rid: bytes, first: zmq.Frame, who: Principal | None, problem: str) -> None:
        """Read the refused message and answer it if it is a request or a Register, in ``problem``'s words."""
        inbox, control = self._inbox, not len(first)
        if control and not first.more:
            inbox.bad(rid, "empty frame without a header")
            return
        head = self._sock.recv(copy=False) if control else first
        got = inbox.read(rid, head, MAX_FRAME if control else MAX_HEADER_BYTES, answer=not control)
        if got is None:
            return
        msg = got[0]
        self._stats["refused"] += 1
        self._throttle(logging.WARNING, f"refused {who.user_id if who else 'removed key'}",
                       "refused %s from %s (%s): %s", type(msg).__name__, hex_id(rid),
                       who.user_id if who else "a removed key", problem)
        if isinstance(msg, Register):
            self._reply(rid, b"", encode(Refused(Code.PERMISSION_DENIED, problem)))
        else:
            self.answer(rid, msg, problem)

    def answer(self, rid: bytes, msg: Any, problem: str) -> None:
        """A refused request's PermissionDenied: its Error, or its run's Done."""
        key = msg.sid if isinstance(msg, RunOpen) else getattr(msg, "rid", 0)
        reply = refusal(str(msg.__struct_config__.tag), key, Code.PERMISSION_DENIED, problem)
        if reply is not None:
            self._reply(rid, encode(reply))

    def _reply(self, rid: bytes, *frames: bytes) -> None:
        if not self._outbox.admit(rid):  # a peer that reads none of its replies hears nothing more
            self._outbox.send(rid, *frames)

    def checked(self, handler: Handler) -> Handler:
        """A client request handler behind the user check: the request must name its key's user, and unlock
        force needs an admin (``common.identity``)."""

        def check(rid: bytes, msg: Any, header: bytes) -> None:
            who = self.current
            assert who is not None and who.kind == USER  # _admit lets nothing else send a request
            problem = user_refusal(msg, who, self.ring, "broker")
            if problem is None:
                handler(rid, msg, header)
                return
            self._stats["refused"] += 1
            self._throttle(logging.WARNING, f"refused {who.user_id}", "refused %s from key %s: %s",
                           type(msg).__name__, who.user_id, problem)
            self.answer(rid, msg, problem)

        return check

    def vet_register(self, msg: Register) -> str | None:
        """Why a Register on the current connection is refused: an agent registers as its key's name only."""
        who = self.current
        if who is None or who.kind != AGENT:
            return f"only an agent key ({self.root / 'agents'}/NAME.key) may register"
        if msg.agent != who.name:
            return (f'agent name "{msg.agent}" refused: this connection\'s key is agent "{who.name}" (with '
                    f"security on, an agent registers as its key's name: zdut-agent --name {who.name})")
        return None

    # ------------------------------------------------------------- reload
    def _rebuild(self) -> None:
        self._held = {p.user_id: p for p in self.ring.principals()}

    def reload(self) -> None:
        """Re-read DIR; end what the keys removed have open (module docstring)."""
        try:
            removed = self.ring.reload()
            self._rebuild()
            for who in sorted(removed, key=lambda p: (p.kind, p.name)):
                if who.kind == USER:
                    self._end_user(who.name)
                else:
                    self._end_agent(who.name)
        except Exception:  # a bug here must not end key reloads, or the broker
            log.exception("reloading %s", self.root)

    def _end_user(self, name: str) -> None:
        ended = self._sessions.end_user(
            name, f'the key of user "{name}" was removed from {self.root / "users"}: session ended')
        log.warning('key of user "%s" removed: %d sessions through this broker ended, its connections refused',
                    name, ended)

    def _end_agent(self, name: str) -> None:
        agent = self._registry.agents.get(name)
        log.warning('key of agent "%s" removed: %s', name, "it goes offline, its connection refused"
                    if agent is not None and agent.online else "it was not online")
        if agent is not None and agent.online:
            self._members.offline(agent, f"its key {self.root / 'agents'}/{name}.key was removed")
