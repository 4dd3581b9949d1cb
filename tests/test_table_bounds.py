"""Tables that used to grow for ever (issue 10, point 7): offline agents in the broker, its takeover
history, and the shell's help-text cache."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
import zmq

from conftest import Lab, wait_for
from zdut import broker as B
from zdut import protocol as P
from zdut.brokerd import membership
from zdut.brokerd.registry import MAX_OFFLINE_AGENTS, Registry
from zdut.protocol import DeviceInfo
from zdut.terminal.shell_view import MAX_HELP_CHARS, MAX_HELP_TEXT, MAX_HELPS, LabView


def registration(
    name: str, device: str, locks: dict[str, P.LockState] | None = None, help_text: str = ""
) -> P.Register:
    entry = P.DeviceEntry(device, [P.CommandInfo("status", help_text)])
    return P.Register(P.VERSION, name, f"{name}-instance", "", [entry], locks or {})


def register(name: str, device: str, locks: dict[str, P.LockState] | None = None) -> bytes:
    return P.encode(registration(name, device, locks))


def registered(sock: zmq.Socket[Any], timeout_ms: int = 5000) -> P.Message:
    assert sock.poll(timeout_ms), "no answer to Register"
    frames = sock.recv_multipart()
    assert frames[0] == b"", frames
    return P.decode(frames[1])


def test_offline_agents_are_bounded_oldest_first_locked_last(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """One raw connection renames itself MAX_OFFLINE_AGENTS + 50 times: each name it leaves goes offline."""
    proc, broker = lab.broker(heartbeat=2.0)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{broker}")
    held = P.LockState("alice", int(time.time()), int(time.time()) + 3600)
    sock.send_multipart([b"", register("keeper", "keeper-dev", {"keeper-dev": held})])
    assert isinstance(registered(sock), P.Registered)
    total = MAX_OFFLINE_AGENTS + 50
    for i in range(total):
        sock.send_multipart([b"", register(f"fake{i:04d}", f"dev{i:04d}")])
        assert isinstance(registered(sock), P.Registered)
    r = lab.zdut("-s", broker, "-f", "json", "agents")
    assert r.returncode == 0, r.stderr
    agents = {a["Name"]: a for a in json.loads(r.stdout)["data"]}
    offline = [n for n, a in agents.items() if not a["Online"]]
    assert len(offline) == MAX_OFFLINE_AGENTS
    assert "keeper" in offline  # the oldest, but it holds a lock
    assert f"fake{total - 1:04d}" in agents and agents[f"fake{total - 1:04d}"]["Online"]
    assert "fake0000" not in agents and "fake0049" not in agents  # seen longest ago: evicted first
    assert "fake0050" in agents
    state = lab.tmp / f"broker-{broker.rpartition(':')[2]}.sqlite3"

    def stored() -> int:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=2)
        try:
            return int(db.execute("SELECT count(*) FROM agents").fetchone()[0])
        finally:
            db.close()

    wait_for(lambda: stored() == MAX_OFFLINE_AGENTS + 1, 10, "the state file to match the registry")
    assert 'forgetting offline agent "fake0000"' in proc.text()
    assert proc.alive()


def test_offline_agents_are_bounded_in_bytes() -> None:
    t = [1000.0]
    reg = Registry(1.0, lambda: t[0], lambda: t[0], max_offline_bytes=1 << 20)
    rid = b"conn"
    for i in range(40):  # ~64 KiB of help text each: past 1 MiB after 16 of them
        t[0] += 1
        reg.register(rid, registration(f"big{i}", f"dev{i}", help_text="h" * (64 << 10)))
    offline = [a for a in reg.agents.values() if not a.online]
    assert 14 <= len(offline) <= 16
    assert reg._offline_bytes <= 1 << 20
    assert "big0" not in reg.agents and "big38" in reg.agents and "dev0" not in reg.devices
    assert reg.deleted >= {"big0", "big1"}  # gone from the state file too


def test_agents_going_offline_at_the_bound_cost_one_eviction_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm of agents going offline at the bound stays linear: each eviction looks at a few offline agents,
    not at all of them (before: every one, each time, which took over half the broker's time in a storm of
    10,000 agents in bench/bench_scale.py)."""
    t = [1000.0]
    reg = Registry(1.0, lambda: t[0], lambda: t[0], max_offline=100)
    lock = P.LockState("alice", 1000, 10**10)
    for i in range(5):  # the oldest offline agents hold locks: they are passed over, and kept
        reg.register(f"conn-locked{i}".encode(), registration(f"locked{i}", f"ldev{i}", {f"ldev{i}": lock}))
        reg.offline(reg.agents[f"locked{i}"])
    looked = [0]
    current_lock = reg._current_lock

    def counted(*args: Any) -> Any:
        looked[0] += 1
        return current_lock(*args)

    monkeypatch.setattr(reg, "_current_lock", counted)
    for i in range(1000):
        reg.register(f"conn{i}".encode(), registration(f"agent{i}", f"dev{i}"))
        reg.offline(reg.agents[f"agent{i}"])
    assert len([a for a in reg.agents.values() if not a.online]) == 100
    assert all(f"locked{i}" in reg.agents for i in range(5)) and "agent0" not in reg.agents
    assert looked[0] <= 10 * 1000, looked[0]  # the 5 locked ones and the one evicted, per agent; before: ~100,000


def test_takeover_history_is_forgotten() -> None:
    """Every name taken over leaves a trace for the flapping check: kept FLAP_WINDOW_S, not for ever."""
    ctx = zmq.Context()
    now = [5000.0]
    broker = B.Broker("inproc://bounds", None, heartbeat_s=1000.0, ctx=ctx, mono=lambda: now[0])
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (a, b):
            s.linger = 0
            s.connect("inproc://bounds")
        for i in range(50):
            for s in (a, b):
                s.send_multipart([b"", register(f"twin{i}", f"twin{i}-dev")])
                deadline = time.monotonic() + 5
                while not s.poll(0):
                    assert time.monotonic() < deadline, "no answer to Register"
                    broker.serve_once(0.01)
                assert isinstance(P.decode(s.recv_multipart()[1]), P.Registered)
        takeovers = broker._members._takeovers
        assert len(takeovers) == 50
        now[0] += membership.FLAP_WINDOW_S + 2
        deadline = time.monotonic() + 5
        while takeovers and time.monotonic() < deadline:
            broker.serve_once(0.01)
        assert not takeovers
    finally:
        a.close()
        b.close()
        broker.close()
        ctx.term()


def test_shell_help_cache_is_bounded() -> None:
    view = LabView()
    for i in range(MAX_HELPS + 500):
        view.helps[(f"dev{i % 50}", f"cmd{i}")] = "usage: cmd FILE\n" * 20
    assert len(view.helps) == MAX_HELPS
    view.helps[("dev0", "recent")] = "kept"
    for i in range(MAX_HELP_CHARS // MAX_HELP_TEXT + 10):  # texts at the per-text limit and beyond it
        view.helps.get(("dev0", "recent"))  # used all along: least recently used goes first, not this one
        view.helps[("huge", f"cmd{i}")] = "x" * (2 * MAX_HELP_TEXT)
    assert view.helps.chars <= MAX_HELP_CHARS
    assert len(view.helps.get(("huge", "cmd12"))) == MAX_HELP_TEXT
    assert view.helps.get(("dev0", "recent")) == "kept"
    # A device that leaves the lab takes its help texts with it.
    view.update([DeviceInfo("huge"), DeviceInfo("dev0")], "me", 0.0)
    view.update([DeviceInfo("dev0")], "me", 0.0)
    assert view.helps.get(("huge", "cmd12")) == ""
