"""What lab automation costs (issue 14), each figure beside a baseline measured in the same run.

    .venv/bin/python bench/bench_automation.py [--rounds 3] [--lines 2000] [--runs 2000] [--handovers 200]

1. ``expect`` round trip through a broker: ``console.sendline(w)`` then ``console.expect(w)`` on an echoing
   console (zdut.expect), beside the raw echo through the client library (write stdin, read the line back;
   bench_sessions.library_echo), alternating round by round.  Target: within 1.2x.
2. ``Lab.run`` of a short command through a broker (the synchronous API, open connection), beside a raw pyzmq
   round trip through a minimal relay (bench_sessions.raw_relay_baseline).  Target: under 0.5 ms p50.
3. Lock hand-over: a holder unlocks while a second connection waits in the queue (``lock(wait=)``); the time
   from the unlock call until the waiter holds the lock, beside a plain unlock + lock by one connection.
   Target: under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sessions import library_echo, machine_note, percentiles, raw_relay_baseline, start_lab, stop_all

from zdut.aio import AsyncLab
from zdut.api import Lab


def expect_echo(addr: str, n: int) -> list[float]:
    """sendline + expect of the echoed word on the demo's echoing console (device2 repeat)."""

    async def go() -> list[float]:
        async with AsyncLab(addr) as lab:
            console = await lab.open("device2", "repeat")
            await console.expect("Enter one word per line[^\n]*\n", timeout=10)
            samples = []
            for i in range(n + 50):
                word = f"word{i}"
                t = time.perf_counter()
                await console.sendline(word)
                await console.expect(word + "\n", timeout=10)
                dt = time.perf_counter() - t
                if i >= 50:
                    samples.append(dt)
            await console.close()
            return samples

    return asyncio.run(go())


def lab_runs(addr: str, n: int) -> list[float]:
    with Lab(addr) as lab:
        for _ in range(50):
            lab.run("device1", "status")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            lab.run("device1", "status")
            samples.append(time.perf_counter() - t)
    return samples


def handovers(addr: str, n: int) -> tuple[list[float], list[float]]:
    """(unlock until the waiter holds the lock, a plain unlock then lock by one connection)."""

    async def go() -> tuple[list[float], list[float]]:
        async with AsyncLab(addr, user="holder") as holder, AsyncLab(addr, user="waiter") as waiter:
            handed, plain = [], []
            for _ in range(n):
                await holder.lock("device1", "1m")
                waiting = asyncio.ensure_future(waiter.lock("device1", "1m", wait="30s"))
                while "waiter" not in next(d for d in await holder.devices() if d.name == "device1").waiting:
                    await asyncio.sleep(0.001)
                t = time.perf_counter()
                await holder.unlock("device1")
                await waiting
                handed.append(time.perf_counter() - t)
                t = time.perf_counter()
                await waiter.unlock("device1")
                await waiter.lock("device1", "1m")
                plain.append(time.perf_counter() - t)
                await waiter.unlock("device1")
            return handed, plain

    return asyncio.run(go())


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--handovers", type=int, default=200)
    args = parser.parse_args()
    print(machine_note())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "files").mkdir()
        procs, _, broker = start_lab(tmp, tmp / "files")
        try:
            print(f"1. expect round trip through a broker ({args.lines} lines a round)")
            for r in range(args.rounds):
                raw = library_echo(broker, args.lines)
                scripted = expect_echo(broker, args.lines)
                print(f"   round {r + 1}: raw echo (library)  {percentiles(raw)}")
                print(f"            sendline+expect      {percentiles(scripted)}   p50 ratio "
                      f"{ratio(scripted, raw):.2f}  (target <= 1.2)")
            print(f"2. Lab.run of a short command through a broker ({args.runs} runs)")
            relay = raw_relay_baseline(args.runs)
            runs = lab_runs(broker, args.runs)
            print(f"   raw pyzmq relay round trip   {percentiles(relay)}")
            print(f"   Lab.run device1 status       {percentiles(runs)}   (target p50 < 500 us)")
            print(f"3. lock hand-over to the next in the queue ({args.handovers} times)")
            handed, plain = handovers(broker, args.handovers)
            print(f"   plain unlock + lock          {percentiles(plain)}")
            print(f"   unlock until the waiter has it {percentiles(handed)}   (target p50 < 50 ms)")
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
