"""Always-on consoles: a serial port read in the background (``background: true``), end to end.

Real agents (and a broker), the real CLI, and the simulated board on a pty behind a by-id style link: what
the board prints while nobody is attached is journaled and replayed, a session takes the port over and
hands it back, and the reader survives the adapter being pulled and plugged in again.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from standins.bootloader import Bootloader

from conftest import Lab, wait_for

CONFIG = """\
version: 0
devices:
  board:
    desc: a board whose console is read while nobody is attached
    cmds:
      serial:
        uses:
          - module: serial
            passthrough: true
            with:
              port: {port}
              background: true
"""

FLOOD_LINES = 5_000


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Bootloader]:
    b = Bootloader(link=str(tmp_path / "usb-FTDI_board-if00-port0")).start()
    yield b
    b.close()


@pytest.fixture
def config(lab: Lab, board: Bootloader) -> Path:
    path = lab.tmp / "background.yaml"
    path.write_text(CONFIG.format(port=board.path))
    return path


def journal(lab: Lab, addr: str, lines: int = 200) -> str:
    r = lab.zdut("-s", addr, "board", "log", "-n", str(lines))
    assert r.returncode == 0, r.stderr
    return r.stdout


def wait_logged(lab: Lab, addr: str, text: str, what: str) -> str:
    """The journal once it holds ``text``."""

    def logged() -> str | None:
        out = journal(lab, addr)
        return out if text in out else None

    return wait_for(logged, 10, what)


@pytest.mark.parametrize("how", ["direct", "brokered"])
def test_what_the_board_prints_while_nobody_is_attached_is_journaled_and_replayed(
        lab: Lab, board: Bootloader, config: Path, how: str) -> None:
    addr = lab.serve(config, how)
    wait_logged(lab, addr, f"[reading {board.path} in the background", "the reader's start in the journal")
    board.say(b"U-Boot SPL 2024.01 at 03:00\r\nkernel panic - not syncing\r\n")
    out = wait_logged(lab, addr, "| kernel panic - not syncing", "the unattended output in the journal")
    assert "| U-Boot SPL 2024.01 at 03:00" in out
    watcher = lab.zdut_bg("-s", addr, "board", "watch", "-n", "2", name="watcher")
    wait_for(lambda: "kernel panic - not syncing" in watcher.text(), 10, "the replay at a watcher")
    assert "U-Boot SPL" in watcher.text()
    board.say(b"reboot: Restarting system\r\n")
    wait_for(lambda: "Restarting system" in watcher.text(), 10, "live unattended output at the watcher")
    listed = lab.zdut("-s", addr, "list").stdout
    assert "- board\n" in listed or "- board (1 watching)" in listed, listed  # reading it holds nothing


def test_a_session_gets_the_port_to_itself_and_the_reader_takes_it_back(
        lab: Lab, board: Bootloader, config: Path) -> None:
    _, addr = lab.agent(config)
    wait_logged(lab, addr, "in the background", "the reader's start")
    # A flood while a monitor session holds the port: were the reader still reading, it would take some of it.
    monitor = lab.zdut_bg("-s", addr, "-u", "carol", "board", "serial", name="monitor")
    wait_for(lambda: "--- Connected to" in monitor.text(), 10, "the monitor on the port")
    line = b"[ 1234.567890] kernel: a chatty driver says something at 115200 baud, again and again\r\n"
    board.flood(len(line) * FLOOD_LINES, b"END OF FLOOD\r\n")
    wait_for(lambda: "END OF FLOOD" in monitor.text(), 30, "the flood at the monitor")
    assert monitor.text().count("a chatty driver says") == FLOOD_LINES  # all of it, none to the reader
    monitor.kill(signal.SIGINT)
    wait_logged(lab, addr, "carol's serial ended", "the monitor's end")
    log = lab.zdut("-s", addr, "-f", "json", "board", "log", "-n", "10000").stdout
    records = [json.loads(r) for r in log.splitlines()]
    start = next(r for r in records if r["kind"] == "start" and r["user"] == "carol")
    during = records[records.index(start):]
    during = during[:next(i for i, r in enumerate(during) if r["kind"] == "end")]
    assert {r["sid"] for r in during if r["kind"] == "output"} == {start["sid"]}  # the session's records only
    r = lab.zdut("-s", addr, "-u", "alice", "board", "serial", "-t", "10s", "--", "send", "version",
                 "expect", "aarch64-linux-gnu-gcc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--- Script completed ---" in r.stdout
    out = journal(lab, addr)
    session = out[out.index("alice started serial"):out.index("alice's serial ended: ok")]
    assert "| aarch64-linux-gnu-gcc 12.2.0" in session  # the session's own output, inside its records
    board.say(b"printed after the session\r\n")
    out = wait_logged(lab, addr, "| printed after the session", "unattended output after the session")
    assert out.index("| printed after the session") > out.index("alice's serial ended: ok")
    console = lab.zdut("-s", addr, "-u", "bob", "board", "serial", "console", input=b"echo by bob\n")
    assert "by bob" in console.stdout, console.stdout + console.stderr
    assert board.received.count(b"version") == 1 and b"echo by bob" in board.received


def test_the_reader_survives_the_adapter_going_away_and_coming_back(
        lab: Lab, board: Bootloader, config: Path) -> None:
    agent, addr = lab.agent(config)
    wait_logged(lab, addr, "in the background", "the reader's start")
    board.say(b"before the unplug\r\n")
    wait_logged(lab, addr, "| before the unplug", "output before the unplug")
    board.unplug()
    out = wait_logged(lab, addr, f"[{board.path} is gone (", "the loss noted")
    assert "opening it again as soon as it is back" in out
    board.say(b"printed into the void\r\n")  # unplugged: nobody can see it
    busy = lab.zdut("-s", addr, "board", "serial", "-t", "1s")
    assert busy.returncode == 1 and "no such device" in busy.stderr, busy.stderr  # a session is told why
    board.replug()
    out = wait_logged(lab, addr, "[gap: ", "the gap noted once the port is back")
    assert f"[gap: {board.path} was gone for " in out and "what the board printed meanwhile is lost" in out
    board.say(b"after the replug\r\n")
    wait_logged(lab, addr, "| after the replug", "output read from the new port")
    assert agent.alive()
    assert journal(lab, addr).count(" is gone (") == 1  # said once, not once a retry
    assert os.path.exists(board.path)


def test_typed_input_is_journaled_only_where_the_config_says_so(lab: Lab, board: Bootloader, config: Path) -> None:
    recording = lab.tmp / "record.yaml"
    recording.write_text(CONFIG.format(port=board.path).replace("background: true", "record_input: true"))
    agent, addr = lab.agent(recording)
    r = lab.zdut("-s", addr, "-u", "alice", "board", "serial", "console", input=b"echo typed by alice\n")
    assert "typed by alice" in r.stdout, r.stdout + r.stderr
    assert " > echo typed by alice" in journal(lab, addr)
    agent.stop()
    _, addr = lab.agent(config)  # the same board, input not recorded
    wait_logged(lab, addr, "in the background", "the reader's start")
    r = lab.zdut("-s", addr, "-u", "bob", "board", "serial", "console", input=b"echo typed by bob\n")
    assert "typed by bob" in r.stdout, r.stdout + r.stderr
    out = journal(lab, addr)
    assert "| typed by bob" in out and " > " not in out.split("bob started")[1], out
