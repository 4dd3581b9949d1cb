"""Interactive sessions from Python (``Lab.open``, ``AsyncLab.open``): pexpect's vocabulary against a real agent
and the simulated board on a pty."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from standins.bootloader import Bootloader, serial_device

from conftest import Lab
from zdut.aio import AsyncLab
from zdut.api import EOF, TIMEOUT, ExpectTimeout, SessionEnded, ZdutError
from zdut.api import Lab as Api
from zdut.protocol import Code

SAY = "      say:\n        uses:\n          - module: shell\n            passthrough: true\n"


@pytest.fixture
def addr(lab: Lab, board: Bootloader) -> str:
    path = lab.tmp / "expect.yaml"
    path.write_text("version: 0\ndevices:\n" + serial_device("board", board.path, SAY))
    return lab.agent(path)[1]


def test_a_console_sends_and_expects_as_pexpect_does(addr: str, board: Bootloader, tmp_path: Path) -> None:
    transcript = tmp_path / "console.log"
    with Api(addr, user="ci") as lab:
        with lab.open("board", "serial", "console", transcript=transcript) as console:
            console.sendline("")
            assert console.expect("=> ", timeout=10) == 0
            console.sendline("version")
            assert console.expect([r"no such thing", r"U-Boot (\S+) \(Simulated"], timeout=10) == 1
            assert isinstance(console.match, re.Match) and console.match.group(1) == "2024.01-zdut"
            assert "version" in console.before  # the board's echo came first
            assert console.after == "U-Boot 2024.01-zdut (Simulated"
            assert console.expect("=> ", timeout=10) == 0
            assert "aarch64-linux-gnu-gcc" in console.before

            with pytest.raises(ExpectTimeout) as late:
                console.expect("never printed", timeout=0.3)
            assert late.value.code == Code.DEADLINE_EXCEEDED and "no match for 'never printed'" in late.value.message
            assert console.expect(["never printed", TIMEOUT], timeout=0.2) == 1 and console.match is TIMEOUT

            console.send(b"echo raw bytes\r")
            assert console.expect(r"\r\nraw bytes\r\n", timeout=10) == 0  # the answer, not the echo
            assert console.read(timeout=5).endswith("=> ")  # what is left, once it arrived
            assert console.read() == ""  # nothing more within no time
            assert lab.devices()[0].lock is not None  # the open console holds the device
        assert console.ended
        assert lab.devices()[0].lock is None  # closed: free again
    assert board.received.startswith(b"\nversion\necho raw bytes\r")
    assert "U-Boot 2024.01-zdut (Simulated Board)" in transcript.read_text()


def test_the_end_of_a_session_is_eof_or_its_own_error(addr: str) -> None:
    with Api(addr, user="ci") as lab:
        with lab.open("board", "say", "printf 'first\\nlast words'") as console:
            assert console.expect("first\n") == 0
            with pytest.raises(SessionEnded) as ended:
                console.expect("never printed")
            assert ended.value.code == Code.OUT_OF_RANGE and ended.value.error is None
            assert ended.value.before == "last words"
            assert console.expect(["never printed", EOF]) == 1 and console.before == "last words"
            with pytest.raises(SessionEnded):
                console.read()
        with lab.open("board", "say", "echo bye; exit 3") as failing:
            assert failing.expect(EOF) == 0 and failing.before == "bye\n"
            assert failing.error is not None and failing.error.code == Code.ABORTED
            with pytest.raises(SessionEnded) as sent:
                failing.sendline("too late")
            assert sent.value.error is failing.error


def test_a_refused_session_raises_when_it_is_opened(addr: str) -> None:
    with Api(addr, user="alice") as alice, Api(addr, user="bob") as bob:
        alice.lock("board", "5m")
        with pytest.raises(ZdutError) as refused:
            bob.open("board", "serial", "console")
        assert refused.value.code == Code.FAILED_PRECONDITION and 'locked by "alice"' in refused.value.message
        with pytest.raises(ZdutError) as missing:
            alice.open("board", "nothing")
        assert missing.value.code == Code.NOT_FOUND


def test_the_asyncio_console_is_the_same(addr: str) -> None:
    async def main() -> str:
        async with AsyncLab(addr, user="ci") as lab:
            async with await lab.open("board", "serial", "console") as console:
                console.linesep = "\r"
                await console.sendline("echo from asyncio")
                await console.expect(r"echo from asyncio\r\n", timeout=10)  # the board's echo
                await console.expect("=> ", timeout=10)
                return console.before

    assert asyncio.run(main()) == "from asyncio\r\n"
