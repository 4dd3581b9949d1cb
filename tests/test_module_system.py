"""The module system through a real agent: third-party modules, failing modules, built-ins."""

from __future__ import annotations

import os
import platform
import subprocess
import textwrap
from pathlib import Path

from standins.pdu_http import PDUServer
from thirdparty import TESTS, install, install_shelly

from conftest import Lab, exe, wait_for

PLUGIN = '''
import msgspec
from zdut.devices.base import Module, ModuleError


class Options(msgspec.Struct, forbid_unknown_fields=True):
    greeting: str = "hi"


class Greeter(Module):
    id = "greeter"
    Options = Options

    def help(self) -> str:
        return "Greets. with: greeting"

    async def run(self, session, args):
        if args == ["fail"]:
            raise ModuleError("asked to fail")
        if args == ["crash"]:
            raise RuntimeError("boom")
        await session.print(f"{self.options.greeting}, {' '.join(args)}\\n")
'''


def _plugin_env(lab: Lab, tmp: Path) -> dict[str, str]:
    """Install a third-party module the way a package would: a dist-info with a zdut.devices entry point."""
    site = install(tmp / "site", "greeter_plugin", {"zdut.devices": {"greeter": "greeter_plugin:Greeter"}})
    (site / "greeter_plugin.py").write_text(PLUGIN)
    return {**lab.env, "PYTHONPATH": str(site)}


def test_third_party_module_via_entry_point(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "plugin.yaml"
    cfg.write_text(textwrap.dedent("""\
        version: 0.1.0
        devices:
          box:
            cmds:
              greet:
                uses:
                  - module: greeter
                    passthrough: true
                    with: {greeting: hello}
        """))
    lab.env = _plugin_env(lab, tmp_path)
    agent, addr = lab.agent(cfg)
    r = lab.zdut("-s", addr, "box", "greet", "world")
    assert r.returncode == 0 and r.stdout == "hello, world\n"
    assert lab.zdut("-s", addr, "box", "greet", "help").stdout == "Greets. with: greeting\n"
    r = lab.zdut("-s", addr, "box", "greet", "fail")
    assert r.returncode == 1 and r.stderr.strip() == "✗ module failed: asked to fail"
    r = lab.zdut("-s", addr, "box", "greet", "crash")
    assert r.returncode == 1 and r.stderr.strip() == "✗ module failed: RuntimeError: boom"
    assert lab.zdut("-s", addr, "box", "greet", "again").stdout == "hello, again\n"  # the agent survived
    wait_for(lambda: "Traceback" in agent.text(), 5, "the crash to be logged with its traceback")


def test_unknown_with_key_names_the_key(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("version: 0.1.0\ndevices:\n  box:\n    cmds:\n      greet:\n        uses:\n"
                   "          - module: greeter\n            with: {greting: typo}\n")
    r = subprocess.run([exe("zdut-agent"), "--check-config", "-c", str(cfg)], capture_output=True, text=True,
                       env=_plugin_env(lab, tmp_path))
    assert r.returncode == 1
    assert "unknown 'with' key 'greting'" in r.stderr and 'device "box": command "greet"' in r.stderr


def test_multi_module_command_stops_at_first_error(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(textwrap.dedent("""\
        version: 0.1.0
        devices:
          box:
            cmds:
              seq:
                uses:
                  - module: dummy-status
                    args: [first]
                  - module: time-wait
                    args: [bogus]
                  - module: dummy-status
                    args: [never]
              info:
                uses:
                  - module: agent-status
        """))
    _, addr = lab.agent(cfg)
    r = lab.zdut("-s", addr, "box", "seq")
    assert r.returncode == 1
    assert "Arg 0: first" in r.stdout and "never" not in r.stdout
    assert "module failed: invalid duration" in r.stderr
    r = lab.zdut("-s", addr, "box", "info")
    assert r.returncode == 0 and platform.node() in r.stdout and r.stdout.startswith(platform.system())


def test_third_party_pdu_backend_via_entry_point(lab: Lab, tmp_path: Path) -> None:
    """A vendor no zdut file names, found by the agent through the zdut.pdu_backends entry-point group."""
    site = install_shelly(tmp_path / "site")
    lab.env = {**lab.env, "PYTHONPATH": f"{site}{os.pathsep}{TESTS}"}
    with PDUServer("shelly", outlets=4) as server:
        cfg = tmp_path / "pdu.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            version: 0.1.0
            devices:
              box:
                cmds:
                  power:
                    uses:
                      - module: pdu
                        passthrough: true
                        with: {{vendor: shelly, host: "{server.url}", outlet: 2}}
            """))
        _, addr = lab.agent(cfg)
        r = lab.zdut("-s", addr, "box", "power", "on")
        assert (r.returncode, r.stdout) == (0, "PDU outlet 2 powered on\n"), r.stderr
        assert server.states == [False, False, True, False]
        assert lab.zdut("-s", addr, "box", "power", "toggle").stdout == "PDU outlet 2 powered off\n"
        assert lab.zdut("-s", addr, "box", "power", "status").stdout == "PDU outlet 2 state: off\n"
        assert server.requests == ["/relay/2?turn=on", "/relay/2", "/relay/2?turn=off", "/relay/2"]

    cfg.write_text(cfg.read_text().replace("vendor: shelly", "vendor: apc"))
    r = subprocess.run([exe("zdut-agent"), "--check-config", "-c", str(cfg)], capture_output=True, text=True,
                       env=lab.env)
    assert r.returncode == 1
    assert "unknown PDU vendor 'apc' (known vendors: gude, intellinet, shelly)" in r.stderr, r.stderr
