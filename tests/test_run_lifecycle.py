"""The run lifecycle has one close step: clients that open a run and vanish never leave a device in use.

A real ``zdut-agent`` process is hit by hundreds of raw DEALER sockets that each send a ``RunOpen`` for a
real command and close with linger=0 at different moments: at once, right after a ``Cancel``, or once
``RunStarted`` has arrived.  Afterwards the device must be free, usable by another user, and the agent's
session table empty.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import Lab, wait_for
from zdut import protocol as p
from zdut.agentd.locker import Locker
from zdut.agentd.run import AgentRun
from zdut.client import Client
from zdut.common.addresses import endpoint

ATTEMPTS = 240
#: How each attempt ends: (command, args, what the client does before closing its socket).
VARIANTS: list[tuple[str, list[str], str]] = [
    ("wait", ["60s"], "vanish"),
    ("status", [], "vanish"),
    ("wait", ["60s"], "cancel"),
    ("wait", ["60s"], "started"),
    ("status", [], "started"),
    ("upload", [], "started"),
]


def _config(tmp: Path) -> Path:
    cfg = tmp / "lifecycle.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  board:\n    cmds:\n"
        "      wait:\n        uses:\n          - module: time-wait\n            passthrough: true\n"
        "      status:\n        uses:\n          - module: dummy-status\n"
        "      upload:\n        uses:\n          - module: dummy-ft\n            args: [in.bin, out.bin]\n"
    )
    return cfg


def _recv(sock: zmq.Socket[Any], timeout_ms: int = 5000) -> p.Message:
    assert sock.poll(timeout_ms), "no reply from the agent"
    return p.decode(sock.recv_multipart()[0])


def _open_and_vanish(ctx: zmq.Context[Any], ep: str, sid: int, variant: tuple[str, list[str], str]) -> None:
    command, args, how = variant
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(ep)
    try:
        sock.send(p.encode(p.Hello(1, p.VERSION, "alice")))  # the connection is up once Welcome arrives
        assert isinstance(_recv(sock), p.Welcome)
        sock.send(p.encode(p.RunOpen(sid, p.VERSION, "alice", "board", command, args)))
        if how == "cancel":
            sock.send(p.encode(p.Cancel(sid, 1)))
        elif how == "started":
            while not isinstance(msg := _recv(sock), p.RunStarted | p.Done):
                pass
            assert isinstance(msg, p.RunStarted), msg
    finally:
        sock.close(linger=0)


def _busy(addr: str) -> Any:
    async def listing() -> Any:
        async with Client(addr, "observer") as client:
            return {d.name: d.lock for d in await client.list()}["board"]

    return asyncio.run(listing())


@pytest.mark.parametrize("via", ["direct", "broker"])
def test_open_and_vanish_never_leaves_the_device_in_use(lab: Lab, ctx: zmq.Context[Any], via: str) -> None:
    """Direct, the agent finds the client gone when it sends; through a broker, the broker tells it (SessionGone)
    or the session's keepalive runs out."""
    config = _config(lab.tmp)
    if via == "direct":
        agent, addr = lab.agent(config)
    else:
        _, addr = lab.broker()
        agent = lab.brokered_agent(config, addr)
    ep = endpoint(addr)
    for i in range(ATTEMPTS):
        _open_and_vanish(ctx, ep, i + 1, VARIANTS[i % len(VARIANTS)])
    holds: list[Any] = []
    try:
        wait_for(lambda: holds.append(_busy(addr)) or holds[-1] is None, 20, "the board to be free again")
    except AssertionError:
        errors = [line for line in agent.text().splitlines() if "error handling" in line or "Error:" in line]
        raise AssertionError(f"board still held: {holds[-1]}; agent errors: {errors[:3]} "
                             f"({len(errors)} in all)") from None
    r = lab.zdut("-s", addr, "-u", "bob", "board", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    assert "Hello from dummy status module" in r.stdout
    assert agent.stop() == 0
    assert "draining 0 running commands" in agent.text()


def _run(**kw: Any) -> tuple[AgentRun, Locker, list[p.Message], list[AgentRun]]:
    sent: list[p.Message] = []
    closed: list[AgentRun] = []
    locker = Locker({"dev"})

    def send(header: bytes, payload: Any = None) -> None:
        if kw.get("peer_gone"):
            raise p.ZdutError(p.Code.UNAVAILABLE, "peer is gone")
        sent.append(p.decode(header))

    return AgentRun(1, send, "dev", "cmd", "u", locker, on_close=closed.append), locker, sent, closed


def test_cancel_before_the_task_ran_still_releases_the_hold() -> None:
    """A Cancel in the same burst as the RunOpen cancels a task that never ran a step: its close must run."""

    async def main() -> None:
        run, locker, sent, closed = _run()

        async def body(session: AgentRun) -> None:
            await asyncio.sleep(60)

        run.start(False, body)
        assert locker.state("dev") is not None
        run.cancel(p.ZdutError(p.Code.CANCELED, "canceled by the client"))
        assert run.task is not None
        await asyncio.wait({run.task}, timeout=1)
        await asyncio.sleep(0)  # done callbacks run one loop step later
        assert locker.state("dev") is None and closed == [run]
        done = sent[-1]
        assert isinstance(done, p.Done) and done.code == p.Code.CANCELED

    asyncio.run(main())


def test_a_peer_gone_before_run_started_releases_the_hold() -> None:
    async def main() -> None:
        run, locker, _, closed = _run(peer_gone=True)
        ran: list[bool] = []

        async def body(session: AgentRun) -> None:
            ran.append(True)

        run.start(False, body)
        assert run.task is not None
        await asyncio.wait({run.task}, timeout=1)
        await asyncio.sleep(0)
        assert locker.state("dev") is None and closed == [run] and not ran

    asyncio.run(main())


def test_a_refused_run_takes_no_hold_and_says_why() -> None:
    async def main() -> None:
        run, locker, sent, closed = _run()
        locker.lock("dev", "someone-else", 60)

        async def body(session: AgentRun) -> None:
            raise AssertionError("must not run")

        run.start(False, body)
        assert run.task is None and closed == [run]
        done = sent[-1]
        assert isinstance(done, p.Done) and done.code == p.Code.FAILED_PRECONDITION
        held = locker.state("dev")
        assert held is not None and held.owner == "someone-else"

    asyncio.run(main())

