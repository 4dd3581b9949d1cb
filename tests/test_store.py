"""The broker's SQLite state file: round trip, moves, clear one-line errors for unusable files, and the
broker's autosave keeping it in step (coalesced writes, a failed write kept and retried)."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zdut import protocol as P
from zdut.brokerd.autosave import RETRY_S, SAVE_DELAY_S, AutoSave
from zdut.brokerd.registry import Registry
from zdut.brokerd.store import AgentRecord, DeviceRecord, Store, StoreError, default_state_path
from zdut.brokerd.timers import Timers
from zdut.common.logs import Throttle
from zdut.protocol import CommandInfo


def agent(name: str, *devices: str, last_seen: float = 100.0) -> AgentRecord:
    return AgentRecord(
        name,
        "0.1.0",
        "inst-" + name,
        f"{name}:1024",
        last_seen,
        [DeviceRecord(d, [CommandInfo("on", f"power {d} on", "Power on"), CommandInfo("status", "")]) for d in devices],
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "broker.sqlite3"  # the directory is created
    store = Store(path)
    store.save([agent("b", "dev3"), agent("a", "dev2", "dev1")])
    store.close()
    store = Store(path)
    loaded = store.load()
    assert [a.name for a in loaded] == ["a", "b"]
    assert [d.name for d in loaded[0].devices] == ["dev1", "dev2"]
    assert loaded[0].devices[0].commands == [CommandInfo("on", "power dev1 on", "Power on"), CommandInfo("status", "")]
    assert (loaded[0].version, loaded[0].instance, loaded[0].address, loaded[0].last_seen) == (
        "0.1.0",
        "inst-a",
        "a:1024",
        100.0,
    )
    store.close()


def test_save_replaces_devices_moves_and_deletes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store.save([agent("a", "dev1", "dev2"), agent("b", "dev3")])
    store.save([agent("a", "dev1")])  # a no longer serves dev2
    store.save([agent("c", "dev3")])  # dev3 moves from b to c
    store.save(deleted=["b"])
    store.save(last_seen=[("a", 555.0)])
    loaded = {a.name: a for a in store.load()}
    assert sorted(loaded) == ["a", "c"]
    assert [d.name for d in loaded["a"].devices] == ["dev1"]
    assert [d.name for d in loaded["c"].devices] == ["dev3"]
    assert loaded["a"].last_seen == 555.0
    store.close()


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(StoreError) as err:
        Store(path)
    assert str(err.value) == f"{path}: not an SQLite database (corrupt state file?)"


def test_truncated_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    store = Store(path)
    store.save([agent(f"agent{i}", *(f"dev{i}-{j}" for j in range(50))) for i in range(20)])
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as err:
        Store(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cookies (name TEXT)")
    with pytest.raises(StoreError, match=r"not a zdut-broker state file \(it holds tables cookies\)"):
        Store(path)


def test_unwritable_file_is_a_clear_error(tmp_path: Path) -> None:
    """Without write permission bits the file is read-only, even for root (who could write it)."""
    path = tmp_path / "broker.sqlite3"
    Store(path).close()
    path.chmod(0o444)
    with pytest.raises(StoreError, match=r"state file is read-only \(mode 0444\); make it writable"):
        Store(path)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_unwritable_location_is_a_clear_error() -> None:
    """/proc refuses new files even to root."""
    with pytest.raises(StoreError) as err:
        Store("/proc/zdut-broker.sqlite3")
    assert (
        str(err.value)
        == "/proc/zdut-broker.sqlite3: cannot create the lock file /proc/zdut-broker.sqlite3.lock: No such file or "
        "directory"
    )


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=r"cannot create directory .*file"):
        Store(blocker / "zdut" / "broker.sqlite3")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


def test_second_store_on_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    first = Store(path)
    try:
        with pytest.raises(StoreError, match=r"in use by another zdut-broker \(pid \d+\)"):
            Store(path)
    finally:
        first.close()


def test_default_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_path() == tmp_path / "zdut" / "broker.sqlite3"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_path() == tmp_path / "home" / ".local" / "state" / "zdut" / "broker.sqlite3"


@pytest.mark.parametrize("content", [b"garbage" * 100, None])
def test_broker_exits_1_with_one_line(tmp_path: Path, content: bytes | None) -> None:
    """The real command: a corrupt or unusable state file is one line on stderr and exit code 1."""
    path = tmp_path / "broker.sqlite3"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "zdut.broker", "-s", "tcp://127.0.0.1:*", "--state", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"zdut-broker: {path}: ")
    assert "Traceback" not in proc.stderr


class FailingStore(Store):
    """A real state file whose next ``failures`` writes fail as a full disk would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures = 0
        self.writes = 0

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError(f"{self.path}: disk full")
        self.writes += 1
        super().save(*args, **kwargs)


def register(reg: Registry, name: str, device: str) -> None:
    reg.register(name.encode(), P.Register(P.VERSION, name, "i", "", [P.DeviceEntry(device, [])], {}))


def test_autosave_coalesces_and_retries_a_failed_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore(tmp_path / "broker.sqlite3")
    timers = Timers(0.0)
    reg = Registry(1.0, lambda: 1e9 + timers.now, lambda: timers.now)
    save = AutoSave(reg, store, timers, Throttle(logging.getLogger("zdut.broker")))
    register(reg, "a", "dev1")
    save.schedule()
    register(reg, "b", "dev2")
    save.schedule()  # the same write
    store.failures = 1
    timers.run_due(SAVE_DELAY_S)
    assert store.writes == 0 and "disk full (the registry stays in memory; retrying)" in caplog.text
    assert reg.dirty == {"a", "b"}  # nothing is lost
    timers.run_due(SAVE_DELAY_S + RETRY_S - 0.01)  # the retry comes RETRY_S later ...
    assert store.writes == 0
    timers.run_due(SAVE_DELAY_S + RETRY_S)  # ... and writes everything
    assert store.writes == 1 and not reg.dirty
    save.close()
    assert [a.name for a in Store(tmp_path / "broker.sqlite3").load()] == ["a", "b"]
