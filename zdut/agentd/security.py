"""``zdut-agent --keys DIR``: who may use the agent's direct port, and which brokers it trusts (issue 12).

DIR (``zdut.common.keyring``)::

    DIR/server.key_secret   the agent's own pair: its CURVE server key on -a, and its client key towards
                            brokers (each broker lists the public half as agents/NAME.key)
    DIR/users/NAME.key      users of the direct port: a request on it acts as user NAME, and only as NAME
    DIR/admins              users of the direct port who may ``unlock force``
    DIR/brokers/NAME.key    brokers it registers with; it trusts the users they name

Which broker key serves ``--server ADDR``: the file ``brokers/ADDR.key`` with ADDR exactly as given (Linux
allows ':' in a file name: ``brokers/lab1:1024.key``), else ``brokers/HOST.key`` for ADDR's host part; else, if
brokers/ holds exactly one key, that one serves every --server. A --server with no key is a start-up error
naming the files looked for.

Identity comes from the key. On the direct port each message's principal is the User-Id libzmq attached to its
frames: no principal, or a key no longer in DIR, and the message is dropped; a request must come from a user
key and name that user (``msg.user``), and ``unlock force`` needs an admin. Through a broker, the uplink's CURVE
handshake proved the broker holds a key of brokers/, and the broker checked each user against its own keys:
``msg.user`` is taken as it comes.

Every RELOAD_S the ring re-reads DIR: a user key removed ends that user's direct-port runs and refuses what
its connection sends later; a broker key removed or changed restarts that uplink with the key now chosen (or
leaves it waiting, logged, until one is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from zdut.common.answers import refusal
from zdut.common.identity import user_refusal
from zdut.common.keyring import AGENT_KINDS, BROKER, RELOAD_S, USER, KeyRing, Principal, ZapHandler
from zdut.common.keys import PUBLIC_SUFFIX
from zdut.protocol import SESSION, UNARY_REQUESTS, Code, Message, RunOpen, ZdutError, encode
from zdut.transport.links import EVENTS, POLLIN, Link, LoopThrottle, int_option

if TYPE_CHECKING:
    from zdut.agentd.agent import Agent

log = logging.getLogger("zdut.agent")
throttled = LoopThrottle(log)  # refusals a peer can cause once per message


def host_part(address: str) -> str:
    """``lab1:1024`` or ``tcp://lab1:1024`` -> ``lab1``."""
    rest = address.partition("://")[2] or address
    return rest.rpartition(":")[0] or rest


def candidates(address: str) -> list[str]:
    """The broker key names that serve ``--server address``, best first."""
    names = [address]
    if (host := host_part(address)) and host != address:
        names.append(host)
    return names


class AgentSecurity:
    """The ring of ``--keys DIR``, its ZAP handler, and what the agent does with the principals it names."""

    def __init__(self, root: str | Path) -> None:
        self.ring = KeyRing(root, AGENT_KINDS)  # KeyFileError: the caller's one-line exit
        self.root = self.ring.root
        self.pair = (self.ring.public, self.ring.secret)
        self.zap: ZapHandler | None = None
        self.agent: Agent | None = None
        self.direct: Link | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------- broker keys
    def broker_keys(self) -> dict[str, bytes]:
        """name -> public key of each broker key the ring holds now."""
        return {who.name: who.key.encode() for who in self.ring.principals() if who.kind == BROKER}

    def broker_key(self, address: str, keys: dict[str, bytes] | None = None) -> tuple[str, bytes] | None:
        """(name, key) of the broker key serving ``--server address`` (module docstring), or None."""
        keys = self.broker_keys() if keys is None else keys
        for name in candidates(address):
            if name in keys:
                return name, keys[name]
        if len(keys) == 1:
            return next(iter(keys.items()))
        return None

    def missing_broker(self, address: str) -> str:
        """The start-up error for a --server no broker key serves."""
        looked = " or ".join(str(self.root / "brokers" / f"{n}{PUBLIC_SUFFIX}") for n in candidates(address))
        held = len(self.broker_keys())
        there = ("brokers/ holds no key" if held == 0
                 else f"brokers/ holds {held} other keys, so none serves every --server")
        return f"--server {address}: no broker key for it: looked for {looked} ({there})"

    # ------------------------------------------------------------- the direct port
    def start_zap(self, ctx: zmq.Context[Any]) -> None:
        """Bind the ZAP handler in ``ctx`` (before any server socket binds) and answer it from the loop."""
        zap = self.zap = ZapHandler(ctx, self.ring)
        option = int_option(zap.sock)
        loop = asyncio.get_running_loop()

        def drain() -> None:  # ZMQ_FD is edge-like: drain while EVENTS says input (ZapHandler.drain does)
            if not zap.sock.closed and option(EVENTS) & POLLIN:
                zap.drain()

        loop.add_reader(zap.sock.fileno(), drain)
        loop.call_soon(drain)

    def known(self, who: Principal | None) -> bool:
        return who is not None and self.ring.holds(who)

    def admit(self, link: Link, peer: bytes, msg: Message, who: Principal | None) -> bool:
        """Whether a direct-port message reaches the agent's handler; a refused request is answered here."""
        if who is None or not self.ring.holds(who):
            throttled(logging.INFO, "dropped: unknown key", "dropped %s from a connection whose key %s",
                      type(msg).__name__, "is gone from " + str(self.root) if who else "is unknown")
            if who is not None and isinstance(msg, (RunOpen, *UNARY_REQUESTS)):  # it proved who it was: say why
                self._refuse(link, peer, msg, f'the key of {who.kind} "{who.name}" was removed from {self.root}: '
                             "connect with a key this agent lists")
            return False
        if isinstance(msg, SESSION):
            assert self.agent is not None
            run = self.agent.runs.get((id(link), peer, msg.sid))
            return run is None or run.user == who.name  # another key's session id is nobody's here
        if not isinstance(msg, (RunOpen, *UNARY_REQUESTS)):
            return True
        problem = self.refusal(msg, who)
        if problem is None:
            return True
        throttled(logging.WARNING, "refused on the direct port", "refused %s from key %s: %s", type(msg).__name__,
                  who.user_id, problem)
        self._refuse(link, peer, msg, problem)
        return False

    @staticmethod
    def _refuse(link: Link, peer: bytes, msg: Any, problem: str) -> None:
        """Answer a request (RunOpen or unary) with PERMISSION_DENIED and why."""
        key = msg.sid if isinstance(msg, RunOpen) else msg.rid
        reply = refusal(str(type(msg).__struct_config__.tag), key, Code.PERMISSION_DENIED, problem)
        if reply is not None:
            with contextlib.suppress(ZdutError):
                link.send(peer, encode(reply))

    def refusal(self, msg: Any, who: Principal) -> str | None:
        """Why a request from ``who`` on the direct port is refused, or None."""
        if who.kind != USER:
            return (f'key "{who.name}" is a {who.kind} key, not a user key: a broker reaches this agent through '
                    "its own uplink (--server), not on the direct port")
        return user_refusal(msg, who, self.ring, "agent")

    # ------------------------------------------------------------- reload
    def start(self, agent: Agent, direct: Link | None) -> None:
        self.agent, self.direct = agent, direct
        self._tasks.append(asyncio.get_running_loop().create_task(self._reloads()))

    async def _reloads(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_S)
            try:
                self.reload()
            except Exception:  # a bug here must not end key reloads for good
                log.exception("reloading %s", self.root)

    def reload(self) -> None:
        """Re-read DIR; end what removed user keys have open on the direct port; re-key the uplinks."""
        assert self.agent is not None
        removed = self.ring.reload()
        for who in sorted(removed, key=lambda p: (p.kind, p.name)):
            if who.kind == USER:
                self._end_user(who.name)
            else:
                log.warning("broker key %s removed from %s/brokers", who.name, self.root)
        keys = self.broker_keys()
        for uplink in self.agent.uplinks:
            chosen = self.broker_key(uplink.address, keys)
            uplink.rekey(chosen[1] if chosen else None, chosen[0] if chosen else "")

    def _end_user(self, name: str) -> None:
        assert self.agent is not None
        runs = [r for (link_id, _, _), r in self.agent.runs.items()
                if self.direct is not None and link_id == id(self.direct) and r.user == name]
        why = ZdutError(Code.PERMISSION_DENIED,
                        f'the key of user "{name}" was removed from {self.root / "users"}: session ended')
        for run in runs:
            run.cancel(why)
        log.warning('key of user "%s" removed: %d running direct sessions ended, its connections refused',
                    name, len(runs))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.zap is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.zap.sock.fileno())
            self.zap.close()
