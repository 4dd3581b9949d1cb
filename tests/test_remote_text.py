"""Issue 12, point 4: every string that came from another process (device, command and agent names, descs and
help texts, lock owners, error texts, versions, failed-init reasons) reaches the victim's terminal with its
control characters escaped, in the CLI (every format), ``zdut __complete`` and the shell.

The hostile peers are an agent whose config names a device, a command and a desc with ESC sequences (OSC title
and clipboard writes, a screen clear), ``\\r`` and a bidi override; a client that locks with such a ``-u``; and
a raw pyzmq agent that registers with a real broker under a lying name, version and failed reason.  The victim
is the real CLI; its stdout and stderr are read as bytes (text mode would turn ``\\r`` into ``\\n``)."""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
import zmq
from hypothesis import given
from hypothesis import strategies as st
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from test_broker_system import Broker, FakeAgent

from conftest import Lab, exe, wait_for
from zdut import protocol as P
from zdut.protocol import DeviceInfo, LockState
from zdut.terminal.commands import Options, Warnings
from zdut.terminal.completion import ShellCompleter
from zdut.terminal.output import Output
from zdut.terminal.safe_text import clean, escape_char, is_unsafe, safe
from zdut.terminal.shell_view import LabView, changes

DEV = "ev\x1b]0;pwned\x07\u202eil"
CMD = "st\x1b[2Jat"
NL_CMD = "x\nlist"  # a newline would make a second completion candidate
DESC = "Report \x1b]52;c;cHduZWQ=\x07 status\r\u2066over"
OWNER = "evil\x1b[2J\x9b31m"
AGENT = "ag\x1b]0;t\x07"
VERSION = "0.9.0\x1b[5m"
REASON = "boom\x1b[2J\r\u202eedoc"
FAILED_DEV = "fd\x1b[31m\u200f"

CONFIG = """\
version: 0.1.0
devices:
  "ev\\e]0;pwned\\a\\u202eil":
    desc: a hostile board
    cmds:
      "st\\e[2Jat":
        desc: "Report \\e]52;c;cHduZWQ=\\a status\\r\\u2066over"
        uses:
          - module: dummy-status
            passthrough: true
      "x\\nlist":
        uses:
          - module: dummy-status
            passthrough: true
  plain:
    cmds:
      status:
        uses:
          - module: dummy-status
            passthrough: true
"""

#: What must never reach a terminal raw: C0 but newline and tab, DEL, C1, bidi and format controls.
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {"\n", "\t"} | set(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")
FORMATS = ("text", "json", "yaml", "oneline")


def inert(text: str) -> bool:
    return not UNSAFE & set(text)


def victim(lab: Lab, *args: str) -> tuple[int, str, str]:
    """The real CLI, its output read as bytes and decoded without newline translation."""
    r = subprocess.run([exe("zdut"), *args], capture_output=True, timeout=30, env=lab.env, cwd=lab.tmp,
                       stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout.decode(errors="surrogateescape"), r.stderr.decode(errors="surrogateescape")


def assert_inert(lab: Lab, *args: str, ok: bool | None = None) -> tuple[str, str]:
    code, out, err = victim(lab, *args)
    assert inert(out), (args, out)
    assert inert(err), (args, err)
    if ok is not None:
        assert (code == 0) == ok, (args, code, out, err)
    return out, err


def all_inert(lab: Lab, calls: list[tuple[tuple[str, ...], bool | None]]) -> None:
    """assert_inert for each (args, ok), four CLI processes at a time: the calls only read, and each is mostly
    an interpreter starting."""
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(assert_inert, lab, *args, ok=ok) for args, ok in calls]:
            future.result()


@pytest.fixture(params=["direct", "brokered"])
def server(request: pytest.FixtureRequest, lab: Lab) -> str:
    config = lab.tmp / "hostile.yaml"
    config.write_text(CONFIG)
    return lab.serve(config, request.param)


def test_hostile_names_descs_help_and_owners_reach_no_terminal_raw(lab: Lab, server: str) -> None:
    s = ("-s", server)
    code, out, err = victim(lab, *s, "-u", OWNER, DEV, "lock", "1h")  # mallory's lock, with a hostile -u
    assert code == 0, (out, err)
    all_inert(lab, [(c, ok) for fmt in FORMATS for c, ok in (
        ((*s, "-f", fmt, "list"), True),
        ((*s, "-f", fmt, "-v", "list"), True),
        ((*s, "-f", fmt, DEV), True),
        ((*s, "-f", fmt, "-v", DEV, CMD, "help"), True),
        ((*s, "-f", fmt, DEV, "lock"), False),  # the error names the owner
        ((*s, "-f", fmt, DEV, "nosuch"), False))])
    out, _ = assert_inert(lab, *s, "list", ok=True)
    assert "- ev\\x1b]0;pwned\\x07\\u202eil" in out and 'locked by "evil\\x1b[2J\\x9b31m"' in out, out
    out, _ = assert_inert(lab, *s, DEV, ok=True)
    assert "- st\\x1b[2Jat  Report \\x1b]52;c;cHduZWQ=\\x07 status\\r\\u2066over\n" in out, out
    assert "- x\\nlist\n" in out, out
    out, _ = assert_inert(lab, *s, DEV, CMD, "help", ok=True)
    assert out.startswith("Report \\x1b]52;c;cHduZWQ=\\x07 status\\r\\u2066over\n\n"), out  # its lines stay
    _, err = assert_inert(lab, *s, DEV, "lock", ok=False)
    assert "evil\\x1b[2J\\x9b31m" in err, err
    # the machine formats still carry the exact values
    listed = json.loads(victim(lab, *s, "-f", "json", "list")[1])["data"]
    assert {"Name": DEV, "Owner": OWNER} in [{"Name": d["Name"], "Owner": d["Owner"]} for d in listed]
    doc = yaml.safe_load(victim(lab, *s, "-f", "yaml", "list")[1])
    assert DEV in [d["name"] for d in doc["data"]]
    assert yaml.safe_load(victim(lab, *s, "-f", "yaml", DEV, CMD, "help")[1])["data"].startswith(DESC)
    # completion: a candidate with a control character is not offered; descs are escaped
    for words in (("",), (DEV, ""), ("plain", "")):
        for kind in ("__complete", "__complete_described"):
            out, _ = assert_inert(lab, kind, *s, *words, ok=True)
            assert "list\n" not in out.replace("\tlist", "") or words == ("",), (kind, words, out)
    assert "plain\n" in victim(lab, "__complete", *s, "")[1]
    assert victim(lab, "__complete", *s, DEV, "")[1] == "lock\nunlock\nhelp\n"  # its own commands are not offered
    # the lock's owner is escaped where it is broken, too
    out, _ = assert_inert(lab, *s, DEV, "unlock", "force", ok=True)
    assert 'broke the lock of "evil\\x1b[2J\\x9b31m"' in out, out


class LyingAgent(FakeAgent):
    """A raw agent that registers under a hostile name and version, with a device whose init 'failed'."""

    def register_msg(self, devices: list[str] | None = None) -> P.Register:
        entries = [P.DeviceEntry(DEV, [P.CommandInfo(CMD, DESC, DESC)]),
                   P.DeviceEntry(FAILED_DEV, [P.CommandInfo("cmd", "")], failed=REASON)]
        return P.Register(VERSION, AGENT, "i1", f"{AGENT}:9", entries, {})


@pytest.fixture
def lying(lab: Lab, ctx: zmq.Context[Any]) -> Iterator[str]:
    broker = Broker(lab, lab.tmp / "broker.sqlite3")
    agent = LyingAgent(ctx, broker.ep, AGENT, [], version=VERSION)
    try:
        assert isinstance(agent.register(), P.Registered)
        addr = broker.ep.removeprefix("tcp://")
        wait_for(lambda: victim(lab, "-s", addr, "agents")[0] == 0, 10, "the broker to answer")
        yield addr
    finally:
        agent.close()


def test_a_lying_agents_name_version_and_failed_reasons_are_escaped(lab: Lab, lying: str) -> None:
    s = ("-s", lying)
    all_inert(lab, [((*s, "-f", fmt, *words), None) for fmt in FORMATS
                    for words in (("agents",), ("list",), ("-v", "agents"), (FAILED_DEV, "cmd"), (DEV,))])
    out, _ = assert_inert(lab, *s, "agents", ok=True)
    assert "- ag\\x1b]0;t\\x07 online" in out and "version 0.9.0\\x1b[5m" in out, out
    assert "fd\\x1b[31m\\u200f (FAILED: boom\\x1b[2J\\r\\u202eedoc)" in out, out
    out, _ = assert_inert(lab, *s, "list", ok=True)
    assert "[FAILED: boom\\x1b[2J\\r\\u202eedoc]" in out and "(agent ag\\x1b]0;t\\x07, online)" in out, out
    info = json.loads(victim(lab, *s, "-f", "json", "agents")[1])["data"][0]
    assert (info["Name"], info["Version"], info["Failed"]) == (AGENT, VERSION, {FAILED_DEV: REASON})


# ------------------------------------------------------------------ the pieces: warnings, the shell


def test_warnings_and_debug_lines_escape_what_the_server_said() -> None:
    out = Output("text", stdout=io.StringIO(), stderr=io.StringIO(), color=False)
    warnings = Warnings("warn", out)
    warnings.warn(f"zdut client 1.0.0 differs from broker {VERSION} (versions not comparable)")
    warnings.flush()
    debug = Warnings("debug", out)
    debug.debug(f"broker version: {VERSION}")
    debug.warn(f"agent said {REASON}")
    err = out.err.getvalue()  # type: ignore[attr-defined]
    assert inert(err) and "broker 0.9.0\\x1b[5m (versions" in err and "DEBUG broker version: 0.9.0\\x1b[5m" in err


@pytest.fixture
def hostile_view() -> LabView:
    later = int(time.time()) + 3600
    return LabView(
        devices={DEV: DeviceInfo(DEV, LockState(OWNER, 1, later), AGENT), "plain": DeviceInfo("plain", None, AGENT)},
        commands={DEV: [CMD, "status"], "plain": [CMD, NL_CMD, "status"]},
        helps={(DEV, CMD): DESC, ("plain", "status"): f"{DESC}\nmore", ("plain", CMD): DESC},
        listed=True,
    )


def completions(view: LabView, text: str, device: str | None = None) -> list[tuple[str, str, str]]:
    completer = ShellCompleter(lambda: view, lambda: device)
    return [(c.text, c.display_text, c.display_meta_text)
            for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_the_shells_completion_menu_shows_no_raw_controls(hostile_view: LabView) -> None:
    for text, device in (("", None), ("e", None), ("use ", None), ("plain ", None), ("", "plain"), ("", DEV),
                         (f"{DEV} ", None)):
        for item in completions(hostile_view, text, device):
            assert all(inert(part) and "\n" not in part for part in item), (text, device, item)
    assert [t for t, _, _ in completions(hostile_view, "plain ")] == ["lock", "status", "unlock"]
    metas = {t: m for t, _, m in completions(hostile_view, "p")}
    assert metas == {"plain ": "device, online"}
    status = completions(hostile_view, "plain st")
    assert status == [("status ", "status", "Report \\x1b]52;c;cHduZWQ=\\x07 status\\r\\u2066over")]


def test_shell_notices_escape_names_and_owners() -> None:
    now = time.time()
    old = {"a": DeviceInfo("a", None, "x")}
    new = {"a": DeviceInfo("a", LockState(OWNER, 1, int(now) + 60), "x"), DEV: DeviceInfo(DEV)}
    notices = changes(old, new, "me", now)
    assert all(inert(n) for n in notices), notices
    assert notices == ["new: ev\\x1b]0;pwned\\x07\\u202eil", 'a locked by "evil\\x1b[2J\\x9b31m"'], notices


def test_the_shells_prompt_and_toolbar_show_no_raw_controls() -> None:
    from zdut.shell import Shell

    shell = Shell(Options(server="127.0.0.1:1"), interactive=False)
    shell.device = DEV
    shell.notice = f"12:00:00 {DEV} unlocked"
    prompt = "".join(text for _, text, *_ in shell.prompt())
    toolbar = "".join(text for _, text, *_ in shell.toolbar())
    assert inert(prompt) and "ev\\x1b]0;pwned" in prompt, prompt
    assert inert(toolbar), toolbar


@given(st.text(alphabet=st.characters(max_codepoint=0x2100))
       | st.text(alphabet="\x00\x1b\n\t\r\x7f\x85\x9f a\u202e\u2028é"), st.booleans())
def test_safe_escapes_exactly_the_characters_is_unsafe_names(text: str, multiline: bool) -> None:
    """safe() searches with one regex (fast on big listings); it must escape exactly what is_unsafe says,
    character by character, keeping newline and tab in a multi-line text."""
    keep = "\n\t" if multiline else ""
    expected = "".join(escape_char(c) if is_unsafe(c) and c not in keep else c for c in text)
    assert safe(text, multiline) == expected
    assert clean(text) == (not any(is_unsafe(c) for c in text))
