"""Raw-mode consoles in a real terminal, driven through tmux."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from conftest import CONF, Lab, exe, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Tmux:
    def __init__(self, lab: Lab) -> None:
        self.name = f"zdut-{uuid.uuid4().hex[:8]}"
        self.lab = lab

    def start(self, command: str) -> None:
        env = " ".join(f"{k}={v}" for k, v in (("XDG_STATE_HOME", self.lab.tmp / "state"), ("USER", "tester")))
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "120", "-y", "30",
                        f"cd {self.lab.tmp} && env {env} {command}; echo EXIT=$?; sleep 600"], check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def tmux(lab: Lab) -> Iterator[Tmux]:
    t = Tmux(lab)
    yield t
    t.kill()


def test_interactive_console_raw_mode_and_detach(lab: Lab, tmux: Tmux) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    tmux.start(f"{exe('zdut')} -s {addr} -u tester device2 repeat")
    wait_for(lambda: "Two words will terminate" in tmux.screen(), 10, "the banner")
    tmux.keys("hello", "Enter")
    wait_for(lambda: "\nhello\n" in tmux.screen(), 5, "the echo of one word")
    assert 'in use by "tester"' in lab.zdut("-s", addr, "list").stdout
    tmux.keys("C-]", ".")
    wait_for(lambda: "EXIT=0" in tmux.screen(), 5, "zdut to exit after Ctrl-]")
    assert "[detached: remote command cancelled]" in tmux.screen()
    wait_for(lambda: "in use" not in lab.zdut("-s", addr, "list").stdout, 5, "the busy hold to be released")


def test_ctrl_c_in_raw_mode_goes_to_the_device(lab: Lab, tmux: Tmux) -> None:
    """In raw mode Ctrl-C is a byte for the remote console, not a local interrupt."""
    _, addr = lab.agent(CONF / "demo.yaml")
    tmux.start(f"{exe('zdut')} -s {addr} device2 repeat")
    wait_for(lambda: "Two words will terminate" in tmux.screen(), 10, "the banner")
    tmux.keys("C-c")
    tmux.keys("ok", "Enter")
    wait_for(lambda: "ok\n" in tmux.screen(), 5, "the console to keep running after Ctrl-C")
    assert "EXIT=" not in tmux.screen()
    tmux.keys("two words", "Enter")
    wait_for(lambda: "EXIT=0" in tmux.screen(), 5, "the module to end on two words")
