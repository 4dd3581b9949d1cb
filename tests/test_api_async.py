"""What only the asyncio API does, and how the synchronous one stands beside it: awaited inside the caller's
own loop, concurrent calls on one connection, cancellation that reaches the agent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import CONF, Lab
from zdut.aio import AsyncLab
from zdut.api import Lab as SyncLab
from zdut.protocol import Code, ZdutError

SHELL = "version: 0.1.0\ndevices:\n  box:\n    cmds:\n      sh:\n        uses:\n          - module: shell\n" \
        "            passthrough: true\n"


async def until(cond: object, timeout: float = 10.0) -> None:
    """Await ``cond()`` (a coroutine function) until it is truthy; fail after ``timeout`` seconds."""
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        await asyncio.sleep(0.02)


def test_calls_share_one_connection_and_run_concurrently(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")

    async def main() -> None:
        async with AsyncLab(addr, user="ci@rack") as api:
            results = await asyncio.gather(
                api.run("device1", "status", "a"), api.run("device2", "status"), api.run("device3", "status"),
                api.commands("device2"), api.lock("device1", "1m"))
            assert [r.ok for r in results[:3]] == [True] * 3
            assert results[0].text.endswith("Arg 0: a\n") and results[3] == ["repeat", "status"]
            assert results[4].owner == "ci@rack"

    asyncio.run(main())


def test_cancelling_the_awaiting_task_cancels_the_command(lab: Lab, tmp_path: Path) -> None:
    config = tmp_path / "shell.yaml"
    config.write_text(SHELL)
    _, addr = lab.agent(config)

    async def main() -> None:
        async with AsyncLab(addr, user="ci@rack") as api:
            async def locked() -> bool:
                return (await api.devices())[0].lock is not None

            async def free() -> bool:
                return not await locked()

            task = asyncio.create_task(api.run("box", "sh", "exec sleep 60"))
            await until(locked)  # the run holds the device
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(free, 5)  # the agent ended it: no sleep left holding the device for a minute
            with pytest.raises(TimeoutError):  # the caller's own deadline works the same way
                async with asyncio.timeout(0.5):
                    await api.run("box", "sh", "exec sleep 60")
            await until(free, 5)

    asyncio.run(main())


def test_unreachable_server_inside_a_running_loop(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ZdutError) as info:
            await AsyncLab("127.0.0.1:1", user="ci@rack").connect()
        assert info.value.code == Code.UNAVAILABLE

    asyncio.run(main())


def test_the_blocking_lab_refuses_a_running_loop_and_names_the_async_one() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"zdut\.aio\.AsyncLab"):
            SyncLab("127.0.0.1:1")

    asyncio.run(main())
