"""A client socket's connection events, from libzmq's socket monitor: up, down, and why it never came up.

ZeroMQ reconnects silently underneath, so a client learns about its connection only by asking: the
monitor socket reports each TCP connect, handshake and disconnect. From them it tells the causes apart:
connection retries with no TCP connection ever accepted mean nobody listens there (refused); a connection
accepted and then dropped or failed in the handshake means the port speaks something other than ZMTP (an
HTTP or SSH server, a listener sending garbage); a connection accepted with no greeting at all means a
listener that says nothing.

With keys (CURVE) it also tells the handshake's refusals apart (docs/zeromq-notes 2.5: they are invisible
otherwise): a ZAP handler that refused our key (HANDSHAKE_FAILED_AUTH), a server without CURVE or a CURVE
server and no key here (HANDSHAKE_FAILED_PROTOCOL, mechanism mismatch), and a server that cannot open our
HELLO because it is not the key we were given: it hangs up without a word (HANDSHAKE_FAILED_NO_DETAIL). After a
refusal libzmq never retries that connection, so a refusal is a verdict at once, before the first handshake
as after a reconnection.

Those refusals race with the server's hang-up: a server that reads our greeting first and closes with it
unread sends a reset, which discards its greeting on our side, so the mismatch shows as a plain disconnect
(seen on a loaded machine: every attempt within the grace). When the verdict is such a guess,
:func:`settled` asks the server's greeting itself which mechanism it speaks (:func:`server_mechanism`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.common.client_config import ClientKeys, config_path
from zdut.common.daemon import off_loop
from zdut.protocol import Code, ZdutError
from zdut.transport.links import EVENTS, NOBLOCK, POLLIN, int_option

_WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

#: An accepted connection that has not greeted in this long is not a ZMTP peer (a zdut server greets at once).
GREETING_S = 1.2
REFUSED = "connection refused"
NOT_ZMTP = "the port answered, but not in ZMTP: is it a zdut server?"


class LinkDown(ZdutError):
    """The client's own link to its server failed (no connection, or it dropped): not an answer of the server, so
    another broker of the same lab may serve."""


#: ZAP's status for "these credentials are not let in" (RFC 27): the server does not know our key.
ZAP_REFUSED = 400


class Verdict(NamedTuple):
    """Why a connection is not coming, and the status code to report it with."""

    why: str
    code: str = Code.UNAVAILABLE


def silent(greeting_s: float) -> str:
    return f"the port accepted the connection but sent no ZMTP greeting within {greeting_s:g}s: is it a zdut server?"


def refused_by_zap(keys: ClientKeys | None, status: int) -> str:
    if keys is None:
        return f"the server's authentication refused this client (ZAP status {status})"
    if status == ZAP_REFUSED:
        return f"the server refused key {keys.name}: is its public key ({keys.name}.key) in the server's users/ dir?"
    return f"the server could not check key {keys.name} (ZAP status {status}): try again, or ask its admin"


def mechanism_mismatch(keys: ClientKeys | None) -> str:
    if keys is None:
        return (f"the server has security on (CURVE) and this client has no key: give --key and --server-key, "
                f"or key and server_key in {config_path()}")
    return f"the server has security off (no CURVE), but this client holds key {keys.name}: use no key for it"


def no_curve_handshake(keys: ClientKeys) -> str:
    return f"no CURVE handshake: is the server key {keys.server_key_file} that server's public key?"


#: A ZMTP 3 greeting: signature (0xff, 8 bytes, 0x7f), major, minor, mechanism (20 bytes, NUL padded), as-server,
#: filler; 64 bytes in all. libzmq sends the part after the major version once it has read the peer's.
ZMTP_SIGNATURE = b"\xff" + bytes(8) + b"\x7f"
GREETING_LEN = 64


async def server_mechanism(ep: str, timeout: float) -> bytes | None:
    """The security mechanism (b"NULL", b"CURVE", ...) the ZMTP 3 server at ``tcp://host:port`` announces, or
    None if it does not greet so within ``timeout``. Only the signature and major version are sent: the server
    has nothing to judge yet, so it neither refuses nor resets before its greeting is read."""
    host, _, port = ep.partition("://")[2].rpartition(":")
    loop = asyncio.get_running_loop()
    greeting = b""
    try:  # a plain socket, closed here on every way out (a cancelled stream would close it only later)
        async with asyncio.timeout(timeout):
            family, address = await _address(host.strip("[]"), int(port))
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, ZMTP_SIGNATURE + b"\x03")
                while len(greeting) < GREETING_LEN and (chunk := await loop.sock_recv(sock, GREETING_LEN)):
                    greeting += chunk
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    if len(greeting) < GREETING_LEN:
        return None
    if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
        return None
    return greeting[12:32].rstrip(b"\0")


async def _address(host: str, port: int) -> tuple[int, Any]:
    """(family, sockaddr) of ``host``: an IP as it is, a name looked up on a daemon thread (the loop's executor
    would leave a thread behind every client that ever failed)."""
    try:
        ip = ipaddress.ip_address(host)
        return (socket.AF_INET6, (host, port)) if ip.version == 6 else (socket.AF_INET, (host, port))
    except ValueError:
        infos = await off_loop(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        return infos[0][0], infos[0][4]


async def settled(verdict: Verdict, ep: str, keys: ClientKeys | None, timeout: float = 1.0) -> Verdict:
    """``verdict``, or when it is a guess from a hang-up (not ZMTP, or no CURVE handshake), what the server's own
    greeting says: CURVE without a key here, or a key here and a server without CURVE, is a mismatch."""
    guesses = (NOT_ZMTP, no_curve_handshake(keys) if keys is not None else None)
    if verdict.why not in guesses:
        return verdict
    mechanism = await server_mechanism(ep, timeout)
    if (mechanism == b"CURVE" and keys is None) or (mechanism == b"NULL" and keys is not None):
        return Verdict(mechanism_mismatch(keys), Code.UNAUTHENTICATED)
    if mechanism not in (None, b"NULL", b"CURVE"):
        return Verdict(f"the server speaks the {mechanism.decode(errors='replace')} mechanism, not zdut's CURVE "
                       "or NULL", Code.UNAUTHENTICATED)
    return verdict


class ConnectionMonitor:
    """Calls ``on_up`` after each handshake and ``on_down`` after each disconnect; until the first handshake,
    resolves ``failed`` with why it is not coming, ``refused_grace_s`` after the first failed attempt: the
    latest attempt's outcome, :data:`REFUSED` (no TCP connection accepted), :data:`NOT_ZMTP` (accepted, then
    dropped or failed in the handshake) or, with ``keys``, :func:`no_curve_handshake`; or :func:`silent` when an
    accepted connection has not greeted within ``greeting_s``. A refusal of the handshake (Code.UNAUTHENTICATED)
    is the verdict at once; one after the link was up goes to ``on_refused``, since libzmq gives up that link.

    Create it before ``sock.connect`` so that no event is missed."""

    def __init__(self, sock: zmq.Socket[Any], on_up: Callable[[], None], on_down: Callable[[], None],
                 refused_grace_s: float, keys: ClientKeys | None = None,
                 on_refused: Callable[[Verdict], None] | None = None, greeting_s: float = GREETING_S) -> None:
        self._monitor = sock.get_monitor_socket(_WATCHED)
        self._option = int_option(self._monitor)
        self._on_up, self._on_down, self._on_refused = on_up, on_down, on_refused
        self._keys = keys
        self._grace, self._greeting = refused_grace_s, greeting_s
        self._loop = asyncio.get_running_loop()
        self._decision: asyncio.TimerHandle | None = None  # the verdict, a grace after the first failure
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._outcome = Verdict("")
        self._connected_since_retry = self._attempt_failed = False
        self.up = self.was_up = False
        self.failed: asyncio.Future[Verdict] = self._loop.create_future()

    async def run(self) -> None:
        """Handle events until cancelled."""
        fd = self._monitor.fileno()
        self._loop.add_reader(fd, self._ready)
        try:
            self._ready()
            await self._loop.create_future()
        finally:
            self._loop.remove_reader(fd)
            self._stop_timers()

    def _ready(self) -> None:
        while not self._monitor.closed and self._option(EVENTS) & POLLIN:
            event = parse_monitor_message(self._monitor.recv_multipart(NOBLOCK))
            self._event(event["event"], event["value"])

    def _event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._stop_timers()
            self._outcome = Verdict("")
            self.up = self.was_up = True
            self._on_up()
        elif event == zmq.EVENT_DISCONNECTED and self.up:
            self.up = False
            self._on_down()
        elif self.up or self.failed.done():
            return
        elif (refusal := self._refusal(event, value)) is not None:
            self._stop_timers()
            if not self.was_up:
                self.failed.set_result(refusal)
            elif self._on_refused is not None:
                self._on_refused(refusal)
        elif self.was_up:
            return  # libzmq reconnects by itself; only a refusal, which ends that, needs telling
        elif event == zmq.EVENT_CONNECTED:
            self._connected_since_retry = True
            self._attempt_failed = False
            if self._greeting_timer is None:
                self._greeting_timer = self._loop.call_later(self._greeting, self._give_up, silent(self._greeting))
        elif event == zmq.EVENT_DISCONNECTED and self._attempt_failed:
            return  # the end of an attempt whose failure is known
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._keys is not None:
            # The server hung up on our CURVE HELLO: it cannot open it, so it is not the key we hold for it (a
            # port that is no ZMTP server fails the greeting instead, and shows as a plain disconnect). A server
            # without CURVE may hang up too before we read its greeting; a later attempt then says so at once.
            self._failed(Verdict(no_curve_handshake(self._keys), Code.UNAUTHENTICATED))
        elif event & _HANDSHAKE_FAILED or event == zmq.EVENT_DISCONNECTED:
            self._failed(Verdict(NOT_ZMTP))
        elif event == zmq.EVENT_CONNECT_RETRIED:
            if not self._connected_since_retry:  # this attempt never got a TCP connection
                self._failed(Verdict(REFUSED))
            self._connected_since_retry = False

    def _refusal(self, event: int, value: int) -> Verdict | None:
        """The server's definite no to our credentials, or None."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return Verdict(refused_by_zap(self._keys, value), Code.UNAUTHENTICATED)
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return Verdict(mechanism_mismatch(self._keys), Code.UNAUTHENTICATED)
        return None

    def _failed(self, outcome: Verdict) -> None:
        """The latest attempt failed: the verdict is the latest outcome, a grace after the first failure (a
        server restarting as we connect gets a moment to come back)."""
        self._outcome = outcome
        self._attempt_failed = True
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
            self._greeting_timer = None
        if self._decision is None:
            self._decision = self._loop.call_later(self._grace, self._give_up, None)

    def _stop_timers(self) -> None:
        for timer in (self._decision, self._greeting_timer):
            if timer is not None:
                timer.cancel()
        self._decision = self._greeting_timer = None

    def _give_up(self, why: str | None) -> None:
        self._decision = self._greeting_timer = None
        if not self.up and not self.failed.done():
            self.failed.set_result(Verdict(why) if why else self._outcome)
