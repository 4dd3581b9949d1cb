"""The broker loop in-process on real inproc sockets and a fake clock: parking under backpressure,
congestion, idle sessions, heartbeats.  Deterministic: no wall-clock waits beyond polling deadlines."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from zdut import broker as B
from zdut import protocol as P
from zdut.brokerd import outbox

USER = "tester"


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A Broker on inproc plus raw peers, all driven from the test thread."""

    def __init__(self, heartbeat_s: float = 10.0, hwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.clock = Clock()
        self.broker = B.Broker(
            "inproc://broker",
            None,
            heartbeat_s=heartbeat_s,
            hwm=hwm,
            ctx=self.ctx,
            mono=self.clock,
            wall=lambda: 1e9 + self.clock.t,
        )
        self.socks: list[zmq.Socket[Any]] = []

    def dealer(self, rcvhwm: int = 1000) -> zmq.Socket[Any]:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = rcvhwm
        s.connect("inproc://broker")
        self.socks.append(s)
        return s

    def pump(self, cond: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        """Run the broker loop until ``cond()`` is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.clock.t += 0.001  # time passes (parked retries are timers)
            self.broker.serve_once(0.005)
            got = cond()
            if got:
                return got
        raise AssertionError(f"timed out waiting for {what}")

    def advance(self, s: float) -> None:
        self.clock.t += s
        self.broker.serve_once(0)

    def recv(self, sock: zmq.Socket[Any], what: str = "a message") -> list[bytes]:
        return self.pump(lambda: sock.recv_multipart() if sock.poll(0) else None, what)

    def recv_msg(self, sock: zmq.Socket[Any], what: str) -> Any:
        """The next message on an agent socket that is not a broker Heartbeat."""
        while True:
            frames = self.recv(sock, what)
            msg = P.decode(frames[1])
            if not isinstance(msg, P.Heartbeat):
                return frames[0], msg

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.broker.close()
        self.ctx.destroy(0)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(hwm=4)
    yield r
    r.close()


def setup_session(rig: Rig, client_rcvhwm: int = 1000) -> tuple[zmq.Socket[Any], zmq.Socket[Any], bytes]:
    agent = rig.dealer()
    agent.send_multipart([b"", P.encode(P.Register(P.VERSION, "a", "i", "", [P.DeviceEntry("dev1", [])], {}))])
    assert isinstance(P.decode(rig.recv(agent, "Registered")[1]), P.Registered)
    client = rig.dealer(client_rcvhwm)
    client.send(P.encode(P.RunOpen(1, P.VERSION, USER, "dev1", "cmd", [])))
    cid, header = rig.recv(agent, "RunOpen")
    assert isinstance(P.decode(header), P.RunOpen)
    return agent, client, cid


def test_full_client_pipe_parks_in_order_then_drains(rig: Rig) -> None:
    agent, client, cid = setup_session(rig, client_rcvhwm=2)
    n = 300
    for seq in range(1, n + 1):
        agent.send_multipart([cid, P.encode(P.Data(1, seq, P.STDOUT)), seq.to_bytes(4, "big")])
    rig.pump(lambda: rig.broker.stats["parked"] > 0, "parking")
    got = []
    while len(got) < n:
        header, payload = rig.recv(client, f"message {len(got) + 1}")
        msg = P.decode(header)
        assert msg.seq == len(got) + 1 and int.from_bytes(payload, "big") == msg.seq
        got.append(msg)
    rig.pump(lambda: not rig.broker._outbox.parked, "parked queue drained")


def test_stuck_client_fails_its_sessions(rig: Rig) -> None:
    agent, _client, cid = setup_session(rig, client_rcvhwm=2)
    for seq in range(1, 50):
        agent.send_multipart([cid, P.encode(P.Data(1, seq, P.STDOUT)), b"x" * 100])
    rig.pump(lambda: rig.broker._outbox.parked, "parking")
    rig.advance(outbox.CONGESTION_S + 1)  # the client reads nothing: no progress
    assert rig.recv_msg(agent, "SessionGone") == (b"", P.SessionGone(cid, 1))
    assert not rig.broker._outbox.parked and not rig.broker._sessions


def test_idle_session_is_ended_at_both_ends(rig: Rig) -> None:
    agent, client, cid = setup_session(rig)
    agent.send_multipart([cid, P.encode(P.RunStarted(1, 1, False))])
    assert P.decode(rig.recv(client)[0]) == P.RunStarted(1, 1, False)
    rig.advance(B.SESSION_IDLE_S - 0.5)
    assert rig.broker._sessions
    rig.advance(1.5)
    assert P.decode(rig.recv(client, "Done")[0]) == P.Done(
        1, 2, P.Code.UNAVAILABLE, f"no message either way for {B.SESSION_IDLE_S:g}s: session ended by the broker"
    )
    assert rig.recv_msg(agent, "SessionGone") == (b"", P.SessionGone(cid, 1))


def test_unanswered_lock_is_forgotten(rig: Rig) -> None:
    agent, client, _ = setup_session(rig)
    client.send(P.encode(P.Lock(9, P.VERSION, USER, "dev1", 0)))
    rig.recv(agent, "Lock")
    assert rig.broker._sessions.pending == 1
    rig.advance(B.PENDING_TIMEOUT_S + 2)
    assert rig.broker._sessions.pending == 0


def test_heartbeats_only_when_idle_and_expiry() -> None:
    rig = Rig(heartbeat_s=1.0)
    try:
        agent = rig.dealer()
        agent.send_multipart([b"", P.encode(P.Register(P.VERSION, "a", "i", "", [P.DeviceEntry("d", [])], {}))])
        rig.recv(agent, "Registered")
        rig.advance(0.5)
        assert not agent.poll(0)  # it just heard from the broker
        rig.advance(0.6)
        frames = rig.recv(agent, "Heartbeat")
        assert P.decode(frames[1]) == P.Heartbeat()
        agent.send_multipart([b"", P.encode(P.Heartbeat())])
        rig.pump(lambda: rig.broker.registry.agents["a"].last_rx == rig.clock.t, "heartbeat received")
        rig.advance(2.9)
        assert rig.broker.registry.agents["a"].online
        rig.advance(0.3)  # housekeeping runs every heartbeat/4 (capped at 0.25 s)
        assert not rig.broker.registry.agents["a"].online
    finally:
        rig.close()


def test_peer_ignoring_credit_is_cut_off(rig: Rig) -> None:
    """Parked bytes beyond what the sessions' credit windows allow mean the sender ignores credit."""
    rig.broker._outbox.park_limit = 10_000
    rig.broker._outbox.per_session = 20_000
    agent, _client, cid = setup_session(rig, client_rcvhwm=2)
    for seq in range(1, 100):  # ~100 KiB towards a client with one session: 30 KiB allowed
        agent.send_multipart([cid, P.encode(P.Data(1, seq, P.STDOUT)), b"x" * 1000])
    assert rig.recv_msg(agent, "SessionGone") == (b"", P.SessionGone(cid, 1))
    assert not rig.broker._outbox.parked and not rig.broker._sessions
