"""Hostile peers against a real agent and a real client: credit is enforced by the receiver, and a flood of
garbage becomes a handful of log lines, never a flood of them.

The attackers are raw pyzmq sockets: a DEALER that ignores the stdin window it was given, a DEALER that
sends frames no zdut peer would, and a ROUTER posing as an agent that ignores the credit the real
``Client`` granted it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from conftest import Lab, free_port, peak_rss_mb, wait_for
from zdut import protocol as p
from zdut.client import Client, RunHandler
from zdut.common.addresses import endpoint

MB = 1024 * 1024


def _config(tmp: Path) -> Path:
    cfg = tmp / "limits.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  board:\n    cmds:\n"
        "      wait:\n        uses:\n          - module: time-wait\n            passthrough: true\n"
        "      status:\n        uses:\n          - module: dummy-status\n"
        "  other:\n    cmds:\n      status:\n        uses:\n          - module: dummy-status\n"
    )
    return cfg


def _dealer(ctx: zmq.Context[Any], addr: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint(addr))
    return sock


def _until(sock: zmq.Socket[Any], want: type, timeout_s: float = 10.0) -> Any:
    """Read messages until one of type ``want`` arrives (failing the test after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            msg = p.decode(sock.recv_multipart()[0])
            if isinstance(msg, want):
                return msg
    raise AssertionError(f"no {want.__name__} within {timeout_s}s")


def test_uncredited_stdin_flood_aborts_the_session_with_bounded_memory(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """300 MB of stdin past the 256 KiB stdin window, at a command that never reads it: the agent aborts the
    session with a Done that says why, queues nothing beyond the window and keeps serving everyone else."""
    agent, addr = lab.agent(_config(lab.tmp))
    sock = _dealer(ctx, addr)
    sock.send(p.encode(p.RunOpen(1, p.VERSION, "mallory", "board", "wait", ["60s"])))
    _until(sock, p.RunStarted)
    block = os.urandom(64 * 1024)
    done: p.Done | None = None
    seq = 0
    start = time.monotonic()
    while seq * len(block) < 300 * MB:
        seq += 1
        sock.send(p.encode(p.Data(1, seq, p.STDIN)), zmq.SNDMORE)
        sock.send(block)
        if done is None and sock.poll(0):  # the answer may arrive while we keep pushing
            msg = p.decode(sock.recv_multipart()[0])
            done = msg if isinstance(msg, p.Done) else None
    done = done or _until(sock, p.Done)
    flood_s = time.monotonic() - start
    print(f"flood {flood_s:.1f}s, agent peak RSS {peak_rss_mb(agent.pid):.0f} MB, {done}")
    assert done.code == p.Code.ABORTED, done
    assert "credit" in done.message and "stdin" in done.message, done.message
    # Everyone else is served, at once and afterwards; the device is free again.
    assert lab.zdut("-s", addr, "other", "status", timeout=10).returncode == 0
    r = lab.zdut("-s", addr, "-u", "bob", "board", "status", timeout=10)
    assert r.returncode == 0, r.stderr
    rss = peak_rss_mb(agent.pid)
    print(f"agent peak RSS {rss:.0f} MB after 300 MB of uncredited stdin in {flood_s:.1f}s; Done: {done.message}")
    assert rss < 100, f"agent peak RSS {rss:.0f} MB"
    assert agent.text().count("credit window") <= 2  # one abort is one log line, not one per message


class _StalledOutput(RunHandler):
    """A terminal that never takes anything: no credit is ever returned."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        self.received += len(data)


def _fake_agent(router: zmq.Socket[Any], flood: int, sent: list[int], cancelled: threading.Event,
                stop: threading.Event) -> None:
    """Answer Hello, then answer a RunOpen with ``flood`` bytes of output, ignoring the client's credit."""
    block = os.urandom(MB)
    while not stop.is_set():
        if not router.poll(100):
            continue
        peer, header, *_ = router.recv_multipart()
        msg = p.decode(header)
        if isinstance(msg, p.Hello):
            router.send_multipart([peer, p.encode(p.Welcome(msg.rid, p.VERSION, "agent", "fake"))])
        elif isinstance(msg, p.RunOpen):
            router.send_multipart([peer, p.encode(p.RunStarted(msg.sid, 1, False))])
            seq = 1
            while sent[0] < flood:
                seq += 1
                router.send_multipart([peer, p.encode(p.Data(msg.sid, seq, p.STDOUT)), block])
                sent[0] += len(block)
        elif isinstance(msg, p.Cancel):
            cancelled.set()


def test_client_aborts_a_peer_that_ignores_its_credit(ctx: zmq.Context[Any]) -> None:
    """A fake agent sends 64 MiB at a client whose terminal never drains (16 MiB window): the client ends the
    session with a clear error and cancels it, and no more than its window reaches the handler."""
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = free_port()
    router.bind(f"tcp://127.0.0.1:{port}")
    sent = [0]
    cancelled, stop = threading.Event(), threading.Event()
    fake = threading.Thread(target=_fake_agent, args=(router, 64 * MB, sent, cancelled, stop), daemon=True)
    fake.start()
    handler = _StalledOutput()

    async def main() -> p.ZdutError:
        async with Client(f"127.0.0.1:{port}", "tester") as client:
            run = client.run("board", "spew", [], handler)
            try:
                await asyncio.wait_for(run.wait(), 15)
            except p.ZdutError as exc:
                return exc
            raise AssertionError("the session ended without an error")

    try:
        error = asyncio.run(main())
        print(f"fake agent sent {sent[0] // MB} MiB, the handler got {handler.received // MB} MiB: {error}")
        assert error.code == p.Code.ABORTED, error
        assert "credit" in error.message, error.message
        assert handler.received <= p.INITIAL_WINDOW
        wait_for(cancelled.is_set, 5, "the client to cancel the session at the peer")
    finally:
        stop.set()
        fake.join(5)


def test_garbage_flood_is_logged_at_a_bounded_rate(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """Seconds of undecodable frames, frames of the wrong count, payload-less Data and runs of no such device
    at the agent's direct port: a few log lines and "suppressed" summaries, not one line per message; the
    agent still serves."""
    agent, addr = lab.agent(_config(lab.tmp))
    before = agent.text().count("\n")
    socks = [_dealer(ctx, addr) for _ in range(4)]
    good = p.encode(p.ListDevices(1, p.VERSION, "x"))
    sent = 0
    end = time.monotonic() + 3
    while time.monotonic() < end:
        for _ in range(200):
            socks[0].send(os.urandom(24))  # undecodable
            socks[1].send_multipart([good, b"payload", b"extra"])  # wrong number of frames
            socks[2].send_multipart([p.encode(p.Data(99, 1, p.STDIN))])  # Data without its payload
            sent += 3
        for i in range(20):
            socks[3].send(p.encode(p.RunOpen(sent + i, p.VERSION, "x", "nosuch", "run", [])))  # refused at once
        sent += 20
        for sock in socks:  # replies to nobody: keep our own queues short
            while sock.poll(0):
                sock.recv_multipart()
    flooded = time.monotonic()
    served = lab.zdut("-s", addr, "other", "status", timeout=10)
    print(f"served {time.monotonic() - flooded:.2f}s after the flood")
    assert served.returncode == 0, served.stderr
    wait_for(lambda: "suppressed" in agent.text(), 15, "the agent's summary of suppressed log lines")
    lines = agent.text().splitlines()[before:]
    dropped = [line for line in lines if "dropped" in line]
    print(f"{sent} bad messages -> {len(lines)} log lines ({len(dropped)} 'dropped' lines)")
    assert len(lines) < 60, "\n".join(lines[:80])
    assert any("suppressed" in line for line in lines)
