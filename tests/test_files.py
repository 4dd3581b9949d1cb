"""File transfer, written once for both sides (zdut/transport/files.py), and how each side reports failures."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from conftest import free_port
from zdut import protocol as p
from zdut.agentd.locker import Locker
from zdut.agentd.run import AgentRun
from zdut.client import Client
from zdut.transport.files import FileReceiver, FileSender
from zdut.transport.stream import Stream


def _wire() -> tuple[Stream, list[tuple[p.Message, Any]]]:
    sent: list[tuple[p.Message, Any]] = []
    return Stream(1, lambda header, payload=None: sent.append((p.decode(header), payload))), sent


def _receive(sent: list[tuple[p.Message, Any]], receiver: FileReceiver) -> bytes:
    """Feed what a sender produced into a receiver, as the other side does."""
    out = bytearray()
    for msg, payload in sent:
        if isinstance(msg, p.FileOpen):
            receiver.size = msg.size
        elif isinstance(msg, p.FileChunk):
            receiver.chunk(msg.offset, payload)
            out += payload
        elif isinstance(msg, p.FileEnd):
            receiver.end(msg.sha256)
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, p.CHUNK_SIZE, p.CHUNK_SIZE + 1, 3 * p.CHUNK_SIZE - 7])
def test_a_file_object_round_trips_in_chunks(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    stream, sent = _wire()
    progress: list[tuple[int, int]] = []

    async def main() -> int:
        stream.granted(64 * p.CHUNK_SIZE, p.WINDOW_MAIN)
        return await FileSender(stream, 3, "f.bin").send(io.BytesIO(data), size, lambda *a: progress.append(a))

    assert asyncio.run(main()) == size
    chunks = [m for m, _ in sent if isinstance(m, p.FileChunk)]
    assert len(chunks) == -(-size // p.CHUNK_SIZE)
    assert all(len(payload) <= p.CHUNK_SIZE for m, payload in sent if isinstance(m, p.FileChunk))
    assert [m.seq for m, _ in sent] == list(range(1, len(sent) + 1))
    assert _receive(sent, FileReceiver(3, "f.bin")) == data
    assert progress[-1:] == ([(size, size)] if size else [])


def test_an_async_iterator_is_rechunked_and_a_path_announces_its_size(tmp_path: Path) -> None:
    big = b"y" * (2 * p.CHUNK_SIZE + 5)

    async def pieces() -> AsyncIterator[bytes]:
        yield b"abc"
        yield big

    path = tmp_path / "f"
    path.write_bytes(b"hello")

    async def main() -> tuple[list[Any], list[Any]]:
        from_iter, sent_iter = _wire()
        await FileSender(from_iter, 1, "it").send(pieces())
        from_path, sent_path = _wire()
        await FileSender(from_path, 2, "path").send(path)
        return sent_iter, sent_path

    sent_iter, sent_path = asyncio.run(main())
    assert sent_iter[0][0].size == -1
    assert [len(pl) for m, pl in sent_iter if isinstance(m, p.FileChunk)] == [3, p.CHUNK_SIZE, p.CHUNK_SIZE, 5]
    assert _receive(sent_iter, FileReceiver(1, "it")) == b"abc" + big
    assert sent_path[0][0].size == 5
    assert _receive(sent_path, FileReceiver(2, "path")) == b"hello"


def test_the_receiver_refuses_gaps_excess_short_files_and_bad_digests() -> None:
    r = FileReceiver(1, "x", 4)
    with pytest.raises(p.ZdutError, match='file "x": chunk at offset 2, expected 0'):
        r.chunk(2, b"ab")
    r = FileReceiver(1, "x", 4)
    with pytest.raises(p.ZdutError, match='file "x": more than the 4 bytes announced'):
        r.chunk(0, b"abcde")
    r = FileReceiver(1, "x", 4)
    r.chunk(0, b"abc")
    with pytest.raises(p.ZdutError, match='file "x": got 3 of 4 bytes'):
        r.end(hashlib.sha256(b"abc").digest())
    r = FileReceiver(1, "x")
    r.chunk(0, b"abc")
    with pytest.raises(p.ZdutError, match='file "x": SHA-256 mismatch after 3 bytes') as info:
        r.end(hashlib.sha256(b"abd").digest())
    assert info.value.code == p.Code.ABORTED


def test_an_abort_stops_the_sender_before_its_next_chunk() -> None:
    stream, sent = _wire()
    sender = FileSender(stream, 5, "out.bin")

    async def pieces() -> AsyncIterator[bytes]:
        yield b"first"
        sender.abort(p.FileAbort(1, 1, 5, p.Code.PERMISSION_DENIED, "refusing to write"))
        yield b"second"

    with pytest.raises(p.ZdutError) as info:
        asyncio.run(sender.send(pieces()))
    assert (info.value.code, info.value.message) == (p.Code.PERMISSION_DENIED, 'sending "out.bin": refusing to write')
    assert [type(m) for m, _ in sent] == [p.FileOpen, p.FileChunk]


def test_the_agent_reports_a_bad_upload_digest_and_drops_aborts_for_unknown_transfers() -> None:
    async def main() -> list[p.ZdutError]:
        run = AgentRun(1, lambda header, payload=None: None, "dev", "cmd", "u", Locker({"dev"}),
                       on_close=lambda r: None)
        for seq in range(1, 1001):  # a client spraying aborts for transfers that do not exist: nothing is kept
            run.deliver(p.FileAbort(1, seq, 10_000 + seq, p.Code.ABORTED, "no"), None)
        assert not run._sending
        incoming = run.request_file("in.bin")
        errors: list[p.ZdutError] = []

        async def read() -> None:
            try:
                async for _ in incoming:
                    pass
            except p.ZdutError as exc:
                errors.append(exc)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)  # the module sends its FileRequest
        run.deliver(p.FileOpen(1, 1001, incoming.xfer, "in.bin", 3), None)
        run.deliver(p.FileChunk(1, 1002, incoming.xfer, 0), b"abc")
        run.deliver(p.FileEnd(1, 1003, incoming.xfer, hashlib.sha256(b"abd").digest()), None)
        await asyncio.wait_for(reader, 1)
        return errors

    assert [e.message for e in asyncio.run(main())] == ['file "in.bin": SHA-256 mismatch after 3 bytes']


def _standin(ctx: zmq.Context[Any], answer: Callable[[p.Message], list[Any]]) -> tuple[str, Callable[[], Any]]:
    """A stand-in agent on a raw ROUTER: answers Hello itself and every other message with ``answer(msg)``
    (messages, or (message, payload) pairs; seq numbers are stamped here) until it has sent a Done.
    Returns its address and the function that serves (run it in a thread); that returns what it received."""
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    port = free_port()
    server.bind(f"tcp://127.0.0.1:{port}")

    def serve() -> list[p.Message]:
        got: list[p.Message] = []
        seq = 0
        while True:
            assert server.poll(5000), f"the client went quiet; got {got}"
            peer, header, *_ = server.recv_multipart()
            msg = p.decode(header)
            got.append(msg)
            if isinstance(msg, p.Hello):
                server.send_multipart([peer, p.encode(p.Welcome(msg.rid, p.VERSION, "agent", "standin"))])
                continue
            for reply in answer(msg):
                m, *payload = reply if isinstance(reply, tuple) else (reply,)
                seq += 1
                server.send_multipart([peer, p.encode(msgspec.structs.replace(m, seq=seq)), *payload])
                if isinstance(m, p.Done):
                    return got

    return f"127.0.0.1:{port}", serve


def _run_against(addr: str, serve: Callable[[], Any], command: str, args: list[str]) -> tuple[p.ZdutError, Any]:
    async def main() -> tuple[p.ZdutError, Any]:
        serving = asyncio.get_running_loop().run_in_executor(None, serve)
        async with Client(addr, "tester") as client:
            with pytest.raises(p.ZdutError) as info:
                await asyncio.wait_for(client.run("dev", command, args).wait(), 10)
        return info.value, await serving

    return asyncio.run(main())


def test_the_client_discards_a_download_with_a_bad_digest_and_says_so(tmp_path: Path,
                                                                      ctx: zmq.Context[Any]) -> None:
    """The client cancels, keeps no file and reports the mismatch, not the Canceled that answers its Cancel."""
    dest = tmp_path / "out.bin"

    def answer(msg: p.Message) -> list[Any]:
        if isinstance(msg, p.RunOpen):
            return [p.RunStarted(msg.sid, 0, False, {str(dest): "receive"}), p.FileOpen(msg.sid, 0, 1, str(dest), 3),
                    (p.FileChunk(msg.sid, 0, 1, 0), b"abc"), p.FileEnd(msg.sid, 0, 1, hashlib.sha256(b"xyz").digest())]
        if isinstance(msg, p.Cancel):
            return [p.Done(msg.sid, 0, p.Code.CANCELED, "module execution aborted: canceled by the client")]
        return []

    error, _ = _run_against(*_standin(ctx, answer), "get", [str(dest)])
    assert error.message == f'file "{dest}": SHA-256 mismatch after 3 bytes'
    assert list(tmp_path.iterdir()) == []


def test_a_read_error_mid_upload_aborts_the_transfer(ctx: zmq.Context[Any]) -> None:
    """The agent's module would otherwise wait for the rest of the file for ever."""
    unreadable = "/proc/self/mem"  # opens, then every read at offset 0 fails with EIO

    def answer(msg: p.Message) -> list[Any]:
        if isinstance(msg, p.RunOpen):
            return [p.RunStarted(msg.sid, 0, False, {unreadable: "send"}), p.FileRequest(msg.sid, 0, 1, unreadable)]
        if isinstance(msg, p.FileAbort):
            return [p.Done(msg.sid, 0, msg.code, f"module failed: {msg.message}")]
        return []

    error, got = _run_against(*_standin(ctx, answer), "put", [unreadable])
    assert error.message == f'module failed: cannot read "{unreadable}": Input/output error'
    assert [type(m) for m in got if isinstance(m, p.FileOpen | p.FileChunk | p.FileAbort)] == [p.FileOpen, p.FileAbort]
