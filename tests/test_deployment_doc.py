"""docs/deployment.md stays true where one machine can check it.

* Every ``zdut``, ``zdut-broker`` and ``zdut-agent`` command line in its shell blocks (and every flag written into
  an environment file as ``ZDUT_BROKER_ARGS=`` / ``ZDUT_AGENT_ARGS=``) uses only flags the program's ``--help``
  lists; the broker's and the agent's parse with the program's own parser.
* The blocks marked ``<!-- checked: HOST... -->`` run as they are written, once per host named, with each host's
  ``/etc/zdut``, ``/var/lib/zdut`` and home directory mapped into a directory of its own, ``scp HOST:PATH`` copying
  between those directories, the owner ``zdut`` standing for the test's own user and group, and the broker's
  address ``broker.lab:1024`` for a free local port. Then the broker and the three agents start with the command
  lines the shipped units build (``test_deploy_units.exec_start``) from the environment files those blocks wrote;
  all three register, alice's ``zdut list`` through the broker (with the config.toml the doc wrote) shows their
  devices online, and a client without keys is refused as the doc's log table says.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_deploy_units import AGENT, BROKER, exec_start

from conftest import BIN, ROOT, Lab, exe, free_port, wait_for
from zdut import broker, worker

DOC = ROOT / "docs" / "deployment.md"
PROGRAMS = ("zdut", "zdut-broker", "zdut-agent")
AGENTS = ("bench1", "bench2", "bench3")
DOC_KEYS = "/etc/zdut/broker-keys"


@dataclass
class Block:
    """A fenced shell block of the doc: its text, and the hosts of its ``<!-- checked: ... -->`` marker."""

    text: str
    hosts: list[str]
    line: int


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while lines[i] != "```":
            body.append(lines[i])
            i += 1
        marker = next((re.fullmatch(r"<!-- checked: ([\w. -]+) -->", lines[j]) for j in range(start - 1, -1, -1)
                       if lines[j].strip()), None)
        if m.group(1) == "sh":
            found.append(Block("\n".join(body) + "\n", marker.group(1).split() if marker else [], start + 1))
        else:
            assert marker is None, f"line {start + 1}: a checked block must be sh"
        i += 1
    return found


# ------------------------------------------------------------------------------------------------ the flags
def command_lines(script: str) -> list[str]:
    """The shell lines of a block: continuations joined, here-document bodies left out."""
    out: list[str] = []
    ending: str | None = None
    pending = ""
    for line in script.splitlines():
        if ending is not None:
            if line == ending:
                ending = None
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(pending)
        if m := re.search(r"<<-?\s*'?(\w+)'?", pending):
            ending = m.group(1)
        pending = ""
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as words: split at ; && || | and parentheses, comments dropped,
    each cut at its first redirection."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    redirected = False
    for token in lex:
        if token in (";", "&&", "||", "|", "(", ")", "&"):
            out.append([])
            redirected = False
        elif set(token) <= set("<>&") or redirected:
            redirected = True
        else:
            out[-1].append(token)
    return [words for words in out if words]


def command_word(words: list[str]) -> int | None:
    """Where the program of a simple command is: past ``sudo [-u USER]``, ``VAR=value`` and the shell's keywords."""
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("do", "then", "else", "exec", "time"):
            i += 1
        elif word == "sudo":
            i += 3 if words[i + 1:i + 2] == ["-u"] else 1
        elif re.fullmatch(r"[A-Za-z_]\w*=.*", word):
            i += 1
        else:
            return None if word in ("for", "while", "if", "case") else i
    return None


def program_calls(script: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of each call of a zdut program in a block (``zdut keys`` counts as its own)."""
    calls = []
    for line in command_lines(script):
        for words in commands(line):
            at = command_word(words)
            if at is None or os.path.basename(words[at]) not in PROGRAMS:
                continue
            name, args = os.path.basename(words[at]), words[at + 1:]
            if name == "zdut" and args[:1] == ["keys"]:
                name, args = "zdut keys", args[1:]
            calls.append((name, args))
    return calls


def env_args(script: str) -> list[tuple[str, list[str]]]:
    """(program, arguments) of each ``ZDUT_BROKER_ARGS=`` / ``ZDUT_AGENT_ARGS=`` the block writes."""
    out = []
    for line in command_lines(script):
        for words in commands(line):
            for word in words:
                if m := re.fullmatch(r"ZDUT_(BROKER|AGENT)_(?:ARGS|KEYS)=(.*)", word):
                    out.append((f"zdut-{m.group(1).lower()}", shlex.split(m.group(2))))
    return out


_help: dict[str, str] = {}


def help_text(program: str) -> str:
    if program not in _help:
        argv = [exe("zdut"), "keys", "--help"] if program == "zdut keys" else [exe(program), "--help"]
        _help[program] = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    return _help[program]


def client_value_flags() -> set[str]:
    """The flags of ``zdut --help`` that take a value (``-s ADDR``, ``--key FILE``...)."""
    return set(re.findall(r"^ {4}(-[-\w]+) [A-Z]+\b", help_text("zdut"), re.M))


def flags_of(program: str, args: list[str]) -> list[str]:
    """The flags among ``args``; for the client only those before the device (the rest are the command's)."""
    if program != "zdut":
        return [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "--"]
    takes_value, flags, i = client_value_flags(), [], 0
    while i < len(args) and args[i].startswith("-"):
        flags.append(args[i])
        i += 2 if args[i] in takes_value else 1
    return flags


def problems(script: str) -> list[str]:
    """What is wrong with the zdut command lines of a script: a flag the program does not list, or (broker,
    agent) arguments its parser refuses."""
    found = []
    for program, args in [*program_calls(script), *env_args(script)]:
        listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][-\w]*)", help_text(program)))
        found += [f"{program}: {flag} is not in its --help" for flag in flags_of(program, args) if flag not in listed]
        parser = {"zdut-broker": broker.build_parser, "zdut-agent": worker.build_parser}.get(program)
        if parser is not None:
            words = [w.replace("$NAME", "bench1") for w in args]
            try:
                parser().parse_args(words)
            except SystemExit:
                found.append(f"{program}: {shlex.join(words)} does not parse")
    return found


def test_every_command_uses_flags_its_program_has() -> None:
    script = "".join(b.text for b in blocks(DOC.read_text()))
    assert problems(script) == [], "\n".join(problems(script))
    calls = program_calls(script) + env_args(script)
    counts = {p: sum(name == p for name, _ in calls) for p in (*PROGRAMS, "zdut keys")}
    assert all(n >= 2 for n in counts.values()), counts  # the extraction finds what the doc runs


@pytest.mark.parametrize(("line", "wrong"), [
    ("/opt/zdut/bin/zdut-agent --chek-config -c x.yaml", "--chek-config is not in"),
    ("echo 'ZDUT_BROKER_ARGS=--listen' > /etc/zdut/broker.env", "does not parse"),
    ("zdut keys generate alice --directory ~/.config/zdut", "--directory is not in"),
    ("sudo -u zdut zdut -S broker.lab:1024 list && true", "-S is not in"),
])
def test_the_flag_check_catches_a_wrong_line(line: str, wrong: str) -> None:
    assert any(wrong in p for p in problems(line + "\n")), problems(line + "\n")


def test_device_arguments_are_not_client_flags() -> None:
    assert flags_of("zdut", ["-s", "x:1", "--key", "k", "dev", "serial", "-t", "5s"]) == ["-s", "--key"]


# ------------------------------------------------------------------------------------------------ the lab
class Machines:
    """Each host of the doc as a directory; its checked blocks run there, rewritten as the module docstring says."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port

    def home(self, host: str) -> Path:
        return self.root / host / ("home/alice" if host == "alice-laptop" else "root")

    def rewrite(self, text: str, host: str) -> str:
        here = self.root / host
        if host.startswith("bench"):
            text = text.replace("NAME=bench1", f"NAME={host.split('.')[0]}")
        text = text.replace("/opt/zdut/bin/", f"{BIN}/")
        text = re.sub(r"(?<![:\w])(/etc/zdut|/var/lib/zdut)", lambda m: f"{here}{m.group(1)}", text)
        text = text.replace("zdut:zdut", f"{os.getuid()}:{os.getgid()}").replace("-g zdut ", f"-g {os.getgid()} ")
        return text.replace("broker.lab:1024", f"127.0.0.1:{self.port}").replace("0.0.0.0:1024",
                                                                                   f"127.0.0.1:{self.port}")

    def run(self, block: Block, host: str) -> None:
        home = self.home(host)
        home.mkdir(parents=True, exist_ok=True)
        prelude = f"""set -euo pipefail
M={shlex.quote(str(self.root))}
_map() {{ case "$1" in *:*) local h=${{1%%:*}}; echo "$M/${{h#*@}}${{1#*:}}";; *) echo "$1";; esac; }}
scp() {{ cp "$(_map "$1")" "$(_map "$2")"; }}
"""
        env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "XDG_CONFIG_HOME": "",
               "ZDUT_KEY": "", "ZDUT_SERVER_KEY": ""}
        env.pop("XDG_CONFIG_HOME")
        proc = subprocess.run(["bash", "-c", prelude + self.rewrite(block.text, host)], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"docs/deployment.md line {block.line} on {host}:\n{proc.stdout}{proc.stderr}"

    def path(self, host: str, unit_path: str) -> Path:
        return self.root / host / unit_path.lstrip("/")

    def argv(self, host: str, unit: str, instance: str, env_file: str) -> list[str]:
        """The unit's ExecStart= with the environment file the doc wrote on ``host``, mapped to its directory."""
        path = self.path(host, env_file)
        files = {env_file: path.read_text()} if path.exists() else {}
        words = exec_start(unit, instance, files)
        return [self.rewrite(w, host) for w in words]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_checked_blocks_set_up_a_lab_that_works(lab: Lab, tmp_path: Path) -> None:
    port = free_port()
    machines = Machines(tmp_path / "machines", port)
    checked = [b for b in blocks(DOC.read_text()) if b.hosts]
    assert {h for b in checked for h in b.hosts} == {"broker.lab", "alice-laptop", *(f"{a}.lab" for a in AGENTS)}
    for block in checked:
        for host in block.hosts:
            machines.run(block, host)

    # The key layout the doc made: each secret the service user's own, 0600; the directories 0750.
    broker_keys = machines.path("broker.lab", "/etc/zdut/broker-keys")
    assert mode(broker_keys / "server.key_secret") == 0o600 and mode(broker_keys) == 0o750
    assert sorted(p.name for p in (broker_keys / "agents").iterdir()) == [f"{a}.key" for a in AGENTS]
    assert [p.name for p in (broker_keys / "users").iterdir()] == ["alice.key"]
    for name in AGENTS:
        keys = machines.path(f"{name}.lab", f"/etc/zdut/agent-{name}-keys")
        assert mode(keys / "server.key_secret") == 0o600 and mode(keys / "brokers") == 0o750
        assert (keys / "brokers" / "broker.lab.key").read_text() == (broker_keys / "server.key").read_text()

    # The broker and the agents, started as their units start them, from the doc's environment files.
    for host in ("broker.lab", *(f"{a}.lab" for a in AGENTS)):
        machines.path(host, "/var/lib/zdut").mkdir(parents=True)  # what StateDirectory= makes
    brk = lab.spawn(machines.argv("broker.lab", BROKER, "ci", "/etc/zdut/broker.env"), "broker")
    assert f"--keys {broker_keys}" in shlex.join(brk.args), brk.args
    agents = [lab.spawn(machines.argv(f"{a}.lab", AGENT, a, f"/etc/zdut/agents/{a}.env"), a) for a in AGENTS]
    for name, proc in zip(AGENTS, agents, strict=True):
        wait_for(lambda name=name, proc=proc: f'agent "{name}" registered' in brk.text() or not proc.alive()
                 or not brk.alive(), 20, f"{name} to register")
        assert proc.alive() and brk.alive(), proc.text() + brk.text()
        assert "security off" not in proc.text()
    assert "security off" not in brk.text()
    assert f"keys in {broker_keys}: 1 users, 3 agents; admins: alice" in brk.text(), brk.text()

    # alice, with the config.toml the doc wrote, lists the three devices through the broker.
    alice = {**lab.env, "HOME": str(machines.home("alice-laptop"))}
    alice.pop("XDG_CONFIG_HOME")
    r = lab.zdut("-s", f"127.0.0.1:{port}", "-f", "json", "list", env=alice)
    assert r.returncode == 0, r.stderr
    listed = {d["Name"]: d.get("Online") for d in json.loads(r.stdout)["data"]}
    assert listed == {f"{a}-board1": True for a in AGENTS}, listed

    # Without keys: refused by the client at once, and by the broker in one of the doc's two lines for it.
    r = lab.zdut("-s", f"127.0.0.1:{port}", "list")
    assert r.returncode == 1 and "the server has security on (CURVE) and this client has no key" in r.stderr, r.stderr
    assert "the server has security on (CURVE) and this client has no key" in DOC.read_text()
    keyless = [f"refused a connection without CURVE (a client not given a key pair, or a server with security "
               f"off): this broker takes only the keys in {DOC_KEYS}",
               f"a peer hung up during its CURVE handshake (Broken pipe): most likely a client without a key pair, "
               f"which this broker refuses (it takes only the keys in {DOC_KEYS}), or one that gave up"]
    real = [line.replace(DOC_KEYS, str(broker_keys)) for line in keyless]
    wait_for(lambda: any(line in brk.text() for line in real), 5, "the refusal in the broker's log")

    # A key the broker does not list: refused, and logged as the doc's table says.
    mallory = lab.zdut("keys", "generate", "mallory", "--dir", str(tmp_path / "mallory"))
    assert mallory.returncode == 0, mallory.stderr
    r = lab.zdut("-s", f"127.0.0.1:{port}", "--key", str(tmp_path / "mallory" / "mallory.key_secret"),
                 "--server-key", str(broker_keys / "server.key"), "list")
    assert r.returncode == 1 and "the server refused key mallory" in r.stderr, r.stderr
    wait_for(lambda: f"is not in {broker_keys}" in brk.text(), 5, "the unknown key in the broker's log")

    # The log lines of section 7 this lab produced.
    doc, addr = DOC.read_text(), f"127.0.0.1:{port}"
    seen = {"broker": brk.text(), **{name: proc.text() for name, proc in zip(AGENTS, agents, strict=True)}}
    for who, fragment in [("broker", f"[keys] keys in {DOC_KEYS}: 1 users, 3 agents; admins: alice"),
                          ("broker", f"; CURVE, keys in {DOC_KEYS}: 1 users, 3 agents, admins: alice)"),
                          ("broker", '[broker] agent "bench1" registered from '),
                          ("broker", ": 1 devices, version "),
                          ("bench1", "[agentd.uplink] registered with broker broker.lab:1024 ("),
                          ("bench1", ") as bench1: 1 devices"),
                          ("broker", "[broker] refused a connection from "),
                          ("broker", f" is not in {DOC_KEYS}`")]:
        assert fragment in doc, fragment
        logged = fragment.replace(DOC_KEYS, str(broker_keys)).replace("broker.lab:1024", addr).removesuffix("`")
        assert logged in seen[who], fragment
    assert all(line in doc for line in keyless)
