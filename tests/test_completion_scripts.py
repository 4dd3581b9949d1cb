"""Shell completion for the one-shot CLI (issue 11, point 9): ``zdut completion bash|zsh|fish`` prints a script
whose candidates come from ``zdut __complete``: global flags, keywords, devices and commands from the server,
cached so that a stopped server still completes, quickly.

Real bash runs the generated function with COMP_WORDS/COMP_CWORD set, against a real agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CONF, Lab, exe

pytestmark = pytest.mark.serial  # completion answers within 1-1.5 s: run alone, not beside another worker


def bash_complete(lab: Lab, *words: str) -> tuple[list[str], float]:
    """What the generated bash function offers for ``zdut WORDS...`` (the last word being completed)."""
    script = lab.zdut("completion", "bash").stdout
    quoted = " ".join(f"'{w}'" for w in [exe("zdut"), *words])
    drive = f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _zdut; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    started = time.monotonic()
    r = subprocess.run(["bash", "-c", drive], capture_output=True, text=True, timeout=10, env=lab.env)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line], took


def test_bash_completes_from_the_server_then_from_the_cache(lab: Lab) -> None:
    proc, addr = lab.agent(CONF / "demo.yaml")
    assert bash_complete(lab, "-s", addr, "dev")[0] == ["device1", "device2", "device3"]
    host, port = addr.split(":")
    assert bash_complete(lab, "-s", host, ":", port, "dev")[0] == ["device1", "device2", "device3"]  # as bash splits
    assert bash_complete(lab, "-s", addr, "")[0][:7] == ["list", "agents", "forget", "shell", "version", "help",
                                                         "completion"]
    commands = lab.zdut("-s", addr, "-f", "json", "device1").stdout
    offered, _ = bash_complete(lab, "-s", addr, "device1", "")
    assert offered[-3:] == ["lock", "unlock", "help"] and all(f'"{c}"' in commands for c in offered[:-3]), offered
    assert bash_complete(lab, "-s", addr, "device1", "lock", "")[0] == ["30m", "1h", "2h", "8h"]
    assert bash_complete(lab, "-f", "")[0] == ["text", "json", "yaml", "oneline", "csv"]
    assert "--no-color" in bash_complete(lab, "--")[0]
    assert bash_complete(lab, "completion", "")[0] == ["bash", "zsh", "fish"]
    assert (lab.tmp / "state" / "zdut" / "completion.json").exists()

    proc.stop()  # the server is away: the cache answers, and fast
    offered_now, took = bash_complete(lab, "-s", addr, "dev")
    assert offered_now == ["device1", "device2", "device3"] and took < 1.0, took  # ~0.2 s on an idle machine
    assert bash_complete(lab, "-s", addr, "device1", "")[0] == offered


def test_a_stale_cache_is_used_when_the_server_is_away(lab: Lab) -> None:
    proc, addr = lab.agent(CONF / "demo.yaml")
    assert bash_complete(lab, "-s", addr, "device")[0] == ["device1", "device2", "device3"]
    proc.stop()
    cache = lab.tmp / "state" / "zdut" / "completion.json"
    held = json.loads(cache.read_text())
    held[addr]["devices"]["at"] = 0  # long out of date
    cache.write_text(json.dumps(held))
    started = time.monotonic()
    r = lab.zdut("__complete", "-s", addr, "device")
    took = time.monotonic() - started
    assert r.stdout.split() == ["device1", "device2", "device3"] and r.returncode == 0, r.stderr
    assert took < 1.5, took  # the server gets 0.25 s; the rest is Python starting on a busy machine


def test_nothing_known_offers_keywords_and_no_error(lab: Lab) -> None:
    r = lab.zdut("__complete", "-s", "127.0.0.1:1", "")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.split()[0] == "list"


def test_unknown_shell_is_a_usage_error(lab: Lab) -> None:
    r = lab.zdut("completion", "tcsh")
    assert (r.returncode, r.stderr) == (2, "usage: zdut completion bash|zsh|fish\n")


@pytest.mark.parametrize(("shell", "check"), [("zsh", ["zsh", "-n"]), ("fish", ["fish", "--no-execute"])])
def test_zsh_and_fish_scripts_parse(lab: Lab, shell: str, check: list[str]) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    script = lab.tmp / f"zdut.{shell}"
    text = lab.zdut("completion", shell).stdout
    assert "__complete" in text and ("__zdut_complete" if shell == "fish" else "_zdut()") in text, text
    script.write_text(text)
    r = subprocess.run([*check, str(script)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def test_fish_completes_devices_for_real(lab: Lab) -> None:
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed here")
    _, addr = lab.agent(CONF / "demo.yaml")
    script = lab.tmp / "zdut.fish"
    script.write_text(lab.zdut("completion", "fish").stdout)
    bindir = str(Path(exe("zdut")).parent)
    r = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C 'zdut -s {addr} dev'"],
                       capture_output=True, text=True, timeout=20,
                       env={**lab.env, "PATH": f"{bindir}:{lab.env['PATH']}"})
    assert r.stdout.split() == ["device1", "device2", "device3"], (r.stdout, r.stderr)
