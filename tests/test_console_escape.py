"""The console's escape menu (Ctrl-] then a key): the key parser, and end to end in tmux against a serial
console on a pseudo-terminal with a simulated boot loader."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from conftest import CONF, Lab, wait_for
from test_shell_terminal import Tmux
from zdut.terminal.console import BREAK, DETACH, HELP, UNKNOWN, EscapeKeys

try:
    from standins.bootloader import Bootloader, serial_device
except ImportError:  # tests/ imported as a package
    from tests.standins.bootloader import Bootloader, serial_device


def test_escape_keys_split_across_reads_and_keep_the_bytes_around_them() -> None:
    keys = EscapeKeys()
    assert keys.feed(b"ab\x1d") == [("send", b"ab")] and keys.pending
    assert keys.feed(b"?cd") == [(HELP, b""), ("send", b"cd")] and not keys.pending
    assert keys.feed(b"\x1d\x1dz") == [("send", b"\x1dz")]  # twice: one literal Ctrl-]
    assert keys.feed(b"x\x1dby\x1dq") == [("send", b"x"), (BREAK, b""), ("send", b"y"), (DETACH, b"")]
    assert keys.feed(b"\x1d.after") == [(DETACH, b"")]  # nothing after a detach is sent
    assert keys.feed(b"\x1dk") == [(UNKNOWN, b"")]
    assert keys.feed(b"plain") == [("send", b"plain")]


@pytest.fixture
def tmux(lab: Lab) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    t = Tmux(lab)
    yield t
    t.kill()


def test_the_escape_menu_in_a_serial_console(lab: Lab, board: Bootloader, tmux: Tmux) -> None:
    cfg = lab.tmp / "serial.yaml"
    cfg.write_text("version: 0.1.0\ndevices:\n" + serial_device("board", board.path))
    _, addr = lab.agent(cfg)
    tmux.start("-s", addr, "board", "serial", "console")
    tmux.wait("[attached to board serial; Ctrl-] . detaches, Ctrl-] ? more]")
    tmux.wait("--- Connected to")
    tmux.keys("C-]", "?")
    tmux.wait("[zdut: Ctrl-] then: . or q detach")
    tmux.keys("C-]", "C-]")
    wait_for(lambda: b"\x1d" in board.received, 10, "a literal Ctrl-] at the board")
    tmux.keys("C-]", "x")
    tmux.wait("[zdut: unknown escape key; Ctrl-] ? lists them]")
    tmux.keys("C-]", "b")
    tmux.wait("[zdut: serial break sent]")  # a pty cannot show a break on its other end: the module's word
    assert b"x" not in board.received and b"b" not in board.received and b"?" not in board.received
    tmux.keys("C-]", ".")
    tmux.wait("EXIT=0")
    tmux.wait("[detached: remote command cancelled]")


def test_a_break_asked_of_a_command_without_a_line_is_refused_in_words(lab: Lab, tmux: Tmux) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    tmux.start("-s", addr, "device2", "repeat")
    tmux.wait("Enter one word per line")
    tmux.keys("C-]", "b")
    tmux.wait("[zdut: this command cannot send a serial break]")
    tmux.keys("C-]", "q")
    tmux.wait("EXIT=0")
