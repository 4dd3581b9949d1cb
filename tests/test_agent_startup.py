"""The agent's start and end: bad flags are usage errors before anything starts, modules that were
initialised are de-initialised on every way out, and SIGTERM ends console sessions at once, telling their
users, while other commands get the drain time to finish (docs/architecture.md, "Shutdown")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_agent_limits import _config
from test_terminal import Tmux, tmux  # noqa: F401 - the fixture, driving a real terminal

from conftest import CONF, Lab, exe, free_port, wait_for

pytestmark = pytest.mark.serial  # the user is told of a SIGTERM within 1 s: run alone, not beside another worker

TRACE_MODULE = '''
import os

from zdut.devices.base import Module, Session


def _mark(what: str) -> None:
    with open(os.environ["ZDUT_TRACE"], "a") as fh:
        fh.write(what + "\\n")


class Trace(Module):
    id = "trace"

    def help(self) -> str:
        return "Writes init and deinit to $ZDUT_TRACE."

    async def init(self) -> None:
        _mark("init")

    async def deinit(self) -> None:
        _mark("deinit")

    async def run(self, session: Session, args: list[str]) -> None:
        await session.print("traced\\n")
'''


@pytest.mark.parametrize("flag", ["--server", "-server", "-a"])
@pytest.mark.parametrize("value", ["hostwithoutport", "http://example.com:80", "localhost:99999", "host:0"])
def test_an_invalid_address_is_a_usage_error_naming_the_flag(tmp_path: Path, flag: str, value: str) -> None:
    r = subprocess.run([exe("zdut-agent"), "-c", str(CONF / "demo.yaml"), flag, value], capture_output=True,
                       text=True, timeout=10, cwd=tmp_path, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    assert r.returncode == 2, r
    name = "-a/--address" if flag == "-a" else "--server/-server"
    assert f"argument {name}: invalid address {value!r}" in r.stderr, r.stderr


def test_a_bind_failure_after_init_still_deinitialises_the_modules(lab: Lab, tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "zdut_trace-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "zdut_trace.py").write_text(TRACE_MODULE)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zdut-trace\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[zdut.devices]\ntrace = zdut_trace:Trace\n")
    config = tmp_path / "trace.yaml"
    config.write_text("version: 0\ndevices:\n  probe:\n    cmds:\n      hit:\n        uses:\n"
                      "          - module: trace\n")
    trace = tmp_path / "trace.log"
    lab.env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                   ZDUT_TRACE=str(trace))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent, _ = lab.agent(config, port, ready=False)
        assert agent.popen.wait(15) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in agent.text()
    assert trace.read_text() == "init\ndeinit\n", agent.text()
    trace.unlink()  # and a clean start and stop does the same
    agent, addr = lab.agent(config)
    assert lab.zdut("-s", addr, "probe", "hit").stdout == "traced\n"
    assert agent.stop() == 0
    assert trace.read_text() == "init\ndeinit\n", agent.text()


@pytest.mark.parametrize("via", ["direct", "broker"])
def test_sigterm_ends_a_console_at_once_and_tells_its_user(lab: Lab, tmux: Tmux, via: str) -> None:  # noqa: F811
    if via == "direct":
        agent, addr = lab.agent(CONF / "demo.yaml")
    else:
        _, addr = lab.broker()
        agent = lab.brokered_agent(CONF / "demo.yaml", addr)
    tmux.start(f"{exe('zdut')} -s {addr} device2 repeat")
    wait_for(lambda: "Two words will terminate" in tmux.screen(), 10, "the banner")
    tmux.keys("hello", "Enter")
    wait_for(lambda: "\nhello\n" in tmux.screen(), 5, "the echo of one word")
    start = time.monotonic()
    agent.kill(signal.SIGTERM)
    wait_for(lambda: "shutting down" in tmux.screen(), 1.0, "the user to be told")
    told = time.monotonic() - start
    wait_for(lambda: "EXIT=" in tmux.screen(), 2.0, "the client to exit")
    client_s = time.monotonic() - start
    wait_for(lambda: not agent.alive(), 2.0, "the agent to exit")
    agent_s = time.monotonic() - start
    print(f"told after {told:.2f}s, client gone after {client_s:.2f}s, agent after {agent_s:.2f}s\n{tmux.screen()}")
    assert "EXIT=0" not in tmux.screen()
    assert agent.popen.returncode == 0, agent.text()[-2000:]


def test_sigterm_lets_a_running_command_finish_and_refuses_new_ones(lab: Lab) -> None:
    """A non-console command is told at once that the agent is going and has the drain time to finish; a
    command that arrives meanwhile is refused; the agent exits as soon as the last one ended."""
    agent, addr = lab.agent(_config(lab.tmp), free_port(), "--drain", "10")
    running = lab.zdut_bg("-s", addr, "board", "wait", "5s")  # outlasts the checks below, even under load
    wait_for(lambda: "run device=board command=wait" in agent.text(), 10, "the command to start")
    start = time.monotonic()
    agent.kill(signal.SIGTERM)
    wait_for(lambda: "is shutting down: this command is cancelled unless it ends within 10s" in running.text(),
             1.0, "the user to be told")
    late = lab.zdut("-s", addr, "other", "status", timeout=10)
    assert late.returncode != 0 and "agent shutting down" in late.stderr, late
    assert running.popen.wait(10) == 0, running.text()
    wait_for(lambda: not agent.alive(), 2.0, "the agent to exit once the command ended")
    print(f"agent exited {time.monotonic() - start:.2f}s after SIGTERM")
    assert agent.popen.returncode == 0
