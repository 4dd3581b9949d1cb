"""``zdut DEV watch``: read-only followers of a device's output, end to end with real agents, brokers and CLIs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import Lab, Proc, exe, free_port, wait_for
from test_shell_terminal import Tmux

CONFIG = """\
version: 0
devices:
  board:
    desc: a board with a console and a chatty command
    cmds:
      console:
        desc: echo what is typed, a line at a time
        uses:
          - module: dummy-repeat
      spew:
        desc: prints about 25 MB, more than a session's credit window
        uses:
          - module: shell
            args: ["yes 'a line of console output, as a board prints at boot' | head -n 480000"]
"""
SPEW_LINES = 480_000
SPEW_LINE = "a line of console output, as a board prints at boot\n"


@pytest.fixture
def config(lab: Lab) -> Path:
    path = lab.tmp / "watch.yaml"
    path.write_text(CONFIG)
    return path


def watch(lab: Lab, addr: str, user: str, *args: str) -> Proc:
    """``zdut board watch`` by ``user``, once the agent has it."""
    proc = lab.zdut_bg("-s", addr, "-u", user, "board", "watch", *args, name=f"watch-{user}")
    wait_for(lambda: f"watch device=board user={user}" in "".join(p.text() for p in lab.procs), 10,
             f"{user} watching")
    return proc


class Console:
    """``board console`` run by a user, its input a pipe, its output in a file."""

    def __init__(self, lab: Lab, addr: str, user: str) -> None:
        self.log = lab.tmp / f"console-{user}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([exe("zdut"), "-s", addr, "-u", user, "board", "console"],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                                         env=lab.env, cwd=lab.tmp, bufsize=1)

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")

    def text(self) -> str:
        return self.log.read_text()

    def end(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.mark.parametrize("how", ["direct", "brokered"])
def test_a_watcher_sees_the_sessions_output_and_the_owner_is_told(lab: Lab, config: Path, how: str) -> None:
    addr = lab.serve(config, how)
    watcher = watch(lab, addr, "bob")
    owner = Console(lab, addr, "alice")
    try:
        wait_for(lambda: "[zdut: alice started console]" in watcher.text(), 10, "the start, at the watcher")
        wait_for(lambda: "[zdut: 1 watching: bob]" in owner.text(), 10, "the owner told who watches")
        owner.type("first")
        wait_for(lambda: "first" in watcher.text(), 10, "the owner's output at the watcher")

        second = watch(lab, addr, "carol")
        wait_for(lambda: "[zdut: carol is watching (2 watching)]" in owner.text(), 10, "the owner told of carol")
        wait_for(lambda: '- board [in use by "alice"] (2 watching)' in lab.zdut("-s", addr, "list").stdout, 10,
                 "the watchers in the listing")
        listed = json.loads(lab.zdut("-s", addr, "-f", "json", "list").stdout)["data"]
        assert [d.get("Watchers") for d in listed] == [2]
        owner.type("second")
        for proc in (watcher, second):
            wait_for(lambda proc=proc: "second" in proc.text(), 10, "the output at both watchers")
        second.kill(signal.SIGINT)
        wait_for(lambda: "[zdut: carol stopped watching (1 watching)]" in owner.text(), 10, "carol leaving")
        owner.type("two words")  # ends dummy-repeat
        owner.proc.wait(10)
        wait_for(lambda: "alice's console ended" in watcher.text(), 10, "the end, at the watcher")
        assert watcher.alive(), watcher.text()  # a watch follows the device, not one session
        assert "first" not in watcher.text().split("alice's console ended")[1]

        r = lab.zdut("-s", addr, "-u", "dave", "board", "console", input=b"two words\n")
        assert "locked" not in r.stderr, r.stderr  # the watchers hold nothing
        wait_for(lambda: "dave started console" in watcher.text(), 10, "the next session, at the same watcher")
    finally:
        owner.end()
    watcher.kill(signal.SIGINT)
    wait_for(lambda: not watcher.alive(), 10, "the watcher to leave on Ctrl-C")


def test_a_busy_device_refuses_a_second_user_with_the_hint_to_watch(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    owner = Console(lab, addr, "alice")
    try:
        owner.type("hello")
        wait_for(lambda: "hello" in owner.text(), 10, "alice's echo")
        r = lab.zdut("-s", addr, "-u", "bob", "board", "console", input=b"")
        assert r.returncode == 1
        assert 'device "board" is locked by "alice" (in use: `zdut board watch` follows its output)' in r.stderr
    finally:
        owner.end()


@pytest.mark.parametrize("how", ["direct", "brokered"])
def test_a_stopped_watcher_does_not_slow_the_owner_and_is_told_what_it_missed(lab: Lab, config: Path,
                                                                               how: str) -> None:
    addr = lab.serve(config, how)
    watcher = watch(lab, addr, "bob", "-n", "0")
    baseline = lab.zdut("-s", addr, "-u", "alice", "board", "spew", timeout=60)
    assert baseline.returncode == 0 and baseline.stdout.count(SPEW_LINE) == SPEW_LINES
    wait_for(lambda: "alice's spew ended: ok" in watcher.text(), 20, "the watcher to see the first spew through")

    watcher.kill(signal.SIGSTOP)  # a watcher that never reads
    try:
        r = lab.zdut("-s", addr, "-u", "alice", "board", "spew", timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count(SPEW_LINE) == SPEW_LINES  # the owner's output complete, in spite of the watcher
    finally:
        watcher.kill(signal.SIGCONT)
    wait_for(lambda: "bytes missed: this watcher could not keep up" in watcher.text(), 20, "the missed count")
    assert watcher.alive()


def test_watch_arguments_are_checked_by_the_client(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    r = lab.zdut("-s", addr, "board", "watch", "-n", "many")
    assert r.returncode == 1 and "watch takes only -n N" in r.stderr  # as every misused command (dutctl)
    r = lab.zdut("-s", addr, "nosuch", "watch")
    assert r.returncode == 1 and "nosuch" in r.stderr


def test_the_shell_toolbar_shows_who_watches_a_device_it_holds(lab: Lab, config: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    _, addr = lab.agent(config)
    shell = Tmux(lab)
    try:
        shell.start("-s", addr, "shell", user="alice")
        shell.wait_ready(online=1)
        shell.line("board lock")
        shell.wait('✓ Device "board" locked by "alice"')
        assert "watching" not in shell.toolbar()
        watch(lab, addr, "bob")
        shell.until(lambda: "| 1 watching board" in shell.toolbar(), "the watcher in the toolbar")
    finally:
        shell.kill()


@pytest.mark.parametrize("how", ["direct", "brokered"])
def test_the_journal_survives_an_agent_restart_and_a_watcher_replays_from_it(lab: Lab, config: Path,
                                                                             how: str) -> None:
    _, broker = lab.broker() if how == "brokered" else (None, "")
    port = free_port()

    def start() -> tuple[Proc, str]:
        if broker:
            return lab.brokered_agent(config, broker, port), broker
        return lab.agent(config, port)

    agent, addr = start()
    r = lab.zdut("-s", addr, "-u", "alice", "board", "console", input=b"bootlogline\ntwo words\n")
    assert "bootlogline" in r.stdout
    assert lab.zdut("-s", addr, "-u", "alice", "board", "lock", "10m").returncode == 0
    assert lab.zdut("-s", addr, "-u", "alice", "board", "unlock").returncode == 0
    agent.stop()
    agent, addr = start()

    log = lab.zdut("-s", addr, "board", "log", "-n", "100")
    assert log.returncode == 0, log.stderr
    lines = log.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines if "started" in line or "ended" in line
            or "locked" in line] == ["alice started console", "alice's console ended: ok",
                                     "alice locked until " + lines[-2].rsplit("until ", 1)[1],
                                     "alice unlocked"], log.stdout
    assert any(line.endswith(" | bootlogline") for line in lines)
    records = [json.loads(line) for line in lab.zdut("-s", addr, "-f", "json", "board", "log").stdout.splitlines()]
    assert [r["kind"] for r in records][-2:] == ["lock", "unlock"] and records[0]["kind"] == "start"

    watcher = watch(lab, addr, "bob", "-n", "1")
    wait_for(lambda: "Oh no" in watcher.text() or "bootlogline" in watcher.text(), 10, "the replay")
    assert "Hello from dummy repeat" not in watcher.text()  # one line only


def test_log_follow_goes_on_with_what_comes_and_since_filters(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    lab.zdut("-s", addr, "-u", "alice", "board", "console", input=b"early\ntwo words\n")
    follower = lab.zdut_bg("-s", addr, "board", "log", "-n", "0", "--follow", name="follower")
    wait_for(lambda: "log device=board" in "".join(p.text() for p in lab.procs), 10, "the follower")
    lab.zdut("-s", addr, "-u", "carol", "board", "console", input=b"late\ntwo words\n")
    wait_for(lambda: "| late" in follower.text(), 10, "the new output at the follower")
    assert "early" not in follower.text() and "carol started console" in follower.text()
    assert lab.zdut("-s", addr, "board", "log", "--since", "1h").stdout.count("started console") == 2
    last = lab.zdut("-s", addr, "board", "log", "-n", "2").stdout.splitlines()
    assert len(last) == 2 and last[1].endswith("carol's console ended: ok"), last  # lines, not records
    assert lab.zdut("-s", addr, "board", "log", "--since", "2999-01-01T00:00").stdout == ""
    bad = lab.zdut("-s", addr, "board", "log", "--since", "yesterday")
    assert bad.returncode == 1 and "neither a duration nor a date-time" in bad.stderr
    assert lab.zdut("-s", addr, "-f", "yaml", "board", "log").returncode == 1
