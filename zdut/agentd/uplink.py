"""The agent's link to one broker: connect out, register, heartbeat, re-register.

The agent connects a DEALER (so it works from behind NAT), registers its
devices, and from then on relays client traffic that the broker prefixes with
the client's id.  When the broker goes silent for ``LIVENESS`` heartbeats, or
answers ``Reregister``, the agent starts over on a fresh socket with
exponential backoff: no agent restart is ever needed.

With ``--keys DIR`` the DEALER is a CURVE client holding the agent's pair and trusting one broker key
(``agentd.security`` says which); a socket monitor tells a handshake the broker refused (it does not know our
key) from one that broke (we hold the wrong broker key), logs each cause once, and ends the connection at once
so that the retry follows the backoff instead of libzmq's 100 ms reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.agentd.locker import Locker
from zdut.common.addresses import endpoint
from zdut.common.backoff import Backoff
from zdut.common.keyring import secure_client
from zdut.protocol import (
    MAX_HEADER_BYTES,
    VERSION,
    DeviceEntry,
    Heartbeat,
    LockChanged,
    Message,
    Refused,
    Register,
    Registered,
    Reregister,
    SessionGone,
    ZdutError,
    encode,
)
from zdut.transport.links import EVENTS, NOBLOCK, POLLIN, Link, LoopThrottle, int_option, tune

log = logging.getLogger("zdut.agentd.uplink")
throttled = LoopThrottle(log)  # lines a broker can cause once per message

LIVENESS = 3
#: Until the broker tells us its interval.
DEFAULT_HEARTBEAT_S = 1.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 5.0
#: Largest frame taken from a broker: what a broker relays at most (its own cap, ``brokerd.outbox.MAX_FRAME``,
#: the same 4 MiB + header), so no client frame the broker let through can cut the agent's link to it.
MAX_FRAME = 4 * 1024 * 1024 + MAX_HEADER_BYTES


class Served(Protocol):
    """What an uplink needs of the agent it connects to a broker."""

    name: str
    address: str

    @property
    def locker(self) -> Locker: ...

    def device_entries(self) -> list[DeviceEntry]: ...

    def listed_extras(self) -> list[LockChanged]: ...

    def handle(self, link: Link, peer: bytes, msg: Message, payload: Any) -> None: ...

    def drop_link_sessions(self, link: Link, reason: str) -> None: ...

    def session_gone(self, link: Link, peer: bytes, sid: int) -> None: ...


_HANDSHAKE = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class Curve:
    """What a secure uplink holds: the agent's pair, the broker key it trusts (None: none yet) and where
    they come from (for the log lines)."""

    def __init__(self, pair: tuple[bytes, bytes], server_key: bytes | None, key_name: str, keys: str) -> None:
        self.pair, self.server_key, self.key_name, self.keys = pair, server_key, key_name, keys


class Uplink:
    def __init__(self, agent: Served, ctx: zmq.Context[Any], address: str, curve: Curve | None = None) -> None:
        self.agent = agent
        self.ctx = ctx
        self.address = address
        self.curve = curve
        self._rekeyed = asyncio.Event()
        self._told: set[str] = set()  # handshake failure causes already logged (until a handshake succeeds)
        self._quiet = False  # the connection ended for a cause already logged: its retry line is debug
        self.instance = secrets.token_hex(8)
        self.link: Link | None = None
        self.registered = False
        self.heartbeat_s = DEFAULT_HEARTBEAT_S
        self._last_refusal = ""
        self._tx_at = 0.0
        self._last_rx = 0.0

    # ------------------------------------------------------------- sending
    def send_control(self, msg: Message) -> None:
        """A message for the broker itself (empty client-id frame); dropped while not registered."""
        if self.link is None or not self.registered:
            return
        self._tx_at = time.monotonic()
        try:
            self.link.send(b"", encode(msg))
        except ZdutError as exc:
            log.debug("control message to %s dropped: %s", self.address, exc)

    def _register(self) -> None:
        assert self.link is not None
        locker = self.agent.locker
        msg = Register(VERSION, self.agent.name, self.instance, self.agent.address, self.agent.device_entries(),
                       locker.states(), locker.shadowed_states())
        try:
            self.link.send(b"", encode(msg))
        except ZdutError as exc:
            log.debug("register to %s not sent: %s", self.address, exc)

    def close(self, linger_ms: int = 0) -> None:
        if self.link is not None:
            self.link.sock.close(linger=linger_ms)
            self.link = None

    def rekey(self, server_key: bytes | None, key_name: str) -> None:
        """The broker key serving this uplink is now ``server_key`` (None: none): a change ends the current
        connection (its sessions end) and the next one uses the new key, or waits for one."""
        curve = self.curve
        if curve is None or curve.server_key == server_key:
            return
        was = curve.key_name
        curve.server_key, curve.key_name = server_key, key_name
        self._told.clear()
        if server_key is None:
            why = f"broker key {was} gone from {curve.keys}/brokers: disconnected until a key for it is there"
        else:
            why = f"broker key now {key_name} ({curve.keys}/brokers): reconnecting with it"
        log.warning("broker %s: %s", self.address, why)
        self._quiet = True  # said here: the reconnect line is debug
        self._rekeyed.set()
        ended = getattr(self, "_ended", None)
        if ended is not None and not ended.done():
            ended.set_result(why)

    # ------------------------------------------------------------- connection loop
    async def run(self) -> None:
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        while True:
            while self.curve is not None and self.curve.server_key is None:
                self._rekeyed.clear()
                await self._rekeyed.wait()
            started = time.monotonic()
            self._quiet = False
            reason = await self._connection()
            self.close()
            if time.monotonic() - started > 10 * self.heartbeat_s:
                backoff.reset()  # it worked for a while: retry promptly
            delay = backoff.next_delay()
            log.log(logging.DEBUG if self._quiet else logging.WARNING, "broker %s: %s; reconnecting in %.2gs",
                    self.address, reason, delay)
            if self.curve is None or self.curve.server_key is not None:
                self._rekeyed.clear()
                with contextlib.suppress(TimeoutError):  # a new key cuts the wait short
                    async with asyncio.timeout(delay):  # not wait_for, which can drop a cancel on 3.11
                        await self._rekeyed.wait()

    async def _connection(self) -> str:
        """One socket's life: returns why it ended."""
        sock = self.ctx.socket(zmq.DEALER)
        tune(sock)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)  # a larger frame drops the connection before it is allocated
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing towards a broker that is not there
        self._ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        monitor = None
        if self.curve is not None:
            assert self.curve.server_key is not None
            secure_client(sock, self.curve.pair, self.curve.server_key)
            monitor = self._watch(sock)
        sock.connect(endpoint(self.address))
        link = self.link = Link(sock, f"broker {self.address}")
        self.registered = False
        self._last_rx = time.monotonic()
        pump = asyncio.create_task(link.run(self._on_message))
        last_register = 0.0
        try:
            while not self._ended.done():
                now = time.monotonic()
                if not self.registered and now - last_register >= max(self.heartbeat_s, 1.0):
                    self._register()
                    last_register = now
                elif self.registered and now - self._tx_at >= self.heartbeat_s:
                    self.send_control(Heartbeat())
                silent = now - self._last_rx
                if silent > LIVENESS * self.heartbeat_s and (self.registered or silent > 5.0):
                    return f"no message for {silent:.1f}s"
                await asyncio.wait({self._ended}, timeout=min(self.heartbeat_s / 2, 0.25))
            return self._ended.result()
        finally:
            pump.cancel()
            if monitor is not None:
                asyncio.get_running_loop().remove_reader(monitor.fileno())
                monitor.close(linger=0)
            lost = f"connection to broker {self.address} lost"
            self.agent.drop_link_sessions(link, f"{lost}: {self._ended.result()}" if self._ended.done() else lost)

    def _watch(self, sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
        """A monitor on a secure uplink's socket (before it connects): a failed handshake ends the connection."""
        monitor = sock.get_monitor_socket(_HANDSHAKE)
        option = int_option(monitor)

        def events() -> None:
            while not monitor.closed and option(EVENTS) & POLLIN:
                event = parse_monitor_message(monitor.recv_multipart(NOBLOCK))
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._told.clear()
                    continue
                self._handshake_failed(event["event"], event["value"])

        asyncio.get_running_loop().add_reader(monitor.fileno(), events)
        events()  # ZMQ_FD is edge-like: it wakes the loop only once ZMQ_EVENTS has been read
        return monitor

    def _handshake_failed(self, event: int, value: int) -> None:
        assert self.curve is not None
        keys, name = self.curve.keys, self.curve.key_name
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            cause = (f"broker {self.address} refused our key (is the public key of {keys}/server.key_secret in "
                     "the broker's agents/?)")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            cause = f"broker {self.address} does not speak CURVE (is its security off? this agent has --keys {keys})"
        else:
            cause = (f"broker {self.address} broke off the CURVE handshake: is {keys}/brokers/{name}.key that "
                     "broker's public key?")
        self._quiet = True  # the cause is logged (once): the reconnect line is debug
        if cause not in self._told:
            self._told.add(cause)
            log.error("%s", cause)
        if not self._ended.done():
            self._ended.set_result("CURVE handshake failed")

    def _on_message(self, peer: bytes, msg: Message, payload: Any) -> None:
        self._last_rx = time.monotonic()
        if peer:
            assert self.link is not None
            self.agent.handle(self.link, peer, msg, payload)
        elif (why := self._control(msg)) is not None and not self._ended.done():
            self._ended.set_result(why)

    def _control(self, msg: Message) -> str | None:
        match msg:
            case Registered():
                self.registered = True
                self.heartbeat_s = max(msg.heartbeat_ms / 1000, 0.05)
                self._last_refusal = ""
                log.info("registered with broker %s (%s) as %s: %d devices", self.address, msg.broker,
                         self.agent.name, len(self.agent.device_entries()))
                for change in self.agent.listed_extras():  # Register carries holds; who watches or waits follows
                    self.send_control(change)
            case Refused():
                if msg.message != self._last_refusal:
                    log.error("broker %s refused registration: %s", self.address, msg.message)
                    self._last_refusal = msg.message
                return "registration refused"
            case Reregister():
                log.info("broker %s asks to register again", self.address)
                self.registered = False
                self._register()
            case SessionGone():
                assert self.link is not None
                self.agent.session_gone(self.link, msg.peer, msg.sid)
            case Heartbeat():
                pass
            case _:
                throttled(logging.DEBUG, "ignored from broker", "ignored %s from broker", type(msg).__name__)
        return None
