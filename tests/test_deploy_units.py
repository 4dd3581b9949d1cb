"""The shipped systemd units (deploy/systemd/) load cleanly in systemd and start the programs with flags they have.

``systemd-analyze verify`` is the check.  What it demands, and how this file meets it:

* every ``ExecStart=`` binary must exist and be executable: the copies verified here point ``/opt/zdut/bin/``
  (where the units expect the install) at the directory of this interpreter, whose venv has the console scripts;
* a template (``zdut-agent@.service``) is verified as an instance of it (``zdut-agent@ci.service``) from the
  same directory;
* ``User=zdut`` need not exist (verify does not resolve users), so no system user is created;
* a bad line (an unknown key, an unparsable value) is *reported but not an error*: verify still exits 0.  So a
  unit counts as broken on a non-zero exit or on any output line that names one of our units, and
  ``test_verify_reports_a_broken_unit`` proves with deliberately broken copies that this catches them.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zdut import broker, worker

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
BROKER = "zdut-broker.service"
AGENT = "zdut-agent@.service"
INSTANCE = "zdut-agent@ci.service"
INSTALL_BIN = "/opt/zdut/bin/"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (Debian package: systemd)")


def staged(tmp_path: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """Copies of the shipped units in ``tmp_path`` whose ExecStart= points at this venv's scripts; ``edits``
    maps a unit name to one (old, new) text replacement that must apply."""
    for name in (BROKER, AGENT):
        text = (UNITS / name).read_text().replace(INSTALL_BIN, f"{BIN}/")
        if edits and name in edits:
            old, new = edits[name]
            assert old in text, f"{old!r} not in {name}"
            text = text.replace(old, new)
        (tmp_path / name).write_text(text)
    return tmp_path


def verify(directory: Path, *units: str) -> tuple[bool, str]:
    """(clean, output) of ``systemd-analyze verify`` on ``units`` in ``directory``."""
    proc = subprocess.run(["systemd-analyze", "verify", *(f"./{u}" for u in units)], cwd=directory,
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    ours = [line for line in output.splitlines() if "zdut-" in line]
    return proc.returncode == 0 and not ours, f"exit {proc.returncode}\n{output}"


def exec_start(name: str, instance: str = "ci") -> list[str]:
    """The ExecStart= argv of a shipped unit, %i expanded, environment-variable words dropped."""
    lines = [line for line in (UNITS / name).read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0].removeprefix("ExecStart=").replace("%i", instance))
    return [w for w in words if not w.startswith("$")]


def test_the_scripts_the_staged_units_run_exist() -> None:
    for script in ("zdut-broker", "zdut-agent"):
        assert (BIN / script).is_file(), f"{BIN / script}: run the tests from the project venv"


def test_shipped_units_verify_clean(tmp_path: Path) -> None:
    clean, output = verify(staged(tmp_path), BROKER, INSTANCE)
    assert clean, output


@pytest.mark.parametrize(("unit", "old", "new", "reported"), [
    (BROKER, "Restart=on-failure", "Restart=sometimes", "sometimes"),
    (BROKER, "ProtectSystem=strict", "ProtecSystem=strict", "ProtecSystem"),
    (AGENT, "Restart=on-failure", "Restart=sometimes", "sometimes"),
    (AGENT, "KillMode=mixed", "KillMode=gently", "gently"),
    (AGENT, f"{BIN}/zdut-agent", f"{BIN}/zdut-agent-missing", "zdut-agent-missing"),
])
def test_verify_reports_a_broken_unit(tmp_path: Path, unit: str, old: str, new: str, reported: str) -> None:
    target = BROKER if unit == BROKER else INSTANCE
    clean, output = verify(staged(tmp_path, {unit: (old, new)}), target)
    assert not clean, output
    assert reported in output


def test_units_run_from_the_documented_venv() -> None:
    assert exec_start(BROKER)[0] == f"{INSTALL_BIN}zdut-broker"
    assert exec_start(AGENT)[0] == f"{INSTALL_BIN}zdut-agent"


def test_broker_exec_start_uses_flags_it_has() -> None:
    args = broker.build_parser().parse_args(exec_start(BROKER)[1:])
    assert str(args.state) == "/var/lib/zdut/broker.sqlite3"


def test_agent_exec_start_uses_flags_it_has() -> None:
    args = worker.build_parser().parse_args(exec_start(AGENT, "bench1")[1:])
    assert (args.config, args.name, str(args.state)) == (
        "/etc/zdut/agents/bench1.yaml", "bench1", "/var/lib/zdut/agent-bench1.json")


def test_state_files_live_in_the_state_directory() -> None:
    for name in (BROKER, AGENT):
        text = (UNITS / name).read_text()
        assert "\nStateDirectory=zdut" in text
        assert "/var/lib/zdut/" in next(line for line in text.splitlines() if line.startswith("ExecStart="))
