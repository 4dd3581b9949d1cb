"""ipmi module: the real ipmitool against ipmi_sim, a simulated BMC on loopback.

Needs the Debian packages ``ipmitool`` and ``openipmi`` (for ipmi_sim); the
simulator tests skip with that reason when they are missing.  The retry and
missing-tool tests use a fake ipmitool script and run everywhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import yaml
from standins.ipmisim import PASSWORD, USER, IPMISim, install_fake_ipmitool, missing_tools

from zdut.devices import get
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.ipmi import IPMI
from zdut.devices.testing import LocalSession

ROOT = Path(__file__).resolve().parent.parent
_missing = missing_tools()
needs_sim = pytest.mark.skipif(_missing is not None, reason=f"needs the simulated BMC: {_missing}")


def run(coro):
    return asyncio.run(coro)


def ipmi(**with_keys) -> IPMI:
    mod = IPMI(decode_options(IPMI, with_keys))
    run(mod.init())
    return mod


def say(mod: IPMI, *args: str) -> str:
    session = LocalSession()
    run(mod.run(session, list(args)))
    return session.text


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def bmc(tmp_path: Path):
    with IPMISim(tmp_path) as sim:
        yield sim


def test_registry_maps_id() -> None:
    assert get("ipmi") is IPMI


@needs_sim
def test_power_round_trip_through_status(bmc: IPMISim) -> None:
    mod = ipmi(host="127.0.0.1", port=bmc.port, user=USER, password=PASSWORD, timeout="2s")
    assert say(mod, "status") == "Device power status: Off\n"
    assert say(mod, "on") == "Power ON command sent\n"
    assert bmc.power == 1
    assert say(mod, "STATUS") == "Device power status: On\n"
    assert say(mod, "Cycle") == "Power CYCLE command sent\n"
    assert bmc.log[:2] == ["power 1", "power 0"]
    # ipmi_sim powers on again a moment after it answered the cycle command
    wait_until(lambda: bmc.log == ["power 1", "power 0", "power 1"], "the BMC to power on after the cycle")
    assert say(mod, "status") == "Device power status: On\n"
    assert say(mod, "reset") == "Power RESET command sent\n"
    assert bmc.log[-1] == "reset 1"
    assert say(mod, "off") == "Power OFF command sent\n"
    assert bmc.power == 0
    assert say(mod, "status") == "Device power status: Off\n"


@needs_sim
def test_wrong_password_fails_naming_the_bmc(bmc: IPMISim) -> None:
    mod = ipmi(host="127.0.0.1", port=bmc.port, user=USER, password="wrong", timeout="1s")
    with pytest.raises(ModuleError, match=rf"^power on command failed: BMC 127.0.0.1:{bmc.port}: .*RMCP\+ session"):
        run(mod.run(LocalSession(), ["on"]))
    assert bmc.power == 0 and bmc.log == []
    with pytest.raises(ModuleError, match=rf"^failed to get chassis status: BMC 127.0.0.1:{bmc.port}"):
        run(mod.run(LocalSession(), ["status"]))


@needs_sim
def test_usage_on_no_or_unknown_argument(bmc: IPMISim) -> None:
    mod = ipmi(host="127.0.0.1", port=bmc.port, user=USER, password=PASSWORD)
    assert (
        say(mod) == "No command specified. Try 'help' for usage.\nAvailable commands: on, off, cycle, reset, status\n"
    )
    assert say(mod, "boot") == "Unknown command: boot\nAvailable commands: on, off, cycle, reset, status\n"
    assert bmc.log == []


# ------------------------------------------------------------------ fake ipmitool: retry, argv, missing tool


@pytest.fixture
def fake_ipmitool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    install_fake_ipmitool(bin_dir)
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_DIR", str(record))
    return record / "calls"


def test_one_failure_is_retried(fake_ipmitool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIL_TIMES", "1")
    mod = ipmi(host="bmc.lab", user="admin", password="s3cret", timeout="3s")
    assert say(mod, "status") == "Device power status: Off\n"
    calls = fake_ipmitool.read_text().splitlines()
    assert len(calls) == 2
    expected = "-I lanplus -H bmc.lab -p 623 -C 3 -N 3 -R 1 -U admin -E chassis power status | IPMI_PASSWORD=s3cret"
    assert calls == [expected, expected]
    assert "s3cret" not in calls[0].split(" | ")[0]  # the password never appears on the command line


def test_two_failures_give_up(fake_ipmitool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIL_TIMES", "5")
    mod = ipmi(host="bmc.lab", port=1623)
    with pytest.raises(ModuleError, match=r"^power cycle command failed: BMC bmc.lab:1623: Error: Unable to establish"):
        run(mod.run(LocalSession(), ["cycle"]))
    assert len(fake_ipmitool.read_text().splitlines()) == 2


@pytest.mark.parametrize(("timeout", "seconds"), [("10s", "10"), ("1500ms", "2"), ("bogus", "10"), ("", "10")])
def test_timeout_becomes_ipmitools_per_try_timeout(timeout: str, seconds: str, fake_ipmitool: Path) -> None:
    mod = ipmi(host="bmc", timeout=timeout, ciphersuite=17)
    argv = mod.argv("chassis", "power", "status")
    assert argv[argv.index("-N") + 1] == seconds
    assert argv[argv.index("-C") + 1] == "17"
    assert "-U" not in argv  # no user configured: ipmitool's anonymous login


def test_missing_ipmitool_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModuleError, match=r"ipmitool not found on PATH .*apt-get install ipmitool"):
        run(IPMI(decode_options(IPMI, {"host": "bmc"})).init())


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "IPMI host is not set"),
        ({"host": "bmc", "port": 70000}, "invalid IPMI port"),
        ({"host": "bmc", "ciphersuite": 99}, "invalid ciphersuite"),
    ],
)
def test_init_rejects_bad_options(options: dict, error: str) -> None:
    with pytest.raises(ModuleError, match=error):
        run(IPMI(decode_options(IPMI, options)).init())


def test_run_before_init() -> None:
    with pytest.raises(ModuleError, match="not initialized"):
        run(IPMI(decode_options(IPMI, {"host": "bmc"})).run(LocalSession(), ["on"]))


def test_help_documents_arguments_and_keys() -> None:
    text = IPMI(decode_options(IPMI, {"host": "10.0.0.9"})).help()
    for word in ("on|off|cycle|reset|status", "host", "port", "user", "password", "timeout", "10.0.0.9:623"):
        assert word in text
    assert text.startswith(
        "IPMI Power Management Module\n"
        "Arguments: on|off|cycle|reset|status (case-insensitive)\n"
        "  on      - Power on the device\n"
        "  off     - Power off the device\n"
        "  cycle   - Power cycle (off, then on)\n"
        "  reset   - Reset the device (if supported)\n"
        "  status  - Show current power status\n"
        "with: host (required)"
    )


def test_example_config_decodes(fake_ipmitool: Path) -> None:
    config = yaml.safe_load((ROOT / "conf" / "ipmi.yaml").read_text())
    steps = [s for d in config["devices"].values() for c in d["cmds"].values() for s in c["uses"]]
    assert steps and all(s["module"] == "ipmi" for s in steps)
    for step in steps:
        run(IPMI(decode_options(IPMI, step["with"])).init())
