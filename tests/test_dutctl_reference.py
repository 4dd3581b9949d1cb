"""dutctl's bytes: the 27 reference calls replayed against real zdut processes, compared byte for byte.

tests/data/dutctl-outputs/ holds what the Go dutctl client printed (stdout, stderr, exit status) for 27 calls
against its own proxy and two agents (its README.md describes the set-up). Here a zdut-broker takes the
proxy's place and two zdut-agents serve config-1.yaml and config-2.yaml, each registered with the broker and
listening directly, all on free ports. Each ``.cmd`` line runs with ``dutctl`` replaced by ``zdut`` (and
``dutagent`` by ``zdut-agent``), the reference addresses mapped to ours, the same stdin, in number order.

Both sides are normalised as the README says (timestamps, ExpiresAt values, ports, the build line of a
version, the random default identity) and must then be identical, except where a documented difference
applies: a row of ../shared/spec/DIFFERENCES.md (1-14) or of docs/differences.md (15 on). Such a case has an
expected-output override here naming its row; it is compared as strictly as the rest. KNOWN_GAPS lists the
cases that still differ and why; any other difference fails, and so does a listed gap that matches.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from conftest import Lab, exe, free_port
from zdut import __version__ as ZDUT_VERSION
from zdut.protocol import AgentInfo, DeviceInfo, LockState
from zdut.terminal.commands import HELP
from zdut.terminal.output import (
    AGENT_LIST,
    COMMAND_DETAIL,
    COMMAND_LIST,
    DEVICE_LIST,
    GENERAL,
    LOCK_RESULT,
    MODULE_OUTPUT,
    Content,
    Output,
    Unlocked,
)

REF = Path(__file__).parent / "data" / "dutctl-outputs"
EXAMPLES = Path(__file__).parent / "data" / "dutctl" / "examples"
REF_BROKER, REF_AGENT1, REF_AGENT2, REF_DEFAULT = "127.0.0.1:39101", "127.0.0.1:39102", "127.0.0.1:39103", \
    "localhost:1024"
STDIN = {"07-server-device2-repeat": b"hi\nbye now\n", "08-server-device2-repeat-eof-no-terminator": b"hi\nthere\n"}
TIMEOUT_S = 10  # the reference's `timeout 10`; exit status 124 when it fires

# --------------------------------------------------------------------------- normalisation


def normalise(text: str) -> str:
    """What the README says to replace, the same on both sides."""
    text = re.sub(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<TIME>", text)  # RFC 3339, UTC as dutctl writes it
    text = re.sub(r'("ExpiresAt": |expiresat: )[1-9]\d*', r"\1<EXPIRES>", text)
    text = re.sub(r"(?m)^Code Revision \S+ from .* built with go\S+$", "<BUILD>", text)  # Go's build line
    text = re.sub(r"(?m)^Python \d+\.\d+\.\d+\S*$", "<BUILD>", text)  # zdut's in its place (row 18)
    return re.sub(r"unknown-[0-9a-f]{8}", "<IDENTITY>", text)


@dataclass(frozen=True)
class Result:
    stdout: str
    stderr: str
    rc: int


def reference(name: str) -> Result:
    read = (REF / name).with_suffix
    return Result(normalise(read(".stdout").read_text()), normalise(read(".stderr").read_text()),
                  int(read(".rc").read_text()))


# --------------------------------------------------------------------------- documented differences

LOCKED_5M = '✓ Device "device1" locked by "alice@example" for 5m\n'
LOCKED_BY_ALICE = '✗ device "device1" is locked by "alice@example" for 5m\n'
#: The agents' names at the broker (``--name``; by default HOST:PORT of the direct address).
NAME1, NAME2 = "agent1", "agent2"
AGENT1, AGENT2 = f"(agent {NAME1}, online)", f"(agent {NAME2}, online)"


def json_devices(*records: str) -> str:
    body = ",\n".join(records)
    return f'{{\n  "contentType": "device-list",\n  "data": [\n{body}\n  ],\n  "timestamp": "<TIME>"\n}}\n'


def json_device(name: str, agent: str) -> str:
    return (f'    {{\n      "Name": "{name}",\n      "Locked": false,\n      "Owner": "",\n      "ExpiresAt": 0,\n'
            f'      "Agent": "{agent}",\n      "Online": true\n    }}')


def yaml_device(name: str, agent: str) -> str:
    return (f'    - name: {name}\n      locked: false\n      owner: ""\n      expiresat: 0\n'
            f'      agent: {agent}\n      online: true\n')


def version_block(title: str, trailing: str) -> str:
    return f"{title}\nVersion: {ZDUT_VERSION}\n<BUILD>\n{trailing}"


@dataclass(frozen=True)
class Documented:
    """What zdut prints instead of dutctl's bytes, by a documented row; None keeps dutctl's."""

    row: int
    stdout: str | None = None
    stderr: str | None = None
    rc: int | None = None

    def apply(self, ref: Result) -> Result:
        return Result(ref.stdout if self.stdout is None else self.stdout,
                      ref.stderr if self.stderr is None else self.stderr, ref.rc if self.rc is None else self.rc)


#: Case -> the documented difference it shows. Rows 1-14: ../shared/spec/DIFFERENCES.md; 15 on:
#: docs/differences.md. Several rows can meet in one case; the row named is the one the override is for,
#: the docstring of each override lists the others.
DOCUMENTED: dict[str, Documented] = {
    # 15: zdut's own help (its commands and flags), on stdout.
    "01-help": Documented(15, stdout=HELP, stderr=""),
    # 18: zdut names itself and its version; Python's version in place of Go's build line.
    "02-version": Documented(18, stdout=version_block("zdut client", "\n")),
    # 16 + 17: a broker's list names each device's agent and its state, and carries no proxy warning.
    "03-server-list": Documented(16, stdout=f"- device1 {AGENT1}\n- device2 {AGENT2}\n", stderr=""),
    # 28: the config's desc of each command beside its name, and leading its help.
    "04-server-device1": Documented(28, stdout="- status  Report status\n"),
    "06-server-device1-status-help": Documented(
        28, stdout="Report status\n\nThis dummy module prints status information about itself and the environment.\n"),
    # 7: stdin EOF reaches the module, which ends: dummy-repeat fails with "EOF" (dutctl-reference.md, 3).
    "08-server-device2-repeat-eof-no-terminator": Documented(7, stderr="✗ module failed: EOF\n", rc=1),
    # 5: lock and unlock work through the broker as directly (calls 16-20).
    "10-server-device1-lock": Documented(5, stdout=LOCKED_5M, stderr="", rc=0),
    "11-server-list-while-locked": Documented(
        5, stdout=f'- device1 [locked by "alice@example" for 5m] {AGENT1}\n- device2 {AGENT2}\n', stderr=""),
    "12-server-device1-status-by-other-user": Documented(5, stdout="", stderr=LOCKED_BY_ALICE, rc=1),
    "13-server-device1-unlock": Documented(5, stdout='✓ Device "device1" unlocked\n', stderr="", rc=0),
    # 16 + 17.
    "21-server-json-list": Documented(
        16, stdout=json_devices(json_device("device1", NAME1), json_device("device2", NAME2)), stderr=""),
    "22-server-yaml-list": Documented(
        16, stdout=("---\ncontentType: device-list\ndata:\n" + yaml_device("device1", NAME1)
                    + yaml_device("device2", NAME2) + 'timestamp: "<TIME>"\n\n'), stderr=""),
    # 17 only: the oneline token of a device carries no agent.
    "23-server-oneline-list": Documented(17, stderr=""),
    # 19: zdut's words for an unreachable server (no Go dial error, no "dutagent").
    "26-default-addr-json-list": Documented(19, stderr=(
        '{\n  "contentType": "general",\n  "data": "cannot reach zdut server at localhost:1024 (connection refused)",'
        '\n  "error": true,\n  "timestamp": "<TIME>"\n}\n')),
    # 18, for the agent.
    "27-agent-version": Documented(18, stdout=version_block("zdut agent", "")),
}

#: Cases that still differ, and what would fix each (in files other than output.py and answers.py).
KNOWN_GAPS: dict[str, str] = {}


# --------------------------------------------------------------------------- the replay


@dataclass
class Addresses:
    broker: str
    agent1: str
    agent2: str
    default: str

    def to_ours(self, text: str) -> str:
        for ref, ours in self._pairs():
            text = text.replace(ref, ours)
        return text

    def to_reference(self, text: str) -> str:
        for ref, ours in self._pairs():
            text = re.sub(re.escape(ours) + r"\b", ref, text)
        return text

    def _pairs(self) -> list[tuple[str, str]]:
        return [(REF_BROKER, self.broker), (REF_AGENT1, self.agent1), (REF_AGENT2, self.agent2),
                (REF_DEFAULT, self.default)]


def replay(lab: Lab, name: str, addrs: Addresses, env: dict[str, str]) -> Result:
    words = shlex.split(addrs.to_ours((REF / name).with_suffix(".cmd").read_text()))
    if words[:2] == ["timeout", str(TIMEOUT_S)]:
        words = words[2:]
    program = {"dutctl": "zdut", "dutagent": "zdut-agent"}[words[0]]
    stdin = STDIN.get(name)
    try:
        r = subprocess.run([exe(program), *words[1:]], input=stdin, stdin=None if stdin else subprocess.DEVNULL,
                           capture_output=True, timeout=TIMEOUT_S, cwd=lab.tmp, env=env)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or b"", exc.stderr or b"", 124
    def text(b: bytes) -> str:
        return normalise(addrs.to_reference(b.decode(errors="backslashreplace")))

    return Result(text(out), text(err), rc)


def dead_address() -> str:
    """A loopback port nobody listens on, standing in for dutctl's default localhost:1024."""
    return f"localhost:{free_port()}"


def test_reference_cases_replayed_byte_for_byte(lab: Lab) -> None:
    names = sorted(p.stem for p in REF.glob("*.cmd"))
    assert len(names) == 27 and set(DOCUMENTED) <= set(names) and set(KNOWN_GAPS) <= set(names)
    _, broker = lab.broker()
    port1, port2 = free_port(), free_port()
    lab.brokered_agent(EXAMPLES / "config-1.yaml", broker, port1, "--name", NAME1)
    lab.brokered_agent(EXAMPLES / "config-2.yaml", broker, port2, "--name", NAME2)
    addrs = Addresses(broker, f"127.0.0.1:{port1}", f"127.0.0.1:{port2}", dead_address())
    # As the reference ran: $USER unset, UTC, the default server where nothing listens.
    env = {k: v for k, v in lab.env.items() if k != "USER"} | {"TZ": "UTC", "ZDUT_SERVER": addrs.default,
                                                                "COLUMNS": "80"}
    env.pop("NO_COLOR", None)

    differ: dict[str, str] = {}
    for name in names:
        doc = DOCUMENTED.get(name)
        expected = doc.apply(reference(name)) if doc else reference(name)
        got = replay(lab, name, addrs, env)
        if got != expected:
            differ[name] = "\n".join(
                f"  {what}: expected {exp!r}\n  {' ' * len(what)}       got {act!r}"
                for what, exp, act in (("stdout", expected.stdout, got.stdout), ("stderr", expected.stderr, got.stderr),
                                       ("rc", expected.rc, got.rc)) if exp != act)
    unexpected = {n: d for n, d in differ.items() if n not in KNOWN_GAPS}
    fixed = sorted(set(KNOWN_GAPS) - set(differ))
    report = "".join(f"\n{n}{' (row ' + str(DOCUMENTED[n].row) + ')' if n in DOCUMENTED else ''}:\n{d}"
                     for n, d in unexpected.items())
    assert not unexpected, f"zdut differs from dutctl's bytes:{report}"
    assert not fixed, f"these known gaps match now; drop them from KNOWN_GAPS: {fixed}"


def test_every_override_names_a_documented_row() -> None:
    """Each override's row exists: 1-14 in ../shared/spec/DIFFERENCES.md, 15 on in docs/differences.md."""
    ours = (Path(__file__).parent.parent / "docs" / "differences.md").read_text()
    rows = {int(m) for m in re.findall(r"(?m)^\| (\d+) \|", ours)}
    assert min(rows) == 15 and rows == set(range(15, max(rows) + 1)), rows
    for name, doc in DOCUMENTED.items():
        assert 1 <= doc.row <= 14 or doc.row in rows, (name, doc.row)


# --------------------------------------------------------------------------- machine formats agree

LOCK = LockState("alice@example", 1_700_000_000, 1_800_000_000)
DEVICES = [(DeviceInfo("device1", LOCK, "agent1", True), True),
           (DeviceInfo("device2", None, "agent2", False, "no chip"), True)]
AGENTS = [AgentInfo("agent1", ["device1"], True, 1_700_000_000.0, "0.1.0", "127.0.0.1:1"),
          AgentInfo("agent2", ["device2"], False, 1_700_000_000.0, "0.1.0", "", {"device2": "no chip"})]
#: Every character that is not a plain letter somewhere, and strings YAML 1.1 would read as something else.
AWKWARD = ["", " lead", "trail ", "a: b", "- x", "#c", "true", "no", "~", "null", "0x1f", "1e3", "12:30", "2026-12-01",
           "two\nlines\n", "no newline\nat end", "blank\n\n\nlines\n\n", "tab\tand\rcr\n", "\x1b[31mred\x1b[0m\n",
           "nel\x85 ls\u2028 ps\u2029 bom\ufeff del\x7f c1\x9b", "quote \" and \\ backslash", "é 日本 🎉\n",
           "".join(map(chr, range(0x2100))) + "\U0010fffd"]


def emitted(fmt: str, *contents: Content) -> str:
    out, err = io.StringIO(), io.StringIO()
    o = Output(fmt, stdout=out, stderr=err)
    for c in contents:
        o.emit(c)
    return out.getvalue() + err.getvalue()


def test_yaml_is_yaml_v3_shaped_and_reads_back() -> None:
    """4-space indent, sequences indented under their key, "" for empty, double quotes where needed; every
    string, however awkward, reads back as itself."""
    text = emitted("yaml", Content(DEVICE_LIST, DEVICES))
    assert text.startswith("---\ncontentType: device-list\ndata:\n    - name: device1\n      locked: true\n"), text
    assert '      owner: ""\n' in text and re.search(r'\ntimestamp: "\S+"\n\n$', text), text
    for s in AWKWARD:
        for c in (Content(GENERAL, s), Content(COMMAND_LIST, [s, s]), Content(MODULE_OUTPUT, s.encode())):
            assert yaml.safe_load(emitted("yaml", c))["data"] in (s, [s, s]), repr(s)


def test_json_is_go_shaped_and_reads_back() -> None:
    """json.MarshalIndent's bytes: 2-space indent, UTF-8 as is, HTML characters and U+2028/9 escaped."""
    text = emitted("json", Content(GENERAL, "<a> & b \u2028 é"))
    assert '  "data": "\\u003ca\\u003e \\u0026 b \\u2028 é",\n' in text, text
    for s in AWKWARD:
        assert json.loads(emitted("json", Content(MODULE_OUTPUT, s.encode())))["data"] == s, repr(s)


def test_yaml_uses_one_key_spelling_for_devices_agents_and_locks() -> None:
    """YAML lowercases the Go field names of every record type alike; JSON keeps them alike."""
    docs = [yaml.safe_load(emitted("yaml", c)) for c in (
        Content(DEVICE_LIST, DEVICES), Content(AGENT_LIST, AGENTS), Content(LOCK_RESULT, ("device1", LOCK)),
        Content(LOCK_RESULT, Unlocked("device1", "bob", 2)))]
    records = [rec for doc in docs for rec in (doc["data"] if isinstance(doc["data"], list) else [doc["data"]])]
    keys = {k for rec in records for k in rec}
    assert keys and all(k == k.lower() for k in keys), keys
    jdocs = [json.loads(emitted("json", c)) for c in (Content(DEVICE_LIST, DEVICES), Content(AGENT_LIST, AGENTS))]
    jkeys = {k for doc in jdocs for rec in doc["data"] for k in rec}
    assert {k.lower() for k in jkeys} <= keys and all(k[0].isupper() for k in jkeys), jkeys


def test_lock_and_unlock_are_records_in_json() -> None:
    """Both are lock-result records with a device-list record's keys (row 21), not sentences."""
    locked = json.loads(emitted("json", Content(LOCK_RESULT, ("device1", LOCK))))
    unlocked = json.loads(emitted("json", Content(LOCK_RESULT, Unlocked("device1"))))
    broke = json.loads(emitted("json", Content(LOCK_RESULT, Unlocked("device1", "bob", 2))))
    assert locked["contentType"] == unlocked["contentType"] == broke["contentType"] == LOCK_RESULT
    assert locked["data"] == {"Name": "device1", "Locked": True, "Owner": "alice@example", "ExpiresAt": 1_800_000_000}
    assert unlocked["data"] == {"Name": "device1", "Locked": False, "Owner": "", "ExpiresAt": 0}
    assert broke["data"] == {**unlocked["data"], "Broke": "bob", "Cancelled": 2}
    listed = json.loads(emitted("json", Content(DEVICE_LIST, [(DEVICES[0][0], False)])))["data"][0]
    assert set(listed) == set(locked["data"])
    assert emitted("text", Content(LOCK_RESULT, Unlocked("device1"))) == '✓ Device "device1" unlocked\n'
    assert emitted("text", Content(LOCK_RESULT, Unlocked("device1", "bob", 2))) == (
        '✓ Device "device1" unlocked: broke the lock of "bob", cancelled 2 running sessions\n')
    oneline = emitted("oneline", Content(LOCK_RESULT, Unlocked("d", "bob")))
    assert oneline.endswith(",lock-result,INFO,d=unlocked;broke:bob\n"), oneline


def test_oneline_is_one_line_per_record() -> None:
    """Whatever a record holds, it is one line (row 20); the escapes are C's and reversible."""
    for s in AWKWARD:
        for c in (Content(MODULE_OUTPUT, s.encode()), Content(COMMAND_DETAIL, s), Content(GENERAL, s, True),
                  Content(COMMAND_LIST, [s, "x"])):
            line = emitted("oneline", c)
            assert line.endswith("\n") and line.count("\n") == 1 and "\r" not in line, (repr(s), line)
            assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in line[:-1]), repr(line)
    field = next(csv.reader([emitted("oneline", Content(GENERAL, "a\\n\nb\tc\x1b"))[:-1]]))[3]
    assert field == "a\\\\n\\nb\\tc\\x1b", field


def test_timestamps_are_go_rfc3339() -> None:
    """``Z`` in UTC as Go writes it, ``+hh:mm`` elsewhere, whole seconds."""
    env = {**os.environ, "TZ": "UTC"}
    code = "from zdut.terminal.output import rfc3339; print(rfc3339(1796156264))"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout == "2026-12-01T20:17:44Z\n"
    env["TZ"] = "Europe/Berlin"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout == "2026-12-01T21:17:44+01:00\n"


def test_unlock_through_the_cli_is_a_record_in_json(lab: Lab) -> None:
    _, addr = lab.agent(EXAMPLES / "config-1.yaml")
    assert lab.zdut("-s", addr, "-u", "alice", "device1", "lock", "5m").returncode == 0
    r = lab.zdut("-s", addr, "-u", "alice", "-f", "json", "device1", "unlock")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["contentType"] == LOCK_RESULT, doc
    assert doc["data"] == {"Name": "device1", "Locked": False, "Owner": "", "ExpiresAt": 0}, doc
