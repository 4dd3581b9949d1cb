"""Broker benchmarks, each beside a raw pyzmq baseline measured in the same run.

1. relay: many concurrent Run sessions through one broker loop.  Messages are preloaded into the
   broker's socket by agent and client DEALERs of this process, then one thread drains them: wall
   time and that thread's CPU time give relays per second and per broker core.  The baseline is a
   bare per-frame ROUTER relay (same frames, same options, a static route table: no decoding, no
   sessions) fed the same way.
2. storm: 1,000 simulated agents with 10 devices each register with a real ``zdut-broker`` process;
   the time until all of them have their ``Registered``.  Baseline: a raw ROUTER process that
   answers every message at once.
3. listing: ``ListDevices`` of those 10,000 devices, round trip including decoding the reply.
   Baseline: a raw ROUTER process answering with a blob of the same size.

Run: ``.venv/bin/python bench/bench_broker.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from zdut import protocol as P
from zdut.broker import Broker

USER = "bench"
_decoder = msgspec.msgpack.Decoder(P.Message)  # no 64 KiB cap: the big listing is over it


def dealer(ctx: zmq.Context[Any], ep: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndhwm = 0
    s.rcvhwm = 0
    s.connect(ep)
    return s


def drain_count(sock: zmq.Socket[Any]) -> int:
    n = 0
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1


# ==================================================================== 1. relay


class RelaySetup:
    """Agents, clients and open sessions, ready to be preloaded."""

    def __init__(self, ctx: zmq.Context[Any], ep: str, n_agents: int, n_clients: int, n_sessions: int) -> None:
        self.agents = [dealer(ctx, ep) for _ in range(n_agents)]
        self.clients = [dealer(ctx, ep) for _ in range(n_clients)]
        # session -> (client index, sid, agent index)
        self.sessions = [(s % n_clients, 1000 + s, s % n_agents) for s in range(n_sessions)]
        self.cids: dict[tuple[int, int], bytes] = {}  # (client index, sid) -> client routing id at the broker

    def preload(self, n: int, payload: bytes) -> int:
        """Each session: n Data+payload agent -> client and n Credit client -> agent.  Returns relays queued."""
        for ci, sid, ai in self.sessions:
            cid = self.cids[(ci, sid)]
            agent, client = self.agents[ai], self.clients[ci]
            for seq in range(1, n + 1):
                agent.send(cid, zmq.SNDMORE)
                agent.send(P.encode(P.Data(sid, seq, P.STDOUT)), zmq.SNDMORE)
                agent.send(payload)
                client.send(P.encode(P.Credit(sid, seq, 320)))
        return 2 * n * len(self.sessions)

    def delivered(self) -> int:
        return sum(drain_count(s) for s in self.agents + self.clients)

    def close(self) -> None:
        for s in self.agents + self.clients:
            s.close(0)


def pump(broker: Broker, cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("bench set-up timed out")
        broker.serve_once(0.01)


def relay_zdut(n_sessions: int, n_msgs: int, payload: bytes) -> dict[str, float]:
    ctx = zmq.Context()
    broker = Broker("tcp://127.0.0.1:*", None, heartbeat_s=3600, hwm=0, ctx=ctx)
    setup = RelaySetup(ctx, broker.endpoint, 10, 10, n_sessions)
    for i, a in enumerate(setup.agents):
        reg = P.Register(P.VERSION, f"agent{i}", "x", "", [P.DeviceEntry(f"dev{i}", [P.CommandInfo("c", "")])], {})
        a.send_multipart([b"", P.encode(reg)])
    pump(broker, lambda: len(broker.registry.by_rid) == len(setup.agents))
    for a in setup.agents:
        drain_count(a)
    for ci, sid, ai in setup.sessions:
        setup.clients[ci].send(P.encode(P.RunOpen(sid, P.VERSION, USER, f"dev{ai}", "c", [])))
    pump(broker, lambda: len(broker._sessions) == len(setup.sessions))
    opened = 0
    while opened < len(setup.sessions):  # every RunOpen has reached its agent: nothing stray is counted later
        opened += sum(drain_count(a) for a in setup.agents)
        broker.serve_once(0.01)
    # which client socket has which routing id: every session has its own sid
    by_sid = {sid: ci for ci, sid, _ in setup.sessions}
    for cid, sid in broker._sessions:
        setup.cids[(by_sid[sid], sid)] = cid
    total = setup.preload(n_msgs, payload)
    time.sleep(1.0)  # let the IO thread move the preload into the broker's pipes
    before = broker.stats["relayed"]
    t0, c0 = time.perf_counter(), time.thread_time()
    while broker.stats["relayed"] - before < total:
        broker.serve_once(0.05)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    got = wait_delivered(setup, total)
    setup.close()
    broker.close()
    ctx.destroy(0)
    return {"relays": total, "wall": wall, "cpu": cpu, "delivered": got}


def wait_delivered(setup: RelaySetup, total: int) -> int:
    got, deadline = 0, time.monotonic() + 30
    while got < total and time.monotonic() < deadline:
        got += setup.delivered()
        time.sleep(0.01)
    return got


def relay_raw(n_sessions: int, n_msgs: int, payload: bytes) -> dict[str, float]:
    """The floor: a per-frame ROUTER relay with a static route table, fed the same frames."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.sndhwm = router.rcvhwm = 0
    router.bind("tcp://127.0.0.1:*")
    ep = router.getsockopt_string(zmq.LAST_ENDPOINT)
    setup = RelaySetup(ctx, ep, 10, 10, n_sessions)
    rids: dict[int, bytes] = {}
    for i, s in enumerate(setup.agents + setup.clients):
        s.send(str(i).encode())
        rid, who = router.recv_multipart()
        rids[int(who)] = rid
    agent_rids = {rids[i] for i in range(len(setup.agents))}
    route: dict[bytes, bytes] = {}  # client rid -> agent rid (one agent per client keeps it static)
    for ci, sid, ai in setup.sessions:
        cid = rids[len(setup.agents) + ci]
        setup.cids[(ci, sid)] = cid
        route[cid] = rids[ai]
    total = setup.preload(n_msgs, payload)
    time.sleep(1.0)
    recv, send, getmore = router.recv, router.send, router.getsockopt
    more_nb, nb, rcvmore = zmq.SNDMORE | zmq.NOBLOCK, zmq.NOBLOCK, zmq.RCVMORE
    n = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    while n < total:
        router.poll(50)
        while True:
            try:
                rid = recv(nb)
            except zmq.Again:
                break
            first = recv()
            if rid in agent_rids:  # [cid][header][payload]
                header = recv()
                body = recv(copy=False) if getmore(rcvmore) else None
                send(first, more_nb)
                if body is None:
                    send(header, nb)
                else:
                    send(header, more_nb)
                    send(body, nb, copy=False)
            else:  # client [header][payload?]
                body = recv(copy=False) if getmore(rcvmore) else None
                send(route[rid], more_nb)
                send(rid, more_nb)
                if body is None:
                    send(first, nb)
                else:
                    send(first, more_nb)
                    send(body, nb, copy=False)
            n += 1
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    got = wait_delivered(setup, total)
    setup.close()
    router.close(0)
    ctx.destroy(0)
    return {"relays": total, "wall": wall, "cpu": cpu, "delivered": got}


# ==================================================================== 1b. relay end to end

RAW_RELAY = r"""
import zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.ROUTER_MANDATORY, 1)
r.bind("tcp://127.0.0.1:*"); print(r.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
agents, route, waiting = {}, {}, {}  # agent index -> rid; client rid -> agent rid; early clients
recv, more = r.recv, r.getsockopt
def send(frame, flags=0, copy=True):
    try:
        r.send(frame, flags, copy=copy)
    except zmq.ZMQError:
        pass  # a peer that left: dropped (the zdut broker tears sessions down instead)
while True:
    rid = recv(); first = recv()
    if first.startswith(b"HELLO"):
        kind, idx = first[5:6], int(first[6:])
        if kind == b"A":
            agents[idx] = rid
            for c in waiting.pop(idx, []): route[c] = rid
        elif idx in agents: route[rid] = agents[idx]
        else: waiting.setdefault(idx, []).append(rid)  # the client's hello overtook its agent's
        continue
    if first == b"quit": break
    if rid in route:  # client [header][payload?] -> [agent][client][header][payload?]
        body = recv(copy=False) if more(zmq.RCVMORE) else None
        send(route[rid], zmq.SNDMORE); send(rid, zmq.SNDMORE)
        send(first, zmq.SNDMORE) if body is not None else send(first)
        if body is not None: send(body, copy=False)
    else:  # agent [cid][header][payload?] -> [cid][header][payload?]
        header = recv(); body = recv(copy=False) if more(zmq.RCVMORE) else None
        send(first, zmq.SNDMORE)
        send(header, zmq.SNDMORE) if body is not None else send(header)
        if body is not None: send(body, copy=False)
"""


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def e2e_load(ep: str, zdut: bool, seconds: float, per_agent: int, window: int, payload: bytes) -> dict[str, float]:
    """10 agents stream Data under a credit window (in messages) to 10 clients that return Credit every 16.
    One process, one thread drives all peers; counts what arrives."""
    ctx = zmq.Context()
    agents = [dealer(ctx, ep) for _ in range(10)]
    clients = [dealer(ctx, ep) for _ in range(10)]
    for i, a in enumerate(agents):
        if zdut:
            reg = P.Register(P.VERSION, f"agent{i}", "x", "", [P.DeviceEntry(f"dev{i}", [])], {})
            a.send_multipart([b"", P.encode(reg)])
            a.recv_multipart()  # Registered
        else:
            a.send(b"HELLOA%d" % i)
    for i, c in enumerate(clients):
        if not zdut:
            c.send(b"HELLOC%d" % i)
        for k in range(per_agent):
            c.send(P.encode(P.RunOpen(k, P.VERSION, USER, f"dev{i}", "c", [])))
    credit: dict[tuple[int, bytes, int], int] = {}
    for i, a in enumerate(agents):
        while len([k for k in credit if k[0] == i]) < per_agent:
            frames = a.recv_multipart()
            if frames[0]:
                credit[(i, frames[0], _decoder.decode(frames[1]).sid)] = window
    seq: dict[tuple[int, bytes, int], int] = dict.fromkeys(credit, 0)
    consumed = dict.fromkeys(((ci, sid) for ci in range(10) for sid in range(per_agent)), 0)
    back_seq = dict(consumed)
    poller = zmq.Poller()
    for s in agents + clients:
        poller.register(s, zmq.POLLIN)
    role = {**{a: ("a", i) for i, a in enumerate(agents)}, **{c: ("c", i) for i, c in enumerate(clients)}}
    relays = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for key, n in credit.items():
            if n:
                ai, cid, sid = key
                a = agents[ai]
                for _ in range(n):
                    seq[key] += 1
                    a.send(cid, zmq.SNDMORE)
                    a.send(P.encode(P.Data(sid, seq[key], P.STDOUT)), zmq.SNDMORE)
                    a.send(payload)
                credit[key] = 0
        for sock, _ in poller.poll(1):
            kind, idx = role[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                relays += 1
                if kind == "c":
                    sid = _decoder.decode(frames[0]).sid
                    consumed[(idx, sid)] += 1
                    if consumed[(idx, sid)] % 16 == 0:
                        back_seq[(idx, sid)] += 1
                        sock.send(P.encode(P.Credit(sid, back_seq[(idx, sid)], 16)))
                elif frames[0]:
                    msg = _decoder.decode(frames[1])
                    credit[(idx, frames[0], msg.sid)] += msg.nbytes
    elapsed = seconds + (time.perf_counter() - end)
    ctx.destroy(0)
    return {"relays": relays, "wall": elapsed}


def relay_e2e(seconds: float, payload: bytes) -> dict[str, dict[str, float]]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker, ep, _ = start_broker(Path(tmp) / "b.sqlite3", heartbeat=60.0)
        try:
            c0 = proc_cpu(broker.pid)
            out["zdut"] = e2e_load(ep, True, seconds, 10, 256, payload)
            out["zdut"]["cpu"] = proc_cpu(broker.pid) - c0
        finally:
            broker.terminate()
            broker.wait(20)
    raw = subprocess.Popen([sys.executable, "-c", RAW_RELAY], stdout=subprocess.PIPE, text=True)
    try:
        assert raw.stdout is not None
        ep = raw.stdout.readline().strip()
        c0 = proc_cpu(raw.pid)
        out["raw"] = e2e_load(ep, False, seconds, 10, 256, payload)
        out["raw"]["cpu"] = proc_cpu(raw.pid) - c0
    finally:
        raw.kill()
    return out


# ==================================================================== 2 + 3. storm and listing

RAW_SERVER = r"""
import sys, zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.sndhwm = r.rcvhwm = 0
r.setsockopt(zmq.BACKLOG, 4096)  # as the broker
r.bind("tcp://127.0.0.1:*"); print(r.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
blob = bytes(int(sys.argv[1]))
while True:
    frames = r.recv_multipart()
    if frames[-1] == b"quit":
        break
    r.send_multipart([frames[0], blob] if frames[-1] == b"list" else [frames[0], b"", b"ok"])
"""


def start_raw_server(blob_size: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(blob_size)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def start_broker(state: Path, heartbeat: float) -> tuple[subprocess.Popen[bytes], str, Path]:
    log = state.with_suffix(".log")
    fh = open(log, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zdut.broker",
            "-s",
            "tcp://127.0.0.1:*",
            "--state",
            str(state),
            "--heartbeat",
            str(heartbeat),
            "--log",
            "info",
        ],
        stderr=fh,
    )
    fh.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"listening on (tcp://[\d.]+:\d+)", log.read_text())
        if m:
            return proc, m.group(1), log
        time.sleep(0.05)
    raise RuntimeError("broker did not start: " + log.read_text())


def register_frames(i: int, n_devices: int) -> list[bytes]:
    devices = [
        P.DeviceEntry(
            f"agent{i:04d}-dev{j:02d}",
            [P.CommandInfo("status", "Report status"), P.CommandInfo("power", "Switch power on or off")],
        )
        for j in range(n_devices)
    ]
    return [b"", P.encode(P.Register(P.VERSION, f"agent{i:04d}", "i", f"host{i}:1024", devices, {}))]


def storm(ep: str, n_agents: int, n_devices: int, expect: type | None) -> tuple[float, list[zmq.Socket[Any]]]:
    """Connect n_agents DEALERs, each sends its Register; seconds until every one has an answer."""
    ctx = zmq.Context.instance()
    ctx.max_sockets = max(ctx.max_sockets, n_agents + 100)
    frames = [register_frames(i, n_devices) for i in range(n_agents)]
    t0 = time.perf_counter()
    socks = []
    for f in frames:
        s = dealer(ctx, ep)
        s.send_multipart(f)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    waiting = set(socks)
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        for s, _ in poller.poll(1000):
            reply = s.recv_multipart()
            if expect is not None:
                msg = _decoder.decode(reply[1])
                assert isinstance(msg, expect), msg
            if s in waiting:
                waiting.discard(s)
                poller.unregister(s)
    if waiting:
        raise RuntimeError(f"{len(waiting)} agents got no answer")
    return time.perf_counter() - t0, socks


def listing(ep: str, request: bytes, rounds: int, zdut: bool) -> tuple[list[float], int, int]:
    """Round trips of one request, reply decoded (zdut) or just received (raw): times, devices, reply bytes."""
    ctx = zmq.Context.instance()
    s = dealer(ctx, ep)
    times, devices, size = [], 0, 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        s.send(request)
        if not s.poll(10_000):
            raise RuntimeError("no listing within 10 s")
        frame = s.recv()
        if zdut:
            msg = _decoder.decode(frame)
            assert isinstance(msg, P.DeviceList)
            devices = sum(d.online for d in msg.devices)
        times.append(time.perf_counter() - t0)
        size = len(frame)
    s.close(0)
    return times, devices, size


def storm_and_listing(n_agents: int, n_devices: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    req = P.encode(P.ListDevices(1, P.VERSION, USER))
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "broker.sqlite3"
        broker, ep, log = start_broker(state, heartbeat=5.0)
        try:
            out["storm"], socks = storm(ep, n_agents, n_devices, P.Registered)
            out["list"], out["listed"], out["list_bytes"] = listing(ep, req, rounds, zdut=True)
            out["client_list"] = client_list(ep)
            out["cli_list"] = cli_list(ep)
            for s in socks:
                s.close(0)
        finally:
            broker.terminate()
            broker.wait(20)
        errors = [ln for ln in log.read_text().splitlines() if "ERROR" in ln]
        # A restart with every device known: start-up (interpreter included), then everyone re-registers.
        t0 = time.perf_counter()
        broker, ep, log = start_broker(state, heartbeat=5.0)
        out["restart"] = time.perf_counter() - t0
        try:
            out["offline_after_restart"] = n_agents * n_devices - listing(ep, req, 1, zdut=True)[1]
            out["storm_again"], socks = storm(ep, n_agents, n_devices, P.Registered)
            for s in socks:
                s.close(0)
        finally:
            broker.terminate()
            broker.wait(20)
        out["broker_log_errors"] = (errors + [ln for ln in log.read_text().splitlines() if "ERROR" in ln])[:3]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zdut.broker", "--version"], check=True, capture_output=True)
    out["bare_start"] = time.perf_counter() - t0
    raw, raw_ep = start_raw_server(out["list_bytes"])
    try:
        out["storm_raw"], socks = storm(raw_ep, n_agents, n_devices, None)
        for s in socks:
            s.close(0)
        out["list_raw"], _, _ = listing(raw_ep, b"list", rounds, zdut=False)
        quit_sock = dealer(zmq.Context.instance(), raw_ep)
        quit_sock.send(b"quit")
        raw.wait(10)
        quit_sock.close(0)
    finally:
        raw.kill()
    return out


def cli_list(ep: str) -> str:
    """``zdut list`` through the broker, minus the start-up of the same CLI (``zdut version``)."""
    exe = str(Path(sys.executable).with_name("zdut"))
    env = {**os.environ, "ZDUT_SERVER": ""}

    def timed(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.perf_counter()
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=env)
        return time.perf_counter() - t0, proc

    base = min(timed("version")[0] for _ in range(3))
    took, proc = timed("-s", ep, "list")
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
        return f"failed after {took:.1f} s (exit {proc.returncode}): {why}"
    return f"{(took - base) * 1000:.0f} ms beyond start-up ({took * 1000:.0f} ms; `zdut version` {base * 1000:.0f} ms)"


def client_list(ep: str) -> str:
    """The project's client library on the same listing."""
    import asyncio

    from zdut.client import Client

    async def go() -> str:
        async with Client(ep, USER, call_timeout=3) as c:
            t0 = time.perf_counter()
            devices = await c.list()
            return f"{(time.perf_counter() - t0) * 1000:.0f} ms ({len(devices)} devices)"

    try:
        return asyncio.run(go())
    except Exception as exc:
        return f"failed: {exc}"


# ==================================================================== report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (CI smoke)")
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--messages", type=int, default=1000, help="per session and direction")
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=10)
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.agents = 200, 200
    payload = os.urandom(args.payload)
    print(
        f"zdut broker benchmark: Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, "
        f"libzmq {zmq.zmq_version()}, {os.cpu_count()} CPUs\n"
    )

    z = relay_zdut(args.sessions, args.messages, payload)
    r = relay_raw(args.sessions, args.messages, payload)
    print(
        f"relay: {args.sessions} sessions over 10 agents and 10 clients, {z['relays']:,} relays "
        f"(Data+{args.payload} B payload one way, Credit the other), preloaded, one loop thread"
    )
    for name, m in (("zdut-broker loop", z), ("raw pyzmq relay", r)):
        print(
            f"  {name:18} {m['relays'] / m['wall']:>10,.0f} relays/s wall  {m['relays'] / m['cpu']:>10,.0f} "
            f"relays/s per core-second  ({m['cpu'] / m['relays'] * 1e6:.2f} us CPU each; delivered "
            f"{m['delivered']:,}/{m['relays']:,})"
        )
    print(f"  zdut/raw: {z['cpu'] / r['cpu']:.2f}x the CPU per relay\n")

    e = relay_e2e(3.0 if not args.quick else 1.0, payload)
    print(
        "relay end to end: real broker process; 10 agents stream Data to 10 clients over 100 sessions "
        "(window 256 messages, Credit back every 16), all peers driven by one Python thread of this process"
    )
    for name, m in (("zdut-broker", e["zdut"]), ("raw pyzmq relay", e["raw"])):
        print(
            f"  {name:18} {m['relays'] / m['wall']:>10,.0f} relays/s  (relay process CPU "
            f"{100 * m['cpu'] / m['wall']:.0f}% of a core incl. its IO thread)"
        )
    print()

    s = storm_and_listing(args.agents, args.devices, 20)
    n = args.agents * args.devices
    print(f"storm: {args.agents:,} agents x {args.devices} devices register at once (new connections)")
    print(f"  zdut-broker        all {args.agents:,} Registered in {s['storm']:.2f} s")
    print(f"  raw pyzmq ROUTER   all {args.agents:,} answered   in {s['storm_raw']:.2f} s")
    print(
        f"  broker restart with {n:,} known devices: listening after {s['restart']:.2f} s (bare "
        f"`zdut-broker --version` {s['bare_start']:.2f} s), {s['offline_after_restart']:,} listed offline, "
        f"all re-registered in {s['storm_again']:.2f} s\n"
    )
    print(
        f"listing: ListDevices of {s['listed']:,}/{n:,} devices ({s['list_bytes'] / 1024:.0f} KiB reply), "
        f"round trip incl. decode, {len(s['list'])} rounds"
    )
    for name, t in (("zdut-broker", s["list"]), ("raw pyzmq blob", s["list_raw"])):
        print(
            f"  {name:18} first {t[0] * 1000:6.1f} ms  median {statistics.median(t) * 1000:6.1f} ms  "
            f"max {max(t) * 1000:6.1f} ms"
        )
    print(f"  zdut.client list(): {s['client_list']}")
    print(f"  zdut list (CLI): {s['cli_list']}")
    if s["broker_log_errors"]:
        print("broker log errors:", *s["broker_log_errors"], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
