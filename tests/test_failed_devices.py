"""Issue 10 point 5 (part): a module whose init fails marks its device as failed, the agent serves on.

The failed device is listed with its reason (``list`` and ``agents``, directly and through a broker, in
every format); its commands answer that reason; the other devices work.  ``--dry-run`` stays strict, and an
agent whose every device failed exits 1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from conftest import Lab, exe, free_port, wait_for

GOOD = "  good:\n    cmds:\n      status:\n        uses:\n          - module: dummy-status\n"
BAD = ("  bad:\n    cmds:\n      w:\n        uses:\n          - module: time-wait\n"
       "            with: {duration: soon}\n")
REASON = 'command "w": module "time-wait": invalid duration'


def _config(tmp: Path, *devices: str) -> Path:
    cfg = tmp / "mixed.yaml"
    cfg.write_text("version: 0.1.0\ndevices:\n" + "".join(devices))
    return cfg


def test_failed_device_is_listed_with_its_reason_and_the_agent_serves_on(lab: Lab) -> None:
    cfg = _config(lab.tmp, GOOD, BAD)
    _, broker = lab.broker()
    port = free_port()
    agent = lab.brokered_agent(cfg, broker, port, "--name", "mixed")
    assert agent.alive()
    assert "1 of 2 devices failed to initialise" in agent.text()
    direct = f"127.0.0.1:{port}"
    for server in (direct, broker):
        text = lab.zdut("-s", server, "list").stdout
        bad_line = text.splitlines()[0]
        assert bad_line.startswith("- bad [FAILED: ") and REASON in bad_line, text
        assert "\n- good" in text
        r = lab.zdut("-s", server, "bad", "w", "1s")
        assert r.returncode == 1
        assert 'device "bad" failed to initialise: ' in r.stderr and REASON in r.stderr, r.stderr
        assert lab.zdut("-s", server, "good", "status").returncode == 0

        listed = {d["Name"]: d for d in json.loads(lab.zdut("-s", server, "-f", "json", "list").stdout)["data"]}
        assert REASON in listed["bad"]["Failed"] and "Failed" not in listed["good"]
        doc = yaml.safe_load(lab.zdut("-s", server, "-f", "yaml", "list").stdout)
        assert REASON in doc["data"][0]["failed"]
        line = lab.zdut("-s", server, "-f", "oneline", "list").stdout
        assert "bad=failed:" in line and "|good" in line

        agents = lab.zdut("-s", server, "agents").stdout
        assert "mixed" in agents and "bad (FAILED: " in agents and REASON in agents, agents
        (info,) = json.loads(lab.zdut("-s", server, "-f", "json", "agents").stdout)["data"]
        assert list(info["Failed"]) == ["bad"] and REASON in info["Failed"]["bad"]
        line = lab.zdut("-s", server, "-f", "oneline", "agents").stdout
        assert "mixed=online;failed:bad" in line, line
    assert agent.stop() == 0


def test_agent_whose_every_device_failed_exits_and_dry_run_stays_strict(lab: Lab) -> None:
    r = subprocess.run([exe("zdut-agent"), "-c", str(_config(lab.tmp, BAD)), "-a", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=20, env=lab.env)
    assert r.returncode == 1
    assert REASON in r.stderr and "every device failed to initialise" in r.stderr, r.stderr
    r = subprocess.run([exe("zdut-agent"), "--dry-run", "-c", str(_config(lab.tmp, GOOD, BAD))],
                       capture_output=True, text=True, timeout=20, env=lab.env)
    assert r.returncode == 1 and REASON in r.stderr and "dry run OK" not in r.stdout


def test_failed_device_joins_a_broker_started_later(lab: Lab) -> None:
    """Brokers learn the failure from the registration, whenever it happens."""
    cfg = _config(lab.tmp, GOOD, BAD)
    bport = free_port()
    lab.agent(cfg, None, "--server", f"127.0.0.1:{bport}")
    _, broker = lab.broker(bport)
    wait_for(lambda: lab.online(broker, ["bad", "good"]), 10, "the agent to register")
    assert "[FAILED: " in lab.zdut("-s", broker, "list").stdout
