"""Run sessions against a real agent: big files, cancellation, vanished clients, agent flags."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import zmq

from conftest import CONF, Lab, exe, free_port, peak_rss_mb, run_measured, wait_for
from zdut import protocol as p
from zdut.common.addresses import endpoint

SUFFIX = b"\n\nprocessed by dummy.FT module\n"


def _slow_config(tmp: Path) -> Path:
    cfg = tmp / "slow.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  board:\n    cmds:\n      wait:\n        uses:\n"
        "          - module: time-wait\n            passthrough: true\n"
        "      status:\n        uses:\n          - module: dummy-status\n"
    )
    return cfg


def _busy_owner(lab: Lab, addr: str, device: str) -> str:
    return lab.zdut("-s", addr, "list").stdout.split(f"- {device}", 1)[1].split("\n", 1)[0]


def test_200mb_round_trip_bounded_memory(lab: Lab) -> None:
    agent, addr = lab.agent(CONF / "demo.yaml")
    src = lab.tmp / "big.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        block = os.urandom(1 << 20)
        for i in range(200):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            fh.write(chunk)
    digest.update(SUFFIX)
    r, client_mb = run_measured([exe("zdut"), "-s", addr, "device3", "file-transfer", "big.bin", "big.out"],
                                cwd=lab.tmp, env=lab.env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    with open(lab.tmp / "big.out", "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").digest() == digest.digest()
    agent_mb = peak_rss_mb(agent.pid)
    assert client_mb < 100, f"client peak RSS {client_mb:.0f} MB"
    assert agent_mb < 100, f"agent peak RSS {agent_mb:.0f} MB"


def test_ctrl_c_cancels_and_releases_busy_hold(lab: Lab) -> None:
    _, addr = lab.agent(_slow_config(lab.tmp))
    client = lab.zdut_bg("-s", addr, "-u", "alice", "board", "wait", "60s")
    wait_for(lambda: "Waiting for 1m0s" in client.text(), 10, "the command to start")
    assert 'in use by "alice"' in _busy_owner(lab, addr, "board")
    client.popen.send_signal(signal.SIGINT)
    assert client.popen.wait(10) == 130
    assert "✗ interrupted" in client.text()
    wait_for(lambda: _busy_owner(lab, addr, "board") == "", 5, "the busy hold to be released")
    assert lab.zdut("-s", addr, "-u", "bob", "board", "status").returncode == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_vanished_client_releases_busy_hold(lab: Lab, how: signal.Signals) -> None:
    agent, addr = lab.agent(_slow_config(lab.tmp))
    client = lab.zdut_bg("-s", addr, "-u", "alice", "board", "wait", "60s")
    try:
        wait_for(lambda: "Waiting for" in client.text(), 10, "the command to start")
        client.kill(how)
        wait_for(lambda: _busy_owner(lab, addr, "board") == "", 6, "the agent to notice the client is gone")
        assert "client lost" in agent.text()
    finally:
        client.kill(signal.SIGKILL)
        if how == signal.SIGSTOP:
            os.kill(client.pid, signal.SIGCONT)


def test_sessions_on_different_devices_do_not_wait(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    with subprocess.Popen([exe("zdut"), "-s", addr, "device2", "repeat"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, env=lab.env, cwd=lab.tmp) as console:
        assert console.stdout is not None and console.stdin is not None
        assert console.stdout.readline() == b"Hello from dummy repeat module!\n"
        r = lab.zdut("-s", addr, "device1", "status", timeout=5)
        assert r.returncode == 0
        console.stdin.write(b"x\n")
        console.stdin.flush()
        console.stdout.readline()
        assert console.stdout.readline() == b"x\n"
        console.stdin.close()
        assert console.wait(10) == 1


def test_agent_restart_keeps_reservations(lab: Lab) -> None:
    port = free_port()
    agent, addr = lab.agent(CONF / "demo.yaml", port)
    assert lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "30m").returncode == 0
    assert agent.stop() == 0
    lab.agent(CONF / "demo.yaml", port)
    assert 'locked by "alice"' in lab.zdut("-s", addr, "list").stdout


def test_major_version_mismatch_is_refused(lab: Lab) -> None:
    agent, addr = lab.agent(CONF / "demo.yaml")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint(addr))
    sock.send(p.encode(p.ListDevices(7, "9.0.0", "old@host")))
    assert sock.poll(5000)
    reply = p.decode(sock.recv())
    ctx.destroy()
    assert isinstance(reply, p.Error) and reply.rid == 7
    assert reply.code == p.Code.FAILED_PRECONDITION
    assert reply.message == f"incompatible zdut versions: agent {p.VERSION}, client 9.0.0 (major version mismatch)"
    wait_for(lambda: "major version mismatch" in agent.text(), 5, "the agent to log the refusal")


def test_check_config_and_dry_run_exit_codes(lab: Lab, tmp_path: Path) -> None:
    ok = subprocess.run([exe("zdut-agent"), "--check-config", "-c", str(CONF / "demo.yaml")], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 0.1.0\ndevices:\n  d:\n    cmds:\n      c:\n        uses: []\n")
    for flag in ("--check-config", "-check-config", "--dry-run"):
        r = subprocess.run([exe("zdut-agent"), flag, "-c", str(bad)], capture_output=True, text=True)
        assert r.returncode == 1, flag
        assert 'device "d": command "c": line 6: command must have at least one module' in r.stderr
    dry = subprocess.run([exe("zdut-agent"), "--dry-run", "-c", str(CONF / "demo.yaml")], capture_output=True,
                         text=True)
    assert dry.returncode == 0, dry.stderr
    failing = tmp_path / "failing.yaml"
    failing.write_text("version: 0.1.0\ndevices:\n  d:\n    cmds:\n      w:\n        uses:\n"
                       "          - module: time-wait\n            with: {duration: soon}\n")
    r = subprocess.run([exe("zdut-agent"), "--dry-run", "-c", str(failing)], capture_output=True, text=True)
    assert r.returncode == 1 and "invalid duration" in r.stderr


def test_agent_sigterm_is_graceful(lab: Lab) -> None:
    agent, _ = lab.agent(CONF / "demo.yaml")
    assert agent.stop() == 0
    assert "shutting down" in agent.text()
