"""Why a connection failed, named for its cause (issue 11, point 8): refused only when refused; an address out of
range, a host that does not resolve, and a port that speaks something other than ZMTP (an HTTP server, an SSH
server, a listener sending garbage, one that accepts and says nothing) each have their own message, within 2 s.

The listeners are real sockets on threads; the client is the real ``zdut`` CLI and the real ``Client``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import CONF, Lab, free_port
from zdut.client import Client
from zdut.protocol import Code, ZdutError

pytestmark = pytest.mark.serial  # each connection failure must be told within 2 s: run alone, not beside another worker

NOT_ZMTP = "the port answered, but not in ZMTP: is it a zdut server?"
SILENT = "the port accepted the connection but sent no ZMTP greeting within 1.2s: is it a zdut server?"


def _http(conn: socket.socket) -> None:
    conn.recv(1024)  # the ZMTP greeting, as far as an HTTP server is concerned a bad request line
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    conn.close()


def _ssh(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
    conn.recv(1024)
    conn.sendall(b"Invalid SSH identification string.\r\n")
    conn.close()


def _garbage(conn: socket.socket) -> None:
    conn.sendall(bytes(range(256)) * 4)


def _silent(conn: socket.socket) -> None:
    pass  # accepted, kept open, never a byte


class Listener:
    """A TCP server on 127.0.0.1 that treats each connection with ``serve``; keeps every socket open."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.kept: list[socket.socket] = []
        self._serve = serve
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.kept.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.kept:
            conn.close()


@pytest.fixture(params=[(_http, NOT_ZMTP), (_ssh, NOT_ZMTP), (_garbage, NOT_ZMTP), (_silent, SILENT)],
                ids=["http", "ssh", "garbage", "silent"])
def stranger(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The address of a listener that is not a zdut server, and the reason zdut should give."""
    serve, why = request.param
    listener = Listener(serve)
    try:
        yield f"127.0.0.1:{listener.port}", why
    finally:
        listener.close()


def connect_error(address: str) -> tuple[ZdutError, float]:
    """What ``Client.connect`` raises for ``address``, and how long it took."""
    async def attempt() -> ZdutError:
        client = Client(address, "tester")
        try:
            await client.connect()
        except ZdutError as exc:
            return exc
        await client.close()
        raise AssertionError(f"connected to {address}")

    started = time.monotonic()
    error = asyncio.run(attempt())
    return error, time.monotonic() - started


def test_a_port_that_is_not_zmtp_is_not_called_refused(lab: Lab, stranger: tuple[str, str]) -> None:
    addr, why = stranger
    r = lab.zdut("-s", addr, "list", timeout=10)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"✗ cannot reach zdut server at {addr} ({why})\n"
    error, took = connect_error(addr)
    assert error.code == Code.UNAVAILABLE and error.message == f"cannot reach zdut server at {addr} ({why})"
    assert took < 2.0, took


def test_a_port_with_nobody_listening_is_refused(lab: Lab) -> None:
    addr = f"127.0.0.1:{free_port()}"
    r = lab.zdut("-s", addr, "list", timeout=10)
    assert (r.returncode, r.stderr) == (1, f"✗ cannot reach zdut server at {addr} (connection refused)\n")
    error, took = connect_error(addr)
    assert error.message == f"cannot reach zdut server at {addr} (connection refused)" and took < 2.0, took


def test_a_host_that_does_not_resolve_is_named(lab: Lab) -> None:
    addr = "nonexistent.invalid:1024"
    r = lab.zdut("-s", addr, "list", timeout=10)
    assert r.returncode == 1
    assert r.stderr.startswith(f'✗ cannot reach zdut server at {addr} (cannot resolve host "nonexistent.invalid"')
    assert "refused" not in r.stderr, r.stderr
    error, took = connect_error(addr)
    assert error.code == Code.UNAVAILABLE and "cannot resolve host" in error.message and took < 2.0, took


@pytest.mark.parametrize("addr", ["localhost:99999", "localhost:0", "tcp://localhost:65536"])
def test_a_port_out_of_range_is_a_usage_error(lab: Lab, addr: str) -> None:
    r = lab.zdut("-s", addr, "list", timeout=10)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f'invalid value "{addr}" for flag -s: want host:port or tcp://host:port with a port '
                               "from 1 to 65535\n"), r.stderr


def test_a_real_server_still_connects_and_a_stopped_one_is_refused(lab: Lab) -> None:
    proc, addr = lab.agent(CONF / "demo.yaml")
    assert lab.zdut("-s", addr, "list").returncode == 0
    proc.stop()
    r = lab.zdut("-s", addr, "list", timeout=10)
    assert r.stderr == f"✗ cannot reach zdut server at {addr} (connection refused)\n"
