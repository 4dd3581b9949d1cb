"""Issue 10 point 3, end to end with the real CLI: locks stay true.

A lock held at an offline agent keeps its device there until it expires or an operator forgets the agent;
a busy hold under an expired reservation is still listed; ``unlock force`` cancels the owner's sessions and
says whose lock it broke; a lock file that cannot be written answers at once and changes nothing.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_broker_cli import _slow_config as _board

from conftest import Lab, free_port, wait_for
from zdut.agentd.locker import Locker
from zdut.protocol import Code, LockState, ZdutError


def _listing(lab: Lab, server: str) -> dict[str, dict[str, Any]]:
    r = lab.zdut("-s", server, "-f", "json", "list")
    assert r.returncode == 0, r.stderr
    return {d["Name"]: d for d in json.loads(r.stdout)["data"]}


def _agents(lab: Lab, broker: str) -> dict[str, dict[str, Any]]:
    r = lab.zdut("-s", broker, "-f", "json", "agents")
    assert r.returncode == 0, r.stderr
    return {a["Name"]: a for a in json.loads(r.stdout)["data"]}


def test_locked_device_stays_with_its_offline_agent_until_forget(lab: Lab) -> None:
    bport = free_port()
    broker_proc, broker = lab.broker(bport)
    cfg = _board(lab.tmp)
    first = lab.brokered_agent(cfg, broker, None, "--name", "rack-a")
    assert lab.zdut("-s", broker, "-u", "alice", "board", "lock", "10m").returncode == 0
    wait_for(lambda: _listing(lab, broker)["board"]["Owner"] == "alice", 5, "the lock copy at the broker")
    first.kill()
    wait_for(lambda: _listing(lab, broker)["board"]["Online"] is False, 5, "rack-a to be listed offline")

    second, second_addr = lab.agent(cfg, None, "--server", broker, "--name", "rack-b")
    wait_for(lambda: 'is locked by "alice" at offline agent "rack-a"' in second.text(), 10, "the refusal")
    assert "expires in 10m" in second.text() and 'zdut forget rack-a' in second.text(), second.text()
    assert 'refused registration of agent "rack-b"' in broker_proc.text()
    board = _listing(lab, broker)["board"]
    assert board["Agent"] == "rack-a" and board["Owner"] == "alice" and board["Online"] is False

    r = lab.zdut("-s", broker, "forget", "nosuch")
    assert r.returncode == 1 and 'agent "nosuch": no such agent' in r.stderr
    r = lab.zdut("-s", second_addr, "forget", "rack-a")
    assert r.returncode == 1 and "forget is served by a broker, not by an agent" in r.stderr
    r = lab.zdut("-s", broker, "-u", "op", "forget", "rack-a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '✓ Agent "rack-a" forgotten, with its devices: board'
    assert 'agent "rack-a" forgotten by "op"' in broker_proc.text()
    assert "board" not in _listing(lab, broker) or _listing(lab, broker)["board"]["Agent"] == "rack-b"
    wait_for(lambda: _listing(lab, broker).get("board", {}).get("Agent") == "rack-b", 10, "the device to move")
    assert _listing(lab, broker)["board"]["Online"] is True
    r = lab.zdut("-s", broker, "forget", "rack-b")
    assert r.returncode == 1
    assert 'agent "rack-b" is online; only an offline agent can be forgotten' in r.stderr

    assert broker_proc.stop() == 0  # forgotten in the state file too
    lab.broker(bport)
    wait_for(lambda: "rack-b" in _agents(lab, broker), 10, "rack-b to register again")
    assert "rack-a" not in _agents(lab, broker)


def test_forget_appears_in_help_and_wants_one_agent(lab: Lab) -> None:
    r = lab.zdut("--help")
    assert "zdut [options] forget <agent>" in r.stdout + r.stderr
    r = lab.zdut("forget")
    assert r.returncode == 1 and "forget takes one argument: the name of an offline agent" in r.stderr


def test_busy_hold_under_an_expired_reservation_is_listed(lab: Lab) -> None:
    """The broker's copy must fall back to the busy hold when the reservation above it expires."""
    _, broker = lab.broker()
    port = free_port()
    lab.brokered_agent(_board(lab.tmp), broker, port)
    r = lab.zdut("-s", broker, "-u", "alice", "-f", "json", "board", "lock", "2s")
    assert r.returncode == 0, r.stderr
    expires = json.loads(r.stdout)["data"]["ExpiresAt"]
    client = lab.zdut_bg("-s", broker, "-u", "alice", "board", "wait", "60s")
    try:
        wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
        seen: list[dict[str, object]] = []

        def busy_listed(server: str) -> bool:
            board = _listing(lab, server)["board"]
            seen.append(board)
            assert board["Locked"] is True and board["Owner"] == "alice", seen
            return time.time() > expires + 0.5 and board["ExpiresAt"] == 0

        # the broker alone first: asking the agent would make it push its own lazily expired state
        wait_for(lambda: busy_listed(broker), 10, "the broker to show the busy hold once the reservation expired")
        assert busy_listed(f"127.0.0.1:{port}")
    finally:
        client.kill(signal.SIGKILL)


@pytest.mark.parametrize("via", ["broker", "direct"])
def test_force_unlock_cancels_the_owners_sessions_and_says_whose(lab: Lab, via: str) -> None:
    _, broker = lab.broker()
    port = free_port()
    lab.brokered_agent(_board(lab.tmp), broker, port)
    if via == "direct":
        broker = f"127.0.0.1:{port}"
    assert lab.zdut("-s", broker, "-u", "alice", "board", "lock", "10m").returncode == 0
    client = lab.zdut_bg("-s", broker, "-u", "alice", "board", "wait", "60s")
    wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
    r = lab.zdut("-s", broker, "-u", "bob", "board", "unlock", "force", timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '✓ Device "board" unlocked: broke the lock of "alice", cancelled 1 running session'
    assert client.popen.wait(5) == 1
    assert 'lock on "board" broken by "bob"' in client.text(), client.text()
    assert _listing(lab, broker)["board"]["Locked"] is False  # the sessions ended before the reply
    assert lab.zdut("-s", broker, "-u", "bob", "board", "status").returncode == 0
    r = lab.zdut("-s", broker, "-u", "bob", "-f", "json", "board", "unlock", "force")
    unlocked = {"Name": "board", "Locked": False, "Owner": "", "ExpiresAt": 0}  # a record, nothing to break
    assert r.returncode == 0 and json.loads(r.stdout)["data"] == unlocked


def test_failed_lock_file_write_answers_at_once_and_changes_nothing(lab: Lab) -> None:
    _, broker = lab.broker()
    port = free_port()
    state = lab.tmp / "locks" / "agent.json"
    lab.brokered_agent(_board(lab.tmp), broker, port, "--state", str(state))
    direct = f"127.0.0.1:{port}"
    assert lab.zdut("-s", broker, "-u", "alice", "board", "lock", "10m").returncode == 0
    wait_for(lambda: _listing(lab, broker)["board"]["Owner"] == "alice", 5, "the lock copy at the broker")
    state.unlink()
    state.mkdir()  # the file path is now a directory: every write fails

    for args in (["-u", "alice", "board", "unlock"], ["-u", "bob", "board", "unlock", "force"],
                 ["-u", "alice", "board", "lock", "20m"]):
        started = time.monotonic()
        r = lab.zdut("-s", broker, *args, timeout=10)
        assert time.monotonic() - started < 5
        assert r.returncode == 1, (args, r.stdout)
        assert f"cannot write the lock state file {state}" in r.stderr and "Is a directory" in r.stderr, r.stderr
        assert "the lock is unchanged" in r.stderr
        for server in (direct, broker):
            board = _listing(lab, server)["board"]
            assert board["Owner"] == "alice" and board["ExpiresAt"] > time.time() + 9 * 60 - 5, (server, board)
            assert board["ExpiresAt"] < time.time() + 11 * 60
    r = lab.zdut("-s", direct, "-u", "bob", "board", "status")
    assert r.returncode == 1 and 'locked by "alice"' in r.stderr  # memory agrees with the listing
    assert list(state.parent.glob(".locks-*")) == []  # the lock writer left no temporary file behind

    state.rmdir()
    assert lab.zdut("-s", broker, "-u", "alice", "board", "unlock").returncode == 0
    assert json.loads(state.read_text()) == {"reserved": {}}
    wait_for(lambda: _listing(lab, broker)["board"]["Locked"] is False, 5, "the broker to see the unlock")


# ------------------------------------------------------------------ the Locker itself


class _Clock:
    t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_locker_rolls_back_when_the_state_file_cannot_be_written(tmp_path: Path) -> None:
    changes: list[tuple[str, LockState | None, LockState | None]] = []
    state = tmp_path / "locks.json"
    locker = Locker({"dev"}, state, on_change=lambda *change: changes.append(change))
    held = locker.lock("dev", "alice", 60)
    state.unlink()
    state.mkdir()
    for call in (lambda: locker.lock("dev", "alice", 600), lambda: locker.unlock("dev", "alice", False),
                 lambda: locker.unlock("dev", "bob", True), lambda: locker.lock("dev", "alice", 0)):
        with pytest.raises(ZdutError) as err:
            call()
        assert err.value.code == Code.INTERNAL and "the lock is unchanged" in err.value.message
        assert locker.state("dev") == held
    assert changes == [("dev", held, None)] and list(tmp_path.iterdir()) == [state]


def test_force_unlock_names_the_broken_owner_and_keeps_the_busy_hold_until_its_runs_end() -> None:
    clock = _Clock()
    changes: list[tuple[str, LockState | None, LockState | None]] = []
    locker = Locker({"dev"}, None, on_change=lambda *change: changes.append(change), clock=clock)
    reserved = locker.lock("dev", "alice", 60)
    locker.acquire_busy("dev", "alice")
    busy = LockState("alice", int(clock.t), 0)
    assert changes[-1] == ("dev", reserved, busy) and locker.shadowed_states() == {"dev": busy}
    assert locker.unlock("dev", "alice", True) == ""  # one's own lock: nothing broken
    assert locker.state("dev") == busy and changes[-1] == ("dev", busy, None)
    assert locker.unlock("dev", "bob", True) == "alice"  # breaks the busy hold: the agent cancels its runs
    assert locker.state("dev") == busy
    locker.release_busy("dev", "alice")  # the cancelled run's close step
    assert locker.state("dev") is None and locker.unlock("dev", "bob", True) == ""
    locker.lock("dev", "alice", 60)
    locker.acquire_busy("dev", "alice")
    clock.t += 60
    assert locker.state("dev") == LockState("alice", int(clock.t) - 60, 0)  # not free: the run goes on


def test_a_lock_under_a_minute_is_refused_in_seconds_not_0m() -> None:
    """The agent's refusal says how long the lock lasts: ``for 45s`` under a minute (dutctl rounds to ``0m``),
    minutes above it as dutctl writes them."""
    clock = _Clock()
    locker = Locker({"dev"}, None, clock=clock)
    locker.lock("dev", "alice", 45)
    with pytest.raises(ZdutError) as err:
        locker.check_access("dev", "bob")
    assert err.value.message == 'device "dev" is locked by "alice" for 45s'
    locker.lock("dev", "alice", 5400)
    with pytest.raises(ZdutError) as err:
        locker.check_access("dev", "bob")
    assert err.value.message == 'device "dev" is locked by "alice" for 1h30m'
