"""The broker's state file as an operator sees it (issue 10, point 9): quiet when idle, readable while the
broker runs, guarded against a second broker, and survived when deleted or made read-only under it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from conftest import Lab, Proc, exe, free_port, wait_for
from zdut.brokerd.store import Store

HEARTBEAT = 0.5


def config(lab: Lab, name: str) -> Path:
    path = lab.tmp / f"{name}.yaml"
    path.write_text(
        "version: 0.1.0\ndevices:\n"
        f"  {name}-dev:\n    desc: d\n    cmds:\n      status:\n        desc: s\n        uses:\n"
        "          - module: dummy-status\n            passthrough: true\n"
    )
    return path


def start(lab: Lab, *agents: str) -> tuple[str, Path, list[Proc]]:
    broker_proc, broker = lab.broker(heartbeat=HEARTBEAT)
    state = lab.tmp / f"broker-{broker.rpartition(':')[2]}.sqlite3"
    procs = [lab.brokered_agent(config(lab, a), broker, None, "--name", a) for a in agents]
    return broker, state, [broker_proc, *procs]


def rows(state: Path) -> dict[str, float]:
    """The agents table as another process reads it while the broker runs."""
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=2)
    try:
        return dict(db.execute("SELECT name, last_seen FROM agents"))
    finally:
        db.close()


def files(state: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of the state file and its journals."""
    out = {}
    for suffix in ("", "-wal", "-journal"):
        path = Path(f"{state}{suffix}")
        if path.exists():
            st = path.stat()
            out[path.name] = (st.st_size, st.st_mtime_ns)
    return out


def test_an_idle_broker_does_not_write_and_flushes_last_seen_at_shutdown(lab: Lab) -> None:
    broker, state, procs = start(lab, "a0", "a1", "a2")
    wait_for(lambda: len(rows(state)) == 3, 10, "three agents in the state file")
    # Settled: the registrations are written (coalesced) and nothing else is pending.
    seen = {"sig": files(state), "since": time.monotonic()}

    def quiet_for(window: float) -> bool:
        now = files(state)
        if now != seen["sig"]:
            seen["sig"], seen["since"] = now, time.monotonic()
        return time.monotonic() - seen["since"] >= window

    # Twelve heartbeats of silence, more than one last-seen flush used to take (every 5 s).
    wait_for(lambda: quiet_for(1.0), 10, "registration writes to settle", interval=0.05)
    settled = files(state)
    deadline = time.monotonic() + 12 * HEARTBEAT
    while time.monotonic() < deadline:
        assert files(state) == settled, "the idle broker wrote to its state file"
        time.sleep(0.05)
    assert lab.online(broker, ["a0-dev", "a1-dev", "a2-dev"])  # the agents were alive all along
    stopped_at = time.time()
    assert procs[0].stop() == 0
    last = rows(state)
    assert sorted(last) == ["a0", "a1", "a2"]
    for name, t in last.items():
        assert stopped_at - 3 * HEARTBEAT <= t <= stopped_at + 1, (name, t, stopped_at)
    assert "Traceback" not in procs[0].text()


def test_state_file_is_readable_while_running_and_a_second_broker_is_refused(lab: Lab) -> None:
    broker, state, procs = start(lab, "solo")
    wait_for(lambda: "solo" in rows(state), 10, "the agent in the state file")
    cli = subprocess.run(["sqlite3", str(state), "SELECT name FROM agents"], capture_output=True, text=True, timeout=10)
    assert cli.returncode == 0 and cli.stdout.split() == ["solo"], cli
    second = subprocess.run(
        [exe("zdut-broker"), "-s", f"127.0.0.1:{free_port()}", "--state", str(state)],
        capture_output=True, text=True, timeout=20, env=lab.env,
    )
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"zdut-broker: {state}: state file is in use by another zdut-broker (pid {procs[0].pid}); "
        "give each broker its own --state"
    )
    assert lab.online(broker, ["solo-dev"])  # the first one never noticed


def test_a_deleted_state_file_is_created_anew(lab: Lab) -> None:
    broker, state, procs = start(lab, "keep", "leave")
    wait_for(lambda: len(rows(state)) == 2, 10, "both agents in the state file")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    procs[2].stop()  # a change of state: the broker writes, and finds its file gone

    def recreated() -> bool:
        try:
            return sorted(rows(state)) == ["keep", "leave"]
        except sqlite3.Error:  # missing yet, or created but its tables not yet committed
            return False

    wait_for(recreated, 20, "the state file recreated")
    assert "the state file was deleted or replaced under the broker; created it anew" in procs[0].text()
    r = lab.zdut("-s", broker, "-f", "json", "list")
    assert r.returncode == 0 and {d["Name"]: d["Online"] for d in json.loads(r.stdout)["data"]} == {
        "keep-dev": True, "leave-dev": False,
    }
    procs[1].stop()
    assert procs[0].stop() == 0
    assert sorted(rows(state)) == ["keep", "leave"]


def test_a_state_file_made_read_only_is_logged_and_retried(lab: Lab) -> None:
    broker, state, procs = start(lab, "first")
    wait_for(lambda: "first" in rows(state), 10, "the agent in the state file")
    state.chmod(0o444)
    late = lab.brokered_agent(config(lab, "late"), broker, None, "--name", "late")  # served all the same
    log = procs[0]
    wait_for(lambda: "state file is read-only (mode 0444)" in log.text(), 10, "the error logged")
    assert "(the registry stays in memory; retrying)" in log.text()
    assert "late" not in rows(state)
    state.chmod(0o644)
    wait_for(lambda: "late" in rows(state), 15, "the retried write")
    wait_for(lambda: "the state file is written again" in log.text(), 5, "the recovery logged")
    assert log.text().count("state file is read-only") == 1  # once, not at every retry
    late.stop()
    assert log.alive()


def test_a_read_only_state_file_at_start_is_refused_saying_so(lab: Lab) -> None:
    state = lab.tmp / "ro.sqlite3"
    Store(state).close()
    state.chmod(0o444)
    proc = lab.spawn([exe("zdut-broker"), "-s", f"127.0.0.1:{free_port()}", "--state", str(state)], "broker")
    wait_for(lambda: not proc.alive(), 10, "the broker to refuse a read-only state file")
    assert proc.popen.returncode == 1
    assert proc.text().strip() == (
        f"zdut-broker: {state}: state file is read-only (mode 0444); make it writable or give another --state"
    )
    assert os.stat(state).st_mode & 0o777 == 0o444
