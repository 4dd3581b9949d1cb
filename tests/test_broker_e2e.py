"""The real broker with real zdut-agent processes (the client side is a raw DEALER; the CLI suite is elsewhere)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_broker_system import USER, Broker, Client

from conftest import CONF, Lab, Proc, exe, wait_for
from zdut import protocol as P


@pytest.fixture
def broker(lab: Lab, tmp_path: Path) -> Broker:
    return Broker(lab, tmp_path / "broker.sqlite3")


@pytest.fixture
def client(ctx: zmq.Context[Any], broker: Broker) -> Iterator[Client]:
    c = Client(ctx, broker.ep)
    yield c
    c.close()


def start_agent(lab: Lab, broker: Broker, config: str, name: str) -> Proc:
    return lab.spawn(
        [
            exe("zdut-agent"),
            "-c",
            str(CONF / config),
            "--server",
            f"127.0.0.1:{broker.port}",
            "--name",
            name,
            "--log",
            "debug",
        ],
        f"agent-{name}",
    )


def online(c: Client) -> dict[str, bool]:
    return {d.name: d.online for d in c.devices()}


def run(c: Client, sid: int, device: str, command: str, args: list[str] | None = None) -> list[Any]:
    """A whole Run session: every message until Done."""
    c.send(P.RunOpen(sid, P.VERSION, USER, device, command, args or []))
    out = []
    while True:
        msg, payload = c.recv(10)
        out.append((msg, payload))
        if isinstance(msg, P.Done):
            return out


def test_real_agents_register_and_serve(lab: Lab, broker: Broker, client: Client) -> None:
    start_agent(lab, broker, "config-1.yaml", "agent-one")
    start_agent(lab, broker, "config-2.yaml", "agent-two")
    wait_for(lambda: online(client) == {"device1": True, "device2": True}, 20, "both agents registered")
    assert [(a.name, a.devices) for a in client.agents()] == [("agent-one", ["device1"]), ("agent-two", ["device2"])]
    out = run(client, 1, "device1", "status", ["x"])
    text = b"".join(p for m, p in out if isinstance(m, P.Data))
    assert text == b"Hello from dummy status module\nCalled with 1 arguments\nArg 0: x\n"
    assert out[-1][0].code == ""
    assert client.call(lambda r: P.ListCommands(r, P.VERSION, USER, "device2")) == P.CommandList(
        client.rid, ["repeat", "status"], ["Repeat input", "Report status"]
    )
    lock = client.call(lambda r: P.Lock(r, P.VERSION, "alice", "device2", 600))
    assert isinstance(lock, P.LockResult) and lock.lock.owner == "alice"
    wait_for(lambda: client.devices()[1].lock == lock.lock, 5, "lock copy in the broker's listing")
    done = run(client, 2, "device2", "status")[-1][0]
    assert (done.code, done.message) == (P.Code.FAILED_PRECONDITION, 'device "device2" is locked by "alice" for 10m')
    assert client.call(lambda r: P.Unlock(r, P.VERSION, "alice", "device2", False)) == P.Unlocked(client.rid)
    wait_for(lambda: client.devices()[1].lock is None, 5, "unlock copy")


def test_agent_killed_mid_session(lab: Lab, broker: Broker, client: Client) -> None:
    agent = start_agent(lab, broker, "config-2.yaml", "agent-two")
    wait_for(lambda: online(client).get("device2"), 20, "agent registered")
    client.send(P.RunOpen(1, P.VERSION, USER, "device2", "repeat", []))
    assert isinstance(client.recv(10)[0], P.RunStarted)
    agent.kill(signal.SIGKILL)
    started = time.monotonic()
    while True:
        msg, _ = client.recv(5)
        if isinstance(msg, P.Done):
            break
    assert time.monotonic() - started < 5
    assert (msg.code, msg.message) == (P.Code.UNAVAILABLE, 'agent "agent-two" went offline')
    assert online(client) == {"device2": False}


def test_agents_reregister_after_broker_crash(lab: Lab, broker: Broker, client: Client) -> None:
    start_agent(lab, broker, "config-1.yaml", "agent-one")
    wait_for(lambda: online(client) == {"device1": True}, 20, "agent registered")
    broker.proc.kill(signal.SIGKILL)
    broker.proc.popen.wait(10)
    broker.start(broker.port)  # same port, same state file
    assert client.hello(10).role == "broker"
    wait_for(lambda: online(client) == {"device1": True}, 20, "agent registered again by itself")


def test_refusal_names_the_holder_and_restart_takes_over(lab: Lab, broker: Broker, client: Client) -> None:
    first = start_agent(lab, broker, "config-1.yaml", "agent-one")
    wait_for(lambda: online(client) == {"device1": True}, 20, "agent registered")
    other = start_agent(lab, broker, "config-1.yaml", "agent-other")
    holder = 'device "device1" is already registered by agent "agent-one" (online)'
    wait_for(lambda: holder in other.text(), 20, "refusal in the other agent's log")
    assert re.search(r'refused registration of agent "agent-other".*' + re.escape(holder), broker.log())
    other.stop()
    first.kill(signal.SIGKILL)
    start_agent(lab, broker, "config-1.yaml", "agent-one")  # the same agent comes back
    wait_for(lambda: broker.log().count('agent "agent-one" registered') == 2, 20, "re-registration")
    assert "(restarted)" in broker.log() or "(takeover from its previous connection)" in broker.log()
    wait_for(lambda: online(client) == {"device1": True}, 20, "back online")
    out = run(client, 1, "device1", "status")
    assert out[-1][0].code == ""
