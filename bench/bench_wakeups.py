"""Thread wake-ups per console echo round trip, per process and thread, zdut beside the same-shape chain;
with ``--runs N``, per ``Lab.run`` of a short command instead, through a broker and directly (issue 14).

A wake-up is a voluntary context switch (/proc/PID/task/TID/status): a thread that slept and was woken.
On a VM without halt polling each costs a VM exit, so this count, not CPU time, sets the echo latency.

    .venv/bin/python bench/bench_wakeups.py [--lines 2000] [--runs 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sessions import (  # the bench folder is not a package: found through sys.path
    BIN,
    CHAIN_CLIENT,
    CHAIN_ECHO,
    CHAIN_RELAY,
    free_port,
    percentiles,
    pipe_echo,
    start_lab,
    stop_all,
)

from zdut.api import Lab

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> Counter[str]:
    """Voluntary context switches of each thread of ``pid``, keyed by thread name (numbered when repeated),
    and under "cpu us" the process's CPU time (user + system)."""
    out: Counter[str] = Counter()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_us = (int(stat[11]) + int(stat[12])) * TICK_US  # utime, stime
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        try:
            name = (task / "comm").read_text().strip()
            fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        except OSError:
            continue  # the thread ended meanwhile
        key, n = name, 2
        while key in out:
            key, n = f"{name}#{n}", n + 1
        out[key] = int(fields["voluntary_ctxt_switches"])
    out["cpu us"] = int(cpu_us)
    return out


class WakeupMeter:
    """Counts wake-ups of named processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, Counter[str]] = {}
        self.after: dict[str, Counter[str]] = {}

    def __call__(self, proc: subprocess.Popen[bytes], starting: bool) -> None:
        pids = {**self.pids, "client": proc.pid}
        taken = {name: switches(pid) for name, pid in pids.items()}
        if starting:
            self.before = taken
        else:
            self.after = taken

    def report(self, title: str, n: int) -> None:
        total = total_cpu = 0.0
        print(f"{title}: wake-ups per round trip")
        for proc, after in self.after.items():
            before = self.before.get(proc, Counter())
            per = {t: (after[t] - before.get(t, 0)) / n for t in after}
            cpu = per.pop("cpu us")
            busy = {t: v for t, v in per.items() if v >= 0.05}
            total += sum(per.values())
            total_cpu += cpu
            print(f"  {proc:8s} {sum(per.values()):5.2f}  cpu {cpu:4.0f} us  "
                  + "  ".join(f"{t}={v:.2f}" for t, v in busy.items()))
        print(f"  total    {total:5.2f}  cpu {total_cpu:4.0f} us")


def chain(n: int) -> None:
    ep = f"tcp://127.0.0.1:{free_port()}"
    relay = subprocess.Popen([sys.executable, "-c", CHAIN_RELAY, ep])
    echo = subprocess.Popen([sys.executable, "-c", CHAIN_ECHO, ep], stdout=subprocess.PIPE)
    assert echo.stdout
    echo.stdout.readline()
    meter = WakeupMeter({"relay": relay.pid, "echo": echo.pid})
    try:
        samples = pipe_echo([sys.executable, "-c", CHAIN_CLIENT, ep], n, measure=meter)
    finally:
        relay.wait(5)
        echo.kill()
        echo.wait(5)
    print(f"raw pyzmq 4-process chain: {percentiles(samples)}")
    meter.report("raw chain", n)


def zdut(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        procs, _, broker = start_lab(Path(d), Path(d))
        try:
            meter = WakeupMeter({"broker": procs[0].pid, "agent": procs[1].pid})
            samples = pipe_echo([str(BIN / "zdut"), "-s", broker, "device2", "repeat"], n, greeting_lines=2,
                                farewell=b"two words\n", measure=meter)
            print(f"zdut through the broker: {percentiles(samples)}")
            meter.report("zdut", n)
        finally:
            stop_all(procs)


def lab_runs(n: int) -> None:
    """``Lab.run("device1", "status")`` n times through the broker, then directly; this process is the client."""
    with tempfile.TemporaryDirectory() as d:
        procs, agent, broker = start_lab(Path(d), Path(d))
        try:
            for title, address in (("Lab.run through the broker", broker), ("Lab.run direct to the agent", agent)):
                meter = WakeupMeter({"broker": procs[0].pid, "agent": procs[1].pid, "client": os.getpid()})
                with Lab(address) as lab:
                    for _ in range(100):  # warm-up: connection, caches
                        lab.run("device1", "status")
                    samples = []
                    meter.before = {name: switches(pid) for name, pid in meter.pids.items()}
                    for _ in range(n):
                        started = time.perf_counter()
                        lab.run("device1", "status")
                        samples.append(time.perf_counter() - started)
                    meter.after = {name: switches(pid) for name, pid in meter.pids.items()}
                print(f"{title}: {percentiles(samples)}")
                meter.report(title, n)
        finally:
            stop_all(procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=0, help="Lab.run calls instead of the console echo")
    args = ap.parse_args()
    if args.runs:
        lab_runs(args.runs)
        return
    chain(args.lines)
    zdut(args.lines)


if __name__ == "__main__":
    main()
