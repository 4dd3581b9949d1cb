"""``zdut shell`` reading a script (stdin not a terminal): the first failing line ends it with its status,
``exit [N]``, and the POSIX quoting of its lines, checked against sh (bash) itself and a real agent.

At the prompt errors do not end the shell; that, ``exit N`` there and type-ahead are in test_shell_terminal.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONF, Lab
from zdut.terminal.shell_words import LineError, split

FIRST = "device1 status\n"  # runs, and says so
FIRST_OUT = "Called with 0 arguments\n"
AFTER = "list\n"  # must not run once a line failed
AFTER_OUT = "- device1"

Script = Callable[[str], "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="module")
def addr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One agent for the module: every script here only reads."""
    lab = Lab(tmp_path_factory.mktemp("script"))
    try:
        yield lab.agent(CONF / "demo.yaml")[1]
    finally:
        lab.close()


@pytest.fixture
def run(addr: str, tmp_path: Path) -> Iterator[Script]:
    """Runs a script through `zdut shell` against the module's agent."""
    lab = Lab(tmp_path)

    def script(text: str) -> subprocess.CompletedProcess[str]:
        return lab.zdut("-s", addr, "shell", input=text.encode(), timeout=20)

    yield script
    lab.close()


# ------------------------------------------------------------------ the first failing line ends a script


@pytest.mark.parametrize(
    ("line", "status", "message"),
    [
        ("help me", 1, "help takes no arguments"),
        ("bogus status", 1, 'device "bogus": no such device'),
        ("device1 lock 1h 2x", 1, "lock takes at most a duration"),
        ("use nosuch", 1, 'device "nosuch": no such device'),
        ("use device1 device2", 1, "use takes one device name"),
        ("format xml", 1, "format takes one of"),
        ('device1 status "open', 2, 'cannot parse the line: unterminated " quote at column 16'),
        ("device1 status a;b", 2, "cannot parse the line: unquoted ';' at column 17"),
        ("exit 256", 2, "exit takes nothing or a status from 0 to 255"),
        ("quit x", 2, "quit takes nothing or a status from 0 to 255"),
        ("exit 1 2", 2, "exit takes nothing or a status from 0 to 255"),
    ],
)
def test_a_script_stops_at_its_first_failing_line(run: Script, line: str, status: int, message: str) -> None:
    r = run(FIRST + "\n# a comment and an empty line keep the status\n" + line + "\n" + AFTER)
    assert r.returncode == status, r.stderr
    assert message in r.stderr
    assert r.stdout.startswith("Hello from dummy status module\n" + FIRST_OUT)
    assert AFTER_OUT not in r.stdout  # the line after the failing one never ran


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ("exit 3\n", 3),
        ("exit 0\n", 0),
        ("quit 255\n", 255),
        ("exit\n", 0),  # the last line's status, and a script that got here has only had successes
        ("quit\n", 0),
    ],
)
def test_exit_n_ends_a_script_with_n(run: Script, script: str, status: int) -> None:
    r = run(FIRST + script + AFTER)
    assert r.returncode == status, r.stderr
    assert FIRST_OUT in r.stdout and AFTER_OUT not in r.stdout
    assert r.stderr == ""


# ------------------------------------------------------------------ POSIX quoting


def test_quoting_reaches_the_command_as_sh_would_pass_it(run: Script) -> None:
    line = r"""device1 status "echo \$HOME" 'a\b "c" $x' a\ b\'c "" "q\"\\\z" ~/fw '~' #not an argument"""
    r = run(line + "\n" + AFTER)  # no exit: a script without a failing line runs to EOF, and exits 0
    assert r.returncode == 0, r.stderr
    args = ["echo $HOME", 'a\\b "c" $x', "a b'c", "", 'q"\\\\z', os.path.expanduser("~/fw"), "~"]
    assert f"Called with {len(args)} arguments\n" + "".join(f"Arg {i}: {a}\n" for i, a in enumerate(args)) in r.stdout
    assert AFTER_OUT in r.stdout
    assert sh_words(line) == ["device1", "status", *args]  # what bash makes of the same line


BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is the reference for POSIX quoting")


def sh_words(line: str) -> list[str] | None:
    """The words bash makes of ``line`` (globbing off), or None when bash refuses the line."""
    assert BASH is not None
    program = f"set -f; set -- {line}\nprintf '%s\\0' \"$#\" \"$@\""
    r = subprocess.run([BASH, "--norc", "--noprofile", "-c", program], capture_output=True, timeout=10)
    if r.returncode != 0:
        return None
    count, *words = r.stdout.decode().split("\0")[:-1]
    assert len(words) == int(count)
    return words


CASES = [
    "a b\tc",
    '"echo \\$HOME"',
    "'a\\b'",
    'a\\ b',
    '"a\\b" "a\\\\b" "\\`" "\\""',
    "'' \"\" a''b",
    "x #comment",
    "x#notacomment \\#nor",
    "\"it's\" 'say \"hi\"'",
    "a'b'\"c\"d\\e",
    "  lead  trail  ",
    "# all comment",
    "a '|' \\> \"&;\" \\(\\)",  # quoted operators are arguments
    "~ ~/fw.bin a~ '~' ~\"x\" \\~ ~root/b ~nosuchuser/c",  # the one expansion: a home directory
]


@needs_bash
@pytest.mark.parametrize("line", CASES)
def test_split_agrees_with_bash(line: str) -> None:
    assert split(line) == sh_words(line)


@needs_bash
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab #\t'\"\\~/", max_size=16))
def test_split_agrees_with_bash_on_generated_lines(line: str) -> None:
    """Blanks, comments, quotes, backslashes and tildes in any order (nothing else bash would expand): the
    same words, or both refuse the line."""
    try:
        ours = split(line)
    except LineError as exc:
        if "backslash" in str(exc):
            return  # bash reads a final backslash as a continuation; here a line is one command
        assert sh_words(line) is None, f"bash accepts {line!r}"
        return
    assert ours == sh_words(line)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('a "b', 'unterminated " quote at column 3'),
        ("a 'b", "unterminated ' quote at column 3"),
        ("a b\\", "the line ends with a backslash"),
        ("a | b", "unquoted '|' at column 3"),
        ("a >out", "unquoted '>' at column 3"),
        ("a&", "unquoted '&' at column 2"),
    ],
)
def test_split_refuses_what_sh_would_read_differently(line: str, error: str) -> None:
    with pytest.raises(LineError) as caught:
        split(line)
    assert error in str(caught.value)
