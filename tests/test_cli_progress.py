"""What a person at a terminal sees of a command's progress and state: the transfer bar (tqdm, on a terminal's
stderr only), the console's attach notice, and the wording of lock results."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CONF, Lab, exe, wait_for

SIZE = 24 * 1024 * 1024


def run_in_pty(lab: Lab, *args: str, timeout: float = 60) -> tuple[int, bytes, bytes]:
    """Run the real CLI with stderr on a pseudo-terminal (stdout a pipe): (status, stdout, what the terminal
    showed)."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    proc = subprocess.Popen([exe("zdut"), *args], cwd=lab.tmp, env=lab.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    screen = bytearray()
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    os.close(master)
    return code, out, bytes(screen)


@pytest.fixture
def big(lab: Lab) -> tuple[str, Path]:
    _, addr = lab.agent(CONF / "demo.yaml")
    (lab.tmp / "big.bin").write_bytes(os.urandom(SIZE))
    return addr, lab.tmp


def test_transfer_bar_with_rate_and_eta_on_a_terminal_only(lab: Lab, big: tuple[str, Path]) -> None:
    """The bar is tqdm's (description, percentage, bar, total, [elapsed<ETA, rate]) on a pty's stderr; a pipe,
    and -f json even on a terminal, get none of it."""
    addr, tmp = big
    code, out, screen = run_in_pty(lab, "-s", addr, "device3", "file-transfer", "big.bin", "big.out")
    assert code == 0, screen
    assert (tmp / "big.out").read_bytes().startswith((tmp / "big.bin").read_bytes())  # dummy-ft appends a line
    text = screen.decode(errors="replace")
    assert re.search(r"↑ big\.bin: +\d+%\|", text), text  # tqdm's bar: description, percentage, bar
    assert re.search(r"\d+(\.\d+)?[KMG]?i?B/s", text) or "B/s" in text, text  # the rate
    assert re.search(r"<\d\d:\d\d", text), text  # the ETA
    assert "24.0M" in text  # tqdm's binary-scaled total
    assert b'sent "big.bin"' in out + screen  # the result line stays; the bar is cleared (leave=False)

    r = lab.zdut("-s", addr, "device3", "file-transfer", "big.bin", "big.out")
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr and "B/s" not in r.stderr and "\r" not in r.stderr + r.stdout

    code, out, screen = run_in_pty(lab, "-s", addr, "-f", "json", "device3", "file-transfer", "big.bin", "big.out")
    assert code == 0, screen
    assert b"%|" not in screen and b"B/s" not in screen and b"\r" not in screen.replace(b"\r\n", b"\n")
    assert b'"contentType": "file-transfer"' in out, out[-500:]


# ------------------------------------------------------------- the console's notice
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture
def tmux(lab: Lab) -> Iterator[str]:
    name = f"zdut-progress-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def screen_of(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


@needs_tmux
def test_interactive_console_names_device_command_and_detach_key(lab: Lab, tmux: str) -> None:
    """On stderr, when stdin is a terminal; a script piping into a console gets no such line."""
    _, addr = lab.agent(CONF / "demo.yaml")
    command = f"cd {lab.tmp} && {exe('zdut')} -s {addr} -u tester device2 repeat 2>err.txt; echo EXIT=$?; sleep 600"
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "120", "-y", "30", command], check=True)
    wait_for(lambda: "Two words will terminate" in screen_of(tmux), 10, "the banner")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-]", "."], check=True)
    wait_for(lambda: "EXIT=0" in screen_of(tmux), 5, "zdut to exit after Ctrl-]")
    err = (lab.tmp / "err.txt").read_text()
    assert err.startswith("[attached to device2 repeat; Ctrl-] . detaches, Ctrl-] ? more]\n"), err  # on stderr

    r = lab.zdut("-s", addr, "device2", "repeat", input=b"two words\n")
    assert r.returncode == 0, r.stderr
    assert "attached" not in r.stderr and "Ctrl-]" not in r.stderr


# ------------------------------------------------------------- locks
def test_short_lock_shows_seconds(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    r = lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "45s")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r'✓ Device "device1" locked by "alice" for 4[45]s\n', r.stdout), r.stdout
    listed = lab.zdut("-s", addr, "list").stdout
    assert re.search(r'\[locked by "alice" for 4[3-5]s\]', listed), listed


def test_relock_for_less_says_the_lock_was_kept(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    assert lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "20m").returncode == 0
    r = lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "5m")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('✓ Device "device1" locked by "alice" for 20m (kept:'), r.stdout
    assert "never shortened" in r.stdout
    doc = json.loads(lab.zdut("-s", addr, "-u", "alice", "-f", "json", "device1", "lock", "1m").stdout)
    assert doc["data"]["Kept"] is True
    longer = lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "30m")
    assert longer.stdout == '✓ Device "device1" locked by "alice" for 30m\n', longer.stdout  # extended: no note


def test_unlock_of_an_unlocked_device_names_it(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    r = lab.zdut("-s", addr, "-u", "alice", "device2", "unlock")
    assert r.returncode == 1
    assert 'device "device2" is not locked' in r.stderr, r.stderr
