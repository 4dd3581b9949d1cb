"""Session stream rules: sequence gaps are reported, credit bounds what is in flight."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
import zmq

from conftest import CONF, Lab
from zdut import protocol as p
from zdut.agentd.locker import Locker
from zdut.agentd.run import AgentRun
from zdut.common.addresses import endpoint
from zdut.transport.stream import Stream


def test_sequence_gap_is_an_error() -> None:
    stream = Stream(7, lambda header, payload=None: None)
    stream.received(p.Ping(7, 1))
    stream.received(p.Ping(7, 2))
    with pytest.raises(p.ZdutError) as info:
        stream.received(p.Ping(7, 4))
    assert info.value.code == p.Code.ABORTED
    assert info.value.message == "session 7: sequence gap: expected message 3, got 4"


def test_receiver_aborts_a_peer_past_its_window_and_counts_returned_credit() -> None:
    """The receiver charges what the sender should have taken; credit it returns reopens the window."""
    credits: list[p.Message] = []
    window = 4 * (p.MESSAGE_COST + 1000)
    stream = Stream(3, lambda header, payload=None: credits.append(p.decode(header)),
                    granted={p.WINDOW_MAIN: p.INITIAL_WINDOW, p.WINDOW_STDIN: window})
    seq = iter(range(1, 100))
    for _ in range(4):
        stream.received(p.Data(3, next(seq), p.STDIN), b"x" * 1000)
    stream.received(p.FileOpen(3, next(seq), 1, "f", 0))  # another window: still fine
    stream.received(p.Ping(3, next(seq)))  # free
    stream.consumed(1000, p.WINDOW_STDIN)  # a quarter of the window: returned at once
    assert [m.nbytes for m in credits if isinstance(m, p.Credit)] == [p.MESSAGE_COST + 1000]
    stream.received(p.Data(3, next(seq), p.STDIN), b"x" * 1000)  # fits the returned credit
    with pytest.raises(p.ZdutError) as info:
        stream.received(p.StdinEof(3, next(seq)))
    assert info.value.code == p.Code.ABORTED
    assert "sent past its stdin credit window" in info.value.message


def test_credit_blocks_the_sender_until_granted() -> None:
    sent: list[Any] = []

    async def main() -> None:
        stream = Stream(1, lambda header, payload=None: sent.append(payload), {p.WINDOW_MAIN: 3 * p.MESSAGE_COST})
        for _ in range(3):
            await stream.send_credited(p.Data, b"", stream=p.STDOUT)
        blocked = asyncio.create_task(stream.send_credited(p.Data, b"x", stream=p.STDOUT))
        await asyncio.sleep(0)
        assert not blocked.done() and len(sent) == 3
        stream.granted(p.MESSAGE_COST + 1, p.WINDOW_MAIN)
        await asyncio.wait_for(blocked, 1)
        assert sent[-1] == b"x"

    asyncio.run(main())


def test_agent_aborts_a_session_with_a_gap(lab: Lab) -> None:
    """A client message that skips a sequence number ends the session with Done{Aborted}, never silently."""
    _, addr = lab.agent(CONF / "demo.yaml")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint(addr))
    try:
        sock.send(p.encode(p.RunOpen(1, p.VERSION, "tester", "device2", "repeat", [])))
        got: list[Any] = []

        def next_message() -> Any:
            assert sock.poll(5000), f"no reply; got {got}"
            frames = sock.recv_multipart()
            msg = p.decode(frames[0])
            got.append(msg)
            return msg

        assert isinstance(next_message(), p.RunStarted)
        sock.send_multipart([p.encode(p.Data(1, 1, p.STDIN)), b"one\n"])
        sock.send_multipart([p.encode(p.Data(1, 3, p.STDIN)), b"two\n"])  # seq 2 is missing
        while not isinstance(msg := next_message(), p.Done):
            pass
        assert msg.code == p.Code.ABORTED
        assert "sequence gap: expected message 2, got 3" in msg.message
    finally:
        ctx.destroy(linger=0)


def test_every_credited_message_returns_its_credit() -> None:
    """An upload's FileOpen and FileEnd cost credit like its chunks; the agent must return all of it,
    or a long session with many transfers eventually starves."""
    sent: list[p.Message] = []

    async def main() -> None:
        run = AgentRun(1, lambda header, payload=None: sent.append(p.decode(header)), "dev", "cmd", "u",
                       Locker({"dev"}), on_close=lambda r: None)
        incoming = run.request_file("in.bin")
        chunks: list[bytes] = []

        async def read() -> None:
            async for chunk in incoming:
                chunks.append(chunk)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)  # the module sends its FileRequest
        payload = b"x" * 1000
        xfer = incoming.xfer
        run.deliver(p.FileOpen(1, 1, xfer, "in.bin", len(payload)), None)
        run.deliver(p.FileChunk(1, 2, xfer, 0), payload)
        run.deliver(p.FileEnd(1, 3, xfer, hashlib.sha256(payload).digest()), None)
        await asyncio.wait_for(reader, 1)
        run.stream.flush_credit()
        returned = sum(m.nbytes for m in sent if isinstance(m, p.Credit) and m.window == p.WINDOW_MAIN)
        assert chunks == [payload]
        assert returned == 3 * p.MESSAGE_COST + len(payload)

    asyncio.run(main())
