"""An interrupted upload leaves no temporary file on the agent, and an agent removes the ones a crash left.

Real agent, real client, uploads big enough to catch in flight (a sparse file reads fast and never ends
soon): the file module (temp file beside its destination), flash (the image it stages) and dummy-ft (its
processed copy).  The temp file is found the way an operator would, among the agent's open files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Lab, exe, free_port, stuck, wait_for
from zdut.devices import scratch

COMMANDS = {
    "upload": ["big.bin:up/big.bin"],
    "ft": ["big.bin", "big.out"],
    "flash": ["write", "big.bin"],
}


def _config(tmp: Path) -> Path:
    cfg = tmp / "uploads.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  board:\n    cmds:\n"
        "      upload:\n        uses:\n          - module: file\n            passthrough: true\n"
        "            with: {operation: upload}\n"
        "      ft:\n        uses:\n          - module: dummy-ft\n            passthrough: true\n"
        "      flash:\n        uses:\n          - module: flash\n            passthrough: true\n"
        f"            with: {{tool: flashrom, programmer: 'dummy:emulate=M25P10.RES,image={tmp / 'chip.bin'}'}}\n"
    )
    return cfg


def _big_file(lab: Lab) -> None:
    with open(lab.tmp / "big.bin", "wb") as fh:
        fh.truncate(8 << 30)  # sparse: the client reads it fast, the upload takes far longer than the test


def _temp_files(pid: int) -> list[str]:
    """Regular files the agent has open for an upload (nothing of its own installation, logs or journals)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if path.startswith("/") and os.path.isfile(path) and not path.endswith((".log", ".json", ".jsonl", ".yaml")) \
                and "site-packages" not in path and not path.startswith(("/usr", "/dev", "/proc")):
            found.append(path)
    return found


def _scratch_files(lab: Lab) -> list[Path]:
    """Every file left in the agent's own temp area (``$XDG_STATE_HOME/zdut/agent-NAME.tmp/``)."""
    return [p for root in (lab.tmp / "state" / "zdut").glob("*.tmp") for p in root.rglob("*") if p.is_file()]


def _start_upload(lab: Lab, addr: str, command: str, agent_pid: int) -> tuple[subprocess.Popen[bytes], str]:
    client = subprocess.Popen([exe("zdut"), "-s", addr, "board", command, *COMMANDS[command]],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(lab.tmp / "client.err", "wb"),
                              env={**lab.env, "PYTHONFAULTHANDLER": "1"}, cwd=lab.tmp)
    temp = wait_for(lambda: _temp_files(agent_pid), 15, "the upload's temp file on the agent", 0.005)
    return client, temp[0]


@pytest.mark.parametrize("how", ["cancel", "kill-client"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_interrupted_upload_leaves_no_temp_file(lab: Lab, command: str, how: str) -> None:
    agent, addr = lab.agent(_config(lab.tmp))
    _big_file(lab)
    client, temp = _start_upload(lab, addr, command, agent.pid)
    try:
        if how == "cancel":
            client.send_signal(signal.SIGINT)  # Ctrl-C: the client cancels the run
        else:
            client.kill()  # the agent notices the silence within its 4 s session timeout
        try:
            client.wait(10)
        except subprocess.TimeoutExpired:
            where = stuck(client)
            raise AssertionError(f"the client did not end within 10s of its {how}: {where}"
                                 f"{(lab.tmp / 'client.err').read_text(errors='replace')}") from None
        wait_for(lambda: not os.path.exists(temp), 8, f"{temp} to be removed")
    finally:
        client.kill()
    assert list(lab.tmp.rglob("*.part")) == []
    assert _scratch_files(lab) == []
    wait_for(lambda: "run ended" in agent.text(), 5, "the run to end")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_agent_removes_the_temp_files_a_crash_left(lab: Lab, command: str) -> None:
    """kill -9 mid-upload leaves the temp file; the restarted agent removes it, and nothing of the user's."""
    port = free_port()
    agent, addr = lab.agent(_config(lab.tmp), port)
    _big_file(lab)
    (lab.tmp / "up").mkdir()
    lookalike = lab.tmp / "up" / ".big.bin.users-own.part"  # the user's file, named like a temp file
    lookalike.write_bytes(b"mine")
    client, temp = _start_upload(lab, addr, command, agent.pid)
    try:
        agent.kill(signal.SIGKILL)
        agent.popen.wait(5)
        client.kill()
        assert os.path.exists(temp)  # the crash left it behind, where the next agent will look
        where = lab.tmp / "up" if command == "upload" else lab.tmp / "state" / "zdut"
        assert temp.startswith(f"{where}/"), temp
        restarted, _ = lab.agent(_config(lab.tmp), port)
        wait_for(lambda: not os.path.exists(temp), 5, f"the restarted agent to remove {temp}")
        assert lookalike.read_bytes() == b"mine"
        assert _scratch_files(lab) == []
        assert "removed" in restarted.text() and "stale" in restarted.text()
    finally:
        client.kill()


def test_sweep_spares_live_agents_and_files_that_are_not_its_own(tmp_path: Path) -> None:
    """A live agent's temp area is never swept; a stale note naming anything but a zdut temp file deletes
    nothing but the note."""
    import sys

    from zdut.devices import scratch

    root = tmp_path / "agent-x.tmp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from zdut.devices import scratch; "
         f"scratch.claim(Path({str(root)!r})); print(scratch._home, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        home = Path(holder.stdout.readline().strip())
        (home / "image").write_bytes(b"in flight")
        assert scratch.sweep(root) == 0 and (home / "image").exists()  # alive: untouched
        user_file = tmp_path / "important.txt"
        user_file.write_text("keep")
        (home / "note-1").write_text(str(user_file))  # not a temp file's name: never deleted
        part = tmp_path / ".fw.bin.abc123.part"
        part.write_text("partial")
        (home / "note-2").write_text(str(part))
    finally:
        holder.kill()
        holder.wait(5)
    assert scratch.sweep(root) == 2  # the noted temp file and the image (and with them the directory)
    assert not home.exists() and not part.exists()
    assert user_file.read_text() == "keep"


CRASH_WHEN_CREATED = """
import os, sys
from pathlib import Path
from zdut.devices import scratch
scratch.claim(Path(sys.argv[1]))
real_open = os.open
def open_then_die(path, flags, mode=0o777, *, dir_fd=None):
    fd = real_open(path, flags, mode, dir_fd=dir_fd)
    if str(path).endswith(scratch.PART_SUFFIX):
        os._exit(9)  # killed the moment the temp file exists
    return fd
os.open = open_then_die
scratch.Beside(sys.argv[2])
"""


def test_a_kill_the_moment_the_temp_file_exists_leaves_nothing_unnamed(tmp_path: Path) -> None:
    """The note naming a temp file is written before the file is created: a crash between the two must not
    leave a file the next agent cannot find (under load, kill -9 mid-upload landed there)."""
    root, dest = tmp_path / "agent.tmp", tmp_path / "up" / "big.bin"
    dest.parent.mkdir()
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHEN_CREATED, str(root), str(dest)])
    assert crashed.returncode == 9
    left = list(dest.parent.glob(f".big.bin.*{scratch.PART_SUFFIX}"))
    assert len(left) == 1  # the crash left it
    assert scratch.sweep(root) == 1
    assert list(dest.parent.iterdir()) == []
