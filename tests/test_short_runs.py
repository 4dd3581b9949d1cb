"""What a short run costs on the wire: a command opened with no input, and busy holds brokers never hear of.

``Lab.run`` without stdin says so in its ``RunOpen`` (``stdin_closed``), so no ``StdinEof`` follows; an agent from
before that field ignores it, says nothing in ``RunStarted``, and the client sends the ``StdinEof`` itself.  An
agent announces a busy hold to its brokers only once the hold has lasted ``BUSY_ANNOUNCE_S``: a short run costs
them no message, a long one is listed as busy and then free.  Real ``zdut-agent`` processes, raw pyzmq peers
in the broker's and the old agent's place.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import zmq

from conftest import Lab, free_port, wait_for
from zdut import protocol as p
from zdut.agentd.agent import BUSY_ANNOUNCE_S
from zdut.api import Lab as ApiLab
from zdut.client import Client


def _config(tmp: Path) -> Path:
    cfg = tmp / "short.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  board:\n    cmds:\n"
        "      status:\n        uses:\n          - module: dummy-status\n"
        "      repeat:\n        uses:\n          - module: dummy-repeat\n"
        "      wait:\n        uses:\n          - module: time-wait\n            passthrough: true\n"
    )
    return cfg


def _recv(sock: zmq.Socket[Any], timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


def test_a_run_opened_with_stdin_closed_reads_eof_at_once_and_says_so(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """dummy-repeat reads stdin until EOF: with ``stdin_closed`` and no StdinEof it must end at once."""
    _, addr = lab.agent(_config(lab.tmp))
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{addr}")
    sock.send(p.encode(p.RunOpen(1, p.VERSION, "alice", "board", "repeat", [], "", stdin_closed=True)))
    seen: list[p.Message] = []
    while not seen or not isinstance(seen[-1], p.Done):
        seen.append(p.decode(_recv(sock)[0]))
    started, done = seen[0], seen[-1]
    assert isinstance(started, p.RunStarted) and started.stdin_closed, seen
    assert isinstance(done, p.Done) and done.message == "module failed: EOF", seen


def test_the_client_sends_eof_itself_to_an_agent_that_ignores_stdin_closed(ctx: zmq.Context[Any]) -> None:
    """An agent from before the field (a raw ROUTER here) answers RunStarted without it: StdinEof follows."""
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    got: list[p.Message] = []

    def old_agent() -> None:
        while True:
            peer, header = _recv(router)[:2]
            msg = p.decode(header)
            got.append(msg)
            if isinstance(msg, p.Hello):
                router.send_multipart([peer, p.encode(p.Welcome(msg.rid, p.VERSION, "agent", "old"))])
            elif isinstance(msg, p.RunOpen):
                router.send_multipart([peer, p.encode(p.RunStarted(msg.sid, 1, False))])
            elif isinstance(msg, p.StdinEof):
                router.send_multipart([peer, p.encode(p.Done(msg.sid, 2, "", ""))])
                return

    thread = threading.Thread(target=old_agent, daemon=True)
    thread.start()

    async def go() -> None:
        async with Client(f"127.0.0.1:{port}", "alice") as client:
            run = client.run("board", "status", [], stdin_closed=True)
            async with asyncio.timeout(5):
                await run.wait()

    asyncio.run(go())
    thread.join(5)
    opened = next(m for m in got if isinstance(m, p.RunOpen))
    assert opened.stdin_closed
    assert [type(m) for m in got if isinstance(m, p.SESSION)] == [p.StdinEof], got
    router.close()


class _FakeBroker:
    """A ROUTER an agent registers with; it records every LockChanged the agent sends."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.address = f"127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.changes: list[p.LockChanged] = []
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            msg = p.decode(frames[2])
            if isinstance(msg, p.Register):
                self.sock.send_multipart([frames[0], b"", p.encode(p.Registered("fake", p.VERSION, 60_000))])
                self.registered.set()
            elif isinstance(msg, p.LockChanged):
                self.changes.append(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_short_runs_cost_a_broker_nothing_and_a_long_one_is_listed_busy_then_free(
        lab: Lab, ctx: zmq.Context[Any]) -> None:
    broker = _FakeBroker(ctx)
    try:
        port = free_port()
        lab.agent(_config(lab.tmp), port, "--server", broker.address)
        assert broker.registered.wait(10), "the agent never registered"
        with ApiLab(f"127.0.0.1:{port}", user="alice") as api:
            for _ in range(20):
                assert "Hello from dummy status module" in api.run("board", "status").text
            # a long run: the broker hears of its busy hold once it has lasted BUSY_ANNOUNCE_S, then of its end
            with api.open("board", "wait", "60s") as console:
                console.expect("Waiting for", timeout=10)
                wait_for(lambda: broker.changes, 10 + BUSY_ANNOUNCE_S, "the busy hold to be announced")
        wait_for(lambda: len(broker.changes) >= 2, 10, "the end of the hold to be announced")
        held, freed = broker.changes[:2]
        assert held.device == "board" and held.lock is not None and held.lock.owner == "alice", broker.changes
        assert held.lock.expires_at == 0 and freed.lock is None, broker.changes  # nothing for the 20 short runs
        assert len(broker.changes) == 2, broker.changes
    finally:
        broker.close()
