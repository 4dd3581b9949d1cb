"""No input makes the client print a traceback (issue 11, point 3).

The real ``zdut`` is run as a subprocess against a real agent and a real broker (with an agent behind it),
started once for the module, with argument vectors built by hypothesis from the real flag set, device and
command names, bytes that are not UTF-8 (argv is bytes: ``os.fsencode`` of surrogate-escaped text), long
strings and many arguments. Whatever it is given, it ends with 0, 1, 2 (or 130/141), a few lines on stderr,
and no "Traceback (most recent call last)".
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CONF, Lab, exe, stuck

Arg = str | bytes
TRACEBACK = b"Traceback (most recent call last)"
EXITS = {0, 1, 2, 130, 141}


class Servers:
    def __init__(self, lab: Lab, agent: str, broker: str) -> None:
        self.lab, self.agent, self.broker = lab, agent, broker

    def run(self, args: list[Arg], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        argv = [exe("zdut"), *(a if isinstance(a, bytes) else os.fsencode(a) for a in args)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.lab.tmp,
                                env={**self.lab.env, "PYTHONFAULTHANDLER": "1"})
        try:
            out, err = proc.communicate(stdin, timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{argv} did not end within 30s: {stuck(proc)}") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    lab = Lab(tmp_path_factory.mktemp("fuzz"))
    try:
        _, agent = lab.agent(CONF / "demo.yaml")
        _, broker = lab.broker()
        lab.brokered_agent(CONF / "demo.yaml", broker)
        yield Servers(lab, agent, broker)
    finally:
        lab.close()


def message_lines(stderr: bytes) -> list[bytes]:
    """stderr without the usage text that follows a usage error, and without blank lines."""
    text = stderr.split(b"\nSYNOPSIS\n", 1)[0]
    return [line for line in text.splitlines() if line.strip()]


def check(r: subprocess.CompletedProcess[bytes], args: list[Arg]) -> None:
    shown = f"{[a[:80] for a in args[:20]]!r} ({len(args)} args): rc={r.returncode}\n{r.stderr[-3000:]!r}"
    assert TRACEBACK not in r.stderr and TRACEBACK not in r.stdout, shown
    assert r.returncode in EXITS, shown
    # A few lines: one message, or one JSON/YAML error record; the live debug log adds its own lines.
    lenient = any(a in ("--log", "-log", "json", "yaml") for a in args)
    assert len(message_lines(r.stderr)) <= (12 if lenient else 3), shown


# ------------------------------------------------------------- the generated argument vectors

# Text that may hold any byte but NUL (argv cannot): non-UTF-8 bytes decode to surrogate escapes.
raw_text = st.binary(max_size=24).map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape"))
long_text = st.integers(1, 70_000).map(lambda n: "a" * n)
some_text = st.one_of(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=16), raw_text)

WORDS = ["list", "agents", "forget", "shell", "version", "help", "device1", "device2", "device3", "nodevice",
         "status", "repeat", "file-transfer", "lock", "unlock", "force", "30m", "1h30m", "0", "-1s", "99999999h",
         "-", "--", "-x"]
FORMATS = ["text", "json", "yaml", "oneline", "csv", ""]
LOGS = ["warn", "none", "debug"]


@st.composite
def servers_flag(draw: st.DrawFn, agent: str, broker: str) -> list[Arg]:
    addr = draw(st.sampled_from([agent, broker]))
    value = draw(st.one_of(
        st.just(addr), st.just(f"tcp://{addr}"), st.just(f"http://{addr}"), st.just(f"http://{addr}/x"),
        st.sampled_from(["localhost:0", "127.0.0.1:65536", "[::1]:1", "host:", ":", "tcp://", "a:b:c"]),
        some_text, long_text))
    return draw(st.sampled_from([["-s", value], [f"--s={value}"]]))


@st.composite
def flags(draw: st.DrawFn, agent: str, broker: str) -> list[Arg]:
    """A few flags of the real set, usually with a meaningful value, sometimes not."""
    out: list[Arg] = draw(st.one_of(st.sampled_from([["-s", agent], ["-s", broker]]), servers_flag(agent, broker)))
    for _ in range(draw(st.integers(0, 3))):
        out += draw(st.one_of(
            st.tuples(st.sampled_from(["-f", "--f"]), st.one_of(st.sampled_from(FORMATS), some_text)).map(list),
            st.tuples(st.sampled_from(["-u", "--u"]), st.one_of(some_text, long_text)).map(list),
            st.tuples(st.sampled_from(["--log", "-log"]), st.one_of(st.sampled_from(LOGS), some_text)).map(list),
            st.sampled_from([["-v"], ["--no-color"], ["-v=false"], ["-v=maybe"], ["-h"], ["--help"], ["-f"],
                             ["--nope"], ["---x"], ["-="]]),
        ))
    return out


@st.composite
def words(draw: st.DrawFn) -> list[Arg]:
    """Device, command and argument words; sometimes a long one, sometimes thousands."""
    word = st.one_of(st.sampled_from(WORDS), some_text)
    out: list[Arg] = draw(st.lists(st.one_of(word, word, word, long_text), max_size=5))
    if draw(st.integers(0, 9)) == 0:
        out += [draw(word)] * draw(st.integers(1, 20_000))
    return out


@pytest.fixture(scope="module")
def argvs(servers: Servers) -> st.SearchStrategy[list[Arg]]:
    return st.tuples(flags(servers.agent, servers.broker), words()).map(lambda t: t[0] + t[1])


def test_generated_command_lines_never_crash(servers: Servers, argvs: st.SearchStrategy[list[Arg]]) -> None:
    @settings(max_examples=int(os.environ.get("ZDUT_FUZZ_EXAMPLES", "120")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argvs)
    def one(args: list[Arg]) -> None:
        check(servers.run(args), args)

    one()


# ------------------------------------------------------------- the cases issue 11 names

NOT_UTF8 = b"\xff\xfe"


@pytest.mark.parametrize("target", ["agent", "broker"])
@pytest.mark.parametrize(("args", "code", "first"), [
    (["-s", "http://localhost:1024", "list"], 2,
     b'invalid value "http://localhost:1024" for flag -s: want host:port or tcp://host:port'),
    (["-s", "http://{addr}/", "list"], 2, b'invalid value "http://'),
    ([NOT_UTF8], 1, b'"\\xff\\xfe" is not valid UTF-8'),
    (["device1", NOT_UTF8], 1, b'"\\xff\\xfe" is not valid UTF-8'),
    (["device1", "status", b"ok", NOT_UTF8], 1, b'"\\xff\\xfe" is not valid UTF-8'),
    (["device2", NOT_UTF8, "help"], 1, b'"\\xff\\xfe" is not valid UTF-8'),
    ([NOT_UTF8, "lock"], 1, b'"\\xff\\xfe" is not valid UTF-8'),
    (["-u", NOT_UTF8, "list"], 2, b'invalid value "\\xff\\xfe" for flag -u: not valid UTF-8'),
    (["-u", NOT_UTF8, "device1", "status"], 2, b'invalid value "\\xff\\xfe" for flag -u: not valid UTF-8'),
    (["-f", NOT_UTF8, "list"], 2, b'invalid value "\\xff\\xfe" for flag -f: want'),
    (["device1", "status", *map(str, range(20_000))], 1, b"request refused: its header of"),
    (["a" * 70_000], 1, b"request refused: its header of"),
    (["device1", "a" * 70_000], 1, b"request refused: its header of"),
    (["-u", "a" * 70_000, "list"], 1, b"request refused: its header of"),
], ids=["http", "http-live", "device", "command", "argument", "help", "lock", "user", "user-run", "format",
        "20000-args", "70k-device", "70k-command", "70k-user"])
def test_named_inputs_get_one_clear_line(servers: Servers, target: str, args: list[Arg], code: int,
                                         first: bytes) -> None:
    addr = servers.agent if target == "agent" else servers.broker
    argv: list[Arg] = [a.replace("{addr}", addr) if isinstance(a, str) else a for a in args]
    if "-s" not in argv:
        argv = ["-s", addr, *argv]
    r = servers.run(argv)
    check(r, argv)
    assert r.returncode == code, r.stderr[-2000:]
    lines = message_lines(r.stderr)
    assert len(lines) == 1 and first in lines[0], r.stderr[-2000:]


def test_shell_fed_the_same_lines_on_stdin(servers: Servers) -> None:
    lines = [NOT_UTF8 + b" status", b"device1 " + NOT_UTF8, b"device1 status " + NOT_UTF8,
             b"device1 status " + b"x " * 20_000, b"a" * 70_000, b"device1 " + b"a" * 70_000,
             b'device1 status "unterminated', b"device1 status \x1b[A \x07", b"http://localhost:1024"]
    for line in lines:
        for addr in (servers.agent, servers.broker):
            r = servers.run(["-s", addr, "shell"], stdin=line + b"\n")
            check(r, ["shell", line])


@pytest.mark.parametrize("target", ["agent", "broker"])
def test_a_request_past_every_frame_cap_is_refused_before_it_is_sent(servers: Servers, target: str) -> None:
    """A 3 MB shell line is over the agent's 1 MiB frame cap: sent, it would only drop the connection ("lost
    connection"); the client refuses it in the servers' own words instead."""
    addr = servers.agent if target == "agent" else servers.broker
    r = servers.run(["-s", addr, "shell"], stdin=b"device1 status " + b"a" * 3_000_000 + b"\n")
    check(r, ["shell", "3 MB line"])
    lines = message_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert b"request refused: its header of 3000" in lines[0] and b"exceeds 65536 bytes" in lines[0], lines


def test_fuzz_servers_survive(servers: Servers) -> None:
    """After everything above, both servers still answer."""
    for addr in (servers.agent, servers.broker):
        r = servers.run(["-s", addr, "device1", "status"])
        assert r.returncode == 0, r.stderr
        assert b"Hello from dummy status module" in r.stdout
