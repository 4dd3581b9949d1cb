"""The "Writing a module" example in docs/modules.md, installed as a plugin and run by a real agent.

The test takes the module's code and its entry-point declaration from the doc itself, so the example
cannot rot: if it stops working, or stops being at most 30 lines, this fails.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from conftest import Lab

DOC = Path(__file__).resolve().parent.parent / "docs" / "modules.md"


def fenced_block(marker: str, language: str) -> str:
    """The first ``language`` code block after the HTML comment that starts with ``marker``."""
    text = DOC.read_text()
    match = re.search(rf"<!-- {re.escape(marker)}\b.*?-->\s*```{language}\n(.*?)\n```", text, re.S)
    assert match, f"docs/modules.md has no {language} block after <!-- {marker} -->"
    return match.group(1) + "\n"


def install_plugin(site: Path) -> str:
    """Write the doc's module and a dist-info declaring its entry point; return the module id."""
    code = fenced_block("example-module", "python")
    assert len(code.splitlines()) <= 30, "the documented example module must stay within 30 lines"
    groups = tomllib.loads(fenced_block("example-entry-point", "toml"))["project"]["entry-points"]
    (module_id, target), = groups["zdut.devices"].items()
    (site / f"{target.partition(':')[0]}.py").write_text(code)
    dist = site / "zdut_file_switch-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zdut-file-switch\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[zdut.devices]\n{module_id} = {target}\n")
    return module_id


def test_documented_module_runs_as_a_plugin(lab: Lab, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    module_id = install_plugin(site)
    relay = tmp_path / "relay0-brightness"
    relay.write_text("0\n")
    config = tmp_path / "plugin.yaml"
    config.write_text(
        "version: 0\ndevices:\n  bench-psu:\n    cmds:\n      power:\n        desc: Switch the relay\n"
        f"        uses:\n          - module: {module_id}\n            passthrough: true\n"
        f"            with:\n              path: {relay}\n"
    )
    lab.env["PYTHONPATH"] = str(site)  # the plugin is found through its entry point, nothing else
    _, addr = lab.agent(config)

    r = lab.zdut("-s", addr, "bench-psu", "power", "status")
    assert (r.returncode, r.stdout) == (0, "Current state: off\n"), r
    r = lab.zdut("-s", addr, "bench-psu", "power", "on")
    assert (r.returncode, r.stdout) == (0, "Turned on\n"), r
    assert relay.read_text() == "1"
    r = lab.zdut("-s", addr, "bench-psu", "power", "status")
    assert r.stdout == "Current state: on\n", r
    r = lab.zdut("-s", addr, "bench-psu", "power", "blink")
    assert r.returncode == 1 and "module failed: want on, off or status, got 'blink'" in r.stderr, r
    r = lab.zdut("-s", addr, "bench-psu", "power", "help")
    assert "Switch a relay through a file." in r.stdout, r
