"""``zdut DEV lock D --wait W``: a first-come, first-served queue at the agent, end to end with real processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import Lab, Proc, free_port, wait_for
from zdut.api import Lab as Api
from zdut.api import ZdutError
from zdut.protocol import Code, LockState

CONFIG = """\
version: 0
devices:
{devices}
"""
DEVICE = """\
  {name}:
    cmds:
      status:
        uses:
          - module: dummy-status
"""


@pytest.fixture
def config(lab: Lab) -> Path:
    path = lab.tmp / "queue.yaml"
    path.write_text(CONFIG.format(devices="".join(DEVICE.format(name=n) for n in ("board", "board-1", "board-2"))))
    return path


def listed(lab: Lab, addr: str, device: str = "board") -> dict[str, object]:
    records = json.loads(lab.zdut("-s", addr, "-f", "json", "list").stdout)["data"]
    return next(r for r in records if r["Name"] == device)


def waiting(lab: Lab, addr: str, device: str = "board") -> list[str]:
    return list(listed(lab, addr, device).get("Waiting", []))  # type: ignore[call-overload]


def join(lab: Lab, addr: str, user: str, device: str = "board") -> Proc:
    """``user`` waits for ``device``'s lock (1m, waiting up to 30s); returns once the agent has them queued."""
    before = len(waiting(lab, addr, device))
    proc = lab.zdut_bg("-s", addr, "-u", user, device, "lock", "1m", "--wait", "30s", name=f"wait-{user}")
    wait_for(lambda: len(waiting(lab, addr, device)) > before or not proc.alive(), 10, f"{user} in the queue")
    return proc


@pytest.mark.parametrize("how", ["direct", "brokered"])
def test_three_waiters_get_the_lock_in_the_order_they_came(lab: Lab, config: Path, how: str) -> None:
    addr = lab.serve(config, how)
    assert lab.zdut("-s", addr, "-u", "alice", "board", "lock", "10m").returncode == 0
    bob, carol, dave = (join(lab, addr, user) for user in ("bob", "carol", "dave"))
    assert waiting(lab, addr) == ["bob", "carol", "dave"]
    assert "(waiting: bob, carol, dave)" in lab.zdut("-s", addr, "list").stdout
    shown = lab.zdut("-s", addr, "board")
    assert "Waiting for its lock: bob, carol, dave" in shown.stdout, shown.stdout
    assert lab.zdut("-s", addr, "-u", "erin", "board", "lock").returncode == 1  # no wait: refused, as ever

    turns = (("alice", bob, "bob", ["carol", "dave"]), ("bob", carol, "carol", ["dave"]), ("carol", dave, "dave", []))
    for holder, proc, user, rest in turns:
        assert lab.zdut("-s", addr, "-u", holder, "board", "unlock").returncode == 0
        assert proc.popen.wait(10) == 0, proc.text()
        assert 'Device "board" locked' in proc.text()
        record = listed(lab, addr)
        assert record["Owner"] == user and waiting(lab, addr) == rest, record


def test_a_waiter_killed_mid_wait_leaves_the_queue_and_the_next_is_served(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    assert lab.zdut("-s", addr, "-u", "alice", "board", "lock", "10m").returncode == 0
    bob = join(lab, addr, "bob")
    carol = join(lab, addr, "carol")
    bob.kill()  # SIGKILL: it says nothing to anyone
    wait_for(lambda: waiting(lab, addr) == ["carol"], 5, "the killed waiter gone within 5 s")
    assert lab.zdut("-s", addr, "-u", "alice", "board", "unlock").returncode == 0
    assert carol.popen.wait(10) == 0, carol.text()
    assert listed(lab, addr)["Owner"] == "carol"


def test_a_wait_that_runs_out_is_a_clear_error(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    assert lab.zdut("-s", addr, "-u", "alice", "board", "lock", "10m").returncode == 0
    r = lab.zdut("-s", addr, "-u", "bob", "board", "lock", "5m", "--wait", "1s")
    assert r.returncode == 1
    assert 'device "board" did not become free within 1s; locked by "alice" for ' in r.stderr, r.stderr
    assert waiting(lab, addr) == []


def test_an_expiring_lock_goes_to_the_waiter_at_once(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    assert lab.zdut("-s", addr, "-u", "alice", "board", "lock", "2s").returncode == 0
    bob = join(lab, addr, "bob")
    assert bob.popen.wait(10) == 0, bob.text()  # nobody unlocked: the expiry handed it over
    assert listed(lab, addr)["Owner"] == "bob"


def test_a_glob_or_a_list_takes_the_first_device_to_become_free(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    for device in ("board-1", "board-2"):
        assert lab.zdut("-s", addr, "-u", "alice", device, "lock", "10m").returncode == 0
    bob = lab.zdut_bg("-s", addr, "-u", "bob", "board-*", "lock", "1m", "--wait", "30s", name="wait-bob")
    wait_for(lambda: waiting(lab, addr, "board-1") == waiting(lab, addr, "board-2") == ["bob"], 10, "bob in both")
    assert lab.zdut("-s", addr, "-u", "alice", "board-2", "unlock").returncode == 0
    assert bob.popen.wait(10) == 0, bob.text()
    assert 'Device "board-2" locked' in bob.text()
    wait_for(lambda: waiting(lab, addr, "board-1") == [], 5, "bob gone from the other queue")
    assert listed(lab, addr, "board-1")["Owner"] == "alice"
    assert listed(lab, addr, "board-2")["Owner"] == "bob"
    listing = lab.zdut("-s", addr, "-u", "bob", "board-1,board", "lock", "1m", "--wait", "5s")
    assert listing.returncode == 0 and 'Device "board" locked' in listing.stdout  # a list: board was free
    none = lab.zdut("-s", addr, "-u", "bob", "nothing-*", "lock", "--wait", "5s")
    assert none.returncode == 1 and "no device matches 'nothing-*'" in none.stderr
    for device in ("board-1", "board-2", "board"):
        lab.zdut("-s", addr, "-u", "bob", device, "unlock", "force")
    both_free = lab.zdut("-s", addr, "-u", "carol", "board-*", "lock", "--wait", "5s")
    assert both_free.returncode == 0, both_free.stderr
    owners = [listed(lab, addr, device).get("Owner") for device in ("board-1", "board-2")]
    assert sorted(owners) == ["", "carol"], owners  # both granted at once: the one not taken is given back


def test_the_api_waits_in_the_same_queue(lab: Lab, config: Path) -> None:
    _, addr = lab.agent(config)
    with Api(addr, user="alice") as alice:
        alice.lock("board", "10m")
        got: list[LockState | BaseException] = []

        def bob_waits() -> None:
            with Api(addr, user="bob") as bob:
                try:
                    got.append(bob.lock("board", "1m", wait="30s"))
                except BaseException as exc:  # the assertion below shows it
                    got.append(exc)

        thread = threading.Thread(target=bob_waits)
        thread.start()
        wait_for(lambda: waiting(lab, addr) == ["bob"], 10, "bob in the queue")
        alice.unlock("board")
        thread.join(10)
        assert isinstance(got[0], LockState) and got[0].owner == "bob", got
        with pytest.raises(ZdutError) as late:
            alice.lock("board", "1m", wait=1)
        assert late.value.code == Code.DEADLINE_EXCEEDED
        took, _ = alice.lock_any(["board-*"], "1m", wait="5s")  # both free: either may answer first
        other = {"board-1": "board-2", "board-2": "board-1"}[took]
        assert listed(lab, addr, took)["Owner"] == "alice" and not listed(lab, addr, other)["Locked"]
        with pytest.raises(ZdutError) as bad:
            alice.lock("board", "1m", wait=0)
        assert bad.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(("args", "message"), [
    (["--wait"], "--wait wants a duration"),
    (["--wait", "0s"], "--wait must be more than 0"),
    (["1m", "--wait", "soon"], "--wait wants a duration"),
    (["1m", "2m", "--wait", "1m"], "lock takes at most a duration"),
    (["--force"], "lock takes at most a duration"),
])
def test_lock_wait_usage_errors(lab: Lab, args: list[str], message: str) -> None:
    r = lab.zdut("-s", "localhost:1", "board", "lock", *args)
    assert r.returncode == 1 and message in r.stderr, r.stderr  # a grammar error, as dutctl


def test_a_restarted_broker_lists_the_queue_and_the_watchers_again(lab: Lab, config: Path) -> None:
    broker_proc, broker = lab.broker()
    port = int(broker.rsplit(":", 1)[1])
    agent_port = free_port()
    lab.brokered_agent(config, broker, agent_port)
    direct = f"127.0.0.1:{agent_port}"  # the waiter and the watcher talk to the agent: they outlive the broker
    assert lab.zdut("-s", direct, "-u", "alice", "board", "lock", "10m").returncode == 0
    join(lab, direct, "bob")
    lab.zdut_bg("-s", direct, "-u", "carol", "board", "watch", name="watch-carol")
    wait_for(lambda: listed(lab, broker).get("Watchers") == 1 and waiting(lab, broker) == ["bob"], 10, "listed")
    broker_proc.kill()
    broker_proc.popen.wait(5)
    lab.broker(port)  # the same address and state file: the agent registers again
    wait_for(lambda: listed(lab, broker).get("Owner") == "alice", 15, "the agent back at the broker")
    wait_for(lambda: listed(lab, broker).get("Watchers") == 1 and waiting(lab, broker) == ["bob"], 5,
             "the watcher and the waiter listed again, with no change to prompt it")
