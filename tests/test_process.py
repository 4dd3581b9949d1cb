"""The process runner every tool-wrapping module uses: output, exit wording, and stopping the whole group."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from modhelpers import alive, until

from zdut.devices.agent import AgentStatus
from zdut.devices.base import NoOptions
from zdut.devices.process import TailBuffer, exit_message, exit_text, group_alive, run_captured, run_streaming
from zdut.devices.testing import LocalSession

pytestmark = pytest.mark.serial  # kill grace periods are timed: run alone, not beside another worker


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_captured_streams_apart_and_merged() -> None:
    script = "echo a; echo b >&2; echo c; exit 4"
    apart = asyncio.run(run_captured(sh(script)))
    assert (apart.status, apart.stdout, apart.stderr) == (4, b"a\nc\n", b"b\n")
    merged = asyncio.run(run_captured(sh(script), merge=True))
    assert (merged.status, merged.stdout, merged.stderr) == (4, b"a\nb\nc\n", b"")


def test_cwd_and_env_reach_the_tool(tmp_path: Path) -> None:
    result = asyncio.run(run_captured(sh('pwd; echo "$ZDUT_X"'), cwd=str(tmp_path), env={"ZDUT_X": "y"}))
    assert result.stdout == f"{tmp_path}\ny\n".encode()


def test_stdin_is_dev_null() -> None:
    assert asyncio.run(run_captured(sh("cat; echo end"))).stdout == b"end\n"


def test_exit_wording() -> None:
    assert exit_text(0) == "exited with code 0"
    assert exit_text(3) == "exited with code 3"
    assert exit_text(-signal.SIGKILL) == "terminated by signal SIGKILL"
    assert exit_text(-200) == "terminated by signal 200"
    assert exit_message("flash tool", -signal.SIGTERM) == "flash tool terminated by signal SIGTERM"
    status = asyncio.run(run_captured(sh("kill -TERM $$"))).status
    assert exit_message("tool", status) == "tool terminated by signal SIGTERM"


def test_tail_buffer_keeps_the_last_bytes() -> None:
    tail = TailBuffer(4)
    for chunk in (b"ab", b"cde", b"f"):
        asyncio.run(tail(chunk))
    assert bytes(tail.data) == b"cdef"


def test_a_tool_that_cannot_start_leaks_no_pipe() -> None:
    before = len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await run_captured(["/nonexistent/zdut-tool"])
        with pytest.raises(PermissionError):
            await run_captured(["/dev/null"])

    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


def test_timeout_stops_the_whole_group() -> None:
    pids: list[int] = []

    async def collect(chunk: bytes) -> None:
        pids.extend(int(p) for p in chunk.split())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                task = asyncio.ensure_future(run_streaming(sh("echo $$; sleep 300 & echo $!; wait"), collect))
                await until(lambda: len(pids) == 2 or task.done(), "both pids")
                assert all(alive(p) for p in pids)
                deadline.reschedule(loop.time())
                await task

    asyncio.run(main())
    assert not any(alive(p) for p in pids)
    assert not group_alive(pids[0])


def test_a_failing_sink_stops_the_tool() -> None:
    pids: list[int] = []

    async def refuse(chunk: bytes) -> None:
        pids.append(int(chunk))
        raise RuntimeError("client gone")

    async def main() -> None:
        async with asyncio.timeout(10):  # without the stop the tool would run for 300 s
            with pytest.raises(RuntimeError, match="client gone"):
                await run_streaming(sh("echo $$; exec sleep 300"), refuse)

    asyncio.run(main())
    assert pids and not alive(pids[0])


def test_a_second_cancel_cuts_the_grace_short(tmp_path: Path) -> None:
    termed = tmp_path / "termed"
    pids: list[int] = []

    async def collect(chunk: bytes) -> None:
        pids.extend(int(p) for p in chunk.split())

    script = f"trap 'echo > {termed}' TERM; echo $$; while :; do sleep 0.02; done"

    async def main() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(run_streaming(sh(script), collect, grace=60))
        await until(lambda: pids or task.done(), "the pid")
        task.cancel()
        await until(termed.exists, "SIGTERM to arrive")
        assert not task.done()  # still in the 60 s grace
        started = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return loop.time() - started

    took = asyncio.run(main())
    assert took < 10
    assert not alive(pids[0])


def test_agent_status_prints_uname() -> None:
    session = LocalSession()
    asyncio.run(AgentStatus(NoOptions()).run(session, ["ignored"]))
    assert session.prints == [asyncio.run(run_captured(["uname", "-a"])).stdout.decode()]
    assert os.uname().nodename in session.prints[0]
