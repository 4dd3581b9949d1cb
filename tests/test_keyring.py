"""The key ring and ZAP handler every secure server uses (issue 12): real CURVE sockets over loopback TCP, real
key files written by ``zdut keys generate``'s own code, the handler answering libzmq's own ZAP requests."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from zdut.common import keys as keys_module
from zdut.common.keyring import (
    AGENT,
    BROKER_KINDS,
    USER,
    KeyRing,
    Principal,
    ZapHandler,
    peer_of,
    secure_client,
)
from zdut.common.keys import KeyFileError, load_pair, load_public


def generate(name: str, directory: Path) -> Path:
    return keys_module.generate(name, directory)[0]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A broker's key directory: its pair, users alice (an admin) and bob, agent rack1; and mallory's pair,
    known to nobody."""
    srv = tmp_path / "srv"
    generate("server", srv)
    cli = tmp_path / "cli"
    for name in ("alice", "bob", "rack1", "mallory"):
        generate(name, cli)
    (srv / "users").mkdir()
    (srv / "agents").mkdir()
    shutil.copy(cli / "alice.key", srv / "users")
    shutil.copy(cli / "bob.key", srv / "users")
    shutil.copy(cli / "rack1.key", srv / "agents")
    (srv / "admins").write_text("# who may unlock force\nalice\n")
    return tmp_path


def held(keys: Path, kind: str, name: str) -> Principal:
    """The principal a ring makes of cli/NAME.key listed as ``kind``."""
    return Principal(kind, name, load_public(keys / "cli" / f"{name}.key").decode())


def test_the_ring_names_each_key_and_its_kind(keys: Path) -> None:
    ring = KeyRing(keys / "srv", BROKER_KINDS)
    alice = load_pair(keys / "cli" / "alice.key_secret")[0]
    assert ring.principal(alice) == held(keys, USER, "alice")
    assert ring.principal(load_pair(keys / "cli" / "rack1.key_secret")[0]) == held(keys, AGENT, "rack1")
    assert ring.principal(load_pair(keys / "cli" / "mallory.key_secret")[0]) is None
    assert ring.is_admin(held(keys, USER, "alice")) and not ring.is_admin(held(keys, USER, "bob"))
    assert not ring.is_admin(held(keys, AGENT, "alice"))  # an agent key named like an admin is no admin
    assert ring.names(USER) == ["alice", "bob"] and ring.names(AGENT) == ["rack1"]


def test_a_reload_sees_keys_added_and_removed(keys: Path) -> None:
    ring = KeyRing(keys / "srv", BROKER_KINDS)
    mallory = load_pair(keys / "cli" / "mallory.key_secret")[0]
    assert ring.reload() == set()  # nothing changed
    shutil.copy(keys / "cli" / "mallory.key", keys / "srv" / "users")
    assert ring.reload() == set() and ring.principal(mallory) == held(keys, USER, "mallory")
    os.remove(keys / "srv" / "users" / "bob.key")
    assert ring.reload() == {held(keys, USER, "bob")} and not ring.holds(held(keys, USER, "bob"))
    (keys / "srv" / "admins").write_text("bob\n")
    ring.reload()
    assert not ring.is_admin(held(keys, USER, "alice")) and not ring.is_admin(held(keys, USER, "bob"))  # bob has no key


def test_a_key_replaced_under_the_same_name_is_a_removal_of_the_old_one(keys: Path) -> None:
    ring = KeyRing(keys / "srv", BROKER_KINDS)
    old = held(keys, USER, "bob")
    assert ring.holds(old)
    shutil.copy(keys / "cli" / "mallory.key", keys / "srv" / "users" / "bob.key")  # bob's file, mallory's key
    assert ring.reload() == {old} and not ring.holds(old)  # what bob's old connections carry is refused
    new = ring.principal(load_public(keys / "cli" / "mallory.key"))
    assert new == Principal(USER, "bob", new.key if new else "") and ring.holds(new) and new.key != old.key
    assert Principal.from_user_id(new.user_id) == new  # Z85 has ':' in its alphabet: the split is by length


def test_bad_files_are_skipped_and_a_shared_key_counts_for_nobody(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    (keys / "srv" / "users" / "junk.key").write_text("not a certificate\n")
    shutil.copy(keys / "cli" / "alice.key", keys / "srv" / "agents" / "alice-too.key")
    with caplog.at_level(logging.WARNING, "zdut.keys"):
        ring = KeyRing(keys / "srv", BROKER_KINDS)
    assert ring.principal(load_pair(keys / "cli" / "alice.key_secret")[0]) is None
    assert ring.names(USER) == ["bob"]
    assert "junk.key" in caplog.text and "several names" in caplog.text


def test_a_missing_directory_or_pair_is_one_clear_error(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(KeyFileError, match="no such directory"):
        KeyRing(tmp_path / "nope", BROKER_KINDS)
    os.remove(keys / "srv" / "server.key_secret")
    with pytest.raises(KeyFileError, match=r"server\.key_secret: no such file"):
        KeyRing(keys / "srv", BROKER_KINDS)


@pytest.fixture
def server(keys: Path) -> Iterator[tuple[KeyRing, ZapHandler, zmq.Socket[Any], str, list[str]]]:
    ctx = zmq.Context()
    ring = KeyRing(keys / "srv", BROKER_KINDS)
    refusals: list[str] = []
    zap = ZapHandler(ctx, ring, refusals.append)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    ring.secure_server(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield ring, zap, sock, f"tcp://127.0.0.1:{port}", refusals
    ctx.destroy(0)


def exchange(zap: ZapHandler, sock: zmq.Socket[Any], peers: list[zmq.Socket[Any]], want: int,
             deadline_s: float = 3.0) -> list[tuple[bytes, Principal | None]]:
    """Serve ZAP and read what arrives until ``want`` messages came or the deadline passed."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(zap.sock, zmq.POLLIN)
    got: list[tuple[bytes, Principal | None]] = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and len(got) < want:
        for s, _ in poller.poll(50):
            if s is zap.sock:
                zap.drain()
            else:
                sock.recv()
                frame = sock.recv(copy=False)
                got.append((frame.bytes, peer_of(frame)))
    return got


def dealer(ctx: zmq.Context[Any], ep: str, pair: tuple[bytes, bytes] | None, server_key: bytes) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None:
        secure_client(sock, pair, server_key)
    sock.connect(ep)
    return sock


def test_only_known_keys_get_through_and_each_message_names_its_key(
        keys: Path, server: tuple[KeyRing, ZapHandler, zmq.Socket[Any], str, list[str]]) -> None:
    ring, zap, sock, ep, refusals = server
    ctx = zmq.Context.instance()
    cli = keys / "cli"
    peers = [
        dealer(ctx, ep, load_pair(cli / "alice.key_secret"), ring.public),
        dealer(ctx, ep, load_pair(cli / "rack1.key_secret"), ring.public),
        dealer(ctx, ep, load_pair(cli / "mallory.key_secret"), ring.public),  # unknown key
        dealer(ctx, ep, None, ring.public),  # NULL: no key at all
        dealer(ctx, ep, load_pair(cli / "bob.key_secret"), load_pair(cli / "mallory.key_secret")[0]),  # wrong server
    ]
    for i, peer in enumerate(peers):
        peer.send(b"message %d" % i)
    got = exchange(zap, sock, peers, want=len(peers), deadline_s=2.0)
    assert sorted(got, key=lambda m: m[0]) == [(b"message 0", held(keys, USER, "alice")),
                                               (b"message 1", held(keys, AGENT, "rack1"))]
    assert len(refusals) == 1 and "127.0.0.1" in refusals[0] and "is not in" in refusals[0]  # mallory, once
    for peer in peers:
        peer.close(0)


def test_the_handler_refuses_what_is_not_a_curve_request_of_our_domain(
        server: tuple[KeyRing, ZapHandler, zmq.Socket[Any], str, list[str]]) -> None:
    ring, zap, *_ = server
    alice_raw = ring.secret  # any 32 bytes that are not a listed key
    assert zap.answer([b"1.0", b"7", b"zdut", b"1.2.3.4", b"", b"NULL"])[2] == b"400"
    assert zap.answer([b"1.0", b"7", b"other", b"1.2.3.4", b"", b"CURVE", alice_raw[:32]])[2] == b"400"
    assert zap.answer([b"2.0", b"7"])[2] == b"500"
    assert zap.answer([])[2] == b"500"
