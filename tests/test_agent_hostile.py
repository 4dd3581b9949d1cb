"""Hostile peers against a real agent: no frame it did not ask for is allocated, no request goes unanswered
for being too long, no routing id a peer claims can make libzmq abort it, and no backlog holds up SIGTERM.

The attackers are raw peers: a TCP socket speaking ZMTP 3.0 by hand (so a 1 GB frame is announced and
streamed without ever existing in this process), pyzmq DEALERs that claim routing ids, and a pyzmq ROUTER
posing as a broker.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import zmq
from test_agent_limits import _config, _dealer, _until
from zmq.utils.monitor import recv_monitor_message

from conftest import Lab, peak_rss_mb, wait_for
from zdut import protocol as p
from zdut.common.addresses import endpoint

pytestmark = pytest.mark.serial  # latencies under a flood must stay under 2 s: run alone, not beside another worker

MB = 1024 * 1024
#: libzmq's first self-assigned routing id in a process whose rand() nobody seeded: 0x00 then rand()'s
#: first value, counting up by one per anonymous peer (checked by test_unseeded_ids_are_what_we_claim).
UNSEEDED_FIRST_ID = 0x6B8B4567


def _zmtp_dealer(addr: str) -> socket.socket:
    """A TCP connection that has done the ZMTP 3.0 NULL handshake as a DEALER (greeting, then READY)."""
    host, _, port = addr.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + bytes(31))
    ready = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(ready)]) + ready)
    got = _received(sock, b"\x05READY")  # the agent's greeting and READY: only then does it take messages
    start = got.index(b"\x05READY") - 2
    while len(got) < start + 2 + got[start + 1]:
        got += sock.recv(4096)
    return sock


def _zmtp_frame(data: bytes) -> bytes:
    """One last (no MORE) message frame, short or long form."""
    if len(data) < 256:
        return b"\x00" + bytes([len(data)]) + data
    return b"\x02" + len(data).to_bytes(8, "big") + data


def _received(sock: socket.socket, marker: bytes, timeout_s: float = 10.0) -> bytes:
    """Read the raw stream until ``marker`` shows up in it."""
    got = b""
    deadline = time.monotonic() + timeout_s
    while marker not in got:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r} arrived: {got!r}"
        got += chunk
    return got


def _stream_huge_frame(sock: socket.socket, size: int) -> tuple[int, float]:
    """Announce one ``size``-byte frame and stream zeros into it until done or cut off: (bytes sent, seconds)."""
    block = bytes(MB)
    sent = 0
    start = time.monotonic()
    sock.settimeout(30)
    try:
        sock.sendall(b"\x02" + size.to_bytes(8, "big"))
        while sent < size:
            sent += sock.send(block[: min(MB, size - sent)])
    except OSError:  # ECONNRESET / EPIPE: the agent refused it
        pass
    return sent, time.monotonic() - start


def _timed_list(lab: Lab, addr: str) -> float:
    start = time.monotonic()
    r = lab.zdut("-s", addr, "list", timeout=20)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - start


def test_a_1gb_frame_to_the_direct_port_is_refused_unallocated(lab: Lab) -> None:
    """A raw peer announces a 1 GB frame and streams zeros into it: the agent cuts the connection off without
    buffering it, its peak RSS stays under 100 MB and clients are served meanwhile and afterwards."""
    agent, addr = lab.agent(_config(lab.tmp))
    raw = _zmtp_dealer(addr)
    raw.sendall(_zmtp_frame(p.encode(p.Hello(1, p.VERSION, "mallory"))))
    _received(raw, b"welcome")  # the hand-made handshake is a real peer's: what follows is judged on size alone
    result: list[tuple[int, float]] = []
    flood = threading.Thread(target=lambda: result.append(_stream_huge_frame(raw, 1024 * MB)))
    flood.start()
    latencies = [_timed_list(lab, addr) for _ in range(3)]
    flood.join(60)
    raw.close()
    latencies.append(_timed_list(lab, addr))
    sent, seconds = result[0]
    peak = peak_rss_mb(agent.pid)
    print(f"sent {sent / MB:.0f} MB in {seconds:.2f}s before the agent cut it off; agent peak RSS {peak:.0f} MB; "
          f"list latencies {[round(x, 2) for x in latencies]}")
    assert agent.alive(), agent.text()
    assert sent < 256 * MB, f"the agent took {sent / MB:.0f} MB of a frame it can never accept"
    assert peak < 100, f"agent peak RSS {peak:.0f} MB"
    assert max(latencies) < 2.0, latencies


def test_a_huge_frame_from_a_broker_drops_that_link_not_the_agent(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """The uplink DEALER caps frames too: a 'broker' that sends 512 MiB loses its connection before the
    agent allocates the frame, and the agent comes back to register again."""
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    port = broker.bind_to_random_port("tcp://127.0.0.1")
    events = broker.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    agent, _ = lab.agent(_config(lab.tmp), None, "--server", f"127.0.0.1:{port}")
    assert broker.poll(10_000), "the agent never registered"
    rid = broker.recv_multipart()[0]
    huge = bytes(512 * MB)  # untouched zero pages: costs this process (almost) nothing resident
    broker.send_multipart([rid, b"", huge], copy=False)
    assert events.poll(10_000), "the agent kept a connection that sent it 512 MiB in one frame"
    assert recv_monitor_message(events)["event"] == zmq.EVENT_DISCONNECTED
    del huge
    wait_for(lambda: broker.poll(0) and isinstance(p.decode(broker.recv_multipart()[2]), p.Register), 15,
             "the agent to register again")
    peak = peak_rss_mb(agent.pid)
    print(f"agent peak RSS {peak:.0f} MB")
    assert peak < 100, f"agent peak RSS {peak:.0f} MB"
    assert agent.alive()


def test_a_request_over_the_header_limit_is_answered_at_once(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """A header over MAX_HEADER_BYTES is refused with a reply that says so, for unary requests and for a
    RunOpen from the real CLI alike, instead of a silence the client has to time out on."""
    _, addr = lab.agent(_config(lab.tmp))
    sock = _dealer(ctx, addr)
    sock.send(p.encode(p.ListCommands(7, p.VERSION, "mallory", "d" * (p.MAX_HEADER_BYTES + 1))))
    start = time.monotonic()
    err = _until(sock, p.Error, 2.0)
    assert (err.rid, err.code) == (7, p.Code.INVALID_ARGUMENT), err
    assert f"exceeds {p.MAX_HEADER_BYTES} bytes" in err.message, err
    sock.send(p.encode(p.Hello(8, p.VERSION, "mallory")))  # and the peer is still served
    assert _until(sock, p.Welcome, 2.0).rid == 8
    start = time.monotonic()
    r = lab.zdut("-s", addr, "board", "wait", "x" * (p.MAX_HEADER_BYTES + 100), timeout=20)
    elapsed = time.monotonic() - start
    print(f"CLI answered in {elapsed:.2f}s: rc {r.returncode}, {r.stderr.strip()!r}")
    assert r.returncode != 0
    assert "request refused: its header of" in r.stderr, r.stderr
    assert f"exceeds {p.MAX_HEADER_BYTES} bytes" in r.stderr, r.stderr
    assert elapsed < 2.0


def test_unseeded_ids_are_what_we_claim() -> None:
    """The premise of the next test, checked on libzmq itself: a plain ROUTER in a fresh process (this
    test runs one) hands its anonymous peers 0x00 + rand()'s first value, then counts up."""
    code = (
        "import zmq\nc = zmq.Context()\nr = c.socket(zmq.ROUTER)\nport = r.bind_to_random_port('tcp://127.0.0.1')\n"
        "for _ in range(3):\n    d = c.socket(zmq.DEALER); d.connect(f'tcp://127.0.0.1:{port}'); d.send(b'x')\n"
        "    print(r.recv_multipart()[0].hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout.split()
    assert out == [(b"\0" + (UNSEEDED_FIRST_ID + i).to_bytes(4, "big")).hex() for i in range(3)], out


def test_peers_claiming_the_next_routing_ids_cannot_crash_the_agent(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """64 DEALERs claim the ids libzmq would give the next anonymous peers of a fresh agent's ROUTER; then
    normal clients come. Unseeded, the first of them makes libzmq abort the agent (socket_base.cpp)."""
    agent, addr = lab.agent(_config(lab.tmp), ready=False)
    host, _, port = addr.rpartition(":")

    def listening() -> bool:
        try:  # a bare TCP connect does no ZMTP handshake: no routing id is used up
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return not agent.alive()

    wait_for(listening, 15, f"the agent to listen on {addr}")
    claimers = []
    for i in range(64):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTING_ID, b"\0" + (UNSEEDED_FIRST_ID + i).to_bytes(4, "big"))
        sock.connect(endpoint(addr))
        sock.send(p.encode(p.Hello(i, p.VERSION, "mallory")))
        claimers.append(sock)
    for sock in claimers:  # every claim is in place: each was answered under its claimed id
        assert isinstance(_until(sock, p.Welcome), p.Welcome)
    for _ in range(5):
        r = lab.zdut("-s", addr, "list", timeout=10)
        assert r.returncode == 0, (r.stderr, agent.text()[-2000:])
        assert "board" in r.stdout
    assert agent.alive(), agent.text()[-2000:]
    assert "Assertion failed" not in agent.text()


def test_sigterm_is_not_held_up_by_a_backlog(lab: Lab, ctx: zmq.Context[Any]) -> None:
    """Peers keep the agent's socket full of messages (late Pings, cheap to handle, never ending); SIGTERM
    still ends the agent within 2 s."""
    agent, addr = lab.agent(_config(lab.tmp))
    stop = threading.Event()
    sent = [0, 0]

    def flood(i: int) -> None:
        sock = _dealer(ctx, addr)
        sock.sndhwm = 0
        ping = p.encode(p.Ping(1, 1))
        while not stop.is_set():
            for _ in range(1000):
                try:
                    sock.send(ping, zmq.NOBLOCK)
                except zmq.Again:
                    break
                sent[i] += 1
        sock.close(0)

    floods = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for t in floods:
        t.start()
    try:  # far more than the agent's receive HWM (100,000) is on its way: it has a backlog to work through
        wait_for(lambda: sum(sent) > 500_000, 30, "the flood to be under way")
        start = time.monotonic()
        agent.kill(signal.SIGTERM)
        wait_for(lambda: not agent.alive(), 10, "the agent to exit")
        took = time.monotonic() - start
    finally:
        stop.set()
        for t in floods:
            t.join()
    print(f"agent exited {took:.2f}s after SIGTERM ({sum(sent)} messages sent)")
    assert took < 2.0
    assert agent.popen.returncode == 0, agent.text()[-2000:]


def test_peers_that_flood_requests_read_nothing_and_hang_up_cannot_crash_the_agent(
    lab: Lab, ctx: zmq.Context[Any]
) -> None:
    """Four DEALERs send listing requests as fast as they can for 1.5 s, read no reply and close. With ZMTP
    heartbeats on its ROUTER, libzmq 4.3.5 aborted the agent when the ping timer next fired on such a
    connection ('!_io_error', libzmq #4364); the agent must keep serving, past that timer's 3 s."""
    agent, addr = lab.agent(_config(lab.tmp))
    request = p.encode(p.ListDevices(1, p.VERSION, "mallory"))
    socks = [_dealer(ctx, addr) for _ in range(4)]
    for sock in socks:
        sock.sndhwm = 0
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        for sock in socks:
            for _ in range(2000):
                sock.send(request, zmq.NOBLOCK)
    for sock in socks:
        sock.close(0)
    served = 0
    end = time.monotonic() + 4.0
    while time.monotonic() < end:  # every client in these 4 s is served
        r = lab.zdut("-s", addr, "list", timeout=10)
        assert r.returncode == 0, (r.stderr, agent.text()[-1000:])
        served += 1
    print(f"{served} listings served after the flood")
    assert agent.alive() and "Assertion failed" not in agent.text(), agent.text()[-1000:]
