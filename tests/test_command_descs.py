"""The config's ``desc`` of each command reaches people (issue 11, point 5): ``zdut DEV`` and ``zdut DEV help`` list
it beside each name, ``DEV CMD help`` leads with it, the Python API has it, and shell completion shows it, both
directly at an agent and through a broker; machine formats keep dutctl's list of names (docs/differences.md 28).

Real agents, a real broker and the real CLI; real fish and zsh run the generated completion scripts."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import Lab, exe

if TYPE_CHECKING:
    from api_drivers import Opener

pytest_plugins = ["api_drivers"]

CONFIG = """\
version: 0.1.0
devices:
  board:
    desc: A board on the bench
    cmds:
      status:
        desc: Report status
        uses:
          - module: dummy-status
            passthrough: true
      flash-and-report:
        desc: Run two modules, with templated arguments
        args:
          - {name: image, desc: the image to flash}
        uses:
          - module: dummy-status
            args: ["${image}"]
          - module: dummy-status
      quiet:
        uses:
          - module: dummy-repeat
            passthrough: true
"""
LISTED = ("- flash-and-report  Run two modules, with templated arguments\n"
          "- quiet\n"
          "- status            Report status\n")
STATUS_HELP = "Report status\n\nThis dummy module prints status information about itself and the environment.\n"
SUMMARY_HELP = ("Run two modules, with templated arguments\n\nCommand with 2 module(s): dummy-status, dummy-status\n\n"
                "Arguments:\n  image: the image to flash\n\n")
QUIET_HELP = "This dummy module repeats the input from the client.\n"  # no desc: the module's help alone


@pytest.fixture
def config(lab: Lab) -> Path:
    path = lab.tmp / "board.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(params=["direct", "brokered"])
def server(request: pytest.FixtureRequest, lab: Lab, config: Path) -> str:
    """The address a client uses: the agent's own, or a broker's it registered with."""
    return lab.serve(config, request.param)


def test_the_command_list_shows_each_desc_aligned(lab: Lab, server: str) -> None:
    for words in (["board"], ["board", "help"]):
        r = lab.zdut("-s", server, *words)
        assert (r.stdout, r.stderr, r.returncode) == (LISTED, "", 0)


def test_command_help_leads_with_its_desc(lab: Lab, server: str) -> None:
    for command, expected in (("status", STATUS_HELP), ("flash-and-report", SUMMARY_HELP), ("quiet", QUIET_HELP)):
        r = lab.zdut("-s", server, "board", command, "help")
        assert (r.stdout, r.returncode) == (expected, 0), command


def test_machine_formats_keep_dutctls_list_of_names(lab: Lab, server: str) -> None:
    r = lab.zdut("-s", server, "-f", "json", "board")
    assert json.loads(r.stdout)["data"] == ["flash-and-report", "quiet", "status"]
    r = lab.zdut("-s", server, "-f", "oneline", "board")
    assert r.stdout.rstrip("\n").split(",")[-1] == "flash-and-report|quiet|status"


def test_the_api_gives_each_command_with_its_desc(lab: Lab, server: str, open_api: Opener) -> None:
    api = open_api(server)
    assert api.descriptions("board") == {
        "flash-and-report": "Run two modules, with templated arguments", "quiet": "", "status": "Report status"}
    assert api.commands("board") == ["flash-and-report", "quiet", "status"]
    assert api.help("board", "status") == STATUS_HELP.rstrip("\n")


def test_a_broker_state_file_from_before_descs_still_loads(lab: Lab, config: Path) -> None:
    """A devices row written as [[command, help], ...] (before descs) is read with empty descs; the agent's
    next registration brings them."""
    broker_proc, broker = lab.broker()
    agent_proc = lab.brokered_agent(config, broker)
    agent_proc.stop()
    broker_proc.stop()
    state = next(lab.tmp.glob("broker-*.sqlite3"))
    with sqlite3.connect(state) as db:
        db.execute("UPDATE devices SET commands = ?", (json.dumps([["quiet", "old help"], ["status", "old"]]),))
    port = int(broker.rpartition(":")[2])
    lab.broker(port)
    r = lab.zdut("-s", broker, "-f", "json", "list")
    assert [d["Name"] for d in json.loads(r.stdout)["data"]] == ["board"], r.stderr  # known, offline
    lab.brokered_agent(config, broker)
    assert lab.zdut("-s", broker, "board").stdout == LISTED


def described(lab: Lab, *words: str) -> list[str]:
    r = lab.zdut("__complete_described", *words)
    assert (r.stderr, r.returncode) == ("", 0)
    return r.stdout.splitlines()


def test_completion_candidates_carry_descs_for_zsh_and_fish_only(lab: Lab, server: str) -> None:
    assert described(lab, "-s", server, "board", "") == [
        "flash-and-report\tRun two modules, with templated arguments", "quiet", "status\tReport status",
        "lock\treserve the device", "unlock\trelease the device", "help\tlist the commands"]
    assert described(lab, "-s", server, "board", "status", "") == ["help\tusage of the command"]
    plain = lab.zdut("__complete", "-s", server, "board", "").stdout  # what bash gets: names alone
    assert plain.split("\n") == ["flash-and-report", "quiet", "status", "lock", "unlock", "help", ""]


def shell_env(lab: Lab) -> dict[str, str]:
    return {**lab.env, "PATH": f"{Path(exe('zdut')).parent}:{lab.env['PATH']}"}


def test_fish_shows_each_commands_desc(lab: Lab, config: Path) -> None:
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here")
    _, addr = lab.agent(config)
    script = lab.tmp / "zdut.fish"
    script.write_text(lab.zdut("completion", "fish").stdout)
    r = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C 'zdut -s {addr} board st'"],
                       capture_output=True, text=True, timeout=20, env=shell_env(lab))
    assert r.stdout == "status\tReport status\n", (r.stdout, r.stderr)


def test_zsh_offers_names_and_shows_descs(lab: Lab, config: Path) -> None:
    """The generated _zdut runs in a real zsh; compadd and compdef (zsh's completion system, which needs a
    terminal) are stood in for by functions that print what they were given."""
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed here")
    _, addr = lab.agent(config)
    script = lab.tmp / "zdut.zsh"
    script.write_text(lab.zdut("completion", "zsh").stdout)
    drive = (
        "compdef() { :; }\n"
        'compadd() { local -a d; zparseopts -D -E l=l d:=d a:=a; print -rl -- "names: ${(j: :)${(P@)a[2]}}" '
        '"shown: ${(j:|:)${(P@)d[2]}}"; }\n'
        f"source {script}\n"
        f"words=(zdut -s {addr} board ''); CURRENT=5; _zdut\n"
    )
    r = subprocess.run(["zsh", "-f", "-c", drive], capture_output=True, text=True, timeout=20, env=shell_env(lab))
    assert r.stdout.splitlines() == [
        "names: flash-and-report quiet status lock unlock help",
        "shown: flash-and-report  -- Run two modules, with templated arguments|quiet|status  -- Report status"
        "|lock  -- reserve the device|unlock  -- release the device|help  -- list the commands",
    ], (r.stdout, r.stderr)
