"""Session benchmarks, direct to an agent and through a broker: console echo latency,
unary call latency and file round-trip throughput.

Each figure is printed beside a raw pyzmq DEALER/ROUTER baseline measured in the
same run on the same machine, because these machines are noisy.

    .venv/bin/python bench/bench_sessions.py [--lines 2000] [--mb 256] [--broker-mb 1024]
    .venv/bin/python bench/bench_sessions.py --echo-rounds 5   # the brokered echo beside the chain, 5 times
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from zdut.client import Client, RunHandler
from zdut.common.client_config import ClientKeys
from zdut.common.memtune import tune_malloc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = samples[len(samples) // 2]
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1e6:7.0f} us   p99 {p99 * 1e6:7.0f} us   mean {statistics.mean(samples) * 1e6:7.0f} us"


ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    rid = s.recv(); msg = s.recv()
    if msg == b"quit": break
    s.send(rid, zmq.SNDMORE); s.send(msg)
"""


def raw_echo_baseline(n: int) -> list[float]:
    """Round trip of a small message over a raw DEALER/ROUTER pair between two processes."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, ep])
    out = _round_trips(ep, n)
    server.wait(5)
    return out


def _round_trips(ep: str, n: int) -> list[float]:
    """Time n small request/echo round trips from a DEALER connected to ep, then send "quit"."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(ep)
    s.send(b"warm")
    s.recv()
    out = []
    for i in range(n):
        t = time.perf_counter()
        s.send(b"word%d\n" % i)
        s.recv()
        out.append(time.perf_counter() - t)
    s.send(b"quit")
    ctx.destroy(linger=1000)
    return out


# argv: front endpoint, back endpoint, and for big frames an HWM: queues then stay as bounded as zdut's credit
# windows keep them, and payloads are forwarded without a copy (as the broker does).
RELAY = """
import sys, zmq
ctx = zmq.Context(); front = ctx.socket(zmq.ROUTER); back = ctx.socket(zmq.DEALER)
big = len(sys.argv) > 3
if big:
    for s in (front, back): s.sndhwm = s.rcvhwm = int(sys.argv[3])
    front.router_mandatory = 1  # block at the HWM instead of dropping
front.bind(sys.argv[1]); back.connect(sys.argv[2])
poller = zmq.Poller(); poller.register(front, zmq.POLLIN); poller.register(back, zmq.POLLIN)
while True:
    for sock, _ in poller.poll():
        if sock is front:
            rid = front.recv(); msg = front.recv(copy=not big)
            if not big and msg == b"quit": sys.exit(0)
            back.send(rid, zmq.SNDMORE); back.send(msg, copy=not big)
        else:
            rid = back.recv(); msg = back.recv(copy=not big)
            front.send(rid, zmq.SNDMORE); front.send(msg, copy=not big)
"""

ROUTED_ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    link = s.recv(); rid = s.recv(); msg = s.recv()
    s.send(link, zmq.SNDMORE); s.send(rid, zmq.SNDMORE); s.send(msg)
"""


def raw_relay_baseline(n: int) -> list[float]:
    """Round trip through a minimal per-frame pyzmq relay process to an echo process (the broker's floor)."""
    echo_ep, relay_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    echo = subprocess.Popen([sys.executable, "-c", ROUTED_ECHO, echo_ep])
    relay = subprocess.Popen([sys.executable, "-c", RELAY, relay_ep, echo_ep])
    out = _round_trips(relay_ep, n)
    relay.wait(5)
    echo.kill()
    echo.wait(5)
    return out


def raw_transfer_baseline(mb: int) -> float:
    """MB/s of pushing ``mb`` MiB in 256 KiB frames to another process and back (a round trip)."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, ep])
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(ep)
    chunk = os.urandom(256 * 1024)
    n = mb * 4
    window = 16
    t = time.perf_counter()
    sent = recvd = 0
    while recvd < n:
        while sent < n and sent - recvd < window:
            s.send(chunk, copy=False)
            sent += 1
        s.recv(copy=False)
        recvd += 1
    elapsed = time.perf_counter() - t
    s.send(b"quit")
    server.wait(5)
    ctx.destroy(linger=0)
    return mb / elapsed


# The far end of the raw file baseline: receives 1 MiB chunks into a temp file (hashing them), then sends the
# file back (hashing it), like dummy-ft behind an agent.  Single-frame messages behind the relay's routing frame;
# b"" ends a file and is followed by its SHA-256.  Small HWMs bound memory as zdut's credit does.
RAW_FT = """
import hashlib, os, sys, tempfile, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.sndhwm = s.rcvhwm = 16; s.router_mandatory = 1
s.bind(sys.argv[1])
s.send_multipart(s.recv_multipart())  # the driver's hello: connections are up before its clock starts
while True:
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=sys.argv[2]) as tmp:
        while True:
            link = s.recv(); rid = s.recv(); chunk = s.recv(copy=False)
            if not len(chunk):
                break
            digest.update(chunk.buffer); tmp.write(chunk.buffer)
        link, rid, theirs = s.recv(), s.recv(), s.recv()
        assert theirs == digest.digest()
        tmp.flush(); tmp.seek(0); digest = hashlib.sha256()
        while chunk := tmp.read(1 << 20):
            digest.update(chunk)
            s.send(link, zmq.SNDMORE); s.send(rid, zmq.SNDMORE); s.send(chunk)
        for last in (b"", digest.digest()):
            s.send(link, zmq.SNDMORE); s.send(rid, zmq.SNDMORE); s.send(last)
"""


def raw_file_baseline(mb: int, files: Path) -> float:
    """MB/s of the same round trip as device3 file-transfer through a broker (1 MiB chunks read from a file and
    hashed, written to a temp file on the far side and sent back, written out and hashed), done by minimal
    pyzmq programs through the minimal relay: what this machine allows for the job."""
    src, dst = files / "raw-in.bin", files / "raw-out.bin"
    _write_random(src, mb)
    far_ep, relay_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", RAW_FT, far_ep, str(files)]),
             subprocess.Popen([sys.executable, "-c", RELAY, relay_ep, far_ep, "16"])]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.sndhwm = s.rcvhwm = 16
    s.connect(relay_ep)
    try:
        s.send(b"hello")
        s.recv()
        t = time.perf_counter()
        digest = hashlib.sha256()
        with open(src, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                s.send(chunk)
        s.send(b"")
        s.send(digest.digest())
        digest = hashlib.sha256()
        with open(dst, "wb") as out:
            while len(chunk := s.recv(copy=False)):
                digest.update(chunk.buffer)
                out.write(chunk.buffer)
        assert s.recv() == digest.digest()
        elapsed = time.perf_counter() - t
    finally:
        ctx.destroy(linger=0)
        for p in procs:
            p.kill()
            p.wait()
        src.unlink()
        dst.unlink(missing_ok=True)
    return mb * (1 << 20) / 1e6 / elapsed


def _write_random(path: Path, mb: int) -> None:
    with open(path, "wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(mb):
            fh.write(block)


def wait_listed(addr: str, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = subprocess.run([str(BIN / "zdut"), "-s", addr, "list"], capture_output=True, text=True)
        if r.returncode == 0 and "device3" in r.stdout and "OFFLINE" not in r.stdout:
            return
    raise SystemExit(f"{what} did not come up")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what ``start_lab`` (or a bench of its own) started, the last started first."""
    for p in reversed(procs):
        p.terminate()
        p.wait(10)


def start_lab(tmp: Path, files: Path) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    """A broker and the demo agent registered with it; returns (processes, agent address, broker address).
    The agent keeps its temporary files (dummy-ft's copy) in ``files``."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp), "TMPDIR": str(files)}
    broker = f"127.0.0.1:{free_port()}"
    agent = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([str(BIN / "zdut-broker"), "-s", broker, "--state", str(tmp / "b.sqlite3"), "--log",
                               "warn"], env=env)]
    procs.append(subprocess.Popen([str(BIN / "zdut-agent"), "-a", agent, "-c", str(ROOT / "conf/demo.yaml"),
                                   "--server", broker, "--log", "warn"], env=env))
    wait_listed(agent, "the agent")
    wait_listed(broker, "the broker")
    return procs, agent, broker


def zdut_echo(addr: str, n: int) -> list[float]:
    """Round trip of one line through `zdut ADDR device2 repeat` driven through pipes."""
    return pipe_echo([str(BIN / "zdut"), "-s", addr, "device2", "repeat"], n, greeting_lines=2,
                     farewell=b"two words\n")


def pipe_echo(argv: list[str], n: int, greeting_lines: int = 0, farewell: bytes = b"",
              measure: Callable[[subprocess.Popen[bytes], bool], None] | None = None) -> list[float]:
    """Round trips of one line written to a process's stdin and read back from its stdout.
    ``measure(proc, starting)`` is called when the timed round trips start and when they end."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin and proc.stdout
    # Buffered on our side: an unbuffered readline() costs one read syscall per byte, which would be
    # charged to the process measured (the raw baselines read whole messages).
    out = io.BufferedReader(proc.stdout)  # type: ignore[arg-type]
    for _ in range(greeting_lines):
        out.readline()
    samples = []
    for i in range(n + 50):
        line = b"word%d\n" % i
        t = time.perf_counter()
        proc.stdin.write(line)
        got = out.readline()
        dt = time.perf_counter() - t
        assert got == line, (got, line)
        if i >= 50:  # warm-up
            samples.append(dt)
        if measure and i in (49, n + 49):
            measure(proc, i == 49)
    if farewell:
        proc.stdin.write(farewell)
    proc.stdin.close()
    proc.wait(10)
    return samples


# The same shape as a brokered console, in minimal pyzmq programs: a client process forwarding its stdin to a
# ROUTER relay, an echoing DEALER that connected out to the relay (as an agent does), the echo back to stdout.
CHAIN_RELAY = """
import sys, zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.bind(sys.argv[1])
agent = r.recv(); r.recv(); r.send(agent, zmq.SNDMORE); r.send(b"ok")
while True:
    rid = r.recv()
    if rid == agent:
        cid = r.recv(); msg = r.recv(); r.send(cid, zmq.SNDMORE); r.send(msg)
    else:
        msg = r.recv()
        if msg == b"quit": sys.exit(0)
        r.send(agent, zmq.SNDMORE); r.send(rid, zmq.SNDMORE); r.send(msg)
"""

CHAIN_ECHO = """
import sys, zmq
ctx = zmq.Context(); d = ctx.socket(zmq.DEALER); d.connect(sys.argv[1]); d.send(b"hello"); d.recv()
print("ready", flush=True)
while True:
    cid = d.recv(); msg = d.recv(); d.send(cid, zmq.SNDMORE); d.send(msg)
"""

CHAIN_CLIENT = """
import os, sys, zmq
ctx = zmq.Context(); d = ctx.socket(zmq.DEALER); d.connect(sys.argv[1])
poller = zmq.Poller(); poller.register(0, zmq.POLLIN); poller.register(d, zmq.POLLIN)
while True:
    for sock, _ in poller.poll():
        if sock == 0:
            data = os.read(0, 65536)
            if not data:
                d.send(b"quit"); ctx.destroy(linger=1000); sys.exit(0)
            d.send(data)
        else:
            os.write(1, d.recv())
"""


def raw_chain_baseline(n: int) -> list[float]:
    """Echo through four minimal processes of the brokered console's shape: the floor zdut is held to."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    relay = subprocess.Popen([sys.executable, "-c", CHAIN_RELAY, ep])
    echo = subprocess.Popen([sys.executable, "-c", CHAIN_ECHO, ep], stdout=subprocess.PIPE)
    assert echo.stdout
    echo.stdout.readline()  # registered with the relay
    try:
        return pipe_echo([sys.executable, "-c", CHAIN_CLIENT, ep], n)
    finally:
        relay.wait(5)
        echo.kill()
        echo.wait(5)


class _Lines(RunHandler):
    """A Run's stdout as lines, awaited by the driver."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = b""
        self.arrived: asyncio.Future[None] | None = None

    def output(self, stream: int, data: bytes, consumed: Any) -> None:
        consumed()
        self.buf += data
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    async def readline(self) -> bytes:
        while b"\n" not in self.buf:
            self.arrived = asyncio.get_running_loop().create_future()
            await self.arrived
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def library_echo(addr: str, n: int, keys: ClientKeys | None = None) -> list[float]:
    """The echo of zdut_echo through the client library in this process: no CLI process, no pipes."""

    async def go() -> list[float]:
        async with Client(addr, keys=keys) as client:
            lines = _Lines()
            run = client.run("device2", "repeat", handler=lines)
            await lines.readline()  # the module's greeting
            await lines.readline()
            samples = []
            for i in range(n + 50):
                line = b"word%d\n" % i
                t = time.perf_counter()
                if not run.try_write_stdin(line):
                    await run.write_stdin(line)
                got = await lines.readline()
                dt = time.perf_counter() - t
                assert got == line, (got, line)
                if i >= 50:
                    samples.append(dt)
            await run.write_stdin(b"two words\n")
            await run.wait()
            return samples

    return asyncio.run(go())


def zdut_file(addr: str, mb: int, tmp: Path, runs: int = 3) -> tuple[list[float], float]:
    """(MB/s of each round trip in-process through the client library, MB/s of one whole CLI call incl.
    start-up)."""
    src = tmp / "in.bin"
    _write_random(src, mb)
    size_mb = src.stat().st_size / 1e6

    async def library_round_trips() -> list[float]:
        out = []
        async with Client(addr) as client:
            for _ in range(runs):
                t = time.perf_counter()
                await client.run("device3", "file-transfer", [str(src), str(tmp / "out.bin")]).wait()
                out.append(size_mb / (time.perf_counter() - t))
        return out

    lib = asyncio.run(library_round_trips())
    want = hashlib.sha256()
    with open(src, "rb") as a, open(tmp / "out.bin", "rb") as b:
        while chunk := a.read(1 << 20):
            want.update(chunk)
        want.update(b"\n\nprocessed by dummy.FT module\n")
        assert want.digest() == hashlib.file_digest(b, "sha256").digest()
    t = time.perf_counter()
    r = subprocess.run([str(BIN / "zdut"), "-s", addr, "device3", "file-transfer", "in.bin", "out.bin"], cwd=tmp,
                       capture_output=True)
    cli = size_mb / (time.perf_counter() - t)
    assert r.returncode == 0, r.stderr
    return lib, cli


def rates(values: list[float]) -> str:
    return f"best {max(values):4.0f} MB/s  (runs: {' '.join(f'{v:.0f}' for v in values)})"


def api_calls(addr: str, n: int) -> list[float]:
    """Latency of one unary call (`commands`) through the synchronous Python API on an open connection."""
    from zdut.api import Lab

    with Lab(addr) as lab:
        lab.devices()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            lab.commands("device1")
            out.append(time.perf_counter() - t)
    return out


def machine_note() -> str:
    """What shapes the latency figures on a VM: each wake-up of an idle vCPU is a VM exit unless the guest
    polls a little before halting (docs/performance.md)."""
    knob = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    try:
        ns = int(knob.read_text())
    except (OSError, ValueError):
        return f"{os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs, guest halt polling {ns} ns" + (" (off: every idle wake-up is a VM exit)"
                                                                    if ns == 0 else "")


def echo_rounds(rounds: int, lines: int) -> None:
    """The issue 10 figure: zdut's brokered echo over the same-run chain's, p50 and p99, round after round
    (alternating, so that a noisy spell hits both)."""
    with tempfile.TemporaryDirectory() as d:
        procs, _, broker = start_lab(Path(d), Path(d))
        try:
            print(f"machine: {machine_note()}")
            for i in range(rounds):
                chain, ours = sorted(raw_chain_baseline(lines)), sorted(zdut_echo(broker, lines))
                p50s = chain[len(chain) // 2], ours[len(ours) // 2]
                p99s = chain[int(len(chain) * 0.99)], ours[int(len(ours) * 0.99)]
                print(f"round {i + 1}: chain p50 {p50s[0] * 1e6:4.0f} p99 {p99s[0] * 1e6:4.0f} us | zdut via broker "
                      f"p50 {p50s[1] * 1e6:4.0f} p99 {p99s[1] * 1e6:4.0f} us | ratio p50 {p50s[1] / p50s[0]:.2f} "
                      f"p99 {p99s[1] / p99s[0]:.2f}", flush=True)
        finally:
            stop_all(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=256, help="file size for the direct round trip (MiB)")
    ap.add_argument("--broker-mb", type=int, default=1024, help="file size for the brokered round trip (MiB)")
    ap.add_argument("--disk", action="store_true",
                    help="keep the transferred files on disk instead of tmpfs (/dev/shm): measures the disk too")
    ap.add_argument("--echo-rounds", type=int, default=0, metavar="N",
                    help="only the brokered echo beside the same-shape chain, N times alternating, with the ratios")
    args = ap.parse_args()
    if args.echo_rounds:
        echo_rounds(args.echo_rounds, args.lines)
        return
    tune_malloc()  # what the zdut CLI does at start, for the in-process library figures
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory(
            dir=None if args.disk or not shm.is_dir() else shm) as f:
        tmp, files = Path(d), Path(f)
        procs, agent, broker = start_lab(tmp, files)
        try:
            print(f"machine: {machine_note()}")
            print(f"console echo, {args.lines} lines (device2 repeat via the zdut CLI, stdin/stdout pipes)")
            print(f"  raw pyzmq DEALER/ROUTER round trip  : {percentiles(raw_echo_baseline(args.lines))}")
            print(f"  zdut direct to agent                : {percentiles(zdut_echo(agent, args.lines))}")
            print(f"  raw pyzmq through a minimal relay   : {percentiles(raw_relay_baseline(args.lines))}")
            print(f"  raw pyzmq 4-process chain, same shape: {percentiles(raw_chain_baseline(args.lines))}")
            print(f"  zdut through the broker             : {percentiles(zdut_echo(broker, args.lines))}")
            print("  the same through the client library (no CLI process, no pipes):")
            print(f"  zdut library direct to agent        : {percentiles(library_echo(agent, args.lines))}")
            print(f"  zdut library through the broker     : {percentiles(library_echo(broker, args.lines))}")
            print(f"unary call through the Python API (zdut.api.Lab.commands), {args.lines} calls")
            print(f"  zdut direct to agent                : {percentiles(api_calls(agent, args.lines))}")
            print(f"  zdut through the broker             : {percentiles(api_calls(broker, args.lines))}")
            print(f"file round trip (device3 file-transfer: upload + download, SHA-256 checked) in {files.parent}")
            print(f"  raw pyzmq 256 KiB frames, echoed    : {raw_transfer_baseline(args.mb):7.0f} MB/s")
            lib, cli = zdut_file(agent, args.mb, files)
            print(f"  zdut direct, {args.mb} MiB, library : {rates(lib)}")
            print(f"  zdut direct, {args.mb} MiB, one CLI call incl. start-up: {cli:4.0f} MB/s")
            raw = [raw_file_baseline(args.broker_mb, files) for _ in range(3)]
            print(f"  raw pyzmq, the same job through a minimal relay, {args.broker_mb} MiB : {rates(raw)}")
            lib, cli = zdut_file(broker, args.broker_mb, files)
            print(f"  zdut via broker, {args.broker_mb} MiB, library : {rates(lib)}")
            print(f"  zdut via broker, {args.broker_mb} MiB, one CLI call incl. start-up: {cli:4.0f} MB/s")
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
