"""Shared fixtures: real zdut processes on loopback, and condition waits with deadlines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from standins.bootloader import Bootloader

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONF = ROOT / "conf"


def exe(name: str) -> str:
    """A console script of this environment (zdut, zdut-agent, zdut-broker)."""
    path = BIN / name
    assert path.exists(), f"{path} missing: install the package (pip install -e .)"
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


@dataclass
class Proc:
    """A background zdut process whose output goes to a log file."""

    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Lab:
    """Starts real zdut-agent / zdut-broker processes and runs the real zdut CLI."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state"), "USER": "tester", "ZDUT_SERVER": "",
                    # no keys from the developer's own config or shell: with one, every CLI call would be CURVE
                    "XDG_CONFIG_HOME": str(tmp / "config"), "ZDUT_KEY": "", "ZDUT_SERVER_KEY": ""}

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        fh = open(log, "wb")
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env or self.env, cwd=self.tmp, start_new_session=True)
        fh.close()
        proc = Proc(popen, log, args)
        self.procs.append(proc)
        return proc

    def agent(self, config: str | Path, port: int | None = None, *extra: str, ready: bool = True) -> tuple[Proc, str]:
        """Start an agent serving ``config`` directly on a free port; wait until it answers."""
        port = port or free_port()
        addr = f"127.0.0.1:{port}"
        proc = self.spawn([exe("zdut-agent"), "-c", str(config), "-a", addr, "--log", "debug", *extra], "agent")
        if ready:
            wait_for(lambda: self.zdut("-s", addr, "list", timeout=5).returncode == 0 or not proc.alive(),
                     15, f"agent on {addr}")
            assert proc.alive(), proc.text()
        return proc, addr

    def broker_args(self, port: int, heartbeat: float = 0.5) -> list[str]:
        """The command line of a zdut-broker on ``port`` with its own state file (without waiting for it)."""
        return [exe("zdut-broker"), "-s", f"127.0.0.1:{port}", "--state", str(self.tmp / f"broker-{port}.sqlite3"),
                "--heartbeat", str(heartbeat), "--log", "debug"]

    def broker(self, port: int | None = None, *extra: str, heartbeat: float = 0.5) -> tuple[Proc, str]:
        """Start a zdut-broker on a free port with its own state file; wait until it answers."""
        port = port or free_port()
        addr = f"127.0.0.1:{port}"
        proc = self.spawn([*self.broker_args(port, heartbeat), *extra], "broker")
        wait_for(lambda: self.zdut("-s", addr, "list", timeout=5).returncode == 0 or not proc.alive(), 15,
                 f"broker on {addr}")
        assert proc.alive(), proc.text()
        return proc, addr

    def brokered_agent(self, config: str | Path, broker: str, port: int | None = None, *extra: str) -> Proc:
        """Start an agent registered with ``broker``; wait until it says so and its devices are listed online there.

        Its own word first: after a restart the broker may still list the previous process online for up to a
        heartbeat, and a readiness check on the listing alone would pass before the new one has registered."""
        proc, _ = self.agent(config, port, "--server", broker, *extra)
        wait_for(lambda: f"registered with broker {broker} " in proc.text() or not proc.alive(), 15,
                 f"{config}'s agent to register with {broker}")
        wait_for(lambda: self.online(broker, self.devices_of(config)) or not proc.alive(), 15,
                 f"{config} online at {broker}")
        return proc

    def serve(self, config: str | Path, how: str) -> str:
        """The address a client uses for ``config``'s devices: ``how`` "direct" (the agent's own) or "brokered"
        (a broker's, which the agent registered with)."""
        if how == "direct":
            return self.agent(config)[1]
        _, broker = self.broker()
        self.brokered_agent(config, broker)
        return broker

    def devices_of(self, config: str | Path) -> list[str]:
        from zdut.agentd.config import load_config

        return sorted(load_config(str(config)).devices)

    def online(self, broker: str, devices: list[str]) -> bool:
        """Whether every device is listed online by the broker."""
        r = self.zdut("-s", broker, "-f", "json", "list", timeout=10)
        if r.returncode != 0:
            return False
        listed = {d["Name"]: d.get("Online") for d in json.loads(r.stdout)["data"]}
        return all(listed.get(d) is True for d in devices)

    def zdut(self, *args: str, input: bytes | None = None, timeout: float = 30, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real CLI to completion; one that does not end within ``timeout`` fails the test with where it
        was (its threads' stacks, which faulthandler prints on SIGABRT)."""
        argv = [exe("zdut"), *args]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or self.tmp,
                                env={**(env or self.env), "PYTHONFAULTHANDLER": "1"})
        try:
            out, err = proc.communicate(input.decode() if input is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{argv} did not end within {timeout:g}s: {stuck(proc)}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def zdut_bg(self, *args: str, name: str = "client") -> Proc:
        return self.spawn([exe("zdut"), *args], name)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context for tests that talk to real processes with raw sockets."""
    c = zmq.Context()
    yield c
    c.destroy(0)


@pytest.fixture
def board() -> Iterator[Bootloader]:
    """The simulated U-Boot board on the far end of a pseudo-terminal (tests/standins/bootloader.py)."""
    b = Bootloader().start()
    yield b
    b.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


_MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
sys.stderr.write(f"\\nPEAK_RSS_KB={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def stuck(proc: subprocess.Popen[Any]) -> str:
    """What a process that overran its time was doing: its state, its kernel wait, and the Python stacks that
    faulthandler (PYTHONFAULTHANDLER) writes to stderr on SIGABRT; or that it had ended and was not read."""
    if proc.poll() is not None:
        return f"it had exited ({proc.returncode}): the test process was not reading (starved or blocked)"
    where = []
    for name in ("status", "wchan", "stack"):
        try:
            text = Path(f"/proc/{proc.pid}/{name}").read_text()
        except OSError as exc:
            text = f"unreadable: {exc}"
        where.append(f"/proc/{proc.pid}/{name}: " + (next((line for line in text.splitlines()
                                                           if line.startswith("State")), "") if name == "status"
                                                     else text.strip()))
    proc.send_signal(signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    said = err.decode(errors="replace") if isinstance(err, bytes) else err or ""
    return "; ".join(where) + "\nits stderr after SIGABRT:\n" + said


def run_measured(args: list[str], **kw: Any) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Run a command and return its result and peak RSS in MB.

    A tiny wrapper process forks it: wait4's ru_maxrss inherits the *forking* process's high-water mark,
    so measuring from pytest (hundreds of MB after some tests) would be meaningless."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, **kw)
    text = r.stderr.decode(errors="replace")
    peak_kb = int(text.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    return r, peak_kb / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set of a live process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")
