"""Issue 3 end to end with the real CLI: the demo, faults, persistence, names, bulk streams, load."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CONF, Lab, exe, free_port, peak_rss_mb, run_measured, wait_for


def _listing(lab: Lab, broker: str) -> dict[str, dict[str, object]]:
    r = lab.zdut("-s", broker, "-f", "json", "list")
    assert r.returncode == 0, r.stderr
    return {d["Name"]: d for d in json.loads(r.stdout)["data"]}


def _slow_config(tmp: Path, device: str = "board") -> Path:
    cfg = tmp / f"{device}.yaml"
    cfg.write_text(
        f"version: 0.1.0\ndevices:\n  {device}:\n    cmds:\n      wait:\n        uses:\n"
        "          - module: time-wait\n            passthrough: true\n"
        "      status:\n        uses:\n          - module: dummy-status\n"
    )
    return cfg


def test_demo(lab: Lab) -> None:
    """The issue's demo, on free ports: two agents behind one broker, lists and a console."""
    _, broker = lab.broker()
    p1, p2 = free_port(), free_port()
    lab.brokered_agent(CONF / "config-1.yaml", broker, p1)
    lab.brokered_agent(CONF / "config-2.yaml", broker, p2)
    listing = lab.zdut("-s", broker, "list").stdout
    assert listing.startswith("- device1 (agent ") and "\n- device2 (agent " in listing and "online" in listing
    assert lab.zdut("-s", f"127.0.0.1:{p1}", "list").stdout == "- device1\n"
    r = lab.zdut("-s", broker, "device2", "repeat", input=b"hi\nbye now\n")
    assert r.returncode == 0 and r.stdout.endswith("(Two words will terminate)\nhi\n")
    agents = lab.zdut("-s", broker, "agents").stdout
    assert agents.count(" online (last seen ") == 2 and ": device1\n" in agents and ": device2\n" in agents


def test_agents_json_and_server_synonym(lab: Lab) -> None:
    """`-server` (dutctl's spelling) registers too, and `agents` reports name, devices, state and version."""
    _, broker = lab.broker()
    lab.agent(CONF / "config-1.yaml", None, "-server", broker, "--name", "bench-a")
    wait_for(lambda: lab.online(broker, ["device1"]), 10, "registration via -server")
    doc = json.loads(lab.zdut("-s", broker, "-f", "json", "agents").stdout)
    (agent,) = doc["data"]
    assert agent["Name"] == "bench-a" and agent["Devices"] == ["device1"] and agent["Online"] is True
    assert agent["Version"] and agent["LastSeen"] > time.time() - 10


def test_agent_killed_mid_run(lab: Lab) -> None:
    _, broker = lab.broker()
    port = free_port()
    cfg = _slow_config(lab.tmp)
    agent = lab.brokered_agent(cfg, broker, port, "--name", "rack-7")
    client = lab.zdut_bg("-s", broker, "board", "wait", "60s")
    wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
    agent.kill()
    killed = time.monotonic()
    rc = client.popen.wait(10)
    assert time.monotonic() - killed < 5
    assert rc == 1 and 'agent "rack-7"' in client.text(), client.text()
    wait_for(lambda: _listing(lab, broker)["board"]["Online"] is False, 5, "the device to be listed offline")
    assert "OFFLINE" in lab.zdut("-s", broker, "list").stdout
    r = lab.zdut("-s", broker, "board", "status")
    assert r.returncode == 1 and "offline" in r.stderr
    lab.agent(cfg, port, "--server", broker, "--name", "rack-7")
    wait_for(lambda: _listing(lab, broker)["board"]["Online"] is True, 5, "the restarted agent to be back")
    assert lab.zdut("-s", broker, "board", "status").returncode == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_client_vanishes_mid_run(lab: Lab, how: signal.Signals) -> None:
    _, broker = lab.broker()
    lab.brokered_agent(_slow_config(lab.tmp), broker)
    client = lab.zdut_bg("-s", broker, "-u", "alice", "board", "wait", "60s")
    try:
        wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
        assert _listing(lab, broker)["board"]["Owner"] == "alice"
        client.kill(how)
        wait_for(lambda: _listing(lab, broker)["board"]["Locked"] is False, 5, "the busy hold to be released")
        assert lab.zdut("-s", broker, "-u", "bob", "board", "status").returncode == 0
    finally:
        client.kill(signal.SIGKILL)
        if how == signal.SIGSTOP:
            os.kill(client.pid, signal.SIGCONT)


def test_broker_killed_mid_run_and_restarted(lab: Lab) -> None:
    bport = free_port()
    broker_proc, broker = lab.broker(bport)
    lab.brokered_agent(_slow_config(lab.tmp), broker)
    lab.brokered_agent(CONF / "config-2.yaml", broker)
    client = lab.zdut_bg("-s", broker, "board", "wait", "60s")
    wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
    broker_proc.kill()
    killed = time.monotonic()
    assert client.popen.wait(10) == 1
    assert time.monotonic() - killed < 5
    assert "lost connection" in client.text() or "lost contact" in client.text()
    lab.broker(bport)
    restarted = time.monotonic()
    wait_for(lambda: lab.online(broker, ["board", "device2"]), 5, "every agent to register again")
    assert time.monotonic() - restarted < 5


def test_restart_lists_known_devices_offline(lab: Lab) -> None:
    bport = free_port()
    broker_proc, broker = lab.broker(bport)
    agent = lab.brokered_agent(CONF / "config-1.yaml", broker)
    agent.stop()
    assert broker_proc.stop() == 0
    lab.broker(bport)
    listing = _listing(lab, broker)
    assert listing["device1"]["Online"] is False
    assert "OFFLINE" in lab.zdut("-s", broker, "list").stdout


def test_corrupt_and_unusable_state_files(lab: Lab, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    r = subprocess.run([exe("zdut-broker"), "-s", f"127.0.0.1:{free_port()}", "--state", str(corrupt)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and str(corrupt) in r.stderr and "Traceback" not in r.stderr
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    r = subprocess.run([exe("zdut-broker"), "-s", f"127.0.0.1:{free_port()}", "--state", str(blocked / "s.db")],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and str(blocked) in r.stderr and "Traceback" not in r.stderr


def test_duplicate_device_name_is_refused_naming_the_holder(lab: Lab) -> None:
    broker_proc, broker = lab.broker()
    lab.brokered_agent(CONF / "config-1.yaml", broker, None, "--name", "first")
    other, _ = lab.agent(CONF / "config-1.yaml", None, "--server", broker, "--name", "second")
    wait_for(lambda: 'already registered by agent "first"' in other.text(), 10, "the refusal in the agent log")
    assert "second" in broker_proc.text() and "first" in broker_proc.text()
    assert _listing(lab, broker)["device1"]["Agent"] == "first"


def test_lock_state_through_broker_is_the_agents(lab: Lab) -> None:
    """The owning agent is the only lock authority: a direct and a brokered client can never both hold it."""
    _, broker = lab.broker()
    port = free_port()
    lab.brokered_agent(CONF / "config-1.yaml", broker, port)
    direct = f"127.0.0.1:{port}"
    assert lab.zdut("-s", direct, "-u", "alice", "device1", "lock", "5m").returncode == 0
    wait_for(lambda: _listing(lab, broker)["device1"]["Owner"] == "alice", 5, "the lock copy at the broker")
    r = lab.zdut("-s", broker, "-u", "bob", "device1", "lock")
    assert r.returncode == 1 and 'locked by "alice"' in r.stderr
    assert lab.zdut("-s", broker, "-u", "alice", "device1", "unlock").returncode == 0
    assert "locked" not in lab.zdut("-s", direct, "list").stdout


def test_console_flood_arrives_complete_and_in_order(lab: Lab, tmp_path: Path) -> None:
    """A module writing ~100 MB of console output as fast as it can, through the broker."""
    cfg = tmp_path / "flood.yaml"
    cfg.write_text("version: 0.1.0\ndevices:\n  gen:\n    cmds:\n      flood:\n        uses:\n"
                   "          - module: shell\n            args: ['seq 1 13000000']\n")
    broker_proc, broker = lab.broker()
    agent = lab.brokered_agent(cfg, broker)
    out = tmp_path / "flood.out"
    with open(out, "wb") as fh:
        r = subprocess.run([exe("zdut"), "-s", broker, "gen", "flood"], stdout=fh, stderr=subprocess.PIPE,
                           env=lab.env, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = hashlib.sha256()
    for start in range(1, 13_000_001, 100_000):
        expected.update("".join(f"{i}\n" for i in range(start, min(start + 100_000, 13_000_001))).encode())
    want = expected.hexdigest()
    with open(out, "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == want
    assert out.stat().st_size > 100_000_000
    for proc in (broker_proc, agent):
        assert peak_rss_mb(proc.pid) < 100


def test_1gb_round_trip_through_broker_bounded_memory(lab: Lab, tmp_path: Path) -> None:
    broker_proc, broker = lab.broker()
    agent = lab.brokered_agent(CONF / "demo.yaml", broker)
    src = lab.tmp / "big.bin"
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(src, "wb") as fh:
        for i in range(1024):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            fh.write(chunk)
    digest.update(b"\n\nprocessed by dummy.FT module\n")
    r, client_mb = run_measured([exe("zdut"), "-s", broker, "device3", "file-transfer", "big.bin", "big.out"],
                                cwd=lab.tmp, env=lab.env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    src.unlink()
    with open(lab.tmp / "big.out", "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").digest() == digest.digest()
    (lab.tmp / "big.out").unlink()
    assert client_mb < 100, f"client peak RSS {client_mb:.0f} MB"
    assert peak_rss_mb(broker_proc.pid) < 100
    assert peak_rss_mb(agent.pid) < 100


def test_fifty_sessions_across_ten_agents(lab: Lab, tmp_path: Path) -> None:
    _, broker = lab.broker()
    devices = []
    for i in range(10):
        cfg = tmp_path / f"a{i}.yaml"
        cfg.write_text(f"version: 0.1.0\ndevices:\n  dev{i}:\n    cmds:\n      echo:\n        uses:\n"
                       "          - module: dummy-repeat\n            passthrough: true\n")
        lab.agent(cfg, None, "--server", broker, "--name", f"agent-{i}")
        devices.append(f"dev{i}")
    wait_for(lambda: lab.online(broker, devices), 20, "ten agents online")
    clients = []
    for n in range(50):
        words = "".join(f"s{n}w{k}\n" for k in range(20)) + "stop now\n"
        p = subprocess.Popen([exe("zdut"), "-s", broker, "-u", "load", f"dev{n % 10}", "echo"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab.env)
        assert p.stdin is not None
        p.stdin.write(words.encode())
        p.stdin.close()
        clients.append((n, p))
    for n, p in clients:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        assert p.wait(60) == 0, err
        assert out.decode().splitlines()[2:] == [f"s{n}w{k}" for k in range(20)]


def test_one_agent_registers_with_several_brokers(lab: Lab) -> None:
    _, first = lab.broker()
    _, second = lab.broker()
    lab.agent(CONF / "config-2.yaml", None, "--server", first, "--server", second, "--name", "twin")
    wait_for(lambda: lab.online(first, ["device2"]) and lab.online(second, ["device2"]), 10, "both registrations")
    for broker in (first, second):
        r = lab.zdut("-s", broker, "device2", "status")
        assert r.returncode == 0 and "Hello from dummy status module" in r.stdout
    assert lab.zdut("-s", first, "-u", "alice", "device2", "lock", "5m").returncode == 0
    wait_for(lambda: _listing(lab, second)["device2"]["Owner"] == "alice", 5, "the lock to show at the other broker")
    r = lab.zdut("-s", second, "-u", "bob", "device2", "status")
    assert r.returncode == 1 and 'locked by "alice"' in r.stderr
