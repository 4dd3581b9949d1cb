"""``zdut shell`` in a real terminal, driven through tmux (send-keys, capture-pane) against real agents."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import CONF, Lab, Proc, exe, free_port, wait_for

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)"),
              pytest.mark.serial]  # the prompt must appear within 0.5 s: run alone, not beside another worker

TESTS = Path(__file__).resolve().parent
STATUS_OUT = "Hello from dummy status module\nCalled with 0 arguments\n"
#: The issue's budget from starting `zdut shell` to a visible prompt.
#: What the prompt may take beyond starting Python with the shell's imports (a connection takes longer: 1 s
#: before a refused one is given up).
PROMPT_BUDGET_S = 0.3


class Tmux:
    """One tmux session running the shell in a 120x30 terminal."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.names: list[str] = []

    def start(self, *args: str, user: str = "tester") -> None:
        self.names.append(f"zdut-shell-{uuid.uuid4().hex[:8]}")
        env = f"XDG_STATE_HOME={self.lab.tmp / 'state'} USER=tester ZDUT_SERVER="
        command = " ".join(shlex.quote(a) for a in (exe("zdut"), "-u", user, *args))
        script = f"cd {self.lab.tmp} && env {env} {command}; echo EXIT=$?; sleep 600"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "120", "-y", "30", script], check=True)

    def start_raw(self, argv: list[str]) -> None:
        """Any command (``python`` meaning this interpreter) in a new session, as ``start`` runs the shell."""
        self.names.append(f"zdut-shell-{uuid.uuid4().hex[:8]}")
        command = " ".join(shlex.quote(a) for a in (sys.executable if argv[0] == "python" else argv[0], *argv[1:]))
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "120", "-y", "30",
                        f"cd {self.lab.tmp} && {command}; sleep 600"], check=True)

    @property
    def name(self) -> str:
        return self.names[-1]

    def keys(self, *keys: str) -> None:
        """Key names (Enter, Tab, C-c...)."""
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        """Literal text."""
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)

    def line(self, text: str) -> None:
        """Type a line and Enter."""
        self.type(text)
        self.keys("Enter")

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen().rstrip("\n").split("\n")]

    def toolbar(self) -> str:
        return self.lines()[-1]

    def prompt(self) -> str:
        """The line being edited: the last one that starts with the prompt."""
        return ([""] + [line for line in self.lines() if line.startswith("zdut")])[-1]

    def until(self, cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
        """wait_for, with the screen in the failure message."""
        try:
            wait_for(cond, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- screen ---\n{self.screen()}") from None

    def wait(self, text: str, timeout: float = 10.0) -> None:
        self.until(lambda: text in self.screen(), repr(text), timeout)

    def wait_prompt(self, expected: str, timeout: float = 10.0) -> None:
        self.until(lambda: self.prompt() == expected, f"the prompt line {expected!r}", timeout)

    def wait_ready(self, online: int = 3) -> None:
        """Connected, and the first refresh (devices, commands, help) is in."""
        self.until(lambda: f"connected | {online} online" in self.toolbar(), "the toolbar with device counts")

    def wait_after(self, marker: str, text: str, timeout: float = 10.0) -> None:
        """``text`` on the screen below the last ``marker``."""
        self.until(
            lambda: marker in self.screen() and text in self.screen().rsplit(marker, 1)[1],
            f"{text!r} after {marker!r}",
            timeout,
        )

    def kill(self) -> None:
        for name in self.names:
            subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


@pytest.fixture
def tmux(lab: Lab) -> Iterator[Tmux]:
    t = Tmux(lab)
    yield t
    t.kill()


def lab_config(lab: Lab) -> Path:
    """demo.yaml plus a device whose command runs until cancelled, and one that reports the window size."""
    cfg = lab.tmp / "lab.yaml"
    board = """\
  board:
    cmds:
      wait:
        uses:
          - module: time-wait
            passthrough: true
      size:
        uses:
          - module: winsize
"""
    cfg.write_text((CONF / "demo.yaml").read_text() + board)
    return cfg


def winsize_agent(lab: Lab) -> str:
    """An agent that also knows the winsize test module."""
    addr = f"127.0.0.1:{free_port()}"
    proc = lab.spawn(
        [sys.executable, str(TESTS / "shell_winsize.py"), "-c", str(lab_config(lab)), "-a", addr, "--log", "debug"],
        "agent",
    )
    wait_for(lambda: lab.zdut("-s", addr, "list", timeout=5).returncode == 0 or not proc.alive(), 15, "the agent")
    assert proc.alive(), proc.text()
    return addr


def board_shell(lab: Lab, tmux: Tmux) -> str:
    """A shell on a winsize agent (demo.yaml and the board), ready; returns the agent's address."""
    addr = winsize_agent(lab)
    tmux.start("-s", addr, "shell")
    tmux.wait_ready(online=4)
    return addr


def busy(lab: Lab, addr: str, device: str) -> str:
    return lab.zdut("-s", addr, "list").stdout.split(f"- {device}", 1)[1].split("\n", 1)[0]


# ------------------------------------------------------------------ 6: start-up


def _first_line_after(tmux: Tmux, command: list[str], prefix: str) -> float:
    """Seconds from starting ``command`` in a new tmux session until a line starts with ``prefix``."""
    start = time.monotonic()
    if command[0] == "python":
        tmux.start_raw(command)
    else:
        tmux.start(*command)
    wait_for(lambda: any(line.startswith(prefix) for line in tmux.lines()), 5, f"a line starting {prefix!r}")
    return time.monotonic() - start


@pytest.mark.parametrize("server", ["agent", "nobody"])
def test_prompt_appears_at_once_and_connects_in_the_background(lab: Lab, tmux: Tmux, server: str) -> None:
    """The prompt does not wait for the connection: it appears within PROMPT_BUDGET_S of what starting Python
    with the shell's imports takes, measured the same way just before (this host's speed varies twofold)."""
    addr = lab.agent(CONF / "demo.yaml")[1] if server == "agent" else f"127.0.0.1:{free_port()}"
    imports = _first_line_after(tmux, ["python", "-c", "import zdut.cli, zdut.shell, zdut.terminal.shell_view; "
                                       "print('imported')"], "imported")
    elapsed = _first_line_after(tmux, ["-s", addr, "shell"], "zdut")
    print(f"prompt after {elapsed:.3f}s; Python with the shell's imports: {imports:.3f}s")
    assert elapsed < imports + PROMPT_BUDGET_S, f"prompt after {elapsed:.3f}s, imports alone {imports:.3f}s"
    if server == "agent":
        tmux.wait_ready()
        assert tmux.toolbar().startswith(f" {addr} (agent ")
        tmux.wait_prompt("zdut>")
        return
    # Nobody listens: the prompt says so, and a command reports it and prompts again.
    tmux.wait_prompt("zdut (disconnected)>", 5)
    assert "DISCONNECTED" in tmux.toolbar()
    tmux.type("list")
    tmux.keys("Enter")
    tmux.wait(f"✗ cannot reach zdut server at {addr} (connection refused)")
    tmux.wait_prompt("zdut (disconnected)>")


# ------------------------------------------------------------------ 2 and 7: completion, running commands


def test_completion_of_device_command_and_file_then_run(lab: Lab, tmux: Tmux) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    (lab.tmp / "test.txt").write_text("payload\n")
    tmux.start("-s", addr, "shell")
    tmux.wait_ready()
    tmux.type("devi")
    tmux.keys("Tab")
    tmux.wait("device3  device, online")  # the menu, with each device's state
    tmux.wait_prompt("zdut> device")  # the common prefix
    tmux.type("3 fi")
    tmux.keys("Tab")
    tmux.wait_prompt("zdut> device3 file-transfer")
    tmux.type("tes")  # the completion ended with a space
    tmux.keys("Tab")  # a command taking files completes local paths
    tmux.wait_prompt("zdut> device3 file-transfer test.txt")
    tmux.type(" out.txt")
    tmux.keys("Enter")
    tmux.wait('↓ received "out.txt" (39 B)')
    assert (lab.tmp / "out.txt").read_text() == "payload\n\n\nprocessed by dummy.FT module\n"
    tmux.wait_prompt("zdut>")

    tmux.type("device1 status")
    tmux.keys("Enter")
    tmux.wait_after("zdut> device1 status\n", STATUS_OUT)
    tmux.wait_prompt("zdut>")

    tmux.type("use device2")
    tmux.keys("Enter")
    tmux.wait_prompt("zdut device2>")
    tmux.type("st")
    tmux.keys("Tab")  # commands of the device in use
    tmux.wait_prompt("zdut device2> status")
    tmux.keys("Enter")
    tmux.wait("Arg 1: bar")
    tmux.type("..")
    tmux.keys("Enter")
    tmux.wait_prompt("zdut>")
    tmux.type("device2 ")
    tmux.keys("Tab")
    tmux.wait("repeat  Repeat input")  # the menu shows each command's config desc


# ------------------------------------------------------------------ 3 and 5: consoles, Ctrl-], Ctrl-C, Ctrl-D


def test_console_detach_then_ctrl_c_cancels_a_command_not_the_shell(lab: Lab, tmux: Tmux) -> None:
    addr = board_shell(lab, tmux)
    tmux.type("device2 repeat")
    tmux.keys("Enter")
    tmux.wait("Two words will terminate")
    tmux.type("hello")
    tmux.keys("Enter")  # raw mode: the module gets CR and echoes the word
    tmux.wait("\nhello\n", 5)
    assert 'in use by "tester"' in busy(lab, addr, "device2")
    tmux.keys("C-]", ".")
    tmux.wait("[detached: remote command cancelled]")
    tmux.wait_prompt("zdut>", 5)
    assert busy(lab, addr, "device2") == ""  # cancelled on the agent before the prompt came back

    # The terminal is cooked again: Ctrl-C is a signal, and it cancels the command, not the shell.
    tmux.type("board wait 60s")
    tmux.keys("Enter")
    tmux.wait("Waiting for 1m0s")
    assert 'in use by "tester"' in busy(lab, addr, "board")
    tmux.keys("C-c")
    tmux.wait("✗ interrupted")
    tmux.wait_prompt("zdut>", 5)
    wait_for(lambda: busy(lab, addr, "board") == "", 5, "the busy hold to be released")

    tmux.type("half-typed")
    # Each key only once the screen shows the last one took: a key sent while one prompt ends and the next
    # begins meets a cooked terminal, where Ctrl-D is the tty's end-of-file, not a key the shell can read.
    tmux.wait_prompt("zdut> half-typed")
    tmux.keys("C-c")  # at the prompt: drops the line, stays
    tmux.wait_prompt("zdut>")  # a new prompt: the line above shows "half-typed"
    assert "EXIT=" not in tmux.screen()
    tmux.keys("C-d")
    tmux.wait("EXIT=")


def test_window_size_changes_reach_the_module(lab: Lab, tmux: Tmux) -> None:
    board_shell(lab, tmux)
    tmux.type("board size")
    tmux.keys("Enter")
    tmux.wait("x120\n")
    subprocess.run(["tmux", "resize-window", "-t", tmux.name, "-x", "100", "-y", "25"], check=True)
    tmux.wait("x100\n")
    tmux.keys("C-]", ".")
    tmux.wait_prompt("zdut>")


# ------------------------------------------------------------------ 2: history


def test_history_survives_a_restart_with_reverse_search(lab: Lab, tmux: Tmux) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    tmux.start("-s", addr, "shell")
    tmux.wait_prompt("zdut>")
    for line in ("device1 status", "list"):
        tmux.type(line)
        tmux.keys("Enter")
        tmux.wait_prompt("zdut>")
        tmux.wait(f"zdut> {line}\n")
    tmux.keys("C-d")
    tmux.wait("EXIT=")
    assert (lab.tmp / "state" / "zdut" / "shell_history").read_text().count("+device1 status\n") == 1

    tmux.start("-s", addr, "shell")
    tmux.wait_prompt("zdut>")
    tmux.keys("Up")
    tmux.wait_prompt("zdut> list")
    tmux.keys("Up")
    tmux.wait_prompt("zdut> device1 status")
    tmux.keys("C-c")  # drops the recalled line: a fresh prompt
    tmux.wait_prompt("zdut>")
    tmux.keys("C-r")
    tmux.type("1 st")
    tmux.wait("(reverse-i-search)`1 st': device1 status")
    tmux.keys("Enter")  # ends the search with the match on the line, ready to edit or run
    tmux.wait_prompt("zdut> device1 status")
    tmux.keys("Enter")
    tmux.wait(STATUS_OUT)


# ------------------------------------------------------------------ 4 and 5: a dying agent, lab changes


def test_agent_killed_and_restarted_while_the_shell_waits(lab: Lab, tmux: Tmux) -> None:
    agent, addr = lab.agent(CONF / "demo.yaml")
    tmux.start("-s", addr, "shell")
    tmux.wait_ready()
    tmux.type("device1 sta")  # half-typed when the agent dies
    agent.kill()
    tmux.wait(f"· lost connection to zdut server at {addr}")
    tmux.wait_prompt("zdut (disconnected)> device1 sta")  # the notice went above; the input is intact
    assert "DISCONNECTED" in tmux.toolbar()
    tmux.type("tus")
    tmux.keys("Enter")
    tmux.wait(f"✗ cannot reach zdut server at {addr}")
    tmux.wait_prompt("zdut (disconnected)>")

    port = int(addr.rsplit(":", 1)[1])
    lab.agent(CONF / "demo.yaml", port)
    tmux.wait(f"· reconnected to {addr}")
    tmux.wait_prompt("zdut>")
    tmux.type("device1 status")
    tmux.keys("Enter")
    tmux.wait_after("zdut> device1 status\n", STATUS_OUT)
    tmux.wait_prompt("zdut>")


def test_locks_of_others_show_while_the_prompt_waits(lab: Lab, tmux: Tmux) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    tmux.start("-s", addr, "shell")
    tmux.wait_ready()
    tmux.type("device2 st")
    assert lab.zdut("-s", addr, "-u", "bob", "device2", "lock", "5m").returncode == 0
    tmux.wait('· device2 locked by "bob"')
    tmux.until(lambda: "3 online, 0 offline, 1 locked" in tmux.toolbar(), "the locked count", 5)
    assert 'device2 locked by "bob"' in tmux.toolbar()
    tmux.wait_prompt("zdut> device2 st")
    tmux.type("atus")
    tmux.keys("Enter")
    tmux.wait('✗ device "device2" is locked by "bob"')  # the agent's refusal, and the shell goes on
    tmux.wait_prompt("zdut>")
    assert lab.zdut("-s", addr, "-u", "bob", "device2", "unlock").returncode == 0
    tmux.wait("· device2 unlocked")


broker_missing = importlib.util.find_spec("zdut.broker") is None


@pytest.mark.skipif(broker_missing, reason="no zdut-broker in this tree")
def test_through_a_broker_devices_go_offline_and_come_back(lab: Lab, tmux: Tmux) -> None:
    broker_addr = f"127.0.0.1:{free_port()}"
    lab.spawn(
        [exe("zdut-broker"), "-s", broker_addr, "--heartbeat", "0.2", "--state", str(lab.tmp / "broker.sqlite3")],
        "broker",
    )

    def agent() -> Proc:
        args = ["-c", str(CONF / "demo.yaml"), "--server", broker_addr, "--name", "ag1"]
        return lab.spawn([exe("zdut-agent"), *args, "--state", str(lab.tmp / "ag1.json")], "agent")

    proc = agent()
    tmux.start("-s", broker_addr, "shell")
    tmux.wait_ready()
    assert "(broker " in tmux.toolbar()
    tmux.type("device1 st")
    proc.kill()
    tmux.wait("· device1, device2, device3 went offline")
    tmux.until(lambda: "0 online, 3 offline" in tmux.toolbar(), "the offline count", 5)
    tmux.wait_prompt("zdut> device1 st")
    tmux.type("atus")
    tmux.keys("Enter")
    tmux.wait('✗ agent "ag1" serving device "device1" is offline')
    tmux.wait_prompt("zdut>")
    agent()
    tmux.wait("· device1, device2, device3 back online")
    tmux.type("device1 status")
    tmux.keys("Enter")
    tmux.wait_after("zdut> device1 status\n", STATUS_OUT)


# ------------------------------------------------------------------ type-ahead, errors and exit at the prompt


def test_lines_typed_during_a_command_are_queued_and_exit_leaves_with_a_status(lab: Lab, tmux: Tmux) -> None:
    addr = board_shell(lab, tmux)
    tmux.line("board wait 3s")
    tmux.wait("Waiting for 3s")
    for line in ("device1 status", "bogus", "agents", "exit 7"):  # an error does not end an interactive shell
        tmux.line(line)
    assert 'in use by "tester"' in busy(lab, addr, "board")  # all typed while the command was running
    tmux.wait("EXIT=7", 15)
    after = tmux.screen().rsplit("Waiting for 3s", 1)[1]
    ran = [after.index(text) for text in ("zdut> device1 status\n" + STATUS_OUT, "✗ ", "zdut> agents\n", "EXIT=7")]
    assert ran == sorted(ran), after  # each in turn, once the wait was over

    tmux.start("-s", addr, "shell")
    tmux.wait_prompt("zdut>")
    tmux.line("bogus")
    tmux.wait('✗ device "bogus": no such device')
    tmux.wait_prompt("zdut>")  # an error at the prompt does not end the shell ...
    tmux.line("exit")
    tmux.wait("EXIT=1")  # ... and `exit` alone leaves with the last line's status, as sh's does
