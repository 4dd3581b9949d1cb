"""The broker's outbox and inbox against a real ROUTER (bind_router, the broker's own options) and DEALER
peers on inproc: parking in order, congestion, the credit allowance, lost peers, and input checks that
never desync the stream.  Time is the Timers' clock, moved by the test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from conftest import wait_for
from zdut import protocol as P
from zdut.brokerd.inbox import Inbox
from zdut.brokerd.outbox import CONGESTION_S, Outbox, bind_router
from zdut.brokerd.timers import Timers
from zdut.common.logs import Throttle

EP = "inproc://outbox"


class Pair:
    """A ROUTER with an Outbox and an Inbox, and DEALER peers that announce themselves."""

    def __init__(self, hwm: int) -> None:
        self.ctx = zmq.Context()
        self.router = bind_router(self.ctx, EP, hwm, heartbeat_s=1.0)
        self.timers = Timers(100.0)
        self.stats = {"relayed": 0, "dropped": 0, "parked": 0, "late": 0}
        self.sessions = 0
        self.congested: list[tuple[bytes, str, int]] = []
        self.outbox = Outbox(
            self.router, self.timers, self.stats, lambda rid: self.sessions, lambda *a: self.congested.append(a)
        )
        self.inbox = Inbox(self.router, self.stats, Throttle(logging.getLogger("zdut.broker")), self.outbox)
        self.peers: list[zmq.Socket[Any]] = []

    def peer(self, rid: bytes, rcvhwm: int) -> zmq.Socket[Any]:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = rcvhwm
        s.routing_id = rid
        s.connect(EP)
        self.peers.append(s)
        s.send(b"hello")  # the ROUTER knows a peer once it has heard from it
        assert self.router.poll(2000)
        assert self.router.recv_multipart() == [rid, b"hello"]
        return s

    def advance(self, s: float) -> None:
        self.timers.run_due(self.timers.now + s)

    def close(self) -> None:
        for s in self.peers:
            s.close(0)
        self.router.close(0)
        self.ctx.destroy(0)


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(hwm=2)
    yield p
    p.close()


def fill(pair: Pair, rid: bytes, n: int, size: int = 10) -> None:
    """n numbered messages for ``rid``, as the broker relays them: [header][payload]."""
    for i in range(n):
        pair.outbox.send(rid, i.to_bytes(4, "big"), b"x" * size)


def drain_pipe(peer: zmq.Socket[Any]) -> list[int]:
    got = []
    while peer.poll(0):
        got.append(int.from_bytes(peer.recv_multipart()[0], "big"))
    return got


def drain(peer: zmq.Socket[Any], pair: Pair) -> list[int]:
    """Read everything the peer gets, retrying the parked queue as the loop would."""
    got = []
    for _ in range(10_000):
        got += drain_pipe(peer)
        if not pair.outbox.parked:
            break
        pair.advance(0.001)  # the parked-retry timer
    while peer.poll(50):
        got.append(int.from_bytes(peer.recv_multipart()[0], "big"))
    return got


def test_a_full_peer_is_parked_in_order_and_later_messages_queue_behind(pair: Pair) -> None:
    peer = pair.peer(b"slow", rcvhwm=2)
    fill(pair, b"slow", 40)
    assert pair.stats["parked"] > 0 and b"slow" in pair.outbox.parked
    first = drain_pipe(peer)
    pair.router.getsockopt(zmq.EVENTS)  # the ROUTER hears that the pipe has room again ...
    pair.outbox.send(b"slow", (40).to_bytes(4, "big"), b"x")  # ... but this one must wait behind the queue
    assert first + drain(peer, pair) == list(range(41))
    assert not pair.outbox.parked and not pair.congested


def test_a_peer_with_room_is_never_parked(pair: Pair) -> None:
    peer = pair.peer(b"fast", rcvhwm=1000)
    fill(pair, b"fast", 2)
    assert pair.stats["parked"] == 0
    assert drain(peer, pair) == [0, 1]


def test_a_received_payload_frame_goes_out_untouched(pair: Pair) -> None:
    sender, receiver = pair.peer(b"s", rcvhwm=1000), pair.peer(b"r", rcvhwm=1000)
    data = bytes(range(256)) * 4096  # 1 MiB, as a file chunk
    sender.send_multipart([b"header", data])
    assert pair.router.poll(2000) and pair.router.recv() == b"s"
    header, payload = pair.router.recv(), pair.router.recv(copy=False)  # as the inbox takes it
    pair.outbox.send(b"r", b"cid", header, payload)
    assert receiver.poll(2000) and receiver.recv_multipart() == [b"cid", b"header", data]


def test_no_progress_for_congestion_s_gives_the_peer_up(pair: Pair) -> None:
    pair.peer(b"stuck", rcvhwm=2)
    fill(pair, b"stuck", 20)
    queued = len(pair.outbox.parked[b"stuck"].items)
    pair.advance(CONGESTION_S - 0.1)
    assert not pair.congested  # stuck, but not for long enough
    pair.advance(0.2)
    assert pair.congested == [(b"stuck", f"no progress for {CONGESTION_S + 0.1:.1f}s", queued)]
    assert b"stuck" not in pair.outbox.parked


def test_progress_restarts_the_congestion_clock(pair: Pair) -> None:
    peer = pair.peer(b"slow", rcvhwm=2)
    fill(pair, b"slow", 20)
    queued = len(pair.outbox.parked[b"slow"].items)
    pair.advance(CONGESTION_S - 1)
    drain_pipe(peer)  # it reads what it has: a retry makes progress once the ROUTER hears of it

    def retried() -> bool:
        pair.outbox.retry()
        return len(pair.outbox.parked[b"slow"].items) < queued

    wait_for(retried, 5.0, "progress")
    pair.advance(CONGESTION_S - 0.5)
    assert not pair.congested  # 4.5 s since the last progress
    pair.advance(1.0)
    assert [c[0] for c in pair.congested] == [b"slow"]


@pytest.mark.parametrize(("sessions", "allowed"), [(0, 10_000), (1, 30_000), (3, 70_000)])
def test_parked_bytes_beyond_the_credit_allowance_give_the_peer_up(pair: Pair, sessions: int, allowed: int) -> None:
    pair.peer(b"greedy", rcvhwm=2)
    pair.outbox.park_limit = 10_000
    pair.outbox.per_session = 20_000
    pair.sessions = sessions
    for i in range(1000):  # messages of 4 + 1000 bytes, until the outbox gives up
        pair.outbox.send(b"greedy", i.to_bytes(4, "big"), b"x" * 1000)
        if pair.congested:
            break
    [(rid, why, undelivered)] = pair.congested
    assert rid == b"greedy" and why == "0 MiB queued, more than its sessions' credit allows"
    assert (undelivered - 1) * 1004 <= allowed < undelivered * 1004  # the first message over the allowance
    assert b"greedy" not in pair.outbox.parked


def test_an_unknown_peer_is_lost_not_an_exception(pair: Pair) -> None:
    pair.outbox.send(b"nobody", b"header")
    assert pair.outbox.lost == {b"nobody"}
    assert not pair.outbox.parked and pair.stats["parked"] == 0


def test_a_peer_gone_while_parked_is_lost(pair: Pair) -> None:
    peer = pair.peer(b"gone", rcvhwm=2)
    fill(pair, b"gone", 20)
    peer.close(0)
    pair.peers.remove(peer)

    def retried() -> set[bytes]:  # polled as the loop does, the ROUTER notices the closed pipe
        pair.router.poll(0)
        pair.advance(0.01)
        return pair.outbox.lost

    assert wait_for(retried, 5.0, "the peer found gone") == {b"gone"}
    pair.outbox.drop(b"gone")
    assert not pair.outbox.parked


# ---------------------------------------------------------------- inbox


def read_next(pair: Pair) -> tuple[bytes, Any]:
    assert pair.router.poll(2000)
    rid = pair.router.recv()
    return rid, pair.inbox.read(rid, pair.router.recv(copy=False))


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([b"\x91" + b"\xa0" * (P.MAX_HEADER_BYTES + 1)], "exceeds"),
        ([b"\x93garbage"], "undecodable header"),
        ([P.encode(P.Data(1, 1, P.STDOUT))], "Data without its payload frame"),
        ([P.encode(P.Data(1, 1, P.STDOUT)), b"payload", b"extra"], "Data with extra frames"),
        ([P.encode(P.Ping(1, 1)), b"extra"], "Ping with extra frames"),
    ],
)
def test_malformed_input_is_dropped_and_the_stream_stays_in_step(
    pair: Pair, frames: list[bytes], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    peer = pair.peer(b"c", rcvhwm=1000)
    peer.send_multipart(frames)
    peer.send_multipart([P.encode(P.Data(1, 2, P.STDOUT)), b"next"])
    assert read_next(pair) == (b"c", None)
    assert pair.stats["dropped"] == 1 and why in caplog.text
    _, (msg, payload) = read_next(pair)
    assert msg == P.Data(1, 2, P.STDOUT) and payload.bytes == b"next"
