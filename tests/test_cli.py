"""The zdut CLI against real processes: every form and format, directly to an agent and through a broker."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zmq

from conftest import CONF, Lab, wait_for
from zdut import protocol as P
from zdut.terminal.commands import UsageError, parse_flags

DEMO_LINES = "Hello from dummy status module\nCalled with 0 arguments\n"


@pytest.fixture(scope="module", params=["direct", "broker"])
def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, str]]:
    """The three-device demo agent, reached directly or through a broker (same expectations)."""
    lab = Lab(tmp_path_factory.mktemp(request.param))
    try:
        if request.param == "direct":
            _, addr = lab.agent(CONF / "demo.yaml")
        else:
            _, addr = lab.broker()
            lab.brokered_agent(CONF / "demo.yaml", addr)
        yield lab, addr
    finally:
        lab.close()


def unknown_device(demo: tuple[Lab, str], device: str) -> str:
    """What the server says of a device it does not know: dutctl's agent and proxy word it differently."""
    through_broker = demo[0].tmp.name.startswith("broker")
    return f'device "{device}" not found' if through_broker else f'device "{device}": no such device'


def plain(listing: str) -> str:
    """A text device list without the broker's agent column."""
    return re.sub(r" \(agent [^)]*, (online|OFFLINE)\)", "", listing)


def z(demo: tuple[Lab, str], *args: str, **kw: object):
    lab, addr = demo
    return lab.zdut("-s", addr, *args, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ dutctl's demo checks


def test_device1_status(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device1", "status")
    assert r.returncode == 0, r.stderr
    assert r.stdout == DEMO_LINES


def test_device1_status_with_argument(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device1", "status", "hello")
    assert r.stdout == "Hello from dummy status module\nCalled with 1 arguments\nArg 0: hello\n"


def test_device2_status_static_args(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device2", "status")
    assert "Called with 2 arguments\nArg 0: foo\nArg 1: bar\n" in r.stdout


def test_piped_repeat_ends_by_itself(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device2", "repeat", input=b"hi\nbye now\n", timeout=15)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from dummy repeat module!\nEnter one word per line. (Two words will terminate)\nhi\n"
    assert "Oh no! Can only handle one word per line." in r.stderr


def test_piped_repeat_eof_reaches_module(demo: tuple[Lab, str]) -> None:
    """Stdin EOF is a half-close: the module sees EOF and fails as dutctl's does (module failed: EOF)."""
    r = z(demo, "device2", "repeat", input=b"one\ntwo\n", timeout=15)
    assert r.returncode == 1
    assert r.stdout.endswith("one\ntwo\n")
    assert "module failed: EOF" in r.stderr


def test_file_transfer(demo: tuple[Lab, str]) -> None:
    lab, _ = demo
    (lab.tmp / "test.txt").write_text("payload\n")
    r = z(demo, "device3", "file-transfer", "test.txt", "test2.txt")
    assert r.returncode == 0, r.stderr
    out = (lab.tmp / "test2.txt").read_text()
    assert out == "payload\n\n\nprocessed by dummy.FT module\n"
    umask = os.umask(0)
    os.umask(umask)
    assert (lab.tmp / "test2.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # a new file: the umask's mode
    assert '↑ sent "test.txt" (8 B)' in r.stdout
    assert '↓ received "test2.txt" (39 B)' in r.stdout


def test_empty_file_round_trip(demo: tuple[Lab, str]) -> None:
    lab, _ = demo
    (lab.tmp / "empty.bin").write_bytes(b"")
    r = z(demo, "device3", "file-transfer", "empty.bin", "empty-out.bin")
    assert r.returncode == 0, r.stderr
    assert (lab.tmp / "empty-out.bin").read_bytes() == b"\n\nprocessed by dummy.FT module\n"
    assert '↑ sent "empty.bin" (0 B)' in r.stdout


def test_missing_client_file(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device3", "file-transfer", "nope.txt", "out.txt")
    assert r.returncode == 1
    assert 'cannot read "nope.txt"' in r.stderr


# ------------------------------------------------------------------ grammar and output formats


def test_list_is_default(demo: tuple[Lab, str]) -> None:
    a, b = z(demo), z(demo, "list")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout
    assert plain(a.stdout) == "- device1\n- device2\n- device3\n"


def test_commands(demo: tuple[Lab, str]) -> None:
    assert z(demo, "device3").stdout == "- file-transfer  Transfer a file\n- status         Report status\n"


def test_help_passthrough_and_templated(demo: tuple[Lab, str]) -> None:
    assert z(demo, "device1", "status", "help").stdout == (
        "Report status\n\nThis dummy module prints status information about itself and the environment.\n")
    text = z(demo, "device3", "file-transfer", "help").stdout
    assert text.startswith("Transfer a file\n\nCommand with 2 module(s): dummy-status, dummy-ft\n\nArguments:\n"
                           "  source-file:")


def test_help_not_last_is_a_run(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device1", "status", "x", "help")
    assert "Called with 2 arguments\nArg 0: x\nArg 1: help\n" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["list", "x"], "list takes nothing, or --match GLOB"),
        (["list", "--match"], "list takes nothing, or --match GLOB"),
        (["list", "--match", "a", "b"], "list takes nothing, or --match GLOB"),
        (["list", "--match="], "--match wants a glob of device names"),
        (["device1", "lock", "1m", "2m"], "lock takes at most a duration"),
        (["device1", "unlock", "--force"], 'unlock takes nothing or the word "force"'),
        (["device1", "status", "help", "more"], '"help" must be the only argument'),
    ],
)
def test_malformed_command_lines(demo: tuple[Lab, str], args: list[str], message: str) -> None:
    r = z(demo, *args)
    assert r.returncode == 1
    assert message in r.stderr
    assert "SYNOPSIS" in r.stderr


def test_unknown_device_and_command(demo: tuple[Lab, str]) -> None:
    r = z(demo, "nodev")
    assert r.returncode == 1 and r.stderr.strip() == f"✗ {unknown_device(demo, 'nodev')}"
    r = z(demo, "device1", "nocmd")
    assert r.returncode == 1 and 'command "nocmd": no such command' in r.stderr


def test_static_command_rejects_runtime_args(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device2", "status", "x")
    assert r.returncode == 1
    assert "arguments provided but command has neither a passthrough module" in r.stderr


def test_templated_command_needs_exact_count(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device3", "file-transfer", "only-one")
    assert r.returncode == 1 and "expected 2 argument(s) but got 1" in r.stderr


def test_json_output(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-f", "json", "list")
    doc = json.loads(r.stdout)
    assert doc["contentType"] == "device-list"
    assert [d["Name"] for d in doc["data"]] == ["device1", "device2", "device3"]
    first = doc["data"][0]
    assert {k: first[k] for k in ("Name", "Locked", "Owner", "ExpiresAt")} == {
        "Name": "device1", "Locked": False, "Owner": "", "ExpiresAt": 0}
    assert set(first) - {"Name", "Locked", "Owner", "ExpiresAt"} in (set(), {"Agent", "Online"})
    assert "metadata" not in doc and "error" not in doc
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", doc["timestamp"])


@pytest.mark.parametrize(("words", "listed"), [
    (["--match", "device[13]"], ["device1", "device3"]),
    (["--match=device?"], ["device1", "device2", "device3"]),
    (["-m", "device2"], ["device2"]),
    (["--match", "*3"], ["device3"]),
    (["--match", "Device*"], []),  # case-sensitive, as device names are
])
def test_list_match_keeps_the_devices_whose_names_match(demo: tuple[Lab, str], words: list[str],
                                                        listed: list[str]) -> None:
    r = z(demo, "-f", "json", "list", *words)
    assert r.returncode == 0, r.stderr
    assert [d["Name"] for d in json.loads(r.stdout)["data"]] == listed
    assert re.findall(r"^- (device\d)", z(demo, "list", *words).stdout, re.M) == listed


def test_the_server_does_the_filtering(demo: tuple[Lab, str]) -> None:
    """A raw request with a glob gets only the matches back: a 100,000-device lab sends a few, not all."""
    _, addr = demo
    reply = raw_request(addr, P.ListDevices(7, P.VERSION, "tester", "device[23]"))
    assert isinstance(reply, P.DeviceList) and [d.name for d in reply.devices] == ["device2", "device3"]
    reply = raw_request(addr, P.ListDevices(8, P.VERSION, "tester"))  # as a client from before --match asks
    assert isinstance(reply, P.DeviceList) and len(reply.devices) == 3


def test_a_broker_answers_an_unchanged_listing_with_its_number_only(lab: Lab) -> None:
    """The shell polls the whole listing every 2 s naming the generation it holds: until something changes it
    gets no devices back (at 100,000 devices a listing is 3.2 MiB to encode and decode)."""
    _, broker = lab.broker()
    agent = lab.brokered_agent(CONF / "demo.yaml", broker)

    def listing(known: int, at: str = broker) -> P.DeviceList:
        reply = raw_request(at, P.ListDevices(1, P.VERSION, "tester", "", known))
        assert isinstance(reply, P.DeviceList), reply
        return reply

    first = listing(0)
    assert len(first.devices) == 3 and first.generation
    again = listing(first.generation)
    assert again.devices == [] and again.generation == first.generation
    assert lab.zdut("-s", broker, "-u", "alice", "device2", "lock", "5m").returncode == 0
    wait_for(lambda: listing(first.generation).devices, 5, "the listing to change")
    changed = listing(first.generation)
    lock = changed.devices[1].lock
    assert changed.generation != first.generation and lock is not None and lock.owner == "alice"
    assert listing(changed.generation).devices == []
    direct = agent.args[agent.args.index("-a") + 1]  # an agent numbers nothing: always the whole listing
    assert listing(0, direct).generation == 0 and len(listing(first.generation, direct).devices) == 3


def raw_request(addr: str, msg: P.Message) -> P.Message:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(f"tcp://{addr}")
        sock.send(P.encode(msg))
        assert sock.poll(5000), "no answer within 5 s"
        return P.decode(sock.recv(), P.MAX_REPLY_BYTES)


def test_json_run_emits_one_object_per_chunk(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-f", "json", "-v", "device1", "status")
    docs = [json.loads(chunk) for chunk in re.split(r"(?<=\n})\n(?=\{)", r.stdout.strip())]
    assert [d["data"] for d in docs] == ["Hello from dummy status module\n", "Called with 0 arguments\n"]
    assert all(d["contentType"] == "module-output" for d in docs)
    assert docs[0]["metadata"]["device"] == "device1" and docs[0]["metadata"]["msg"] == "Run Response"


def test_json_error(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-f", "json", "nodev")
    doc = json.loads(r.stderr)
    assert doc["error"] is True and doc["data"] == unknown_device(demo, "nodev")


def test_yaml_output(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-f", "yaml", "device3")
    assert r.stdout.startswith("---\n")
    doc = yaml.safe_load(r.stdout)
    assert doc["contentType"] == "command-list" and doc["data"] == ["file-transfer", "status"]
    r = z(demo, "-f", "yaml", "list")
    first = yaml.safe_load(r.stdout)["data"][0]
    assert {k: first[k] for k in ("name", "locked", "owner", "expiresat")} == {
        "name": "device1", "locked": False, "owner": "", "expiresat": 0}


def test_oneline_output(demo: tuple[Lab, str]) -> None:
    for fmt in ("oneline", "csv"):
        line = z(demo, "-f", fmt, "device3").stdout.strip()
        assert re.fullmatch(r"\S+,command-list,INFO,file-transfer\|status", line), line
    line = z(demo, "-f", "oneline", "device1", "status").stdout.splitlines()[0]
    assert line.endswith(',module-output,INFO,"Hello from dummy status module\n') or "Hello from dummy" in line


def test_verbose_text_metadata(demo: tuple[Lab, str]) -> None:
    _, addr = demo
    r = z(demo, "-v", "device1")
    assert r.stdout.startswith(f'# connected to {addr} (Commands Response) device "device1"\n')


def test_unknown_format_is_usage_error(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-f", "xml", "list")
    assert r.returncode == 2 and 'invalid value "xml" for flag -f' in r.stderr


def test_bad_flag_and_log_level(demo: tuple[Lab, str]) -> None:
    assert z(demo, "--bogus").returncode == 2
    r = z(demo, "--log", "loud", "list")
    assert r.returncode == 2 and "-log" in r.stderr


def test_flags_after_device_pass_through(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device1", "status", "-t", "60s", "--")
    assert "Arg 0: -t\nArg 1: 60s\nArg 2: --\n" in r.stdout


@pytest.mark.parametrize(
    ("argv", "verbose", "no_color", "words"),
    [
        (["-v", "list"], True, False, ["list"]),
        (["--v=T", "-no-color=1", "dev"], True, True, ["dev"]),
        (["-v=FALSE", "--no-color", "--", "-dev"], False, True, ["-dev"]),
        (["-v", "false"], True, False, ["false"]),  # a boolean never takes the next word
    ],
)
def test_boolean_flags_follow_go(argv: list[str], verbose: bool, no_color: bool, words: list[str]) -> None:
    opts, rest = parse_flags(argv)
    assert (opts.verbose, opts.no_color, rest) == (verbose, no_color, words)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-v=yes"], 'invalid boolean value "yes" for -v: parse error'),
        (["-s"], "flag needs an argument: -s"),
        (["-x"], "flag provided but not defined: -x"),
        (["---s", "a"], "bad flag syntax: ---s"),
    ],
)
def test_flag_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_flags(argv)
    assert str(err.value) == message


def test_value_flags_take_the_next_word_or_equals() -> None:
    opts, rest = parse_flags(["-s", "-odd:1", "--u=me", "-log", "none", "dev", "-f", "json"])
    assert (opts.server, opts.user, opts.log, opts.fmt, rest) == ("-odd:1", "me", "none", "text", ["dev", "-f", "json"])


def test_help_flag(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-h")
    assert r.returncode == 0 and "SYNOPSIS" in r.stdout and "OPTIONS" in r.stdout and r.stderr == ""


def test_version(demo: tuple[Lab, str]) -> None:
    r = z(demo, "version", "ignored")
    assert r.returncode == 0 and r.stdout.startswith("zdut client\nVersion: ")


def test_unreachable_server_fails_fast(demo: tuple[Lab, str]) -> None:
    lab, _ = demo
    from conftest import free_port

    r = lab.zdut("-s", f"127.0.0.1:{free_port()}", "list", timeout=8)
    assert r.returncode == 1
    assert "cannot reach zdut server at 127.0.0.1:" in r.stderr and "connection refused" in r.stderr


def test_zdut_server_environment(demo: tuple[Lab, str]) -> None:
    lab, addr = demo
    r = lab.zdut("list", env={**lab.env, "ZDUT_SERVER": addr})
    assert r.returncode == 0 and "device1" in r.stdout


# ------------------------------------------------------------------ locks


def test_lock_unlock_between_identities(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-u", "alice", "device1", "lock", "10m")
    assert r.returncode == 0 and r.stdout.strip() == '✓ Device "device1" locked by "alice" for 10m'
    listing = plain(z(demo, "list").stdout)
    assert '- device1 [locked by "alice" for 10m]' in listing
    r = z(demo, "-u", "bob", "device1", "status")
    assert r.returncode == 1 and 'device "device1" is locked by "alice" for 10m' in r.stderr
    r = z(demo, "-u", "bob", "device1", "lock")
    assert r.returncode == 1 and "locked by" in r.stderr
    r = z(demo, "-u", "bob", "device1", "unlock")
    assert r.returncode == 1 and 'locked by "alice"' in r.stderr
    assert z(demo, "-u", "alice", "device1", "status").returncode == 0
    r = z(demo, "-u", "alice", "device1", "lock", "20m")  # same owner extends
    assert "for 20m" in r.stdout
    r = z(demo, "-u", "bob", "device1", "unlock", "force")
    assert r.returncode == 0 and r.stdout.strip() == '✓ Device "device1" unlocked: broke the lock of "alice"'
    assert plain(z(demo, "list").stdout).startswith("- device1\n")
    r = z(demo, "-u", "alice", "device1", "unlock")
    assert r.returncode == 1 and "device \"device1\" is not locked" in r.stderr


def test_lock_duration_errors(demo: tuple[Lab, str]) -> None:
    r = z(demo, "device2", "lock", "abc")
    assert r.returncode == 1 and 'invalid lock duration "abc"' in r.stderr
    r = z(demo, "device2", "lock", "-5m")
    assert r.returncode == 1 and 'lock duration must be positive, got "-5m"' in r.stderr


def test_long_lock_warns(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-u", "carol", "device2", "lock", "9h")
    assert r.returncode == 0
    assert "⚠ 1 warning(s) during run:" in r.stderr and "duration=9h0m0s" in r.stderr
    assert z(demo, "-u", "carol", "device2", "unlock").returncode == 0


def test_lock_json(demo: tuple[Lab, str]) -> None:
    r = z(demo, "-u", "dave", "-f", "json", "device3", "lock", "1m")
    doc = json.loads(r.stdout)
    assert doc["contentType"] == "lock-result"
    assert doc["data"]["Name"] == "device3" and doc["data"]["Owner"] == "dave" and doc["data"]["ExpiresAt"] > 0
    assert z(demo, "-u", "dave", "device3", "unlock").returncode == 0


def test_files_only_named_on_the_command_line(lab: Lab, tmp_path: Path) -> None:
    """An agent cannot read a client file the user did not name (dutctl lets it: zdut refuses): a path the
    config fixes is not a file argument of the run (tests/test_file_args.py has the rest)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    cfg = tmp_path / "steal.yaml"
    cfg.write_text(
        "version: 0.1.0\ndevices:\n  evil:\n    cmds:\n      steal:\n        uses:\n"
        f"          - module: dummy-ft\n            args: [{secret}, loot.txt]\n"
    )
    _, addr = lab.agent(cfg)
    r = lab.zdut("-s", addr, "evil", "steal")
    assert r.returncode == 1
    assert f'refusing to send "{secret}": the command\'s module does not declare it as a file argument' in r.stderr
    assert not (lab.tmp / "loot.txt").exists()
