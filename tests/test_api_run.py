"""``run`` of the Python APIs (Lab and AsyncLab alike): output in order, transfers, how a run ends and each
error code, against real agents."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import CONF, Lab, wait_for
from zdut.api import RunResult, ZdutError
from zdut.protocol import PRINT, STDERR, STDOUT, Code

if TYPE_CHECKING:
    from api_drivers import Opener

pytest_plugins = ["api_drivers"]
DEMO = CONF / "demo.yaml"
#: One command whose modules print, write stdout, then stderr, then print again.
CHAIN = """version: 0.1.0
devices:
  box:
    cmds:
      chain:
        uses:
          - module: dummy-status
            args: [before]
          - module: dummy-repeat
          - module: dummy-status
            args: [after]
      sh:
        uses:
          - module: shell
            passthrough: true
"""


def chain_agent(lab: Lab, tmp_path: Path) -> str:
    config = tmp_path / "chain.yaml"
    config.write_text(CHAIN)
    return lab.agent(config)[1]


def test_output_keeps_its_order_and_its_streams(lab: Lab, tmp_path: Path, open_api: Opener) -> None:
    api = open_api(chain_agent(lab, tmp_path))
    result = api.run("box", "chain", stdin=b"one\ntwo words\n")
    assert (result.ok, result.code, result.message, result.error) == (True, Code.OK, "", None)
    order = [stream for i, (stream, _) in enumerate(result.output) if i == 0 or result.output[i - 1][0] != stream]
    assert order == [PRINT, STDOUT, STDERR, PRINT]
    before, after = (b"Hello from dummy status module\nCalled with 1 arguments\nArg 0: %s\n" % word
                     for word in (b"before", b"after"))
    greeting = b"Hello from dummy repeat module!\nEnter one word per line. (Two words will terminate)\n"
    oh_no = b"Oh no! Can only handle one word per line.\n"
    assert (result.printed, result.stdout, result.stderr) == (before + after, greeting + b"one\n", oh_no)
    assert result.combined == before + greeting + b"one\n" + oh_no + after
    assert result.text == (before + greeting + b"one\n" + after).decode()


def test_a_failed_command_carries_its_code_and_message(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    failed = api.run("device2", "repeat", stdin=b"one\n", check=False)
    assert (failed.ok, failed.code, failed.message) == (False, Code.ABORTED, "module failed: EOF")
    assert failed.error is not None and (failed.error.code, failed.error.message) == (failed.code, failed.message)
    assert failed.stdout.endswith(b"one\n")  # what came before the failure is kept
    with pytest.raises(ZdutError) as info:
        api.run("device2", "repeat", stdin=b"one\n")
    assert (info.value.code, info.value.message) == (Code.ABORTED, "module failed: EOF")
    wrong = api.run("device3", "file-transfer", "only-one", check=False)
    assert (wrong.code, wrong.message) == (Code.INVALID_ARGUMENT, "expected 2 argument(s) but got 1")


def test_a_shell_exit_status_is_in_the_message(lab: Lab, tmp_path: Path, open_api: Opener) -> None:
    api = open_api(chain_agent(lab, tmp_path))
    result = api.run("box", "sh", "echo out; echo err >&2; exit 3", check=False)
    assert (result.code, result.message) == (Code.ABORTED, "module failed: shell command exited with code 3")
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_files_go_both_ways(lab: Lab, tmp_path: Path, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"payload")
    result = open_api(addr).run("device3", "file-transfer", str(src), str(dst))
    assert dst.read_bytes() == b"payload\n\nprocessed by dummy.FT module\n"
    assert result.transfers == [("sent", str(src), 7), ("received", str(dst), dst.stat().st_size)]
    assert result.ok and b"File operated successfully" in result.printed


def test_a_timeout_cancels_the_command_and_frees_the_device(lab: Lab, tmp_path: Path, open_api: Opener) -> None:
    api = open_api(chain_agent(lab, tmp_path))
    result = api.run("box", "sh", "echo started; exec sleep 60", check=False, timeout=1)
    assert (result.code, result.message) == (Code.DEADLINE_EXCEEDED, "box sh: no result within 1s")
    assert result.stdout == b"started\n"
    assert api.devices()[0].lock is None  # the agent ended the run before run() returned
    with pytest.raises(ZdutError) as info:
        api.run("box", "sh", "exec sleep 60", timeout=0.5)
    assert info.value.code == Code.DEADLINE_EXCEEDED


def busy(api: Any) -> bool:
    lock = api.devices()[0].lock
    return lock is not None and lock.expires_at == 0  # a busy hold: a run is under way


def test_an_agent_lost_mid_run_is_unavailable(lab: Lab, tmp_path: Path, open_api: Opener) -> None:
    config = tmp_path / "chain.yaml"
    config.write_text(CHAIN)
    agent, addr = lab.agent(config)
    api, watcher = open_api(addr), open_api(addr)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(api.run, "box", "sh", "exec sleep 60")
        wait_for(lambda: busy(watcher), 10, "the run to start")
        agent.kill()
        with pytest.raises(ZdutError) as info:
            running.result(30)
    assert info.value.code == Code.UNAVAILABLE, info.value.message


def test_run_result_of_nothing() -> None:
    empty = RunResult()
    assert (empty.ok, empty.code, empty.message, empty.combined, empty.text) == (True, Code.OK, "", b"", "")
