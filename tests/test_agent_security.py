"""``zdut-agent --keys DIR`` (issue 12): a real agent, raw pyzmq CURVE peers speaking zdut.protocol, and a raw
CURVE ROUTER posing as a broker with the ZAP handler of zdut.common.keyring.

Users: alice (an admin), bob and carol hold keys the agent lists; mallory's key is known to nobody."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from conftest import CONF, Lab, exe, free_port, wait_for
from zdut import protocol as p
from zdut.common import keys as keys_module
from zdut.common.addresses import endpoint
from zdut.common.keyring import AGENT, BROKER_KINDS, KeyRing, Principal, ZapHandler, peer_of, secure_client
from zdut.common.keys import load_pair

DEMO = CONF / "demo.yaml"
SILENCE_S = 1.5  # how long a refused peer is given to (wrongly) get an answer


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """tmp/agent: the agent's --keys DIR; tmp/cli: everyone's pairs; tmp/broker: a broker's DIR knowing the
    agent as rack1."""
    agent, cli, broker = tmp_path / "agent", tmp_path / "cli", tmp_path / "broker"
    keys_module.generate("server", agent)
    keys_module.generate("server", broker)
    for name in ("alice", "bob", "carol", "mallory"):
        keys_module.generate(name, cli)
    (agent / "users").mkdir()
    (agent / "brokers").mkdir()
    for name in ("alice", "bob", "carol"):
        shutil.copy(cli / f"{name}.key", agent / "users")
    (agent / "admins").write_text("alice\n")
    (broker / "agents").mkdir()
    shutil.copy(agent / "server.key_secret", broker / "agents" / "rack1.key")  # its public half is what counts
    (broker / "agents" / "rack1.key").chmod(0o644)
    return tmp_path


def pair(keys: Path, name: str) -> tuple[bytes, bytes]:
    return load_pair(keys / "cli" / f"{name}.key_secret")


def server_key(keys: Path, which: str = "agent") -> bytes:
    return load_pair(keys / which / "server.key_secret")[0]


def start(lab: Lab, keys: Path, *extra: str) -> tuple[Any, str]:
    agent, addr = lab.agent(DEMO, None, "--keys", str(keys / "agent"), *extra, ready=False)
    wait_for(lambda: "serving 3 devices" in agent.text() or not agent.alive(), 15, "the agent to listen")
    assert agent.alive(), agent.text()
    return agent, addr


def peer(ctx: zmq.Context[Any], addr: str, keypair: tuple[bytes, bytes] | None, srv: bytes) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keypair is not None:
        secure_client(sock, keypair, srv)
    sock.connect(endpoint(addr))
    return sock


def reply(sock: zmq.Socket[Any], want: type, timeout_s: float = 5.0, ping_sid: int = 0,
          seqs: Iterator[int] | None = None) -> Any:
    """The first message of type ``want`` within ``timeout_s``, else None; with ``ping_sid``, keep that session
    alive with Pings meanwhile (numbered from ``seqs``)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if ping_sid and seqs is not None:
            sock.send(p.encode(p.Ping(ping_sid, next(seqs))))
        if sock.poll(int(min(left, 0.5) * 1000)):
            msg = p.decode(sock.recv_multipart()[0])
            if isinstance(msg, want):
                return msg
    return None


def lines(agent: Any, text: str) -> int:
    """Lines above debug level that contain ``text``."""
    return sum(text in line and " DEBUG " not in line for line in agent.text().splitlines())


def listing(user: str, rid: int = 1) -> bytes:
    return p.encode(p.ListDevices(rid, p.VERSION, user))


#: A ZMTP 3.0 greeting offering the NULL mechanism as a client: signature, version, mechanism, as-server, filler.
NULL_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)


class NullPeer:
    """A raw TCP peer that sends a NULL greeting, then a zdut request, and never hangs up first.

    A libzmq DEALER without CURVE may read the agent's CURVE greeting and hang up before the agent has read its
    own; the agent then sees only a peer that hung up (EPIPE), a different cause with a different line. This
    peer stays, so the agent always reads its greeting and refuses the mechanism."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(NULL_GREETING)

    def send(self, frame: bytes) -> None:
        with contextlib.suppress(OSError):  # refused already: the agent may have closed the connection
            self.sock.sendall(b"\x00" + bytes([len(frame)]) + frame)  # a short final frame

    def answered(self, timeout_s: float) -> bool:
        """Whether the agent sent anything beyond its own greeting before closing or ``timeout_s`` passing."""
        received = b""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                break
            except OSError:  # reset by the agent
                break
            if not chunk:
                break
            received += chunk
        return len(received) > len(NULL_GREETING)

    def close(self) -> None:
        self.sock.close()


def answered(peer_: zmq.Socket[Any] | NullPeer, timeout_s: float) -> bool:
    if isinstance(peer_, NullPeer):
        return peer_.answered(timeout_s)
    return reply(peer_, object, timeout_s) is not None


def test_security_off_says_so_in_one_line(lab: Lab) -> None:
    agent, _ = lab.agent(DEMO)  # the plain CLI gets in: a bench needs no keys
    assert lines(agent, "security off: the direct port") == 1, agent.text()
    assert "--keys DIR turns CURVE security on" in agent.text()


def test_a_known_key_is_served_and_others_get_nothing(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> None:
    agent, addr = start(lab, keys)
    srv = server_key(keys)
    alice = peer(ctx, addr, pair(keys, "alice"), srv)
    alice.send(listing("alice"))
    got = reply(alice, p.DeviceList)
    assert got is not None and [d.name for d in got.devices] == ["device1", "device2", "device3"]
    refused: dict[str, Callable[[], zmq.Socket[Any] | NullPeer]] = {
        "NULL": lambda: NullPeer(addr),
        "unknown key": lambda: peer(ctx, addr, pair(keys, "mallory"), srv),
        "wrong server key": lambda: peer(ctx, addr, pair(keys, "bob"), pair(keys, "mallory")[0]),
    }
    logged = {"NULL": "refused a connection without CURVE", "unknown key": "is not in",
              "wrong server key": "holds the wrong server key"}
    again = {"NULL": "without CURVE", "unknown key": "refused by ZAP", "wrong server key": "wrong server key"}
    for what, make in refused.items():
        first, second = make(), make()  # two connections: the second is not logged again
        for sock in (first, second):
            sock.send(listing("mallory" if what != "wrong server key" else "bob"))
        assert not answered(first, SILENCE_S) and not answered(second, 0.1), what
        wait_for(lambda what=what: lines(agent, logged[what]) >= 1, 5, f"the {what} refusal logged")
        wait_for(lambda what=what: sum(again[what] in line and "(again)" in line
                                       for line in agent.text().splitlines()) >= 1, 5, f"the second {what} seen")
        assert lines(agent, logged[what]) == 1, (what, agent.text())
        first.close()
        second.close()
    alice.send(listing("alice", 2))
    assert reply(alice, p.DeviceList) is not None  # and the agent serves on


def test_the_user_named_must_be_the_keys(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> None:
    _, addr = start(lab, keys)
    alice = peer(ctx, addr, pair(keys, "alice"), server_key(keys))
    alice.send(listing("bob", 7))
    err = reply(alice, p.Error)
    assert err is not None and (err.rid, err.code) == (7, p.Code.PERMISSION_DENIED), err
    assert err.message == ('user "bob" refused: this connection\'s key is user "alice" '
                           "(with security on, -u must be your key's name)")
    alice.send(p.encode(p.RunOpen(3, p.VERSION, "bob", "device1", "status", [])))
    done = reply(alice, p.Done)
    assert done is not None and (done.sid, done.code) == (3, p.Code.PERMISSION_DENIED), done
    assert 'user "bob" refused' in done.message
    alice.send(p.encode(p.RunOpen(4, p.VERSION, "alice", "device1", "status", [])))
    done = reply(alice, p.Done)
    assert done is not None and (done.sid, done.code) == (4, p.Code.OK), done


def test_unlock_is_the_owners_and_unlock_force_the_admins(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> None:
    _, addr = start(lab, keys)
    srv = server_key(keys)
    alice, bob, carol = (peer(ctx, addr, pair(keys, n), srv) for n in ("alice", "bob", "carol"))
    bob.send(p.encode(p.Lock(1, p.VERSION, "bob", "device1", 0)))
    assert reply(bob, p.LockResult) is not None
    carol.send(p.encode(p.Unlock(2, p.VERSION, "carol", "device1", False)))
    err = reply(carol, p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED and 'locked by "bob"' in err.message, err
    carol.send(p.encode(p.Unlock(3, p.VERSION, "carol", "device1", True)))
    err = reply(carol, p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED, err
    assert err.message.startswith('unlock force refused: user "carol" is not an admin of this agent'), err
    alice.send(p.encode(p.ListDevices(4, p.VERSION, "alice")))
    devices = reply(alice, p.DeviceList)
    assert devices is not None and devices.devices[0].lock is not None and devices.devices[0].lock.owner == "bob"
    alice.send(p.encode(p.Unlock(5, p.VERSION, "alice", "device1", True)))
    done = reply(alice, p.Unlocked)
    assert done is not None and done.broke == "bob", done


def bobs_console(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> tuple[Any, str, zmq.Socket[Any], Iterator[int]]:
    """A secure agent, and bob's console (session 9, device2 repeat) on its direct port: (agent, address,
    bob's socket, the Ping numbers that keep the session alive)."""
    agent, addr = start(lab, keys)
    bob = peer(ctx, addr, pair(keys, "bob"), server_key(keys))
    bob.send(p.encode(p.RunOpen(9, p.VERSION, "bob", "device2", "repeat", [])))
    assert reply(bob, p.RunStarted) is not None
    return agent, addr, bob, itertools.count(1)


def test_a_removed_key_ends_its_session_and_an_added_key_gets_in(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> None:
    agent, addr, bob, seqs = bobs_console(lab, keys, ctx)
    srv = server_key(keys)
    assert reply(bob, p.Done, 1.0, 9, seqs) is None  # the console runs on while bob's key is there
    os.remove(keys / "agent" / "users" / "bob.key")
    removed = time.monotonic()
    done = reply(bob, p.Done, 5.0, 9, seqs)
    assert done is not None, agent.text()[-2000:]
    print(f"Done {time.monotonic() - removed:.2f}s after the key went: {done.message}")
    assert done.code == p.Code.PERMISSION_DENIED and 'the key of user "bob" was removed' in done.message, done
    bob.send(listing("bob", 10))  # its connection is refused from now on, and told why
    refused = reply(bob, p.Error, 5.0)
    assert refused is not None and refused.code == p.Code.PERMISSION_DENIED, refused
    assert 'the key of user "bob" was removed' in refused.message, refused

    mallory = peer(ctx, addr, pair(keys, "mallory"), srv)
    mallory.send(listing("mallory", 1))
    assert reply(mallory, object, SILENCE_S) is None
    shutil.copy(keys / "cli" / "mallory.key", keys / "agent" / "users")
    added = time.monotonic()
    got = None
    while got is None and time.monotonic() - added < 5.0:  # a refused DEALER may not retry: a fresh one each try
        mallory.close()
        mallory = peer(ctx, addr, pair(keys, "mallory"), srv)
        mallory.send(listing("mallory", 2))
        got = reply(mallory, p.DeviceList, 0.5)
    assert got is not None, "an added key was not let in within 5s"


def test_a_key_replaced_under_its_name_ends_the_old_keys_session(lab: Lab, keys: Path, ctx: zmq.Context[Any]) -> None:
    """Overwriting users/bob.key with another key is bob's old key removed: its console ends, its connection is
    refused, and the new key's holder is bob."""
    agent, addr, bob, seqs = bobs_console(lab, keys, ctx)
    shutil.copy(keys / "cli" / "mallory.key", keys / "agent" / "users" / "bob.key")
    done = reply(bob, p.Done, 5.0, 9, seqs)
    assert done is not None and done.code == p.Code.PERMISSION_DENIED, (done, agent.text()[-2000:])
    bob.send(listing("bob", 10))
    refused = reply(bob, p.Error, 5.0)
    assert refused is not None and 'the key of user "bob" was removed' in refused.message, refused
    new_bob = peer(ctx, addr, pair(keys, "mallory"), server_key(keys))  # the holder of the key now filed as bob
    new_bob.send(listing("bob", 11))
    assert isinstance(reply(new_bob, p.DeviceList, 5.0), p.DeviceList)


class Broker:
    """A raw CURVE ROUTER with a ZAP handler: what a secure zdut-broker looks like to an agent's uplink."""

    def __init__(self, keys: Path) -> None:
        self.ctx = zmq.Context()
        self.ring = KeyRing(keys / "broker", BROKER_KINDS)
        self.zap = ZapHandler(self.ctx, self.ring)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.ring.secure_server(self.sock)
        self.events = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.failures = 0
        self.disconnects = 0

    def serve(self, seconds: float) -> tuple[p.Message, Principal | None] | None:
        """Answer ZAP and count handshake failures for up to ``seconds``; the first message and its key."""
        poller = zmq.Poller()
        for s in (self.sock, self.zap.sock, self.events):
            poller.register(s, zmq.POLLIN)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            for s, _ in poller.poll(int(left * 1000)):
                if s is self.zap.sock:
                    self.zap.drain()
                elif s is self.events:
                    event = parse_monitor_message(self.events.recv_multipart())["event"]
                    self.disconnects += event == zmq.EVENT_DISCONNECTED
                    self.failures += event != zmq.EVENT_DISCONNECTED
                else:
                    frames = self.sock.recv_multipart(copy=False)
                    return p.decode(frames[2].bytes), peer_of(frames[2])
        return None

    def close(self) -> None:
        self.ctx.destroy(0)


@pytest.fixture
def broker(keys: Path) -> Any:
    b = Broker(keys)
    yield b
    b.close()


def test_the_uplink_registers_only_with_the_broker_whose_key_it_holds(lab: Lab, keys: Path, broker: Broker) -> None:
    addr = f"127.0.0.1:{broker.port}"
    shutil.copy(keys / "broker" / "server.key_secret", keys / "agent" / "brokers" / f"{addr}.key")
    agent, _ = start(lab, keys, "--server", addr)
    got = broker.serve(10)
    assert got is not None, agent.text()[-2000:]
    assert isinstance(got[0], p.Register) and (got[1].kind, got[1].name) == (AGENT, "rack1"), got
    os.remove(keys / "agent" / "brokers" / f"{addr}.key")  # the broker is no longer trusted: the uplink goes
    wait_for(lambda: broker.serve(0.1) is None and broker.disconnects >= 1, 5, "the uplink to close")
    assert lines(agent, f"broker key {addr} gone from") == 1, agent.text()[-2000:]


@pytest.mark.parametrize("case", ["wrong broker key", "our key unknown"])
def test_a_failed_uplink_handshake_is_logged_once_and_retried(lab: Lab, keys: Path, broker: Broker,
                                                              case: str) -> None:
    addr = f"127.0.0.1:{broker.port}"
    if case == "wrong broker key":
        shutil.copy(keys / "cli" / "mallory.key", keys / "agent" / "brokers" / "127.0.0.1.key")  # by host part
        want = f"broker {addr} broke off the CURVE handshake: is {keys / 'agent'}/brokers/127.0.0.1.key"
    else:
        shutil.copy(keys / "broker" / "server.key_secret", keys / "agent" / "brokers" / "only.key")  # the only one
        os.remove(keys / "broker" / "agents" / "rack1.key")
        broker.ring.reload()
        want = f"broker {addr} refused our key (is the public key of {keys / 'agent'}/server.key_secret"
    agent, _ = start(lab, keys, "--server", addr)
    deadline = time.monotonic() + 15
    while broker.failures < 3 and time.monotonic() < deadline:  # three handshakes tried and failed
        assert broker.serve(0.2) is None, "a message arrived through a handshake that should fail"
    assert broker.failures >= 3, agent.text()[-2000:]
    wait_for(lambda: agent.text().count("CURVE handshake failed; reconnecting") >= 2, 10, "the agent's retries")
    assert lines(agent, want) == 1, agent.text()[-3000:]
    assert lines(agent, "CURVE handshake failed; reconnecting") == 0  # the retries themselves are debug lines


def test_start_up_errors_are_one_line(tmp_path: Path, keys: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe("zdut-agent"), "-c", str(DEMO), *args], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})

    r = run("--keys", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("zdut-agent: --keys: "), r.stderr
    assert "no such directory" in r.stderr
    for name in ("lab1", "lab2"):
        shutil.copy(keys / "cli" / "mallory.key", keys / "agent" / "brokers" / f"{name}.key")
    port = free_port()
    r = run("--keys", str(keys / "agent"), "--server", f"lab3:{port}")
    assert r.returncode == 1, r.stderr
    assert f"--server lab3:{port}: no broker key for it: looked for {keys / 'agent'}/brokers/lab3:{port}.key or " \
           f"{keys / 'agent'}/brokers/lab3.key" in r.stderr, r.stderr
