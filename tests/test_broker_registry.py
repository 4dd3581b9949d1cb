"""The broker registry as pure logic, on a fake clock: takeover, refusal, expiry, lock copies, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdut.brokerd.registry import LIVENESS, Registry
from zdut.brokerd.store import Store
from zdut.protocol import (
    VERSION,
    Code,
    CommandInfo,
    DeviceEntry,
    DeviceInfo,
    GetDetails,
    Lock,
    LockState,
    Register,
    ZdutError,
)

HB = 1.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def wall(self) -> float:
        return self.t

    def mono(self) -> float:
        return self.t - 999_000.0

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registry:
    return Registry(HB, clock.wall, clock.mono)


def register(
    name: str, *devices: str, instance: str = "i1", version: str = VERSION, locks: dict[str, LockState] | None = None,
    busy: dict[str, LockState] | None = None, failed: dict[str, str] | None = None,
) -> Register:
    entries = [
        DeviceEntry(d, [CommandInfo("status", f"status of {d}"), CommandInfo("on", "power on", "Power on")], *extra)
        for d in devices
        for extra in [[failed[d]] if failed and d in failed else []]
    ]
    return Register(version, name, instance, f"{name}:1024", entries, locks or {}, *([busy] if busy else []))


def refusal(reg: Registry, rid: bytes, msg: Register) -> ZdutError:
    with pytest.raises(ZdutError) as err:
        reg.register(rid, msg)
    return err.value


def test_register_and_list(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev2", "dev1"))
    reg.register(b"r2", register("b", "dev0"))
    assert reg.device_list() == [
        DeviceInfo("dev0", None, "b", True),
        DeviceInfo("dev1", None, "a", True),
        DeviceInfo("dev2", None, "a", True),
    ]
    assert reg.commands("dev1") == [("on", "Power on"), ("status", "")]
    assert reg.help_text("dev1", "status") == "status of dev1"
    assert [(a.name, a.devices, a.online, a.address) for a in reg.agent_list()] == [
        ("a", ["dev1", "dev2"], True, "a:1024"),
        ("b", ["dev0"], True, "b:1024"),
    ]


def test_errors_use_dutctl_proxy_words(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1"))
    cases = [
        (lambda: reg.commands("nope"), Code.NOT_FOUND, 'device "nope" not found'),
        (lambda: reg.help_text("nope", "x"), Code.NOT_FOUND, 'device "nope" not found'),
        (lambda: reg.help_text("dev1", "x"), Code.NOT_FOUND, 'device "dev1", command "x": no such command'),
        (
            lambda: reg.answer(GetDetails(1, VERSION, "u", "dev1", "status", "usage"), "b"),
            Code.INVALID_ARGUMENT,
            'unknown keyword "usage", possible values are: "help"',
        ),
        (
            lambda: reg.answer(Lock(1, VERSION, "u", "dev1", 0), "b"),
            Code.UNIMPLEMENTED,
            "Lock is not served by the broker",
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(ZdutError) as err:
            call()
        assert (err.value.code, err.value.message) == (code, message)


def test_duplicate_device_of_online_agent_is_refused(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1", "dev2"))
    err = refusal(reg, b"r2", register("b", "dev3", "dev2"))
    assert err.code == Code.ALREADY_EXISTS
    assert err.message == 'device "dev2" is already registered by agent "a" (online)'
    assert "dev3" not in reg.devices  # all or nothing
    assert reg.devices["dev2"].agent.name == "a"


def test_same_agent_takes_over_from_a_new_connection(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1", instance="i1"))
    result = reg.register(b"r2", register("a", "dev1", "dev9", instance="i2"))
    assert result.replaced_rid == b"r1"
    assert result.restarted
    assert reg.by_rid == {b"r2": result.agent}
    assert reg.devices["dev9"].agent is result.agent


def test_reconnect_of_same_process_is_not_a_restart(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1", instance="i1"))
    result = reg.register(b"r2", register("a", "dev1", instance="i1"))
    assert result.replaced_rid == b"r1" and not result.restarted
    again = reg.register(b"r2", register("a", "dev1", instance="i1"))  # same socket again: nothing to replace
    assert again.replaced_rid is None and not again.restarted


def test_device_of_offline_agent_moves(reg: Registry) -> None:
    a = reg.register(b"r1", register("a", "dev1", "dev2")).agent
    reg.offline(a)
    result = reg.register(b"r2", register("b", "dev2"))
    assert result.moved == [("dev2", "a")]
    assert a.devices == ["dev1"]
    reg.offline(result.agent)
    reg.register(b"r3", register("c", "dev1"))
    assert "a" not in reg.agents  # serves nothing any more: forgotten
    records, deleted = reg.take_dirty()
    assert deleted == ["a"]
    assert {r.name for r in records} == {"b", "c"}


def test_removed_devices_disappear(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1", "dev2"))
    result = reg.register(b"r1", register("a", "dev1"))
    assert result.removed == ["dev2"]
    assert [d.name for d in reg.device_list()] == ["dev1"]


def test_invalid_registrations(reg: Registry) -> None:
    cases = [
        (
            register("a", "dev1", version="1.0.0"),
            Code.FAILED_PRECONDITION,
            f"incompatible zdut versions: broker {VERSION}, agent 1.0.0 (major version mismatch)",
        ),
        (register("", "dev1"), Code.INVALID_ARGUMENT, "agent name is not set"),
        (register("a"), Code.INVALID_ARGUMENT, "empty device list"),
        (register("a", "dev1", ""), Code.INVALID_ARGUMENT, "device 1 has empty name"),
        (register("a", "dev1", "dev1"), Code.INVALID_ARGUMENT, 'device "dev1" is listed twice'),
    ]
    for msg, code, message in cases:
        err = refusal(reg, b"r1", msg)
        assert (err.code, err.message) == (code, message)
    assert not reg.agents and not reg.by_rid


def test_minor_version_drift_is_accepted(reg: Registry) -> None:
    major = VERSION.split(".")[0]
    reg.register(b"r1", register("a", "dev1", version=f"{major}.99.0"))
    assert reg.agents["a"].online


def test_silent_agent_expires_after_liveness_intervals(reg: Registry, clock: Clock) -> None:
    a = reg.register(b"r1", register("a", "dev1")).agent
    clock.advance(LIVENESS * HB - 0.01)
    assert reg.expired() == []
    a.last_rx = clock.mono()  # any message counts (the socket loop stamps it)
    clock.advance(LIVENESS * HB - 0.01)
    assert reg.expired() == []
    clock.advance(0.02)
    assert reg.expired() == [a]
    seen = clock.wall() - (LIVENESS * HB + 0.01)
    assert reg.offline(a) == b"r1"
    assert reg.offline(a) is None
    assert a.last_seen == pytest.approx(seen)
    assert reg.device_list() == [DeviceInfo("dev1", None, "a", False)]
    with pytest.raises(ZdutError) as err:
        reg.commands("dev1")
    assert (err.value.code, err.value.message) == (Code.UNAVAILABLE, 'agent "a" serving device "dev1" is offline')
    assert reg.expired() == []


def test_expired_agent_does_not_block_others(reg: Registry, clock: Clock) -> None:
    a = reg.register(b"r1", register("a", "dev1")).agent
    clock.advance(LIVENESS * HB + 1)
    for agent in reg.expired():
        reg.offline(agent)
    assert not a.online
    result = reg.register(b"r2", register("b", "dev1"))  # the name moves to whoever is online
    assert result.moved == [("dev1", "a")]


def test_lock_copies_and_expiry(reg: Registry, clock: Clock) -> None:
    now = int(clock.wall())
    busy = LockState("bob", now, 0)
    reserved = LockState("alice", now, now + 60)
    a = reg.register(b"r1", register("a", "dev1", "dev2", "dev3", locks={"dev1": reserved, "dev2": busy})).agent
    listing = {d.name: d.lock for d in reg.device_list()}
    assert listing == {"dev1": reserved, "dev2": busy, "dev3": None}
    assert reg.lock_changed(a, "dev3", LockState("carol", now, now + 30))
    b = reg.register(b"r2", register("b", "dev9")).agent
    assert not reg.lock_changed(b, "dev1", None)  # only the owner speaks for a device
    clock.advance(30)
    listing = {d.name: d.lock for d in reg.device_list()}
    assert listing["dev3"] is None and listing["dev1"] == reserved
    clock.advance(30)
    listing = {d.name: d.lock for d in reg.device_list()}
    assert listing == {"dev1": None, "dev2": busy, "dev3": None, "dev9": None}  # busy holds never expire
    assert reg.lock_changed(a, "dev2", None)
    assert reg.device_list()[1] == DeviceInfo("dev2", None, "a", True)


def test_listing_is_cached_until_something_changes(reg: Registry) -> None:
    a = reg.register(b"r1", register("a", "dev1")).agent
    first = reg.device_list()
    assert reg.device_list() is first
    reg.offline(a)
    assert reg.device_list() is not first


def test_last_seen_tracks_messages(reg: Registry, clock: Clock) -> None:
    a = reg.register(b"r1", register("a", "dev1")).agent
    clock.advance(2)
    assert reg.last_seen(a) == pytest.approx(clock.wall() - 2)
    a.last_rx = clock.mono()
    assert reg.last_seen(a) == pytest.approx(clock.wall())


def test_one_connection_renaming_itself(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1"))
    result = reg.register(b"r1", register("b", "dev1"))  # not a conflict with itself
    assert result.displaced is not None and result.displaced.name == "a"
    assert reg.devices["dev1"].agent.name == "b"


def test_persistence_round_trip_lists_devices_offline(reg: Registry, clock: Clock, tmp_path: Path) -> None:
    reg.register(b"r1", register("a", "dev1", "dev2"))
    reg.register(b"r2", register("b", "dev3"))
    store = Store(tmp_path / "state.sqlite3")
    store.save(*reg.take_dirty())
    store.close()

    clock.advance(100)
    fresh = Registry(HB, clock.wall, clock.mono)
    store = Store(tmp_path / "state.sqlite3")
    fresh.load(store.load())
    store.close()
    assert fresh.device_list() == [
        DeviceInfo("dev1", None, "a", False),
        DeviceInfo("dev2", None, "a", False),
        DeviceInfo("dev3", None, "b", False),
    ]
    with pytest.raises(ZdutError, match="is offline"):
        fresh.help_text("dev1", "status")
    infos = fresh.agent_list()
    assert [(i.name, i.online, i.last_seen, i.version) for i in infos] == [
        ("a", False, clock.wall() - 100, VERSION),
        ("b", False, clock.wall() - 100, VERSION),
    ]
    back = fresh.register(b"r9", register("a", "dev1", "dev2", instance="i2"))
    assert back.restarted and back.replaced_rid is None
    assert fresh.commands("dev1") == [("on", "Power on"), ("status", "")]


# ------------------------------------------------------------------ issue 10: locks stay true


def test_device_locked_at_an_offline_agent_is_not_claimed_until_the_lock_expires(reg: Registry, clock: Clock) -> None:
    now = int(clock.wall())
    a = reg.register(b"r1", register("a", "dev1", "dev2", locks={"dev2": LockState("alice", now, now + 600)})).agent
    reg.offline(a)
    err = refusal(reg, b"r2", register("b", "dev2"))
    assert err.code == Code.FAILED_PRECONDITION
    assert err.message == (
        'device "dev2" is locked by "alice" at offline agent "a" (expires in 10m, at 1970-01-12T13:56:40Z); '
        'it can move once the lock expires or after "zdut forget a"'
    )
    assert reg.devices["dev2"].agent is a and a.devices == ["dev1", "dev2"]  # nothing moved
    assert reg.register(b"r3", register("c", "dev1")).moved == [("dev1", "a")]  # unlocked devices still move
    clock.advance(600)
    assert reg.register(b"r2", register("b", "dev2")).moved == [("dev2", "a")]
    assert "a" not in reg.agents


def test_busy_hold_at_an_offline_agent_keeps_its_device(reg: Registry) -> None:
    now = int(reg.wall())
    a = reg.register(b"r1", register("a", "dev1", locks={"dev1": LockState("bob", now, 0)})).agent
    reg.offline(a)
    err = refusal(reg, b"r2", register("b", "dev1"))
    assert err.message == (
        'device "dev1" is in use by "bob" at offline agent "a" (a session holds it, no expiry); it can move once '
        'that agent releases it or after "zdut forget a"'
    )
    again = reg.register(b"r3", register("a", "dev1", instance="i2"))  # the same agent is always welcome back
    assert again.restarted and reg.devices["dev1"].lock is None


def test_a_busy_hold_under_an_expired_reservation_is_listed(reg: Registry, clock: Clock) -> None:
    now = int(clock.wall())
    reserved, busy = LockState("alice", now, now + 60), LockState("alice", now + 1, 0)
    a = reg.register(b"r1", register("a", "dev1", "dev2", locks={"dev1": reserved}, busy={"dev1": busy})).agent
    assert reg.device_list()[0].lock == reserved
    clock.advance(60)
    assert reg.device_list()[0].lock == busy  # not free: alice's session still runs
    assert reg.lock_changed(a, "dev2", reserved, busy)
    assert reg.lock_changed(a, "dev2", reserved, None)  # the session ended under the reservation
    clock.advance(60)
    assert reg.device_list()[1].lock is None


def test_forget_drops_an_offline_agent_and_its_devices(reg: Registry) -> None:
    a = reg.register(b"r1", register("a", "dev1", "dev2")).agent
    reg.register(b"r2", register("b", "dev3"))
    reg.take_dirty()
    for name, code, message in [
        ("zz", Code.NOT_FOUND, 'agent "zz": no such agent'),
        ("a", Code.FAILED_PRECONDITION, 'agent "a" is online; only an offline agent can be forgotten'),
    ]:
        with pytest.raises(ZdutError) as err:
            reg.forget(name)
        assert (err.value.code, err.value.message) == (code, message)
    reg.offline(a)
    assert reg.forget("a") == ["dev1", "dev2"]
    assert [d.name for d in reg.device_list()] == ["dev3"] and [i.name for i in reg.agent_list()] == ["b"]
    assert reg.take_dirty() == ([], ["a"])  # deleted from the state file too
    assert reg.register(b"r1", register("a", "dev1")).agent is not a  # a stranger now


def test_failed_devices_are_listed_with_their_reason(reg: Registry) -> None:
    reg.register(b"r1", register("a", "dev1", "dev2", failed={"dev2": "module x: no port"}))
    assert reg.device_list() == [DeviceInfo("dev1", None, "a", True), DeviceInfo("dev2", None, "a", True,
                                                                                 "module x: no port")]
    assert reg.agent_list()[0].failed == {"dev2": "module x: no port"}
