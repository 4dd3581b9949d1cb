"""The real zdut-broker process, driven by raw pyzmq DEALER sockets playing agents and clients.

No mocks and no sleeps as synchronisation: every wait polls a socket (or a log file) with a deadline.
"""

from __future__ import annotations

import os
import queue
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import Lab, Proc, exe, wait_for
from zdut import protocol as P

HB = 0.5  # broker heartbeat in these tests: an agent is offline after 1.5 s of silence
USER = "tester"


# ==================================================================== raw peers


def decode(frames: list[bytes]) -> tuple[Any, bytes | None]:
    msg = P._decoder.decode(frames[0])  # no 64 KiB cap: large listings are tested too
    return msg, frames[1] if len(frames) > 1 else None


class Client:
    """A raw client DEALER: ``[header][payload?]`` both ways."""

    def __init__(self, ctx: zmq.Context[Any], ep: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(ep)
        self.rid = 0

    def send(self, msg: Any, payload: bytes | None = None) -> None:
        if payload is None:
            self.sock.send(P.encode(msg))
        else:
            self.sock.send_multipart([P.encode(msg), payload])

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> tuple[Any, bytes | None]:
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int(1000 * (deadline - time.monotonic())))):
            frames = self.sock.recv_multipart()
            if frames[0]:  # [b""][...] is broker control for agent-shaped senders (fuzzing gets some)
                return decode(frames)
        raise AssertionError(f"client: nothing received within {timeout}s")

    def call(self, make: Any, timeout: float = 5.0) -> Any:
        """A unary request; returns the reply with the same rid."""
        self.rid += 1
        self.send(make(self.rid))
        deadline = time.monotonic() + timeout
        while True:
            msg, _ = self.recv(max(0.01, deadline - time.monotonic()))
            if getattr(msg, "rid", None) == self.rid:
                return msg

    def hello(self, timeout: float = 5.0) -> Any:
        return self.call(lambda r: P.Hello(r, P.VERSION, USER), timeout)

    def devices(self) -> list[P.DeviceInfo]:
        reply = self.call(lambda r: P.ListDevices(r, P.VERSION, USER))
        assert isinstance(reply, P.DeviceList), reply
        return reply.devices

    def agents(self) -> list[P.AgentInfo]:
        reply = self.call(lambda r: P.ListAgents(r, P.VERSION, USER))
        assert isinstance(reply, P.AgentList), reply
        return reply.agents

    def close(self) -> None:
        self.sock.close(0)


class FakeAgent:
    """A raw agent DEALER run by its own thread (it owns the socket): registers, heartbeats while
    alive, queues what it receives.  ``die()`` makes it silent without closing the connection."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        ep: str,
        name: str,
        devices: list[str],
        instance: str = "i1",
        version: str = P.VERSION,
        heartbeat: bool = True,
        auto_reregister: bool = True,
        echo: bool = False,
    ) -> None:
        self.ctx, self.ep, self.name, self.devices = ctx, ep, name, devices
        self.instance, self.version = instance, version
        self.heartbeat, self.auto_reregister, self.echo = heartbeat, auto_reregister, echo
        self.seqs: dict[tuple[bytes, int], int] = {}
        self.inbox: queue.Queue[tuple[bytes, Any, bytes | None]] = queue.Queue()
        self.outbox: queue.Queue[list[bytes]] = queue.Queue()
        self.alive = True
        self.closed = False
        self.control: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"agent-{name}")
        self.thread.start()

    def register_msg(self, devices: list[str] | None = None) -> P.Register:
        entries = [
            P.DeviceEntry(d, [P.CommandInfo("cmd", f"help of cmd on {d}"), P.CommandInfo("other", "")])
            for d in (devices if devices is not None else self.devices)
        ]
        return P.Register(self.version, self.name, self.instance, f"{self.name}:9", entries, {})

    def register(self, timeout: float = 5.0) -> Any:
        """Register and return the broker's answer (Registered or Refused)."""
        self.send(b"", P.encode(self.register_msg()))
        return self.expect_control((P.Registered, P.Refused), timeout)

    def expect_control(self, kinds: Any, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.control.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"agent {self.name}: no {kinds} within {timeout}s") from None
            if isinstance(msg, kinds):
                return msg

    def send(self, *frames: bytes) -> None:
        self.outbox.put(list(frames))

    def send_msg(self, cid: bytes, msg: Any, payload: bytes | None = None) -> None:
        self.send(cid, P.encode(msg), *([payload] if payload is not None else []))

    def recv(self, timeout: float = 5.0) -> tuple[bytes, Any, bytes | None]:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"agent {self.name}: nothing received within {timeout}s") from None

    def die(self) -> None:
        self.alive = False

    def revive(self) -> None:
        self.alive = True

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)

    def _echo(self, cid: bytes, msg: Any, payload: bytes | None) -> None:
        """A console that echoes stdin to stdout and ends at stdin EOF."""
        key = (cid, getattr(msg, "sid", -1))
        if isinstance(msg, P.RunOpen):
            self.seqs[key] = 1
            self.send_msg(cid, P.RunStarted(msg.sid, 1, True))
        elif key in self.seqs and isinstance(msg, (P.Data, P.StdinEof)):
            self.seqs[key] += 1
            seq = self.seqs[key]
            if isinstance(msg, P.Data):
                self.send_msg(cid, P.Data(msg.sid, seq, P.STDOUT), payload)
            else:
                self.send_msg(cid, P.Done(msg.sid, seq, "", ""))
                del self.seqs[key]

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.ep)
        last_tx = time.monotonic()
        try:
            while not self.closed:
                if sock.poll(10):
                    frames = sock.recv_multipart()
                    cid, (msg, payload) = frames[0], decode(frames[1:])
                    if cid and self.echo:
                        self._echo(cid, msg, payload)
                    elif cid:
                        self.inbox.put((cid, msg, payload))
                    elif isinstance(msg, P.Reregister) and self.alive and self.auto_reregister:  # as real agents do
                        self.outbox.put([b"", P.encode(self.register_msg())])
                        self.control.put(msg)
                    elif not isinstance(msg, P.Heartbeat):
                        self.control.put(msg)
                while not self.outbox.empty():
                    frames = self.outbox.get()
                    if self.alive or (frames[0] == b"" and b"register" in frames[1][:12]):
                        sock.send_multipart(frames)
                        last_tx = time.monotonic()
                if self.alive and self.heartbeat and time.monotonic() - last_tx > HB / 2:
                    sock.send_multipart([b"", P.encode(P.Heartbeat())])
                    last_tx = time.monotonic()
        finally:
            sock.close(0)


# ==================================================================== broker process


class Broker:
    def __init__(self, lab: Lab, state: Path, port: int | None = None) -> None:
        self.lab, self.state = lab, state
        self.proc = self.start(port)

    def start(self, port: int | None = None) -> Proc:
        listen = f"tcp://127.0.0.1:{port or '*'}"
        proc = self.lab.spawn(
            [exe("zdut-broker"), "-s", listen, "--state", str(self.state), "--heartbeat", str(HB), "--log", "debug"],
            "broker",
        )
        found = wait_for(
            lambda: re.search(r"listening on (tcp://[\d.]+:\d+)", proc.text()) or not proc.alive(), 15, "broker start"
        )
        assert proc.alive(), proc.text()
        self.ep = found.group(1)
        self.port = int(self.ep.rpartition(":")[2])
        self.proc = proc
        return proc

    def restart(self) -> None:
        assert self.proc.stop() == 0, self.proc.text()
        self.start(self.port)

    def log(self) -> str:
        return self.proc.text()


@pytest.fixture
def broker(lab: Lab, tmp_path: Path) -> Broker:
    return Broker(lab, tmp_path / "broker.sqlite3")


@pytest.fixture
def peers(ctx: zmq.Context[Any], broker: Broker) -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for p in made:
        p.close()


def client(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> Client:
    c = Client(ctx, broker.ep)
    peers.append(c)
    return c


def agent(ctx: zmq.Context[Any], broker: Broker, peers: list[Any], name: str, *devices: str, **kw: Any) -> FakeAgent:
    a = FakeAgent(ctx, broker.ep, name, list(devices), **kw)
    peers.append(a)
    return a


def run_open(c: Client, sid: int, device: str, command: str = "cmd", args: list[str] | None = None) -> None:
    c.send(P.RunOpen(sid, P.VERSION, USER, device, command, args or []))


# ==================================================================== tests


def test_hello_and_empty_listing(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    c = client(ctx, broker, peers)
    welcome = c.hello()
    assert isinstance(welcome, P.Welcome)
    assert (welcome.role, welcome.version) == ("broker", P.VERSION)
    assert welcome.name.endswith(f":{broker.port}")
    assert c.devices() == []
    assert c.agents() == []


def test_registration_listing_and_registry_answers(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev2", "dev1")
    reply = a.register()
    assert isinstance(reply, P.Registered)
    assert reply.heartbeat_ms == int(HB * 1000)
    b = agent(ctx, broker, peers, "agent-b", "dev3")
    assert isinstance(b.register(), P.Registered)
    c = client(ctx, broker, peers)
    assert c.devices() == [
        P.DeviceInfo("dev1", None, "agent-a", True),
        P.DeviceInfo("dev2", None, "agent-a", True),
        P.DeviceInfo("dev3", None, "agent-b", True),
    ]
    infos = c.agents()
    assert [(i.name, i.devices, i.online, i.address) for i in infos] == [
        ("agent-a", ["dev1", "dev2"], True, "agent-a:9"),
        ("agent-b", ["dev3"], True, "agent-b:9"),
    ]
    assert abs(infos[0].last_seen - time.time()) < 5
    listed = c.call(lambda r: P.ListCommands(r, P.VERSION, USER, "dev1"))
    assert listed == P.CommandList(c.rid, ["cmd", "other"], ["", ""])
    assert c.call(lambda r: P.GetDetails(r, P.VERSION, USER, "dev1", "cmd", "help")) == P.Details(
        c.rid, "help of cmd on dev1"
    )
    errors = [
        (lambda r: P.ListCommands(r, P.VERSION, USER, "nope"), P.Code.NOT_FOUND, 'device "nope" not found'),
        (
            lambda r: P.GetDetails(r, P.VERSION, USER, "dev1", "zz", "help"),
            P.Code.NOT_FOUND,
            'device "dev1", command "zz": no such command',
        ),
        (
            lambda r: P.GetDetails(r, P.VERSION, USER, "dev1", "cmd", "x"),
            P.Code.INVALID_ARGUMENT,
            'unknown keyword "x", possible values are: "help"',
        ),
        (lambda r: P.Lock(r, P.VERSION, USER, "nope", 0), P.Code.NOT_FOUND, 'device "nope" not found'),
        (
            lambda r: P.ListDevices(r, "9.0.0", USER),
            P.Code.FAILED_PRECONDITION,
            f"incompatible zdut versions: broker {P.VERSION}, client 9.0.0 (major version mismatch)",
        ),
    ]
    for make, code, message in errors:
        assert c.call(make) == P.Error(c.rid, code, message)


def test_lock_changes_show_in_listing(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = client(ctx, broker, peers)
    lock = P.LockState("alice", int(time.time()), int(time.time()) + 600)
    a.send(b"", P.encode(P.LockChanged("dev1", lock)))
    wait_for(lambda: c.devices()[0].lock == lock, 5, "lock copy")
    a.send(b"", P.encode(P.LockChanged("dev1", None)))
    wait_for(lambda: c.devices()[0].lock is None, 5, "unlock copy")


def test_lock_and_unlock_are_forwarded_to_the_agent(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = client(ctx, broker, peers)
    c.rid += 1
    c.send(P.Lock(c.rid, P.VERSION, USER, "dev1", 60))
    cid, msg, _ = a.recv()
    assert msg == P.Lock(c.rid, P.VERSION, USER, "dev1", 60)
    state = P.LockState(USER, 1, 61)
    a.send_msg(cid, P.LockResult(msg.rid, "dev1", state))
    assert c.recv()[0] == P.LockResult(c.rid, "dev1", state)
    c.rid += 1
    c.send(P.Unlock(c.rid, P.VERSION, USER, "dev1", False))
    cid, msg, _ = a.recv()
    a.send_msg(cid, P.Error(msg.rid, P.Code.FAILED_PRECONDITION, "device is not locked"))
    assert c.recv()[0] == P.Error(c.rid, P.Code.FAILED_PRECONDITION, "device is not locked")
    a.send_msg(cid, P.Unlocked(12345))  # nobody asked: not forwarded
    assert c.hello().rid == c.rid


def test_run_session_is_relayed_both_ways(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = client(ctx, broker, peers)
    run_open(c, 7, "dev1", args=["x", "y"])
    cid, msg, payload = a.recv()
    assert msg == P.RunOpen(7, P.VERSION, USER, "dev1", "cmd", ["x", "y"]) and payload is None
    a.send_msg(cid, P.RunStarted(7, 1, True))
    a.send_msg(cid, P.Data(7, 2, P.STDOUT), b"hello")
    big = os.urandom(P.CHUNK_SIZE)  # a 256 KiB chunk goes through untouched (zero-copy)
    a.send_msg(cid, P.FileChunk(7, 3, 1, 0), big)
    assert c.recv() == (P.RunStarted(7, 1, True), None)
    assert c.recv() == (P.Data(7, 2, P.STDOUT), b"hello")
    assert c.recv() == (P.FileChunk(7, 3, 1, 0), big)
    c.send(P.Data(7, 1, P.STDIN), b"typed")
    c.send(P.Credit(7, 2, 4096))
    c.send(P.FileChunk(7, 3, 2, 0), big)
    assert a.recv() == (cid, P.Data(7, 1, P.STDIN), b"typed")
    assert a.recv() == (cid, P.Credit(7, 2, 4096), None)
    assert a.recv() == (cid, P.FileChunk(7, 3, 2, 0), big)
    c.send(P.Ping(7, 4))
    assert a.recv()[1] == P.Ping(7, 4)
    a.send_msg(cid, P.Done(7, 4, "", ""))
    assert c.recv()[0] == P.Done(7, 4, "", "")
    c.send(P.Credit(7, 5, 10))  # after Done: a late message, dropped
    run_open(c, 8, "dev1")
    assert a.recv()[1].sid == 8  # the late Credit never reached the agent


def test_run_errors_answered_by_the_broker(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = client(ctx, broker, peers)
    run_open(c, 1, "nope")
    assert c.recv()[0] == P.Done(1, 1, P.Code.NOT_FOUND, 'device "nope" not found')
    c.send(P.RunOpen(2, "7.0.0", USER, "dev1", "cmd", []))
    done = c.recv()[0]
    assert (done.sid, done.seq, done.code) == (2, 1, P.Code.FAILED_PRECONDITION)
    run_open(c, 3, "dev1")
    cid, _, _ = a.recv()
    run_open(c, 3, "dev1")  # the same sid while open
    assert c.recv()[0] == P.Done(3, 1, P.Code.ALREADY_EXISTS, "session 3 is already open")
    # Agents refuse a RunOpen with Done; an Error naming the session is no reply anyone waits for.
    a.send_msg(cid, P.Error(3, P.Code.INTERNAL, "agent could not start it"))
    a.send_msg(cid, P.Done(3, 1, P.Code.INTERNAL, "agent could not start it"))
    assert c.recv()[0] == P.Done(3, 1, P.Code.INTERNAL, "agent could not start it")


def test_takeover_by_same_agent_and_refusal_of_another(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a1 = agent(ctx, broker, peers, "agent-a", "dev1", "dev2", instance="first")
    a1.register()
    c = client(ctx, broker, peers)
    run_open(c, 1, "dev1")
    a1.recv()

    intruder = agent(ctx, broker, peers, "agent-x", "dev2", "dev9")
    refused = intruder.register()
    assert refused == P.Refused(
        P.Code.ALREADY_EXISTS, 'device "dev2" is already registered by agent "agent-a" (online)'
    )
    wait_for(lambda: 'refused registration of agent "agent-x"' in broker.log(), 5, "refusal logged")
    assert 'already registered by agent "agent-a"' in broker.log()

    a2 = agent(ctx, broker, peers, "agent-a", "dev1", "dev2", instance="second")  # the agent restarted
    assert isinstance(a2.register(), P.Registered)
    done = c.recv()[0]  # the old process's session cannot continue
    assert (done.sid, done.code, done.message) == (1, P.Code.UNAVAILABLE, 'agent "agent-a" restarted')
    run_open(c, 2, "dev1")
    assert a2.recv()[1].sid == 2  # routed to the new connection
    assert [(i.name, i.online) for i in c.agents()] == [("agent-a", True)]


def test_agent_death_ends_sessions_and_lists_offline(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = client(ctx, broker, peers)
    run_open(c, 1, "dev1")
    cid, _, _ = a.recv()
    a.send_msg(cid, P.RunStarted(1, 1, False))
    a.send_msg(cid, P.Data(1, 2, P.STDOUT), b"x")
    assert c.recv()[0].seq == 1 and c.recv()[0].seq == 2
    c.rid += 1
    c.send(P.Lock(c.rid, P.VERSION, USER, "dev1", 0))  # pending when the agent dies
    a.recv()
    started = time.monotonic()
    a.die()
    got = {type(m): m for m in (c.recv(5)[0], c.recv(5)[0])}
    assert time.monotonic() - started < 5
    assert got[P.Done] == P.Done(1, 3, P.Code.UNAVAILABLE, 'agent "agent-a" went offline')  # seq follows the agent's
    assert got[P.Error] == P.Error(c.rid, P.Code.UNAVAILABLE, 'agent "agent-a" went offline')
    assert c.devices() == [P.DeviceInfo("dev1", None, "agent-a", False)]
    reply = c.call(lambda r: P.ListCommands(r, P.VERSION, USER, "dev1"))
    assert reply == P.Error(c.rid, P.Code.UNAVAILABLE, 'agent "agent-a" serving device "dev1" is offline')
    run_open(c, 2, "dev1")
    assert c.recv()[0] == P.Done(2, 1, P.Code.UNAVAILABLE, 'agent "agent-a" serving device "dev1" is offline')
    assert 'agent "agent-a" went offline' in broker.log()


def test_unknown_connection_is_told_to_reregister(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    """Heartbeats or session traffic from a connection the broker does not know (it restarted, or expired
    the agent) get Reregister; the agent then registers on the same connection."""
    a = agent(ctx, broker, peers, "agent-a", "dev1", heartbeat=False, auto_reregister=False)
    a.send(b"", P.encode(P.Heartbeat()))
    a.expect_control(P.Reregister)
    a.send_msg(b"\x00\x01\x02\x03\x04", P.Data(1, 9, P.STDOUT), b"stale")
    a.expect_control(P.Reregister)
    assert isinstance(a.register(), P.Registered)


def test_client_disappearing_tells_the_agent(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    c = Client(ctx, broker.ep)
    run_open(c, 5, "dev1")
    cid, _, _ = a.recv()
    c.close()  # the connection goes away: the next message for it is EHOSTUNREACH at the broker
    seq = 0

    def session_gone() -> Any:
        nonlocal seq
        seq += 1
        a.send_msg(cid, P.Data(5, seq, P.STDOUT), b"x")
        try:
            return a.expect_control(P.SessionGone, 0.1)
        except AssertionError:
            return None

    assert wait_for(session_gone, 10, "SessionGone", interval=0) == P.SessionGone(cid, 5)


def test_restart_lists_known_devices_offline_from_state(
    ctx: zmq.Context[Any], broker: Broker, peers: list[Any]
) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1", "dev2")
    b = agent(ctx, broker, peers, "agent-b", "dev3")
    a.register()
    b.register()
    c = client(ctx, broker, peers)
    assert [d.online for d in c.devices()] == [True, True, True]
    before = {i.name: i for i in c.agents()}
    a.die()
    b.die()
    broker.restart()  # same port, same state file
    assert c.devices() == [
        P.DeviceInfo("dev1", None, "agent-a", False),
        P.DeviceInfo("dev2", None, "agent-a", False),
        P.DeviceInfo("dev3", None, "agent-b", False),
    ]
    after = {i.name: i for i in c.agents()}
    assert not after["agent-a"].online and after["agent-a"].devices == ["dev1", "dev2"]
    assert after["agent-b"].last_seen >= before["agent-b"].last_seen - 1
    a.revive()  # its next heartbeat gets Reregister, and it registers again by itself
    wait_for(lambda: [d.online for d in c.devices()] == [True, True, False], 10, "agent-a back online")
    run_open(c, 1, "dev1")
    assert a.recv()[1].sid == 1


def test_reconnect_of_same_process_takes_over(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    """The agent opened a new socket (network loss): the old connection's sessions end, the name stays."""
    a1 = agent(ctx, broker, peers, "agent-a", "dev1", instance="same")
    a1.register()
    c = client(ctx, broker, peers)
    run_open(c, 1, "dev1")
    a1.recv()
    a1.die()
    a2 = agent(ctx, broker, peers, "agent-a", "dev1", instance="same")
    assert isinstance(a2.register(), P.Registered)
    assert c.recv()[0] == P.Done(1, 1, P.Code.UNAVAILABLE, 'agent "agent-a" reconnected')
    wait_for(lambda: "(takeover from its previous connection)" in broker.log(), 5, "takeover logged")


def fuzz_frames(rng: random.Random) -> list[bytes]:
    """One hostile message: random bytes, wrong frame counts, truncated or unknown headers, bad versions."""
    junk = lambda n: rng.randbytes(rng.randrange(n))  # noqa: E731
    good = [
        P.encode(P.Hello(1, P.VERSION, "x")),
        P.encode(P.Data(1, 1, P.STDIN)),
        P.encode(P.RunOpen(1, P.VERSION, "x", "dev1", "cmd", [])),
        P.encode(P.Register(P.VERSION, "evil", "i", "", [P.DeviceEntry("dev1", [])], {})),
        P.encode(P.Done(1, 1, "", "")),
        P.encode(P.Heartbeat()),
    ]
    kind = rng.randrange(10)
    if kind == 0:
        return [junk(300)]
    if kind == 1:
        return [junk(100) for _ in range(rng.randrange(2, 7))]
    if kind == 2:  # valid header, wrong number of frames
        return [rng.choice(good)] + [junk(50) for _ in range(rng.choice([1, 2, 3]))]
    if kind == 3:  # truncated header
        h = rng.choice(good)
        return [h[: rng.randrange(1, len(h))]]
    if kind == 4:  # valid headers, incompatible versions
        return [
            rng.choice(
                [
                    P.encode(P.Hello(1, "99.0.0", "x")),
                    P.encode(P.ListDevices(2, "0", "x")),
                    P.encode(P.RunOpen(3, "42.1.1", "x", "dev1", "cmd", [])),
                ]
            )
        ]
    if kind == 5:  # agent-shaped control frames from a stranger
        return [b"", rng.choice([junk(40), P.encode(P.Register("9.0.0", "evil", "i", "", [], {})), good[5]])]
    if kind == 6:  # looks like a header (fixarray), is not one
        return [bytes([0x90 | rng.randrange(16)]) + junk(60)]
    if kind == 7:  # header over the 64 KiB limit
        return [b"\x93" + rng.randbytes(70_000)]
    if kind == 8:  # unknown message type
        return [P.msgspec.msgpack.encode(["bogus", 1, 2])]
    return [P.encode(P.Data(99, 1, P.STDIN)), junk(1000)]  # a session nobody opened


def test_fuzz_garbage_never_hurts_other_peers(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    a = agent(ctx, broker, peers, "agent-a", "dev1")
    a.register()
    good = client(ctx, broker, peers)
    good.hello()
    rng = random.Random(20240607)
    evil = [client(ctx, broker, peers) for _ in range(4)]
    for i in range(3000):
        evil[i % len(evil)].send_raw(*fuzz_frames(rng))
    huge = client(ctx, broker, peers)
    huge.send_raw(b"\x93" + bytes(6 * 1024 * 1024))  # over MAXMSGSIZE: libzmq drops that connection
    for e in evil:  # everything before it has been read once each evil client gets its Welcome
        e.rid = 1_000_000  # above the fuzz's rids
        assert isinstance(e.hello(timeout=20), P.Welcome)
    assert isinstance(good.hello(), P.Welcome)
    assert good.devices() == [P.DeviceInfo("dev1", None, "agent-a", True)]
    run_open(good, 1, "dev1")
    cid, msg, _ = a.recv()
    assert msg.sid == 1
    a.send_msg(cid, P.Data(1, 1, P.STDOUT), b"still fine")
    assert good.recv() == (P.Data(1, 1, P.STDOUT), b"still fine")
    assert broker.proc.alive()
    text = broker.log()
    assert "dropped a message" in text
    assert "internal error" not in text and "Traceback" not in text
    assert len(text.splitlines()) < 400  # rate-limited, not one line per bad message


def test_load_50_sessions_across_10_agents(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    """Every byte of 50 concurrent echo sessions comes back, in order, with contiguous sequence numbers."""
    agents = [agent(ctx, broker, peers, f"agent-{i}", f"dev{i}", echo=True) for i in range(10)]
    for a in agents:
        assert isinstance(a.register(), P.Registered)
    clients = [client(ctx, broker, peers) for _ in range(5)]
    rng = random.Random(7)
    sent: dict[tuple[int, int], list[bytes]] = {}
    for ci, c in enumerate(clients):
        for k in range(10):
            sid = 100 + k
            run_open(c, sid, f"dev{(ci * 10 + k) % 10}")
            sent[(ci, sid)] = [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(20)]
    for j in range(20):  # interleave all sessions
        for (ci, sid), chunks in sent.items():
            clients[ci].send(P.Data(sid, j + 1, P.STDIN), chunks[j])
    for ci, sid in sent:
        clients[ci].send(P.StdinEof(sid, 21))
    got: dict[tuple[int, int], list[Any]] = {key: [] for key in sent}
    poller = zmq.Poller()
    for c in clients:
        poller.register(c.sock, zmq.POLLIN)
    index = {c.sock: ci for ci, c in enumerate(clients)}
    deadline = time.monotonic() + 30
    done = 0
    while done < len(sent):
        assert time.monotonic() < deadline, f"only {done} sessions done"
        for sock, _ in poller.poll(1000):
            msg, payload = decode(sock.recv_multipart())
            got[(index[sock], msg.sid)].append((msg, payload))
            done += isinstance(msg, P.Done)
    for key, chunks in sent.items():
        msgs = got[key]
        assert [m.seq for m, _ in msgs] == list(range(1, 23))
        assert isinstance(msgs[0][0], P.RunStarted) and msgs[-1][0] == P.Done(key[1], 22, "", "")
        assert [p for _, p in msgs[1:-1]] == chunks


def test_two_processes_with_one_name_are_reported(ctx: zmq.Context[Any], broker: Broker, peers: list[Any]) -> None:
    """Same name = same agent, so two live processes sharing a name keep taking over: the broker says so."""
    first = agent(ctx, broker, peers, "twin", "dev1", instance="one")
    second = agent(ctx, broker, peers, "twin", "dev1", instance="two")
    assert isinstance(first.register(), P.Registered)
    assert isinstance(second.register(), P.Registered)
    wait_for(lambda: "two agent processes probably use the same name" in broker.log(), 15, "flapping reported")
