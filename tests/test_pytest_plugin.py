"""zdut's pytest plugin, driven by pytester: the example suite of docs/automation.md, and a few of its own, run
in a pytest of their own against real broker and agent processes and two simulated boards on ptys."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from standins.bootloader import Bootloader, serial_device

import zdut.devices.serial  # noqa: F401  imported before pytester snapshots sys.modules: it restores them after
from conftest import Lab

pytest_plugins = ["pytester"]


DOC = Path(__file__).resolve().parent.parent / "docs" / "automation.md"


def documented_suite() -> str:
    match = re.search(r"<!-- automation-suite -->\s*```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert match, "docs/automation.md has no python block after <!-- automation-suite -->"
    return match.group(1)


INTERRUPTED = r'''
import os
import signal

import pytest


@pytest.mark.zdut_device("board-2")
def test_interrupted(zdut_lab, zdut_device):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, mid-test
'''

XDIST = r'''
import time
from pathlib import Path

import pytest

SEEN = Path(__file__).parent / "seen"


@pytest.mark.zdut_device("board-*")
@pytest.mark.parametrize("n", [1, 2])
def test_each_worker_takes_its_own_board(zdut_lab, zdut_device, n):
    SEEN.mkdir(exist_ok=True)
    (SEEN / zdut_device).write_text(str(n))
    deadline = time.monotonic() + 20
    while len(list(SEEN.iterdir())) < 2:  # both hold their lock at once, or the test proves nothing
        assert time.monotonic() < deadline, "the other worker never got a board"
        time.sleep(0.05)
'''


@pytest.fixture
def boards() -> Iterator[list[Bootloader]]:
    both = [Bootloader().start(), Bootloader().start()]
    yield both
    for board in both:
        board.close()


@pytest.fixture
def addr(lab: Lab, boards: list[Bootloader]) -> str:
    config = lab.tmp / "boards.yaml"
    config.write_text("version: 0\ndevices:\n" + "".join(serial_device(f"board-{i}", b.path)
                                                         for i, b in enumerate(boards, 1)))
    _, broker = lab.broker()
    lab.brokered_agent(config, broker)
    return broker


def locks(lab: Lab, addr: str) -> dict[str, str]:
    records = json.loads(lab.zdut("-s", addr, "-f", "json", "list").stdout)["data"]
    return {r["Name"]: r["Owner"] for r in records if r["Locked"]}


def run_suite(pytester: pytest.Pytester, lab: Lab, addr: str, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_boards=source)
    return pytester.runpytest_subprocess("--zdut-server", addr, "--zdut-user", "ci", "-p", "no:cacheprovider",
                                         "-p", "no:randomly", *args, timeout=120)


def test_a_suite_boots_the_board_and_a_failure_carries_the_transcript(pytester: pytest.Pytester, lab: Lab,
                                                                      addr: str, boards: list[Bootloader]) -> None:
    result = run_suite(pytester, lab, addr, documented_suite())
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "the board did not say goodbye" in out
    assert "zdut console: board-1 serial console" in out  # the failed test's console, in its report
    section = out[out.index("zdut console: board-1 serial console"):]
    assert "--- Connected to" in section and "hello from the board" in section
    assert out.count("zdut console: board-") == 1, out  # the passing test's console is not shown
    assert locks(lab, addr) == {}, lab.zdut("-s", addr, "list").stdout  # every lock released, the failing one too
    assert b"version" in boards[0].received + boards[1].received


def test_an_interrupted_run_releases_its_lock(pytester: pytest.Pytester, lab: Lab, addr: str) -> None:
    result = run_suite(pytester, lab, addr, INTERRUPTED)
    assert "KeyboardInterrupt" in result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert locks(lab, addr) == {}


def test_two_xdist_workers_take_two_boards(pytester: pytest.Pytester, lab: Lab, addr: str) -> None:
    pytest.importorskip("xdist")
    result = run_suite(pytester, lab, addr, XDIST, "-n", "2")
    result.assert_outcomes(passed=2)
    seen = sorted(p.name for p in Path(pytester.path, "seen").iterdir())
    assert seen == ["board-1", "board-2"]
    assert locks(lab, addr) == {}


def test_the_device_fixture_needs_its_marker(pytester: pytest.Pytester, lab: Lab, addr: str) -> None:
    result = run_suite(pytester, lab, addr, "def test_unmarked(zdut_device):\n    pass\n")
    assert "needs @pytest.mark.zdut_device" in result.stdout.str() + result.stderr.str()
    assert result.ret != 0
