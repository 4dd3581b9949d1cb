"""The shell module: streaming, exit codes, quiet mode and killing the whole process group."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from modhelpers import alive, make_module, until

from zdut.devices import process
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.shell import TOO_MANY_ARGS, Shell
from zdut.devices.testing import LocalSession

pytestmark = pytest.mark.serial  # kill grace periods are timed: run alone, not beside another worker


async def make(**with_: object) -> Shell:
    return await make_module(Shell, **with_)


def run_cmd(command: str, **with_: object) -> LocalSession:
    async def main() -> LocalSession:
        session = LocalSession()
        await (await make(**with_)).run(session, [command])
        return session

    return asyncio.run(main())


def test_output_streams_before_the_command_ends(tmp_path: Path) -> None:
    flag = tmp_path / "go-on"
    command = f"echo first; echo warn >&2; while [ ! -e {flag} ]; do sleep 0.01; done; echo second"

    async def main() -> LocalSession:
        session = LocalSession()
        task = asyncio.create_task((await make()).run(session, [command]))
        await until(lambda: (b"first\n" in session.out and b"warn\n" in session.err) or task.done(), "the first lines")
        assert not task.done(), "the command ended before its first line arrived"
        assert b"second" not in session.out
        flag.touch()
        await task
        return session

    session = asyncio.run(main())
    assert session.events.index(("stdout", b"first\n")) < session.events.index(("stdout", b"second\n"))
    assert bytes(session.out) == b"first\nsecond\n"
    assert bytes(session.err) == b"warn\n"


def test_exit_code_is_reported() -> None:
    with pytest.raises(ModuleError) as err:
        run_cmd("echo partial; exit 3")
    assert err.value.message == "shell command exited with code 3"


def test_signal_death_is_reported() -> None:
    with pytest.raises(ModuleError, match=r"^shell command terminated by signal SIGKILL$"):
        run_cmd("kill -9 $$")


def test_quiet_hides_output_unless_the_command_fails() -> None:
    assert run_cmd("echo hidden; echo warn >&2", quiet=True).events == []
    session = LocalSession()

    async def main() -> None:
        await (await make(quiet=True)).run(session, ["echo hidden; echo oops >&2; exit 1"])

    with pytest.raises(ModuleError, match="exited with code 1"):
        asyncio.run(main())
    assert session.events == [("stderr", b"oops\n")]


def test_path_option_and_no_stdin() -> None:
    session = run_cmd('echo "$0"; cat; echo end', path="bash")
    assert bytes(session.out) == b"bash\nend\n"  # stdin is /dev/null: cat ends at once


def test_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A grandchild in a subshell and a background child, plus the shell waiting on them.
    command = f"sleep 300 & echo $! >> {pids}; (sleep 301 & echo $! >> {pids}; wait) & wait"

    async def main() -> list[int]:
        task = asyncio.create_task((await make()).run(LocalSession(), [command]))
        await until(lambda: pids.exists() and len(pids.read_text().split()) == 2, "the pid file")
        found = [int(p) for p in pids.read_text().split()]
        assert all(alive(p) for p in found)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not any(alive(p) for p in found), "the group to die")
        return found

    asyncio.run(main())


def test_cancel_escalates_to_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "KILL_GRACE_S", 0.3)
    pidfile = tmp_path / "pid"
    command = f"trap '' TERM; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; while :; do sleep 0.05; done"

    async def main() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task((await make(path="bash")).run(LocalSession(), [command]))
        await until(pidfile.exists, "the pid file")
        pid = int(pidfile.read_text())
        started = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not alive(pid)
        return loop.time() - started

    took = asyncio.run(main())
    assert 0.25 <= took < 3  # waited the grace, then SIGKILL


def test_background_children_do_not_hold_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "PIPE_LINGER_S", 0.2)
    pidfile = tmp_path / "pid"
    try:
        session = run_cmd(f"sleep 300 & echo $! > {pidfile}; echo started")
        assert bytes(session.out) == b"started\n"
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_missing_shell_is_named() -> None:
    with pytest.raises(ModuleError) as err:
        asyncio.run(make(path="/nonexistent/zsh"))
    assert err.value.message.startswith('shell path "/nonexistent/zsh": executable file not found in $PATH')
    assert "install" in err.value.message


@pytest.mark.parametrize(("args", "message"), [([], "missing command-string"), (["a", "b"], TOO_MANY_ARGS)])
def test_argument_errors(args: list[str], message: str) -> None:
    async def main() -> None:
        await (await make()).run(LocalSession(), args)

    with pytest.raises(ModuleError) as err:
        asyncio.run(main())
    assert err.value.message == message


def test_help() -> None:
    text = Shell(decode_options(Shell, {"path": "bash", "quiet": True})).help()
    assert 'The used shell is "bash".' in text
    assert "quiet mode" in text
