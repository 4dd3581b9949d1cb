"""The broker's session and pending tables and its timers, as plain logic: the messages every kind of end
sends to each side, and nothing more.  The socket side is a list of what would have been written."""

from __future__ import annotations

from typing import Any

import pytest

from zdut import protocol as P
from zdut.brokerd.registry import Agent
from zdut.brokerd.sessions import Sessions
from zdut.brokerd.timers import Coalesced, Timers


class Wire:
    """What the tables write: (peer, decoded message), for clients and agents alike."""

    def __init__(self) -> None:
        self.out: list[tuple[str, Any]] = []

    def send(self, rid: bytes, header: bytes) -> None:
        self.out.append((rid.decode(), P.decode(header)))

    def to_agent(self, agent: Agent, cid: bytes, header: bytes) -> None:
        assert cid == b""  # the tables only ever write control messages to agents
        self.out.append((agent.name, P.decode(header)))


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def tables(wire: Wire) -> Sessions:
    return Sessions(wire.send, wire.to_agent)


A, B = Agent("a", rid=b"ra"), Agent("b", rid=b"rb")


def test_open_get_and_end_keep_every_index_in_step(tables: Sessions, wire: Wire) -> None:
    s1 = tables.open(b"c1", 1, A, "dev1", 10.0)
    s2 = tables.open(b"c1", 2, B, "dev2", 10.0)
    assert tables.get((b"c1", 1)) is s1 and (b"c1", 2) in tables and len(tables) == 2
    assert (tables.count(A, b"ra"), tables.count(None, b"c1")) == (1, 2)
    tables.end(s1)
    assert tables.get((b"c1", 1)) is None and sorted(tables) == [(b"c1", 2)]
    assert (tables.count(A, b"ra"), tables.count(None, b"c1")) == (0, 1)
    tables.end(s1)  # twice is harmless
    assert wire.out == []  # a quiet end: both sides already know
    tables.end(s2)
    assert not tables._by_client and not tables._by_agent  # no empty index entries left behind


def test_fail_tells_both_sides_after_the_last_seq(tables: Sessions, wire: Wire) -> None:
    sess = tables.open(b"c1", 7, A, "dev1", 10.0)
    sess.down_seq = 41
    tables.fail(sess, P.Code.ABORTED, "why")
    assert wire.out == [("c1", P.Done(7, 42, P.Code.ABORTED, "why")), ("a", P.SessionGone(b"c1", 7))]
    assert len(tables) == 0


def test_end_agent_ends_its_sessions_and_pending_requests_only(tables: Sessions, wire: Wire) -> None:
    tables.open(b"c1", 1, A, "dev1", 10.0)
    tables.open(b"c2", 1, A, "dev1", 10.0)
    tables.open(b"c1", 2, B, "dev2", 10.0)
    tables.await_reply(b"c3", 5, A, 99.0)
    tables.await_reply(b"c3", 6, B, 99.0)
    tables.end_agent(A, 'agent "a" went offline')
    gone = P.Code.UNAVAILABLE, 'agent "a" went offline'
    assert sorted(wire.out, key=repr) == sorted(
        [("c1", P.Done(1, 1, *gone)), ("c2", P.Done(1, 1, *gone)), ("c3", P.Error(5, *gone))], key=repr
    )
    assert sorted(tables) == [(b"c1", 2)] and tables.pending == 1


def test_end_client_tells_each_agent_and_forgets_its_requests(tables: Sessions, wire: Wire) -> None:
    tables.open(b"c1", 1, A, "dev1", 10.0)
    tables.open(b"c1", 2, B, "dev2", 10.0)
    tables.open(b"c2", 1, A, "dev1", 10.0)
    tables.await_reply(b"c1", 5, A, 99.0)
    tables.end_client(b"c1")
    assert sorted(wire.out, key=repr) == [("a", P.SessionGone(b"c1", 1)), ("b", P.SessionGone(b"c1", 2))]
    assert sorted(tables) == [(b"c2", 1)] and tables.pending == 0


def test_a_reply_is_taken_once_and_only_from_the_agent_asked(tables: Sessions) -> None:
    tables.await_reply(b"c1", 5, A, 99.0)
    assert not tables.take_reply(b"c1", 5, B)  # another agent cannot answer for A
    assert not tables.take_reply(b"c1", "5", A)  # nor a rid of the wrong type
    assert tables.take_reply(b"c1", 5, A)
    assert not tables.take_reply(b"c1", 5, A)


def test_idle_sessions_and_old_requests_expire_at_their_limits(tables: Sessions, wire: Wire) -> None:
    tables.open(b"c1", 1, A, "dev1", 10.0)
    tables.open(b"c1", 2, A, "dev1", 15.0)
    tables.await_reply(b"c1", 5, A, 20.0)
    tables.end_idle(22.0, 12.0)
    tables.expire_pending(20.0)
    assert len(tables) == 2 and tables.pending == 1 and wire.out == []  # exactly at the limit: still alive
    tables.end_idle(22.5, 12.0)
    tables.expire_pending(20.5)
    message = "no message either way for 12s: session ended by the broker"
    assert wire.out == [("c1", P.Done(1, 1, P.Code.UNAVAILABLE, message)), ("a", P.SessionGone(b"c1", 1))]
    assert tables.get((b"c1", 1)) is None and len(tables) == 1 and tables.pending == 0


# ---------------------------------------------------------------- timers


def test_timers_run_due_callbacks_in_deadline_order() -> None:
    timers = Timers(0.0)
    ran: list[str] = []
    timers.at(2.0, lambda: ran.append("late"))
    timers.after(1.0, lambda: ran.append("early"))
    timers.at(1.0, lambda: ran.append("tie, set second"))
    assert timers.wait_s(0.5, 10.0) == 0.5 and timers.wait_s(0.5, 0.1) == 0.1
    timers.run_due(0.99)
    assert ran == []
    timers.run_due(1.5)
    assert ran == ["early", "tie, set second"] and timers.now == 1.5
    timers.run_due(5.0)
    assert ran[-1] == "late" and timers.wait_s(5.0, 3.0) == 3.0


def test_a_repeating_timer_counts_from_when_it_ran() -> None:
    timers = Timers(0.0)
    ticks: list[float] = []
    timers.every(1.0, lambda: ticks.append(timers.now))
    timers.run_due(1.0)
    timers.run_due(3.5)  # late: one run, not a burst of catch-ups
    timers.run_due(4.0)
    timers.run_due(4.5)
    assert ticks == [1.0, 3.5, 4.5]


def test_coalesced_requests_make_one_run_until_it_has_run() -> None:
    timers = Timers(0.0)
    runs: list[float] = []
    soon = Coalesced(timers, 0.2, lambda: runs.append(timers.now))
    soon.request()
    timers.run_due(0.1)
    soon.request()  # already due: no second run, and no later deadline
    timers.run_due(0.2)
    timers.run_due(1.0)
    assert runs == [0.2]
    soon.request()  # after the run, a new request is a new run
    timers.run_due(1.2)
    assert runs == [0.2, 1.2]
