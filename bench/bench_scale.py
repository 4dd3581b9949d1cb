"""A lab of 100,000 devices (issue 15): registration storms, big listings and broker memory, each figure beside
a raw pyzmq baseline measured in the same run.

1. storm, one broker: 10,000 simulated agents with 10 devices each connect at once and register with a real
   ``zdut-broker``; the time until every one has its ``Registered``.  Baseline: a raw ROUTER process that
   answers every message at once.
2. storm, two brokers: the same agents register with two brokers at once (two connections each, as
   ``zdut-agent --server A --server B`` does).  Baseline: two raw ROUTER processes.
3. listing: ``zdut list`` of all 100,000 devices and ``zdut list --match GLOB`` (filtered by the broker), beyond
   the CLI's own start-up (``zdut version``); and ``ListDevices`` round trips.  Baseline: a raw ROUTER answering
   with a blob of the same size.
4. memory: the broker's VmRSS and VmHWM holding 100,000 devices; baseline: the raw ROUTER holding the same
   connections.

The simulated agents live in worker processes (a process cannot hold 20,000 sockets: each needs two file
descriptors), each a plain pyzmq loop that, as ``zdut-agent`` does, heartbeats every ``--heartbeat`` seconds,
answers the broker's heartbeats and registers again when the broker asks, so every agent stays online while the
listings are measured.  The raw baselines' agents only register (a raw ROUTER has no liveness to keep).

Run: ``.venv/bin/python bench/bench_scale.py`` (``--agents 2000`` for a smaller run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from bench_broker import RAW_SERVER, USER, dealer, start_broker

from zdut import protocol as P

#: Simulated agents per worker process: two sockets (broker connections) each stays well inside 20,000 fds.
PER_WORKER = 2500
_decoder = msgspec.msgpack.Decoder(P.Message)

WORKER = r"""
import sys, time, zmq
from zdut import protocol as P
first, count, devices = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
eps, raw = sys.argv[4].split(","), sys.argv[5] == "raw"
heartbeat = P.encode(P.Heartbeat())
frames = []
for i in range(first, first + count):
    entries = [P.DeviceEntry(f"agent{i:05d}-dev{j:02d}", [P.CommandInfo("status", "Report status"),
                                                         P.CommandInfo("power", "Switch power on or off")])
               for j in range(devices)]
    frames.append(P.encode(P.Register(P.VERSION, f"agent{i:05d}", "i", f"host{i}:1024", entries, {})))
ctx = zmq.Context()
ctx.max_sockets = count * len(eps) + 100
print("ready", flush=True)
sys.stdin.readline()  # go
started = time.perf_counter()
socks = []
for register in frames:
    for ep in eps:
        s = ctx.socket(zmq.DEALER)
        s.linger, s.sndhwm, s.rcvhwm = 0, 0, 0
        s.connect(ep)
        s.send_multipart([b"", register])
        socks.append(s)
poller = zmq.Poller()
for s in socks:
    poller.register(s, zmq.POLLIN)
poller.register(sys.stdin.fileno(), zmq.POLLIN)
register_of = {s: frames[i // len(eps)] for i, s in enumerate(socks)}
waiting, registered = set(socks), P.Registered.__struct_config__.tag.encode()
rereg = P.encode(P.Reregister())
heartbeat_s, beat_at, asked = float(sys.argv[6]), time.monotonic(), {}
while True:
    ready = dict(poller.poll(100))
    if sys.stdin.fileno() in ready:
        break  # the parent closed our stdin: the end
    for s in ready:
        while s.poll(0):
            reply = s.recv_multipart()
            if s in waiting:
                if not raw and registered not in reply[-1][:16]:
                    print(f"refused: {reply[-1][:200]!r}", flush=True)
                    sys.exit(1)
                waiting.discard(s)
                if not waiting:
                    print(f"registered {time.perf_counter() - started:.3f}", flush=True)
            elif reply[-1] == heartbeat:  # the broker heard nothing from this agent for a while: answer
                s.send_multipart([b"", heartbeat])
            elif reply[-1] == rereg and time.monotonic() - asked.get(s, 0.0) >= max(heartbeat_s, 1.0):
                asked[s] = time.monotonic()  # the broker lost us: register again, at most once a heartbeat, as
                s.send_multipart([b"", register_of[s]])  # zdut-agent does (each reply to a register is a rereg)
    if not raw and time.monotonic() - beat_at >= heartbeat_s:  # an idle agent heartbeats on its own
        beat_at = time.monotonic()
        for s in socks:
            if s not in waiting:
                s.send_multipart([b"", heartbeat])
"""


class Workers:
    """Simulated agents across processes: ``go`` starts every worker's storm, ``wait`` returns the slowest
    worker's time to be fully registered."""

    def __init__(self, n_agents: int, n_devices: int, endpoints: list[str], raw: bool,
                 heartbeat: float = 1.0) -> None:
        self.procs = []
        for first in range(0, n_agents, PER_WORKER):
            args = [sys.executable, "-c", WORKER, str(first), str(min(PER_WORKER, n_agents - first)), str(n_devices),
                    ",".join(endpoints), "raw" if raw else "zdut", str(heartbeat)]
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in self.procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def storm(self, timeout: float = 120.0) -> float:
        started = time.perf_counter()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if not line.startswith("registered"):
                raise RuntimeError(f"a worker failed: {line!r}")
        took = time.perf_counter() - started
        if took > timeout:
            raise RuntimeError(f"storm took {took:.1f} s")
        return took

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def memory(pid: int) -> str:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rss, hwm = (int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))
    return f"VmRSS {rss} MiB, VmHWM {hwm} MiB"


def start_raw_router(blob_size: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(blob_size)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def round_trips(ep: str, request: bytes, rounds: int) -> tuple[list[float], int]:
    """Times of ``rounds`` requests answered on one connection, and the last reply's size."""
    sock = dealer(zmq.Context.instance(), ep)
    times, size = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        sock.send(request)
        if not sock.poll(20_000):
            raise RuntimeError("no answer within 20 s")
        size = len(sock.recv())
        times.append(time.perf_counter() - started)
    sock.close(0)
    return times, size


def cli_ms(ep: str, *words: str, rounds: int = 3) -> tuple[float, float, int]:
    """``zdut -s EP WORDS``: best wall time of ``rounds``, the CLI's best start-up (``zdut version``), both
    in ms, and the lines it printed."""
    exe = str(Path(sys.executable).with_name("zdut"))
    env = {**os.environ, "ZDUT_SERVER": ""}

    def timed(*args: str) -> tuple[float, str]:
        started = time.perf_counter()
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"zdut {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return (time.perf_counter() - started) * 1000, proc.stdout

    base = min(timed("version")[0] for _ in range(rounds))
    runs = [timed("-s", ep, *words) for _ in range(rounds)]
    return min(t for t, _ in runs), base, runs[0][1].count("\n")


def percentiles(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return f"median {statistics.median(ms):7.1f} ms  max {ms[-1]:7.1f} ms"


def one_broker(n_agents: int, n_devices: int, heartbeat: float, glob: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker, ep, log = start_broker(Path(tmp) / "broker.sqlite3", heartbeat)
        workers = Workers(n_agents, n_devices, [ep], raw=False, heartbeat=heartbeat)
        try:
            out["storm"] = workers.storm()
            request = P.encode(P.ListDevices(1, P.VERSION, USER))
            out["list"], out["list_bytes"] = round_trips(ep, request, 10)
            reply = _decoder.decode(dealer_ask(ep, request))
            assert isinstance(reply, P.DeviceList)
            out["online"] = sum(d.online for d in reply.devices)
            out["cli_all"] = cli_ms(ep, "list")
            out["cli_match"] = cli_ms(ep, "list", "--match", glob)
            out["memory"] = memory(broker.pid)
        finally:
            workers.close()
            broker.terminate()
            broker.wait(60)
        out["errors"] = [line for line in log.read_text().splitlines() if "ERROR" in line][:3]
    raw, raw_ep = start_raw_router(out["list_bytes"])
    workers = Workers(n_agents, n_devices, [raw_ep], raw=True)
    try:
        out["storm_raw"] = workers.storm()
        out["list_raw"], _ = round_trips(raw_ep, b"list", 10)
        out["memory_raw"] = memory(raw.pid)
    finally:
        workers.close()
        raw.kill()
        raw.wait()
    return out


def dealer_ask(ep: str, request: bytes) -> bytes:
    sock = dealer(zmq.Context.instance(), ep)
    sock.send(request)
    if not sock.poll(20_000):
        raise RuntimeError("no answer within 20 s")
    reply = sock.recv()
    sock.close(0)
    return reply


def two_brokers(n_agents: int, n_devices: int, heartbeat: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = [start_broker(Path(tmp) / f"broker{i}.sqlite3", heartbeat) for i in range(2)]
        workers = Workers(n_agents, n_devices, [ep for _, ep, _ in started], raw=False, heartbeat=heartbeat)
        try:
            out["storm"] = workers.storm()
            out["memory"] = [memory(proc.pid) for proc, _, _ in started]
        finally:
            workers.close()
            for proc, _, _ in started:
                proc.terminate()
            for proc, _, _ in started:
                proc.wait(60)
    raws = [start_raw_router(16) for _ in range(2)]
    workers = Workers(n_agents, n_devices, [ep for _, ep in raws], raw=True)
    try:
        out["storm_raw"] = workers.storm()
    finally:
        workers.close()
        for proc, _ in raws:
            proc.kill()
            proc.wait()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--devices", type=int, default=10, help="per agent")
    # 5 s, as docs/deployment.md advises past a few thousand agents: at the broker's default of 1 s, 10,000
    # agents simulated on the broker's own 2 cores cannot all heartbeat on time, and flap offline.
    ap.add_argument("--heartbeat", type=float, default=5.0, help="the brokers' --heartbeat (default 5)")
    args = ap.parse_args(argv)
    n = args.agents * args.devices
    glob = "agent0042*"
    print(f"zdut scale benchmark: {args.agents:,} agents x {args.devices} devices = {n:,} devices; Python "
          f"{sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {os.cpu_count()} CPUs, "
          f"agents simulated by {-(-args.agents // PER_WORKER)} worker processes, "
          f"broker --heartbeat {args.heartbeat}\n")
    one = one_broker(args.agents, args.devices, args.heartbeat, glob)
    print("storm, one broker (every agent connects and registers at once)")
    print(f"  zdut-broker        all {args.agents:,} Registered in {one['storm']:.2f} s")
    print(f"  raw pyzmq ROUTER   all {args.agents:,} answered   in {one['storm_raw']:.2f} s\n")
    print(f"listing of {one['online']:,}/{n:,} online devices ({one['list_bytes'] / 2**20:.1f} MiB reply)")
    print(f"  ListDevices round trip (10, reply received, not decoded): {percentiles(one['list'])}")
    print(f"  raw blob of the same size                             : {percentiles(one['list_raw'])}")
    for words, (took, base, lines) in (("list", one["cli_all"]), (f"list --match '{glob}'", one["cli_match"])):
        print(f"  zdut {words:24} {took - base:6.0f} ms beyond start-up ({took:.0f} ms in all; `zdut version` "
              f"{base:.0f} ms; {lines:,} lines)")
    print(f"\nmemory with {n:,} devices\n  zdut-broker        {one['memory']}")
    print(f"  raw pyzmq ROUTER   {one['memory_raw']} (the same connections, no state)\n")
    two = two_brokers(args.agents, args.devices, args.heartbeat)
    print("storm, two brokers (every agent registers with both at once)")
    print(f"  zdut-broker x2     all {args.agents:,} Registered with both in {two['storm']:.2f} s "
          f"({'; '.join(two['memory'])})")
    print(f"  raw pyzmq ROUTER x2 all {args.agents:,} answered by both in {two['storm_raw']:.2f} s")
    if one["errors"]:
        print("broker log errors:", *one["errors"], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
