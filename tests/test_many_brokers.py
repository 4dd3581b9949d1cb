"""Several brokers for one lab (issue 15): clients given a list use the first that answers, spread over it, and
go on through another when theirs dies; every broker shows the same truth.  Real brokers, agent, CLI, API and
shell."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import CONF, Lab, Proc, wait_for
from test_shell_terminal import Tmux, busy, tmux  # noqa: F401  tmux: the fixture, used by name
from zdut.aio import AsyncLab
from zdut.api import Lab as Api
from zdut.protocol import Code, ZdutError

DEVICES = ["device1", "device2", "device3"]


@pytest.fixture
def three(lab: Lab) -> tuple[list[Proc], list[str]]:
    """Three brokers and the demo agent registered with all of them."""
    started = [lab.broker() for _ in range(3)]
    procs, addrs = [p for p, _ in started], [a for _, a in started]
    lab.agent(CONF / "demo.yaml", None, *[arg for a in addrs for arg in ("--server", a)])
    for addr in addrs:
        wait_for(lambda addr=addr: lab.online(addr, DEVICES), 15, f"the agent at {addr}")
    return procs, addrs


def answered_by(lab: Lab, servers: str | None, *args: str) -> tuple[int, str]:
    r = lab.zdut(*(("-s", servers) if servers is not None else ()), "-v", *(args or ("list",)))
    found = re.search(r"# connected to (\S+)", r.stdout)
    return r.returncode, found.group(1) if found else r.stderr


@pytest.mark.parametrize(("servers", "message"), [
    ("a:1,,b:2", "an empty entry in the list"),
    ("localhost:1,localhost:1", "'localhost:1' is listed twice"),
    ("localhost:1,tcp://127.0.0.1:1", "'tcp://127.0.0.1:1' is listed twice (as 'localhost:1')"),
    ("localhost:1,http://x", "'http://x': want host:port"),
    ("localhost:1,hostwithoutport", "'hostwithoutport': want host:port"),
])
def test_the_list_syntax_and_its_errors(lab: Lab, servers: str, message: str) -> None:
    r = lab.zdut("-s", servers, "list")
    assert r.returncode == 2 and f'for flag -s: {message}' in r.stderr, r.stderr
    r = lab.zdut("list", env={**lab.env, "ZDUT_SERVER": servers})
    assert r.returncode == 2 and f"for $ZDUT_SERVER: {message}" in r.stderr, r.stderr
    with pytest.raises(ZdutError) as bad:
        AsyncLab(servers)
    assert bad.value.code == Code.INVALID_ARGUMENT and message in bad.value.message


def test_nobody_answering_names_every_broker(lab: Lab) -> None:
    started = time.monotonic()
    r = lab.zdut("-s", "localhost:1,localhost:2", "list")
    assert r.returncode == 1 and r.stderr.startswith("✗ no zdut server answered: ")
    assert "localhost:1" in r.stderr and "localhost:2" in r.stderr
    assert time.monotonic() - started < 5  # about a second each


def test_one_shot_calls_spread_over_the_list_and_go_on_when_a_broker_is_killed(
        lab: Lab, three: tuple[list[Proc], list[str]]) -> None:
    procs, addrs = three
    servers = ",".join(addrs)
    used = set()
    for _ in range(12):
        code, where = answered_by(lab, servers)
        assert code == 0, where
        used.add(where)
    assert len(used) >= 2, used  # each client starts at its own place in the list
    procs[0].kill()  # SIGKILL: no goodbye to anyone
    procs[0].popen.wait(5)
    for _ in range(6):
        started = time.monotonic()
        code, where = answered_by(lab, servers)
        assert code == 0 and where != addrs[0], where  # no call fails: the dead one is passed over
        assert time.monotonic() - started < 5
    assert lab.zdut("-s", servers, "-u", "alice", "device1", "lock", "10m").returncode == 0
    for addr in addrs[1:]:  # a lock taken through one broker is enforced through every other and directly
        r = lab.zdut("-s", addr, "-u", "bob", "device1", "status")
        assert r.returncode == 1 and 'locked by "alice"' in r.stderr, r.stderr

    lab.broker(int(addrs[0].rsplit(":", 1)[1]))  # back, on its address and state file
    wait_for(lambda: lab.online(addrs[0], DEVICES), 15, "the agent back at the restarted broker")
    wait_for(lambda: 'locked by "alice"' in lab.zdut("-s", addrs[0], "list").stdout, 5, "the lock there too")
    wait_for(lambda: answered_by(lab, servers)[1] == addrs[0], 30, "new clients using it again", interval=0)


def test_the_api_switches_to_another_broker_when_its_own_dies(lab: Lab, three: tuple[list[Proc], list[str]],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    procs, addrs = three
    with Api(",".join(addrs), user="alice") as api:
        assert [d.name for d in api.devices()] == DEVICES
        mine = api._lab.client.address
        procs[addrs.index(mine)].kill()
        procs[addrs.index(mine)].popen.wait(5)
        started = time.monotonic()
        api.lock("device2", "10m")  # the next call goes through another broker, without the caller's help
        assert time.monotonic() - started < 2
        assert api._lab.client.address != mine
        assert "lost the connection to " + mine in caplog.text
        for addr in addrs:
            if addr != mine:
                wait_for(lambda addr=addr: 'locked by "alice"' in lab.zdut("-s", addr, "list").stdout, 2,
                         f"the lock listed at {addr} within 2 s")
        with Api(",".join(a for a in addrs if a != mine), user="bob") as bob, pytest.raises(ZdutError) as refused:
            bob.run("device2", "status")
        assert 'locked by "alice"' in refused.value.message


def test_the_shell_keeps_working_when_its_broker_dies(lab: Lab, three: tuple[list[Proc], list[str]],
                                                       tmux: Tmux) -> None:  # noqa: F811  the imported fixture
    procs, addrs = three
    tmux.start("-s", ",".join(addrs), "shell")
    tmux.wait_ready()
    tmux.line("list")
    tmux.wait("- device3")
    mine = next(a for a in addrs if a in tmux.toolbar())  # the toolbar says where it is connected
    procs[addrs.index(mine)].kill()
    tmux.wait(f"lost connection to zdut server at {mine}: switching to another", 5)
    tmux.until(lambda: mine not in tmux.toolbar() and any(a in tmux.toolbar() for a in addrs), "another broker", 3)
    tmux.line("device1 status")
    tmux.wait("Hello from dummy status module")


def test_a_lab_never_closed_does_not_hold_up_its_interpreters_exit(lab: Lab, three: tuple[list[Proc], list[str]]
                                                                    ) -> None:
    procs, addrs = three
    procs[0].kill()
    procs[0].popen.wait(5)
    script = ("import sys\nfrom zdut.api import Lab, ZdutError\n"
              "lab = Lab(sys.argv[1], user='bob')\n"
              "try:\n    lab.run('device1', 'nothing')\nexcept ZdutError as exc:\n    print(exc.code)\n")
    child = subprocess.run([sys.executable, "-c", script, ",".join(addrs)], capture_output=True, text=True,
                           timeout=20, env=lab.env)  # a hang here is the failure
    assert child.returncode == 0 and child.stdout.strip() == "NotFound", child.stdout + child.stderr


Truth = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]  # devices, agents


def truth(api: Api) -> Truth:
    """What one broker says of the lab, without what is each broker's own (when it last heard an agent)."""
    devices = [(d.name, d.agent, d.online, d.lock and (d.lock.owner, d.lock.expires_at)) for d in api.devices()]
    agents = [(a.name, a.devices, a.online, a.version, a.address) for a in api.agents()]
    return devices, agents


def cli_truth(lab: Lab, addr: str) -> tuple[object, object]:
    """The same from ``zdut -f json list`` and ``agents``, as a user would compare them."""
    listed = json.loads(lab.zdut("-s", addr, "-f", "json", "list").stdout)["data"]
    agents = json.loads(lab.zdut("-s", addr, "-f", "json", "agents").stdout)["data"]
    return listed, [{k: v for k, v in a.items() if k != "LastSeen"} for a in agents]


def all_agree(apis: list[Api], expect: Callable[[Truth], bool],
              within: float, what: str) -> float:
    """Wait until every broker shows the same truth and it is the one expected; how long that took."""
    started = time.monotonic()

    def agreed() -> bool:
        seen = [truth(api) for api in apis]
        return all(s == seen[0] for s in seen) and expect(seen[0])

    wait_for(agreed, within, f"every broker to show {what} within {within:g} s", interval=0.01)
    return time.monotonic() - started


def test_every_broker_shows_the_same_truth_within_two_seconds(lab: Lab, three: tuple[list[Proc], list[str]]) -> None:
    _, addrs = three
    apis = [Api(addr, user="carol") for addr in addrs]
    try:
        def owner(device: str) -> Callable[[Truth], bool]:
            return lambda seen: next(d for d in seen[0] if d[0] == device)[3] not in (None, "")

        # lock changes, through a broker, through another, and at the agent directly
        started = time.monotonic()
        assert lab.zdut("-s", addrs[0], "-u", "alice", "device1", "lock", "10m").returncode == 0
        all_agree(apis, owner("device1"), 2 + time.monotonic() - started, "device1 locked")
        assert truth(apis[2])[0][0][3][0] == "alice"
        started = time.monotonic()
        assert lab.zdut("-s", addrs[1], "-u", "alice", "device1", "unlock").returncode == 0
        all_agree(apis, lambda seen: seen[0][0][3] is None, 2 + time.monotonic() - started, "device1 free")
        direct = next(a.address for a in apis[0].agents())
        started = time.monotonic()
        assert lab.zdut("-s", direct, "-u", "bob", "device3", "lock", "5m").returncode == 0
        all_agree(apis, owner("device3"), 2 + time.monotonic() - started, "device3 locked at the agent")

        # an agent arriving: every broker lists it within 2 s of the first one that does
        newcomer, _ = lab.agent(CONF / "file.yaml", None, *[arg for a in addrs for arg in ("--server", a)],
                                ready=False)
        wait_for(lambda: any("example-device" in [d.name for d in api.devices()] for api in apis), 15,
                 "the new agent listed by a broker")
        all_agree(apis, lambda seen: len(seen[1]) == 2 and all(a[2] for a in seen[1]), 2, "the new agent")
        assert cli_truth(lab, addrs[0]) == cli_truth(lab, addrs[1]) == cli_truth(lab, addrs[2])

        # leaving: said goodbye (SIGTERM), every broker within 2 s of it; killed, within 2 s of the first to notice
        started = time.monotonic()
        newcomer.stop()
        all_agree(apis, lambda seen: [a[2] for a in seen[1]].count(False) == 1, 2 + time.monotonic() - started,
                  "the agent that said goodbye offline")
        port = int(newcomer.args[newcomer.args.index("-a") + 1].rsplit(":", 1)[1])
        newcomer, _ = lab.agent(CONF / "file.yaml", port, *[arg for a in addrs for arg in ("--server", a)])
        all_agree(apis, lambda seen: all(a[2] for a in seen[1]), 15, "the agent back")
        newcomer.kill()
        wait_for(lambda: any(not a.online for api in apis for a in api.agents()), 10,
                 "a broker to notice the agent killed")
        all_agree(apis, lambda seen: [a[2] for a in seen[1]].count(False) == 1, 2, "the killed agent offline")
        assert cli_truth(lab, addrs[0]) == cli_truth(lab, addrs[1]) == cli_truth(lab, addrs[2])
    finally:
        for api in apis:
            api.close()


def test_a_console_open_on_a_broker_killed_ends_clearly_and_the_shell_goes_on(
        lab: Lab, three: tuple[list[Proc], list[str]], tmux: Tmux) -> None:  # noqa: F811  the imported fixture
    procs, addrs = three
    tmux.start("-s", ",".join(addrs), "shell")
    tmux.wait_ready()
    mine = next(a for a in addrs if a in tmux.toolbar())  # the toolbar says where it is connected
    tmux.line("device2 repeat")
    tmux.wait("Two words will terminate")
    tmux.line("hello")
    tmux.wait("\nhello\n", 5)  # the module repeated it: the console is open
    procs[addrs.index(mine)].kill()
    started = time.monotonic()
    tmux.wait(f"lost connection to zdut server at {mine}", 5)  # the console cannot migrate: it ends, saying why
    tmux.wait_prompt("zdut>", 5)
    assert time.monotonic() - started < 5
    tmux.line("device2 status")  # the next call works through another broker, without the user's help
    tmux.wait("Hello from dummy status module")
    assert mine not in tmux.toolbar()
    other = next(a for a in addrs if a != mine)  # the agent ended the session whose broker died: device2 is free
    wait_for(lambda: "in use" not in busy(lab, other, "device2"), 5, "device2 no longer in use")


def test_one_shot_calls_in_a_loop_while_a_broker_is_killed(lab: Lab, three: tuple[list[Proc], list[str]]) -> None:
    procs, addrs = three
    servers = ",".join(addrs)
    calls: list[tuple[float, subprocess.CompletedProcess[str]]] = []  # (when it started, how it ended)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            calls.append((started, lab.zdut("-s", servers, "-v", "device1", "status")))

    looping = threading.Thread(target=loop)
    looping.start()
    try:
        wait_for(lambda: len(calls) >= 4, 20, "a few calls before the kill")
        procs[1].kill()
        killed = time.monotonic()
        wait_for(lambda: sum(started > killed for started, _ in calls) >= 8, 30, "eight calls after the kill")
    finally:
        stop.set()
        looping.join(60)
    for started, call in calls:
        if started > killed:  # a call that starts after the kill passes over the dead broker
            assert call.returncode == 0 and f"# connected to {addrs[1]}" not in call.stdout, call.stderr
        else:  # one in flight on it when it died may fail, and says so
            assert call.returncode == 0 or f"lost connection to zdut server at {addrs[1]}" in call.stderr, call.stderr


def write_config(lab: Lab, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The client config file of the lab's CLI calls and of this process's API."""
    for name in ("XDG_CONFIG_HOME", "ZDUT_SERVER"):
        monkeypatch.setenv(name, lab.env[name])
    path = lab.tmp / "config" / "zdut" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_config_files_server_list_is_the_default(lab: Lab, three: tuple[list[Proc], list[str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    procs, addrs = three
    procs[0].kill()
    write_config(lab, f'[default]\nserver = "{",".join(addrs)}"\n', monkeypatch)
    for _ in range(3):  # without -s or $ZDUT_SERVER, the file's list, with the dead broker passed over
        code, where = answered_by(lab, None)
        assert code == 0 and where in addrs[1:], where
    with Api(user="alice") as api:  # the API too
        assert [d.name for d in api.devices()] == DEVICES
        assert api._lab.client.address in addrs[1:]
    r = lab.zdut("-v", "list", env={**lab.env, "ZDUT_SERVER": "127.0.0.1:1"})  # the variable wins over the file
    assert r.returncode == 1 and "127.0.0.1:1" in r.stderr, r.stderr
    offered = lab.zdut("__complete", "dev").stdout.split()  # and shell completion
    assert offered == DEVICES, offered


@pytest.mark.parametrize(("config", "message"), [
    ('[default]\nserver = "hostwithoutport"\n', "{path}: [default] server 'hostwithoutport': want host:port"),
    ('[default]\nserver = "a:1,a:1"\n', "{path}: [default] server 'a:1,a:1': 'a:1' is listed twice"),
    ('[default]\nserver = 1024\n', "{path}: [default] server must be host:port, or a comma-separated list of them, "
                                   "in quotes, not 1024"),
    ('[servers."a:1"]\nserver = "b:2"\n', "{path}: [servers.\"a:1\"]: server belongs in [default] (a server's "
                                          "table holds its keys: key and server_key)"),
])
def test_a_bad_server_in_the_config_file_is_a_usage_error_naming_it(lab: Lab, config: str, message: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(lab, config, monkeypatch)
    r = lab.zdut("list")
    assert r.returncode == 2 and r.stderr.startswith(message.format(path=path)), r.stderr
    assert "SYNOPSIS" not in r.stderr  # the file's problem, not the command line's
    with pytest.raises(ZdutError) as bad:
        AsyncLab()
    assert bad.value.code == Code.INVALID_ARGUMENT and message.format(path=path).split(": ", 1)[1] in bad.value.message
    assert lab.zdut("-s", "127.0.0.1:1", "version").returncode == 0  # nothing that needs no server is refused


def test_a_hung_broker_costs_a_one_shot_call_one_second(lab: Lab, three: tuple[list[Proc], list[str]]) -> None:
    """A broker that accepts connections and answers nothing (SIGSTOP: the kernel still completes the TCP
    handshake) is the slowest way to be down; a call that starts there moves on after 1 s."""
    procs, addrs = three
    servers = f"{addrs[0]},{addrs[1]}"  # two entries: about half the clients start at the hung one
    start_up = min(timed(lab, "version")[0] for _ in range(3))
    procs[0].kill(signal.SIGSTOP)
    try:
        calls = [timed(lab, "-s", servers, "-v", "list") for _ in range(10)]
    finally:
        procs[0].kill(signal.SIGCONT)
    for took, r in calls:
        assert r.returncode == 0 and f"# connected to {addrs[1]}" in r.stdout, r.stderr
        assert took - start_up < 1.0 + 1.0, (took, start_up)  # the 1 s it gives the hung broker, and slack
    slow = [took for took, _ in calls if took - start_up > 0.8]
    assert slow, [took for took, _ in calls]  # some did start at the hung broker (each call: 1 in 2)


def timed(lab: Lab, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    r = lab.zdut(*args)
    return time.monotonic() - started, r
