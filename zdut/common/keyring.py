"""Who a server lets in (issue 12): the keys of its ``--keys DIR``, and its answers to libzmq's ZAP requests.

A server with ``--keys DIR`` speaks CURVE on every socket facing the network, and only to the keys this ring
holds. The layout (each ``.key`` file written by ``zdut keys generate``; the file's name is the key's name)::

    DIR/server.key_secret      the server's own pair (its public half is what clients and agents are given)
    DIR/users/NAME.key         a user's public key: requests from it act as user NAME
    DIR/agents/NAME.key        (broker) an agent's key: it may register as agent NAME, and only as NAME
    DIR/brokers/NAME.key       (agent) a broker it registers with, and whose users it trusts
    DIR/admins                 user names that may ``unlock force``, one a line ('#' starts a comment)

The ring re-reads the directory when anything in it changes (:meth:`KeyRing.reload`, which the server calls
every second): a key added lets its holder in at the next handshake, a key removed is reported back so that
the server ends what that key has open, and every later message on its old connection is refused.

Security is fail-closed where libzmq is not (docs/zeromq-notes 2.5): a server socket gets a non-empty ZAP
domain and ZAP_ENFORCE_DOMAIN, so with no handler answering, no handshake completes; the handler
(:class:`ZapHandler`) must be bound in the socket's context before the socket binds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from zdut.common.keys import PUBLIC_SUFFIX, KeyFileError, load_pair, load_public, name_problem

log = logging.getLogger("zdut.keys")

SERVER_PAIR = "server.key_secret"
ADMINS = "admins"
USER, AGENT, BROKER = "user", "agent", "broker"
#: The key directories of each server kind: sub-directory -> the kind of principal its keys are.
BROKER_KINDS = {"users": USER, "agents": AGENT}
AGENT_KINDS = {"users": USER, "brokers": BROKER}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zdut"
#: How often a server looks at its key directory (the issue allows 5 s for a change to take effect).
RELOAD_S = 1.0
Z85_KEY_LEN = 40  # a CURVE public key in Z85
#: Refused (address, key) pairs a ZAP handler remembers so as to log each once; past this it starts over.
MAX_TOLD = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is at the other end of a connection: the kind and name of the key it proved it holds, and that key
    (Z85), so that a key file replaced under the same name is a removal for the connections of the old key."""

    kind: str
    name: str
    key: str = ""

    @property
    def user_id(self) -> str:
        """What the ZAP reply names it: libzmq attaches this to every message of the connection."""
        return f"{self.kind}:{self.name}:{self.key}"

    @staticmethod
    def from_user_id(user_id: str) -> Principal | None:
        kind, sep, rest = user_id.partition(":")
        name, key = rest[:-Z85_KEY_LEN - 1], rest[-Z85_KEY_LEN:]  # Z85 has ':' in its alphabet: split by length
        ok = sep and kind in (USER, AGENT, BROKER) and name and rest[-Z85_KEY_LEN - 1:-Z85_KEY_LEN] == ":"
        return Principal(kind, name, key) if ok else None


def peer_of(frame: zmq.Frame) -> Principal | None:
    """The principal of the connection a received frame came on (None on a socket without CURVE)."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:  # no such property: a NULL-mechanism socket
        return None
    return Principal.from_user_id(user_id) if isinstance(user_id, str) else None


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What a reload compares: the name, size, mtime and inode of each file it reads."""

    files: tuple[tuple[str, int, int, int], ...]


class KeyRing:
    """The keys of one ``--keys DIR``; ``kinds`` maps its sub-directories to principal kinds."""

    def __init__(self, root: str | os.PathLike[str], kinds: dict[str, str]) -> None:
        self.root = Path(root)
        self.kinds = kinds
        if not self.root.is_dir():
            raise KeyFileError(f"{self.root}: no such directory (--keys wants a key directory)")
        public, secret = load_pair(self.root / SERVER_PAIR)
        self.public, self.secret = public, secret
        self._by_key: dict[bytes, Principal] = {}
        self._held: frozenset[Principal] = frozenset()
        self.admins: frozenset[str] = frozenset()
        self._stamp: _Stamp | None = None
        self._complained: set[str] = set()  # files already logged as unusable
        self.reload()

    # ------------------------------------------------------------- lookups
    def principal(self, public_key: bytes) -> Principal | None:
        """The principal of a public key: 32 raw bytes (what ZAP carries) or 40 Z85 characters."""
        return self._by_key.get(z85.encode(public_key) if len(public_key) == 32 else public_key)

    def holds(self, who: Principal) -> bool:
        """Whether ``who``'s key is still in the ring under its name (a removed or replaced key's old connections
        are refused)."""
        return who in self._held

    def is_admin(self, who: Principal) -> bool:
        return who.kind == USER and who.name in self.admins and self.holds(who)

    def names(self, kind: str) -> list[str]:
        return sorted(p.name for p in self._held if p.kind == kind)

    # ------------------------------------------------------------- loading
    def reload(self) -> set[Principal]:
        """Re-read the directory if anything in it changed; returns the principals whose keys went away."""
        stamp = self._scan()
        if stamp == self._stamp:
            return set()
        before = set(self._by_key.values())
        by_key: dict[bytes, Principal] = {}
        clashes: set[bytes] = set()
        for sub, kind in self.kinds.items():
            for path in sorted((self.root / sub).glob(f"*{PUBLIC_SUFFIX}")):
                name = path.name[: -len(PUBLIC_SUFFIX)]
                try:
                    if (problem := name_problem(name)) is not None:
                        raise KeyFileError(f"{path}: {problem}")
                    key = load_public(path)
                except KeyFileError as exc:
                    self._complain(str(path), f"ignoring a key file: {exc}")
                    continue
                if key in by_key:
                    clashes.add(key)
                by_key[key] = Principal(kind, name, key.decode())
        for key in clashes:  # one key under two names: whoever holds it would be either; it is neither
            self._complain(f"clash:{key!r}", f"ignoring a public key listed under several names in {self.root}")
            del by_key[key]
        self._by_key, self._stamp = by_key, stamp
        self._held = frozenset(by_key.values())  # holds() runs per message: one set, built here
        self.admins = self._read_admins()
        now = set(by_key.values())
        if now != before:
            log.info("keys in %s: %s; admins: %s", self.root,
                     ", ".join(f"{len(self.names(kind))} {kind}s" for kind in self.kinds.values()),
                     ", ".join(sorted(self.admins)) or "none")
        return before - now

    def principals(self) -> frozenset[Principal]:
        return self._held

    def _read_admins(self) -> frozenset[str]:
        try:
            text = (self.root / ADMINS).read_text(errors="replace")
        except FileNotFoundError:
            return frozenset()
        except OSError as exc:
            self._complain(ADMINS, f"cannot read {self.root / ADMINS}: {exc.strerror}; no admins")
            return frozenset()
        return frozenset(line.split("#", 1)[0].strip() for line in text.splitlines()) - {""}

    def _scan(self) -> _Stamp:
        files: list[tuple[str, int, int, int]] = []
        for path in [self.root / ADMINS, *(p for sub in self.kinds for p in (self.root / sub).glob("*"))]:
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return _Stamp(tuple(sorted(files)))

    def _complain(self, key: str, text: str) -> None:
        if key not in self._complained:
            self._complained.add(key)
            log.warning("%s", text)

    # ------------------------------------------------------------- sockets
    def secure_server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (before it binds) a CURVE server that only ZAP can let a peer into."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket[Any], pair: tuple[bytes, bytes], server_key: bytes) -> None:
    """Make ``sock`` (before it connects) a CURVE client holding ``pair`` that talks only to ``server_key``."""
    sock.curve_publickey, sock.curve_secretkey = pair
    sock.curve_serverkey = server_key


class ZapHandler:
    """Answers the ZAP requests of every CURVE server socket in one context from a :class:`KeyRing`.

    It has no thread: the server's own loop calls :meth:`drain` when :attr:`sock` is readable (the broker polls
    it beside its ROUTER; the agent adds its FD to the event loop), so a handshake waits on nothing else."""

    def __init__(self, ctx: zmq.Context[Any], ring: KeyRing, refused: Callable[[str], None] | None = None) -> None:
        self.ring = ring
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)  # before any server socket binds: libzmq asks only a bound handler
        self._refused = refused or (lambda text: log.warning("%s", text))
        self._told: set[tuple[str, bytes]] = set()  # (address, key) already logged: once per peer

    def drain(self) -> None:
        """Answer every request waiting, without blocking."""
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart()  # the inproc handler socket, not the network: a whole request is fine
            envelope, _, request = _split_envelope(frames)
            sock.send_multipart([*envelope, b"", *self.answer(request)])

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply frames (RFC 27) to one request's frames."""
        if len(request) < 6 or request[0] != b"1.0":
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        who = None
        if domain == ZAP_DOMAIN and mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            who = self.ring.principal(credentials[0])
        if who is None:
            self._refuse(address.decode(errors="replace"), mechanism, credentials)
            return [version, request_id, b"400", b"unknown key", b"", b""]
        return [version, request_id, b"200", b"OK", who.user_id.encode(), b""]

    def _refuse(self, address: str, mechanism: bytes, credentials: list[bytes]) -> None:
        key = credentials[0] if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32 else b""
        if (address, key) in self._told:
            return
        if len(self._told) >= MAX_TOLD:  # peers choose their keys: what is remembered of them stays bounded
            self._told.clear()
        self._told.add((address, key))
        what = f"key {z85.encode(key).decode()}" if key else f"mechanism {mechanism.decode(errors='replace')}"
        self._refused(f"refused a connection from {address}: {what} is not in {self.ring.root}")

    def close(self) -> None:
        self.sock.close(0)


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], bytes, list[bytes]]:
    """A REQ peer's message on a ROUTER: its routing frames, the empty delimiter, then the request."""
    try:
        cut = frames.index(b"")
    except ValueError:
        return frames[:1], b"", frames[1:]
    return frames[:cut], b"", frames[cut + 1 :]
