"""The client's own lifecycle, against real processes: it ends when its session ends, whatever its stdin does;
a closed or full stdout ends the command; a bad ``-s`` is a usage error; a failed opening leaves nothing
behind; and a hostile server cannot make it allocate a frame larger than any reply.
"""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import Lab, exe, free_port, run_measured, wait_for
from zdut import protocol as p
from zdut.api import Lab as ApiLab
from zdut.client import Client
from zdut.protocol import ZdutError

pytestmark = pytest.mark.serial  # session ends and releases are timed (1-5 s): run alone, not beside another worker

#: A device whose command echoes stdin (and fails on EOF), and one that runs any shell command line.
CONFIG = """version: 0.1.0
devices:
  device2:
    cmds:
      repeat:
        uses:
          - module: dummy-repeat
            passthrough: true
  host:
    cmds:
      run:
        uses:
          - module: shell
            passthrough: true
"""
GREETING = b"Enter one word per line"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "lifecycle.yaml"
    cfg.write_text(CONFIG)
    return cfg


class Stdin:
    """The client's stdin: a pipe whose write end stays open, a terminal, or /dev/null."""

    def __init__(self, kind: str) -> None:
        self.kind, self._keep = kind, -1
        if kind == "pipe":
            self.fd, self._keep = os.pipe()
        elif kind == "tty":
            self._keep, self.fd = pty.openpty()
        else:
            self.fd = os.open(os.devnull, os.O_RDONLY)

    def close(self) -> None:
        for fd in (self.fd, self._keep):
            if fd >= 0:
                os.close(fd)


def start_console(lab: Lab, addr: str, stdin: Stdin, user: str = "tester") -> subprocess.Popen[bytes]:
    """``zdut -s ADDR device2 repeat`` with the given stdin; returns once the module has greeted."""
    client = subprocess.Popen([exe("zdut"), "-s", addr, "-u", user, "device2", "repeat"], stdin=stdin.fd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.env, start_new_session=True)
    assert client.stdout is not None
    seen = b""
    while GREETING not in seen:
        chunk = client.stdout.read1(4096)
        assert chunk, f"the console ended before its greeting: {client.wait(5)} {client.stderr.read()!r}"
        seen += chunk
    return client


def exit_time(client: subprocess.Popen[bytes], since: float, limit: float) -> tuple[int, float]:
    """Wait (at most ``limit`` s) for the client to exit; its status and how long after ``since`` it did."""
    try:
        code = client.wait(limit)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
        raise AssertionError(f"the client was still running {limit:g}s after its session ended") from None
    return code, time.monotonic() - since


# ------------------------------------------------------------------ 1. the session ends, the client exits

ENDINGS = [
    ("pipe", "agent killed behind a broker"),
    ("tty", "agent killed behind a broker"),
    ("devnull", "agent killed behind a broker"),
    ("pipe", "agent killed, direct"),
    ("tty", "broker killed"),
    ("pipe", "session cancelled by unlock force"),
]


@pytest.mark.parametrize(("stdin_kind", "ending"), ENDINGS)
def test_the_client_exits_when_its_session_ends(lab: Lab, config: Path, stdin_kind: str, ending: str) -> None:
    broker, baddr = lab.broker()
    agent, daddr = lab.agent(config, None, "--server", baddr)
    wait_for(lambda: lab.online(baddr, ["device2", "host"]), 15, "the agent online at the broker")
    addr = daddr if ending.endswith("direct") else baddr
    stdin = Stdin(stdin_kind)
    try:
        if ending.startswith("session cancelled"):
            assert lab.zdut("-s", addr, "-u", "alice", "device2", "lock", "10m").returncode == 0
        client = start_console(lab, addr, stdin, user="alice")
        since = time.monotonic()
        if ending.startswith("agent killed"):
            agent.kill()
        elif ending == "broker killed":
            broker.kill()
        else:
            assert lab.zdut("-s", addr, "-u", "bob", "device2", "unlock", "force").returncode == 0
        code, took = exit_time(client, since, 5.0)
    finally:
        stdin.close()
    assert code not in (0, None), code
    assert took < 5.0


def test_stdin_at_dev_null_reaches_the_module_as_eof(lab: Lab, config: Path) -> None:
    """/dev/null cannot be polled: it is read directly, so the module sees EOF instead of waiting for ever."""
    _, addr = lab.agent(config)
    r = subprocess.run([exe("zdut"), "-s", addr, "device2", "repeat"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, env=lab.env, timeout=15)
    assert r.returncode == 1 and "module failed: EOF" in r.stderr, r


# ------------------------------------------------------------------ 2. a closed or full stdout


def in_use(lab: Lab, addr: str, device: str) -> bool:
    return f"- {device} [in use" in lab.zdut("-s", addr, "list").stdout


@pytest.mark.parametrize("via", ["direct", "broker"])
def test_a_closed_stdout_cancels_the_command(lab: Lab, config: Path, via: str) -> None:
    if via == "broker":
        _, addr = lab.broker()
        lab.brokered_agent(config, addr)
    else:
        _, addr = lab.agent(config)
    pipeline = f"{exe('zdut')} -s {addr} host run yes | head -2; echo status=${{PIPESTATUS[0]}}"
    start = time.monotonic()
    r = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, env=lab.env, timeout=20)
    took = time.monotonic() - start
    assert r.stdout == "y\ny\nstatus=141\n", r
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr
    assert took < 5, took
    wait_for(lambda: not in_use(lab, addr, "host"), 1.0, "the device free again")
    again = lab.zdut("-s", addr, "-u", "bob", "host", "run", "echo mine")
    assert again.returncode == 0 and again.stdout == "mine\n", again


@pytest.mark.parametrize("words", [["host", "run", "echo hi"], ["list"], ["-f", "json", "list"]])
def test_a_full_stdout_is_a_clear_error(lab: Lab, config: Path, words: list[str]) -> None:
    _, addr = lab.agent(config)
    with open("/dev/full", "w") as full:
        r = subprocess.run([exe("zdut"), "-s", addr, *words], stdout=full, stderr=subprocess.PIPE, text=True,
                           env=lab.env, timeout=15, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    assert "cannot write the output: No space left on device" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr


# ------------------------------------------------------------------ 5. start-up and failed openings


@pytest.mark.parametrize("value", ["hostwithoutport", "http://localhost:1024", "localhost:99999", "tcp://:1024",
                                   "localhost:"])
def test_an_invalid_server_is_a_usage_error(lab: Lab, value: str) -> None:
    r = lab.zdut("-s", value, "list", timeout=10)
    assert r.returncode == 2, r
    assert f'invalid value "{value}" for flag -s: want host:port or tcp://host:port' in r.stderr, r.stderr
    r = lab.zdut("list", timeout=10, env={**lab.env, "ZDUT_SERVER": value})
    assert r.returncode == 2 and f'invalid value "{value}" for $ZDUT_SERVER' in r.stderr, r.stderr


def resources() -> tuple[int, int, int, int]:
    """Open fds, OS threads (libzmq's included), Python threads, asyncio tasks."""
    tasks = len(asyncio.all_tasks()) if _running_loop() else 0
    return (len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), threading.active_count(),
            tasks)


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def dead_ends(ctx: zmq.Context[Any]) -> Iterator[dict[str, str]]:
    """Servers that fail an opening three ways: nobody listens, TCP accepted but no ZMTP, ZMTP but no answer."""
    silent_tcp = socket.socket()
    silent_tcp.bind(("127.0.0.1", 0))
    silent_tcp.listen(2048)
    mute = ctx.socket(zmq.ROUTER)
    mute_port = mute.bind_to_random_port("tcp://127.0.0.1")
    yield {"refused": f"127.0.0.1:{free_port()}", "silent": f"127.0.0.1:{silent_tcp.getsockname()[1]}",
           "mute": f"127.0.0.1:{mute_port}"}
    silent_tcp.close()
    mute.close(0)


async def _fail_to_open(address: str) -> None:
    with pytest.raises(ZdutError):
        async with Client(address, "leaky", connect_timeout=0.05, call_timeout=0.05):
            raise AssertionError("a dead end answered")


#: How long the counts may take to come back: an OS thread of libzmq's can still be exiting when its context's
#: destroy has returned (seen: one thread more, now and then, gone a moment later).
SETTLE_S = 2.0


def test_failed_openings_leak_nothing(dead_ends: dict[str, str]) -> None:
    async def main() -> tuple[tuple[int, ...], tuple[int, ...]]:
        for address in dead_ends.values():  # warm up: lazily created things are not leaks
            await _fail_to_open(address)
        await asyncio.sleep(0)
        before = resources()
        for _ in range(20):  # 1,000 openings: 50 at a time, the refused ones concurrently (each takes 1 s)
            await asyncio.gather(*(_fail_to_open(dead_ends[kind])
                                   for kind in ["refused"] * 2 + ["silent"] * 24 + ["mute"] * 24))
        deadline = time.monotonic() + SETTLE_S
        while resources() != before and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return before, resources()

    before, after = asyncio.run(main())
    assert after == before, f"fds, OS threads, Python threads, tasks: before {before}, after {after}"
    lab_before: tuple[int, ...] = ()
    for _ in range(101):  # the Lab API's openings too, each on its own event loop (after one to warm up)
        with pytest.raises(ZdutError):
            ApiLab(dead_ends["mute"], "leaky", timeout=0.05)
        lab_before = lab_before or resources()
    wait_for(lambda: resources() == lab_before, SETTLE_S, f"the resources of before the Lab openings, {lab_before}")


# ------------------------------------------------------------------ 7. a frame larger than any reply

HUGE = 300 * 1024 * 1024


def test_a_hostile_servers_huge_frame_is_refused_unallocated(ctx: zmq.Context[Any]) -> None:
    """A raw ROUTER answers every Hello with a 300 MB frame: the client drops the link before allocating it."""
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    huge = zmq.Frame(bytes(HUGE))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(50):
                peer, *_ = router.recv_multipart()
                router.send(peer, zmq.SNDMORE)
                router.send(huge, copy=False)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        start = time.monotonic()
        r, peak_mb = run_measured([exe("zdut"), "-s", f"127.0.0.1:{port}", "list"], timeout=25,
                                  stdin=subprocess.DEVNULL)
        took = time.monotonic() - start
    finally:
        stop.set()
        server.join(5)
        router.close(0)
    stderr = r.stderr.decode(errors="replace")
    assert r.returncode == 1, stderr
    assert f"lost connection to zdut server at 127.0.0.1:{port}" in stderr and "frame over 64 MiB" in stderr, stderr
    assert peak_mb < 150, peak_mb
    assert took < 10, took


def test_the_client_caps_frames_at_the_longest_reply() -> None:
    from zdut.common.limits import CLIENT_MAX_FRAME

    assert CLIENT_MAX_FRAME == p.MAX_REPLY_BYTES



def test_a_lab_dropped_without_close_after_its_server_died_does_not_hang_the_garbage_collector(lab: Lab) -> None:
    broker, addr = lab.broker()
    script = ("import gc, sys\nfrom zdut.api import Lab\n"
              "lab = Lab(sys.argv[1])\nlab.devices()\nprint('connected', flush=True)\nsys.stdin.readline()\n"
              "del lab\ngc.collect()\nprint('collected', flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", script, addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=lab.env)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "connected"
    broker.kill()
    broker.popen.wait(5)
    try:
        out, _ = child.communicate("\n", timeout=15)  # the context's term() waited for ever here before
    finally:
        child.kill()
    assert out.strip() == "collected"
