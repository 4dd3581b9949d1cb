"""Every unary method of the Python APIs (Lab and AsyncLab alike), its answer and each error code it gives,
against real agents and brokers."""

from __future__ import annotations

import datetime
import math
import time
from typing import TYPE_CHECKING

import pytest

from conftest import CONF, Lab, free_port, wait_for
from zdut.api import ZdutError
from zdut.protocol import Code

if TYPE_CHECKING:
    from api_drivers import Opener

pytest_plugins = ["api_drivers"]
DEMO = CONF / "demo.yaml"


def code_of(call: object, *args: object, **kwargs: object) -> ZdutError:
    assert callable(call)
    with pytest.raises(ZdutError) as info:
        call(*args, **kwargs)
    return info.value


def test_listings_answer(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    assert [(d.name, d.lock, d.online) for d in api.devices()] == [
        ("device1", None, True), ("device2", None, True), ("device3", None, True)]
    (agent,) = api.agents()  # an agent lists itself
    assert agent.devices == ["device1", "device2", "device3"] and agent.online
    assert api.commands("device2") == ["repeat", "status"]
    assert api.help("device1", "status").startswith("Report status\n\nThis dummy module prints")


def test_unknown_names_are_not_found(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    errors = [code_of(api.commands, "nodev"), code_of(api.help, "nodev", "status"),
              code_of(api.help, "device1", "nocmd"), code_of(api.lock, "nodev", "1m"),
              code_of(api.unlock, "nodev"), code_of(api.run, "nodev", "status"),
              code_of(api.run, "device1", "nocmd")]
    assert [e.code for e in errors] == [Code.NOT_FOUND] * len(errors)
    assert errors[0].message == 'device "nodev": no such device'
    assert errors[2].message == 'device "device1", command "nocmd": no such command'


GOOD_DURATIONS = [(None, 30 * 60), ("", 30 * 60), ("1.5h", 5400), ("1h30m", 5400), ("90s", 90), (90.5, 91),
                  (7, 7), ("500ms", 1), (0.2, 1), (datetime.timedelta(minutes=5), 300)]


def test_lock_durations_as_on_the_cli(lab: Lab, open_api: Opener) -> None:
    """None is the agent's default; strings are Go durations; numbers and timedeltas are seconds; a fraction of
    a second rounds up instead of falling back to the default."""
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    for duration, seconds in GOOD_DURATIONS:
        before = time.time()
        lock = api.lock("device1", duration)
        assert (lock.owner, lock.expires_at - lock.locked_at) == ("ci@rack", seconds), duration
        assert before - 1 <= lock.locked_at <= time.time()
        if seconds >= 60:  # (a 1s lock may be gone by now: the agent counts whole seconds)
            assert api.devices()[0].lock == lock
        assert api.unlock("device1", force=True).broke == ""  # ours: nothing broken, even once expired


BAD_DURATIONS = [0, 0.0, -1, -2.5, "0", "-5m", "abc", "90", "1e3s", "99999999999h", math.nan, math.inf, True, [],
                 datetime.timedelta(0)]


def test_bad_durations_are_invalid_arguments(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    for duration in BAD_DURATIONS:
        error = code_of(api.lock, "device1", duration)
        assert error.code == Code.INVALID_ARGUMENT, (duration, error.message)
        assert "lock duration" in error.message
    assert api.devices()[0].lock is None  # nothing was sent


@pytest.mark.parametrize("duration", ["0", "-5m", "abc", "90"])
def test_bad_durations_say_what_the_cli_says(lab: Lab, open_api: Opener, duration: str) -> None:
    _, addr = lab.agent(DEMO)
    error = code_of(open_api(addr).lock, "device1", duration)
    r = lab.zdut("-s", addr, "device1", "lock", duration)
    assert r.returncode == 1 and error.message in r.stderr, (error.message, r.stderr)


@pytest.mark.parametrize(("duration", "seconds"), [("1h0.5s", 3601), ("1.5h", 5400)])
def test_good_durations_lock_as_long_as_on_the_cli(lab: Lab, open_api: Opener, duration: str, seconds: int) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    assert lab.zdut("-s", addr, "-u", "ci@rack", "device1", "lock", duration).returncode == 0
    by_cli = api.devices()[0].lock
    assert by_cli is not None and by_cli.expires_at - by_cli.locked_at == seconds
    by_api = api.lock("device2", duration)
    assert by_api.expires_at - by_api.locked_at == seconds


def test_lock_conflicts(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    alice, bob = open_api(addr, "alice@rack"), open_api(addr, "bob@rack")
    held = alice.lock("device1", "5m")
    assert alice.lock("device1", "1m") == held  # re-locking for less never shortens the lock
    taken = code_of(bob.lock, "device1", "1m")
    assert (taken.code, taken.message) == (Code.FAILED_PRECONDITION,
                                           'device "device1" is locked by "alice@rack" for 5m')
    assert code_of(bob.run, "device1", "status").code == Code.FAILED_PRECONDITION
    assert code_of(bob.unlock, "device1").code == Code.PERMISSION_DENIED
    assert alice.run("device1", "status").ok  # the owner runs as before
    broken = bob.unlock("device1", force=True)
    assert (broken.broke, broken.cancelled) == ("alice@rack", 0)
    assert code_of(alice.unlock, "device1").code == Code.FAILED_PRECONDITION  # not locked any more
    assert code_of(open_api(addr, "").lock, "device1", "1m").code == Code.UNAUTHENTICATED


def test_forget_through_a_broker(lab: Lab, open_api: Opener) -> None:
    _, broker = lab.broker()
    agent = lab.brokered_agent(DEMO, broker)
    api = open_api(broker)
    (listed,) = api.agents()
    assert listed.online and listed.devices == ["device1", "device2", "device3"]
    assert code_of(api.forget, "nosuch").code == Code.NOT_FOUND
    assert code_of(api.forget, listed.name).code == Code.FAILED_PRECONDITION  # online agents stay
    assert code_of(api.run, "nodev", "status").code == Code.NOT_FOUND
    agent.kill()
    wait_for(lambda: not api.agents()[0].online, 10, "the broker to see the agent offline")
    assert code_of(api.run, "device1", "status").code == Code.UNAVAILABLE  # its agent is away
    assert api.forget(listed.name) == ["device1", "device2", "device3"]
    assert api.devices() == [] and api.agents() == []


def test_forget_is_for_brokers(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    assert code_of(open_api(addr).forget, "any").code == Code.UNIMPLEMENTED


def test_unreachable_or_malformed_address(open_api: Opener) -> None:
    started = time.monotonic()
    refused = code_of(open_api, f"127.0.0.1:{free_port()}")
    assert refused.code == Code.UNAVAILABLE and "connection refused" in refused.message
    assert time.monotonic() - started < 5
    assert code_of(open_api, "hostwithoutport").code == Code.INVALID_ARGUMENT


def test_every_call_is_unavailable_once_the_server_is_gone(lab: Lab, open_api: Opener) -> None:
    agent, addr = lab.agent(DEMO)
    api = open_api(addr, timeout=5)
    assert api.commands("device1") == ["status"]
    agent.kill()
    agent.popen.wait(10)
    calls = [(api.devices,), (api.agents,), (api.commands, "device1"), (api.help, "device1", "status"),
             (api.lock, "device1", "1m"), (api.unlock, "device1"), (api.forget, "a"), (api.run, "device1", "status")]
    for call, *args in calls:
        assert code_of(call, *args).code == Code.UNAVAILABLE, call


def test_calls_after_close_are_unavailable(lab: Lab, open_api: Opener) -> None:
    _, addr = lab.agent(DEMO)
    api = open_api(addr)
    api.close()
    for call, *args in [(api.devices,), (api.lock, "device1"), (api.run, "device1", "status")]:
        assert code_of(call, *args).code == Code.UNAVAILABLE, call
    api.close()  # closing twice is harmless
