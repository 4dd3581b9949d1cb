"""What watchers and the journal cost the session they watch (issue 13).

    .venv/bin/python bench/bench_watch.py [--rounds 3] [--lines 2000] [--mb 100]

1. Console echo p50/p99 through a broker with no watcher and with one, alternating round by round (the
   same agent, broker and machine), so a noisy spell hits both.
2. ``--mb`` MB of console output at full speed to the owner while two watchers follow and the journal
   records it: the owner's copy checked complete and in order, the time, and the agent's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sessions import BIN, free_port, percentiles, pipe_echo, stop_all

CONFIG = """\
version: 0
devices:
  board:
    cmds:
      console:
        uses:
          - module: dummy-repeat
      spew:
        uses:
          - module: shell
            passthrough: true
"""


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def watcher(addr: str, user: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "zdut"), "-s", addr, "-u", user, "board", "watch", "-n", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def until_listed(addr: str, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in subprocess.run([str(BIN / "zdut"), "-s", addr, "list"], capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            raise SystemExit(f"{addr} never listed {text!r}")
        time.sleep(0.1)


def until_watched(addr: str, count: int) -> None:
    until_listed(addr, f"({count} watching)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=100)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "watch.yaml").write_text(CONFIG)
        env = {**os.environ, "XDG_STATE_HOME": str(tmp)}
        broker, agent_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        procs = [subprocess.Popen([str(BIN / "zdut-broker"), "-s", broker, "--state", str(tmp / "b.sqlite3"),
                                   "--log", "warn"], env=env)]
        agent = subprocess.Popen([str(BIN / "zdut-agent"), "-a", agent_addr, "-c", str(tmp / "watch.yaml"),
                                  "--server", broker, "--log", "warn"], env=env)
        procs.append(agent)
        try:
            until_listed(broker, ", online)")
            echo = [str(BIN / "zdut"), "-s", broker, "-u", "alice", "board", "console"]
            for i in range(opts.rounds):
                alone = sorted(pipe_echo(echo, opts.lines, greeting_lines=2, farewell=b"two words\n"))
                w = watcher(broker, "bob")
                until_watched(broker, 1)
                watched = sorted(pipe_echo(echo, opts.lines, greeting_lines=2, farewell=b"two words\n"))
                w.send_signal(signal.SIGINT)
                w.wait(10)
                ratio = watched[len(watched) // 2] / alone[len(alone) // 2]
                print(f"round {i + 1}: echo alone {percentiles(alone)} | one watcher {percentiles(watched)} | "
                      f"p50 ratio {ratio:.2f}", flush=True)

            watchers = [watcher(broker, "bob"), watcher(broker, "carol")]
            until_watched(broker, 2)
            before = vm_hwm_mb(agent.pid)
            lines = opts.mb * 1024 * 1024 // 64
            spew = f"seq -f '%062.0f' 1 {lines}"  # 63-byte numbered lines + newline: order is checkable
            t = time.perf_counter()
            r = subprocess.run([str(BIN / "zdut"), "-s", broker, "-u", "alice", "board", "spew", spew],
                               capture_output=True)
            elapsed = time.perf_counter() - t
            want = hashlib.sha256(subprocess.run(["sh", "-c", spew], capture_output=True).stdout).hexdigest()
            got = hashlib.sha256(r.stdout).hexdigest()
            print(f"{len(r.stdout) / 1e6:.0f} MB to the owner with two watchers and the journal: "
                  f"{'complete and in order' if got == want and r.returncode == 0 else 'DIFFERENT'}, "
                  f"{len(r.stdout) / 1e6 / elapsed:.0f} MB/s; agent VmHWM {before:.0f} MB before, "
                  f"{vm_hwm_mb(agent.pid):.0f} MB after")
            for w in watchers:
                w.send_signal(signal.SIGINT)
                w.wait(10)
        finally:
            stop_all(procs)


if __name__ == "__main__":
    main()
