"""Help and version as people type them: ``--help``, ``-h`` and ``help``; ``--version`` and ``version``; global
flags after ``shell``; ``DEV help``."""

from __future__ import annotations

from conftest import CONF, Lab
from zdut.terminal.commands import HELP


def test_every_help_form_prints_usage_on_stdout_and_exits_0(lab: Lab) -> None:
    for args in (["--help"], ["-h"], ["help"], ["-s", "127.0.0.1:1", "help"], ["-s", "http://x", "help"]):
        r = lab.zdut(*args, timeout=10)
        assert (r.returncode, r.stdout, r.stderr) == (0, HELP, ""), args


def test_help_names_the_flag_and_word_forms() -> None:
    assert "--version" in HELP and "zdut help" in HELP and "shell [options]" in HELP


def test_dash_dash_version_is_version(lab: Lab) -> None:
    word, flag = lab.zdut("version"), lab.zdut("--version")
    assert flag.returncode == 0 and flag.stderr == ""
    assert flag.stdout == word.stdout and flag.stdout.startswith("zdut client\nVersion: ")


def test_flags_after_shell_work_as_before_it(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    script = b"device1 status\n"
    before = lab.zdut("-s", addr, "-f", "json", "shell", input=script)
    after = lab.zdut("shell", "-s", addr, "-f", "json", input=script)
    assert before.returncode == after.returncode == 0, after.stderr
    assert '"contentType": "module-output"' in after.stdout
    strip = [line for line in after.stdout.splitlines() if "timestamp" not in line]
    assert strip == [line for line in before.stdout.splitlines() if "timestamp" not in line]


def test_bad_flag_after_shell_is_a_usage_error(lab: Lab) -> None:
    r = lab.zdut("shell", "-s", "http://x", timeout=10)
    assert r.returncode == 2 and r.stderr.startswith('invalid value "http://x" for flag -s'), r.stderr
    r = lab.zdut("shell", "-s", "127.0.0.1:1", "extra", timeout=10)
    assert r.returncode != 0 and "extra" in r.stderr


def test_device_help_lists_its_commands_with_their_descs(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    listing = lab.zdut("-s", addr, "device2")
    r = lab.zdut("-s", addr, "device2", "help")
    assert r.returncode == 0, r.stderr
    assert r.stdout == listing.stdout == "- repeat  Repeat input\n- status  Report status\n"
