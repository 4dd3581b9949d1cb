"""Agents joining and leaving the broker: registration, takeover, heartbeats, going offline.

An agent's Register is answered with Registered or Refused; a takeover (the same agent name on a new
connection) or a restart (a new instance) ends the sessions of the old one.  Liveness runs both ways: an
agent silent for LIVENESS heartbeats goes offline with all its sessions, and an agent the broker has not
written to for a heartbeat gets one.  A connection the broker does not know is told to register again
(docs/protocol.md, "Broker <-> agent").
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

from zdut.brokerd.outbox import Outbox
from zdut.brokerd.registry import Agent, Registration, Registry
from zdut.brokerd.sessions import Sessions
from zdut.brokerd.timers import Timers
from zdut.common.logs import Throttle, hex_id
from zdut.protocol import (
    VERSION,
    Code,
    Error,
    Forget,
    Forgotten,
    Heartbeat,
    Refused,
    Register,
    Registered,
    Reregister,
    ZdutError,
    check_version,
    encode,
)

log = logging.getLogger("zdut.broker")

#: Takeovers within this window are remembered (and reported as flapping); older ones are forgotten.
FLAP_WINDOW_S = 30.0
#: Re-register prompts to one connection are rate-limited with what is remembered of this long.
PROMPT_MEMORY_S = 10.0

_HEARTBEAT = encode(Heartbeat())
_REREGISTER = encode(Reregister())


class Membership:
    """``to_agent(agent, cid, header)`` writes to an agent's live connection and stamps its ``last_tx``;
    ``changed()`` is told whenever the registry has something new to persist."""

    def __init__(
        self,
        name: str,
        heartbeat_s: float,
        registry: Registry,
        sessions: Sessions,
        outbox: Outbox,
        timers: Timers,
        throttle: Throttle,
        to_agent: Callable[[Agent, bytes, bytes], None],
        changed: Callable[[], None],
        vet: Callable[[Register], str | None] | None = None,
    ) -> None:
        self.name = name
        self.heartbeat_s = heartbeat_s
        self._registry = registry
        self._sessions = sessions
        self._outbox = outbox
        self._timers = timers
        self._throttle = throttle
        self._to_agent = to_agent
        self._changed = changed
        self._vet = vet  # with --keys: why a registration is refused before the registry sees it, or None
        self._rereg_sent: dict[bytes, float] = {}
        self._takeovers: dict[str, deque[float]] = {}
        timers.every(min(0.25, heartbeat_s / 4), self._housekeeping)
        timers.every(1.0, self._forget_old)

    def register(self, rid: bytes, msg: Register) -> None:
        try:
            if self._vet is not None and (problem := self._vet(msg)) is not None:
                raise ZdutError(Code.PERMISSION_DENIED, problem)
            reg = self._registry.register(rid, msg)
        except ZdutError as exc:
            self._throttle(
                logging.WARNING,
                f"refused {msg.agent}",
                'refused registration of agent "%s" (%s): %s',
                msg.agent,
                msg.address or hex_id(rid),
                exc.message,
            )
            self._outbox.send(rid, b"", encode(Refused(exc.code, exc.message)))
            return
        agent = reg.agent
        self._settle(reg)
        self._outbox.send(rid, b"", encode(Registered(self.name, VERSION, max(1, round(self.heartbeat_s * 1000)))))
        agent.last_tx = self._timers.now
        self._changed()
        how = (
            " (takeover from its previous connection)" if reg.replaced_rid else " (restarted)" if reg.restarted else ""
        )
        log.info(
            'agent "%s" registered from %s: %d devices, version %s%s',
            agent.name,
            agent.address or hex_id(rid),
            len(agent.devices),
            agent.version,
            how,
        )

    def _settle(self, reg: Registration) -> None:
        """What an accepted registration ends: sessions of a replaced connection or an old agent process."""
        agent = reg.agent
        if reg.displaced is not None:
            self._sessions.end_agent(reg.displaced, f'agent "{reg.displaced.name}" re-registered as "{agent.name}"')
        if reg.replaced_rid is not None:
            self._outbox.drop(reg.replaced_rid)  # queued for a connection the agent has left
            self._check_flapping(agent.name)
        if reg.replaced_rid is not None or reg.restarted:
            why = "restarted" if reg.restarted else "reconnected"
            self._sessions.end_agent(agent, f'agent "{agent.name}" {why}')
        for device, previous in reg.moved:
            log.info('device "%s" moves from offline agent "%s" to agent "%s"', device, previous, agent.name)
        if reg.removed:
            log.info('agent "%s" no longer serves %s', agent.name, ", ".join(reg.removed))

    def forget(self, msg: Forget) -> Forgotten | Error:
        """An operator drops an offline agent and its devices (``zdut forget``): the reply to ``msg``."""
        try:
            check_version("broker", VERSION, msg.version)
            devices = self._registry.forget(msg.agent)
        except ZdutError as exc:
            return Error(msg.rid, exc.code, exc.message)
        self._takeovers.pop(msg.agent, None)
        log.warning('agent "%s" forgotten by "%s", with its devices: %s', msg.agent, msg.user, ", ".join(devices))
        self._changed()
        return Forgotten(msg.rid, msg.agent, devices)

    def _check_flapping(self, name: str) -> None:
        """Two live processes with one agent name take the registration from each other over and over."""
        times = self._takeovers.setdefault(name, deque(maxlen=3))
        times.append(self._timers.now)
        if len(times) == times.maxlen and times[-1] - times[0] < FLAP_WINDOW_S:
            self._throttle(
                logging.ERROR,
                f"flapping {name}",
                'agent "%s" was taken over %d times in %.0fs: two '
                "agent processes probably use the same name (see zdut-agent --name)",
                name,
                len(times),
                times[-1] - times[0],
            )

    def prompt(self, rid: bytes, at_most_every_s: float | None = None) -> None:
        """Tell a connection the broker does not know to register; with ``at_most_every_s``, rate-limited
        (a flood of stale session traffic gets one prompt per interval, not one per message)."""
        if at_most_every_s is not None:
            now = self._timers.now
            if now - self._rereg_sent.get(rid, -math.inf) < at_most_every_s:
                return
            self._rereg_sent[rid] = now
        self._outbox.send(rid, b"", _REREGISTER)

    def _forget_old(self) -> None:
        """Keep the prompt and takeover tables to what their rate limits still look at."""
        now = self._timers.now
        for rid in [r for r, t in self._rereg_sent.items() if now - t > PROMPT_MEMORY_S]:
            del self._rereg_sent[rid]
        for name in [n for n, times in self._takeovers.items() if now - times[-1] > FLAP_WINDOW_S]:
            del self._takeovers[name]

    def offline(self, agent: Agent, why: str) -> None:
        """``agent`` is gone: its devices are listed offline, its sessions and pending requests end."""
        rid = self._registry.offline(agent)
        if rid is None:
            return
        self._outbox.drop(rid)
        log.warning(
            'agent "%s" went offline (%s); its %d devices are listed offline', agent.name, why, len(agent.devices)
        )
        self._sessions.end_agent(agent, f'agent "{agent.name}" went offline')
        self._changed()

    def _housekeeping(self) -> None:
        """Agent liveness both ways: expire the silent, heartbeat the idle."""
        now = self._timers.now
        for agent in self._registry.expired():
            self.offline(agent, f"no message for {now - agent.last_rx:.1f}s")
        idle = now - self.heartbeat_s
        for agent in list(self._registry.by_rid.values()):
            if agent.last_tx <= idle:
                self._to_agent(agent, b"", _HEARTBEAT)
