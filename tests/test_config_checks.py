"""Config errors point at the cause, and ``--check-config`` refuses exactly what start-up refuses.

Unknown keys are named with the nearest valid key, an empty file and an unknown ``version`` are errors, and a
module's option checks that need no hardware (an ``ipmi`` command without ``host``) fail when the config loads,
so the real ``zdut-agent --check-config`` and a real agent start-up print the same line and exit 1
(docs/differences.md row 23; spec DIFFERENCES.md row 11).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import exe, free_port
from zdut.agentd.config import ConfigError, parse_config, parse_devices

V = "version: 1.0.0\n"


def error(text: str, full: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        (parse_config if full else parse_devices)(textwrap.dedent(text))
    return info.value


def cmd(uses_entry: str) -> str:
    """A config whose one command has one uses entry, given as its YAML lines (indented 10 spaces)."""
    return V + "devices:\n  dev:\n    cmds:\n      c:\n        uses:\n" + uses_entry


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "device", "command", "line", "message"),
    [
        (V + "devics:\n  dev: {}\n", None, None, 2, "unknown key 'devics' (did you mean 'devices'?)"),
        (V + "Version: 1\n", None, None, 2, "unknown key 'Version' (did you mean 'version'?)"),
        (V + "owner: lab\n", None, None, 2, "unknown key 'owner' (allowed: version, devices)"),
        (V + "devices:\n  dev:\n    cmd: {}\n", "dev", None, 4, "unknown key 'cmd' (did you mean 'cmds'?)"),
        (
            V + "devices:\n  dev:\n    cmds:\n      c:\n        usse:\n          - module: dummy-status\n",
            "dev",
            "c",
            6,
            "unknown key 'usse' (did you mean 'uses'?)",
        ),
        (
            V + "devices:\n  dev:\n    cmds:\n      c:\n        args: [{name: x, dsc: y}]\n        uses: []\n",
            "dev",
            "c",
            6,
            "unknown key 'dsc' (did you mean 'desc'?)",
        ),
        (
            cmd("          - module: dummy-status\n            passtrough: true\n"),
            "dev",
            "c",
            8,
            "unknown key 'passtrough' (did you mean 'passthrough'?)",
        ),
        (
            cmd("          - module: dummy-status\n            main: true\n"),
            "dev",
            "c",
            8,
            "unknown key 'main' (did you mean 'passthrough'?)",
        ),
        (
            cmd("          - module: dummy-status\n            timeout: 5\n"),
            "dev",
            "c",
            8,
            "unknown key 'timeout' (allowed: module, passthrough, args, with)",
        ),
    ],
)
def test_an_unknown_key_is_named_with_the_nearest_valid_key(
    text: str, device: str | None, command: str | None, line: int, message: str
) -> None:
    err = error(text)
    assert (err.kind, err.device, err.command, err.line, err.message) == ("unknown_key", device, command, line, message)


def test_an_unknown_key_is_refused_before_what_it_hides() -> None:
    # dutctl ignores `usse:` and reports "command must have at least one module": the cause is the typo.
    err = error(V + "devices:\n  dev:\n    cmds:\n      c:\n        usse:\n          - module: dummy-status\n")
    assert str(err) == 'device "dev": command "c": line 6: unknown key \'usse\' (did you mean \'uses\'?)'


def test_a_control_character_in_an_unknown_key_is_escaped() -> None:
    err = error(V + 'devices:\n  dev:\n    "c\\x1bmds": {}\n')
    assert err.message == 'unknown key "c\\x1bmds" (did you mean \'cmds\'?)'


def test_an_unknown_with_key_points_at_its_own_line() -> None:
    err = error(cmd("          - module: time-wait\n            with:\n              durtion: 3s\n"))
    assert (err.kind, err.line, err.message) == (
        "validation",
        9,
        "module \"time-wait\": unknown 'with' key 'durtion' (did you mean 'duration'?)",
    )


# ---------------------------------------------------------------- version and empty files


KNOWN_VERSIONS = ["0", "0.1.0", "1", "1.0", "1.0.0", "1.0.0-alpha.1", "v1.2.3+build.5"]
UNKNOWN = "(this agent reads config versions 0.x and 1.x)"


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("2.0.0", f"unknown version '2.0.0' {UNKNOWN}"),
        ("10", f"unknown version '10' {UNKNOWN}"),
        ("banana", "invalid version 'banana' (want MAJOR.MINOR.PATCH, e.g. 1.0.0)"),
    ],
)
def test_only_known_versions_load(version: str, message: str) -> None:
    err = error(f"version: {version}\n")
    assert (err.kind, err.line, err.message) == ("version", 1, message)
    assert [parse_config(f"version: {known}\n").version for known in KNOWN_VERSIONS] == KNOWN_VERSIONS


@pytest.mark.parametrize("text", ["version:\ndevices:\n", "devices:\n  dev: {cmds: {c: {uses: [{module: x}]}}}\n"])
def test_a_config_needs_a_version_but_a_device_map_does_not(text: str) -> None:
    err = error(text)
    assert (err.kind, err.line, err.message) == ("version", None, "version is missing (want e.g. version: 1.0.0)")
    # dutctl's validation cases hold only the devices map: no version to check there.
    assert list(parse_devices("dev: {cmds: {c: {uses: [{module: dummy-status}]}}}\n").devices) == ["dev"]


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing yet\n", "~\n", "---\n"])
def test_an_empty_config_is_an_error(text: str) -> None:
    err = error(text)
    assert (err.kind, str(err)) == ("empty", "the config is empty (want version and devices)")


# ---------------------------------------------------------------- module options checked at load


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{user: admin}", 'module "ipmi": IPMI host is not set'),
        ("{host: bmc, port: 70000}", 'module "ipmi": invalid IPMI port 70000'),
        ("{host: bmc, ciphersuite: 99}", 'module "ipmi": invalid ciphersuite 99: must be 0..17'),
    ],
)
def test_ipmi_options_are_checked_when_the_config_loads(options: str, message: str) -> None:
    err = error(cmd(f"          - module: ipmi\n            passthrough: true\n            with: {options}\n"))
    assert (err.kind, err.device, err.command, err.line, err.message) == ("validation", "dev", "c", 7, message)


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        ("pdu", "{outlet: 1}", "PDU host address not configured"),
        ("pdu", "{host: 10.0.0.5}", "invalid PDU host '10.0.0.5': must be an absolute URL"),
        ("pdu", "{host: 'http://pdu', user: admin}", "PDU authentication requires both user and password"),
        ("wifisocket", "{channel: 2}", "wifisocket: host must be configured"),
        ("serial", "{baud: 9600}", "COM port is not set"),
        ("serial", "{port: /dev/ttyUSB0, delay: fast}", 'invalid delay "fast"'),
        ("ssh", "{user: root, password: x}", "host is required"),
        ("ssh", "{host: dut}", "unable to authenticate, either password or private key must be configured"),
        ("flash", "{programmer: dummy}", "tool must be configured"),
        ("flash", "{tool: flashrom}", "programmer must be configured"),
        ("flash-emulate", "{tool: em100}", "chip must be configured"),
        ("file", "{source: a.txt}", "operation must be set in config"),
        ("file", "{operation: upload, permission: '644'}", "invalid permission '644'"),
        ("gpio-button", "{pin: 3, backend: sysfs}", 'unknown gpio backend "sysfs"'),
        ("gpio-switch", "{pin: 3, backend: sim, initial: maybe}", 'invalid initial state "maybe"'),
    ],
)
def test_option_errors_a_module_sees_without_hardware_fail_the_load(module: str, options: str, message: str) -> None:
    err = error(cmd(f"          - module: {module}\n            passthrough: true\n            with: {options}\n"))
    assert (err.kind, err.line) == ("validation", 7)
    assert err.message.startswith(f'module "{module}": {message}'), err.message


# ---------------------------------------------------------------- the real agent: --check-config and start-up


def agent(tmp: Path, config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
    return subprocess.run([exe("zdut-agent"), "-c", str(config), *flags], capture_output=True, text=True,
                          timeout=20, env=env, cwd=tmp)


GOOD_DEVICE = "  good:\n    cmds:\n      status:\n        uses:\n          - module: dummy-status\n"
BAD_CONFIGS = {
    # name: (file content, the error after "zdut-agent: PATH: ")
    "ipmi-without-host": (
        V + "devices:\n" + GOOD_DEVICE
        + "  bmc:\n    cmds:\n      power:\n        uses:\n          - module: ipmi\n            passthrough: true\n"
        "            with: {user: admin, password: secret}\n",
        'device "bmc": command "power": line 12: module "ipmi": IPMI host is not set',
    ),
    "typo": (
        V + "devices:\n" + GOOD_DEVICE + "  board:\n    cmds:\n      status:\n        usse:\n"
        "          - module: dummy-status\n",
        'device "board": command "status": line 11: unknown key \'usse\' (did you mean \'uses\'?)',
    ),
    "empty": ("", "the config is empty (want version and devices)"),
    "version": (
        "version: 3.0.0\ndevices:\n" + GOOD_DEVICE,
        "line 1: unknown version '3.0.0' (this agent reads config versions 0.x and 1.x)",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_check_config_and_start_up_refuse_the_same_config_with_the_same_line(tmp_path: Path, name: str) -> None:
    text, expected = BAD_CONFIGS[name]
    config = tmp_path / f"{name}.yaml"
    config.write_text(text)
    checked = agent(tmp_path, config, "--check-config")
    started = agent(tmp_path, config, "-a", f"127.0.0.1:{free_port()}")
    line = f"zdut-agent: {config}: {expected}\n"
    assert (checked.returncode, checked.stdout, checked.stderr) == (1, "", line)
    assert (started.returncode, started.stderr) == (1, line)
