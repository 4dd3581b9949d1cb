"""The serial module against a simulated boot loader on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import os
import re
import select
import subprocess
import time
from collections.abc import Awaitable

import pytest
from modhelpers import make_module, until

import conftest
from zdut.devices import serial as serial_mod
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.serial import Serial
from zdut.devices.serial_ansi import KEEP_DISPLAY, STRIP_ALL, EscapeFilter
from zdut.devices.serial_expect import Engine, PrintWriter
from zdut.devices.serial_ports import ports_in_use
from zdut.devices.serial_script import parse_args
from zdut.devices.testing import LocalSession
from zdut.protocol import Code

try:
    from standins.bootloader import COLOR, Bootloader, serial_device
except ImportError:  # tests/ imported as a package
    from tests.standins.bootloader import COLOR, Bootloader, serial_device


@pytest.fixture(autouse=True)
def short_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serial_mod, "SEND_DRAIN_S", 0.3)


async def make(port: str, **with_: object) -> Serial:
    return await make_module(Serial, **{"port": port, "delay": "0s", **with_})


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def start(mod: Serial, session: LocalSession, args: list[str]) -> asyncio.Task[None]:
    """Run in the background and wait until the port is open (the module flushes stale input at open)."""
    task = asyncio.create_task(mod.run(session, args))
    await until(lambda: "--- Connected to" in session.text or task.done(), "the connect marker")
    return task


def assert_markers_on_own_lines(text: str) -> None:
    for m in re.finditer(r"--- ", text):
        if text[m.start() :].startswith("--- "):
            assert m.start() == 0 or text[m.start() - 1] == "\n", f"marker not at line start: {text!r}"


# ---------------------------------------------------------------- scripts


def test_send_expect_markers(board: Bootloader) -> None:
    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        await mod.run(session, ["-t", "5s", "--", "send", "version", "expect", r"aarch64-\w+", "expect", "=> "])
        return session

    session = run(main())
    text = session.text
    assert text.startswith(f"--- Connected to {board.path} at 115200 baud ---\n")
    order = [
        '--- [1/3] sent "version" ---\n',
        "U-Boot 2024.01-zdut (Simulated Board)",
        '--- [2/3] matched "aarch64-\\\\w+" ---\n',
        '--- [3/3] matched "=> " ---\n',
        "--- Script completed ---\n",
    ]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions), text
    assert text.endswith("--- Script completed ---\n")
    assert_markers_on_own_lines(text)
    assert board.received == b"version\r"  # send appends the default EOL, CR


def test_autoboot_is_stopped_by_a_key(board: Bootloader) -> None:
    board.autoboot, board.tick = 3, 0.2

    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        task = await start(mod, session, ["-t", "5s", "expect", "Hit any key", "send-raw", " ", "expect", "=> "])
        board.reset()
        await task
        return session

    session = run(main())
    assert "U-Boot 2024.01-zdut" in session.text
    assert '--- [2/3] sent " " ---' in session.text
    assert board.state == "uboot"
    assert "Starting kernel" not in session.text


def test_autoboot_boots_and_drain_shows_reply_to_final_send(board: Bootloader) -> None:
    board.autoboot, board.tick = 2, 0.05
    script = [
        "-t",
        "5s",
        "expect",
        "Starting kernel",
        "expect",
        "login: ",
        "send",
        "root",
        "expect",
        "# ",
        "send",
        "uname",
    ]

    async def main() -> tuple[LocalSession, float]:
        mod = await make(board.path)
        session = LocalSession()
        task = await start(mod, session, script)
        board.reset()
        loop = asyncio.get_running_loop()
        await until(lambda: 'sent "uname"' in session.text, "the final send")
        sent_at = loop.time()
        await task
        return session, loop.time() - sent_at

    session, after_send = run(main())
    text = session.text
    # The board's answer arrives after the last marker: only the post-send drain can show it.
    assert (
        text.index('--- [5/5] sent "uname" ---')
        < text.index("zdut-board 6.1.0")
        < text.index("--- Script completed ---")
    )
    assert after_send >= 0.25  # the drain window (patched to 0.3 s)
    assert board.state == "shell"


def test_expect_timeout_error_text(board: Bootloader) -> None:
    async def main() -> None:
        mod = await make(board.path)
        await mod.run(LocalSession(), ["-t", "200ms", "expect", "never-printed"])

    with pytest.raises(ModuleError) as err:
        run(main())
    assert err.value.message == 'step 1 (expect "never-printed"): timeout of 200ms reached without match'


def test_long_labels_are_truncated(board: Bootloader) -> None:
    async def main() -> None:
        mod = await make(board.path)
        await mod.run(LocalSession(), ["-t", "100ms", "send", "x" * 30, "expect", "abcdefghijklmnopqrstuvwxyz"])

    with pytest.raises(ModuleError) as err:
        run(main())
    assert err.value.message == 'step 2 (expect "abcdefghijklmnopqrst..."): timeout of 100ms reached without match'


def test_send_escapes_and_eol(board: Bootloader) -> None:
    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        await mod.run(session, ["-t", "5s", "send-raw", r"ech\x6f A\\B\tC\r", "expect", r"A\\B\tC\r\n=> "])
        await mod.run(session, ["-t", "5s", "-eol", "crlf", "--", "send", "echo crlf", "expect", "crlf\r\n=> "])
        await mod.run(session, ["-t", "5s", "-eol=lf", "send", "echo lf", "expect", "lf\r\n=> "])
        await mod.run(session, ["-t", "5s", "-eol", "none", "send", "abc", "send-raw", r"\x03", "expect", r"\^C"])
        return session

    run(main())
    assert bytes(board.received) == b"echo A\\B\tC\r" + b"echo crlf\r\n" + b"echo lf\n" + b"abc\x03"


def test_escape_sequences_are_stripped_before_matching(board: Bootloader) -> None:
    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        await mod.run(session, ["-t", "5s", "send", "color", "expect", "green plain text"])
        return session

    session = run(main())
    assert "green plain text" in session.text
    assert "\x1b" not in session.text


def test_keep_escapes_passes_them_through(board: Bootloader) -> None:
    session = LocalSession()

    async def main() -> None:
        mod = await make(board.path)
        await mod.run(session, ["-keep-escapes", "-t", "500ms", "send", "color", "expect", "green plain"])

    with pytest.raises(ModuleError, match="timeout of 500ms reached without match"):
        run(main())
    assert "\x1b[1;32mgreen\x1b[0m" in session.text
    assert "\x1b]0;board title\x07" in session.text


def test_escape_filter_reassembles_split_sequences() -> None:
    f = EscapeFilter(STRIP_ALL)
    pieces = [b"ab\x1b", b"[3", b"1mcd\x1b]0;ti", b"tle\x1b", b"\\ef\x1b(", b"Bgh\x1bP", b"x\x9cij"]
    assert b"".join(f.feed(p) for p in pieces) == b"abcdefghij"
    assert f.feed(COLOR) == b"green plain text\r\n"
    # A CSI interrupted by a new ESC is dropped up to the interrupting byte.
    assert f.feed(b"x\x1b[12\x1b[31my") == b"xy"
    # An unterminated string sequence is not carried forever.
    assert f.feed(b"\x1b]" + b"z" * 20000) == b""
    assert f.remainder == b""


def test_console_escape_policy_keeps_display_sequences() -> None:
    f = EscapeFilter(KEEP_DISPLAY)
    out = f.feed(b"\x1b[1;32mgreen\x1b[0m\x1b[2J\x1b]0;title\x07\x1b[21t\x1bP1$r0m\x1b\\.")
    assert out == b"\x1b[1;32mgreen\x1b[0m\x1b[2J."


async def quiet(deadline: float | None) -> None:
    """A port with nothing to say: until ``deadline`` (loop time), or for ever."""
    if deadline is None:
        await asyncio.Event().wait()
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))


def test_match_window_is_bounded() -> None:
    class FakePort:
        def __init__(self, gap: int) -> None:
            data = b"START" + b"a" * gap + b"END"
            self.chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]

        async def read(self, deadline: float | None = None) -> bytes:
            if not self.chunks:
                await quiet(deadline)
                return b""
            return self.chunks.pop(0)

    async def expect(gap: int) -> bool:
        port = FakePort(gap)
        engine = Engine(port, PrintWriter(LocalSession()), False)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(0.3):
                await engine.read_until(re.compile("STARTa*END"))
        except TimeoutError:
            return False
        return True

    assert run(expect(60_000))
    assert not run(expect(70_000))  # START fell out of the 64 KiB window before END arrived


class ChunkedPort:
    """A port that delivers ``data`` in the given chunk sizes (cycled), then stays quiet."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.chunks: list[bytes] = []
        pos, i = 0, 0
        while pos < len(data):
            self.chunks.append(data[pos : pos + sizes[i % len(sizes)]])
            pos += sizes[i % len(sizes)]
            i += 1
        self.chunks.reverse()

    async def read(self, deadline: float | None = None) -> bytes:
        if not self.chunks:
            await quiet(deadline)
            return b""
        return self.chunks.pop()


def test_expect_matches_across_chunk_boundaries_and_window_cuts() -> None:
    """A prompt split over many reads, after far more output than the window holds, is still found, once."""
    noise = b"x" * (5 * 64 * 1024 + 123)  # cut back several times before the prompt arrives

    async def expect(sizes: list[int]) -> tuple[str, str]:
        port = ChunkedPort(noise + b"login: " + b"after", sizes)
        engine = Engine(port, PrintWriter(LocalSession()), False)  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            await engine.read_until(re.compile(r"(?<=x)login: "))  # the look-behind sees the older output
            rest = engine.buf
            await engine.read_until(re.compile("after"))
        return rest, engine.buf

    for sizes in ([1], [3, 7, 4096], [len(noise) + 3, 1], [65535, 2]):
        rest, after = run(expect(sizes))  # type: ignore[misc]
        assert "login" not in rest and after == ""


def test_monitor_keeps_nothing_it_forwarded() -> None:
    """Monitor mode forwards every byte and keeps none of it (a console that talks for days costs no memory)."""
    data = (b"[ 1.000000] a kernel line\r\n" * 40_000)[: 1 << 20]

    async def main() -> tuple[Engine, LocalSession]:
        session = LocalSession()
        engine = Engine(ChunkedPort(data * 8, [4096]), PrintWriter(session), False)  # type: ignore[arg-type]
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await engine.pump()
        return engine, session

    engine, session = run(main())  # type: ignore[misc]
    assert len(session.text) == 8 * len(data)
    assert engine.buf == ""


# ---------------------------------------------------------------- monitor


def test_monitor_until_timeout_is_a_success(board: Bootloader) -> None:
    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        task = await start(mod, session, ["-t", "500ms"])
        board.say(b"\x1b[33mhello\x1b[0m from the board")
        await until(lambda: "hello from the board" in session.text, "board output")
        await task
        return session

    session = run(main())
    assert session.text.endswith("hello from the board\n--- Connection closed ---\n")


def test_monitor_cancel_closes_the_port_at_once(board: Bootloader) -> None:
    async def main() -> None:
        mod = await make(board.path)
        session = LocalSession()
        task = await start(mod, session, [])
        board.say(b"tick\r\n")
        await until(lambda: "tick" in session.text, "board output")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not ports_in_use()
        # The port is free again: a new session opens it straight away.
        await mod.run(LocalSession(), ["-t", "10ms"])

    run(main())


# ---------------------------------------------------------------- console


def test_console_bridges_stdin_and_output(board: Bootloader) -> None:
    async def main() -> LocalSession:
        mod = await make(board.path)
        session = LocalSession()
        task = await start(mod, session, ["console"])
        session.feed_stdin(b"version\n")
        await until(lambda: b"aarch64" in session.out, "the board's answer")
        session.feed_stdin(b"color\n")
        await until(lambda: b"plain" in session.out, "the colour output")
        session.close_stdin()
        await task
        return session

    session = run(main())
    assert board.received == b"version\ncolor\n"
    out = bytes(session.out)
    assert out.startswith(f"--- Connected to {board.path} at 115200 baud ---\n".encode())
    assert out.endswith(b"\n--- Connection closed ---\n")
    assert b"\x1b[1;32mgreen" in out  # display sequences survive in console mode
    assert b"\x1b]0;" not in out  # the title change does not
    assert Serial.interactive is True


def test_console_alias_and_no_steps() -> None:
    assert parse_args(["-i"]).console
    assert parse_args(["-t", "1s", "console"]).console
    with pytest.raises(ModuleError, match="console mode takes no steps, got 1"):
        parse_args(["console", "send", "x"])


# ---------------------------------------------------------------- port sharing and errors


def test_second_session_gets_busy_error(board: Bootloader, tmp_path: os.PathLike[str]) -> None:
    link = os.path.join(tmp_path, "ttyBOARD")
    os.symlink(board.path, link)

    async def main() -> None:
        first = await make(board.path)
        second = await make(link)  # another command of the device, same port under another name
        session = LocalSession()
        task = await start(first, session, [])
        with pytest.raises(ModuleError) as err:
            await second.run(LocalSession(), ["-t", "10ms"])
        assert err.value.code == Code.FAILED_PRECONDITION
        assert err.value.message == f"serial port {link} is busy (in use by another session)"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await second.run(LocalSession(), ["-t", "10ms"])

    run(main())


def test_missing_device_is_named() -> None:
    async def main() -> None:
        mod = await make("/dev/ttyZDUT-missing")
        await mod.run(LocalSession(), [])

    with pytest.raises(ModuleError) as err:
        run(main())
    assert err.value.message.startswith(
        "failed to open serial port /dev/ttyZDUT-missing: no such device (is the serial adapter plugged in?"
    )
    assert not ports_in_use()


@pytest.mark.parametrize(
    ("with_", "message"),
    [
        ({"port": ""}, "COM port is not set"),
        ({"port": "/dev/x", "delay": "fast"}, 'invalid delay "fast": time: invalid duration "fast"'),
    ],
)
def test_init_errors(with_: dict[str, object], message: str) -> None:
    with pytest.raises(ModuleError) as err:
        Serial(decode_options(Serial, with_))  # the constructor checks them, so the config load fails
    assert err.value.message == message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "failed to parse arguments: flag provided but not defined: -x"),
        (["-t"], "failed to parse arguments: flag needs an argument: -t"),
        (["-t", "soon"], 'failed to parse arguments: invalid value "soon" for flag -t: parse error'),
        (
            ["-keep-escapes=maybe"],
            'failed to parse arguments: invalid boolean value "maybe" for -keep-escapes: parse error',
        ),
        (["---t"], "failed to parse arguments: bad flag syntax: ---t"),
        (["-eol", "cr2"], 'invalid -eol "cr2": want cr, lf, crlf, or none'),
        (["jump"], 'unknown step verb "jump" (want expect, send, or send-raw)'),
        (["expect"], '"expect" requires a pattern argument'),
        (["send", "x", "send-raw"], '"send-raw" requires a data argument'),
        (["send", r"\q"], r'invalid data "\\q": unknown escape "\\q"'),
        (["send", r"\x4"], r'invalid data "\\x4": \x requires two hex digits'),
        (["send", "a\\"], r'invalid data "a\\": trailing backslash'),
    ],
)
def test_argument_errors(args: list[str], message: str) -> None:
    with pytest.raises(ModuleError) as err:
        parse_args(args)
    assert err.value.message == message


def test_argument_parsing() -> None:
    script = parse_args(["--t=1m30s", "-keep-escapes", "--", "expect", "-x", "send", r"\x41"])
    assert script.timeout == 90
    assert script.keep_escapes
    assert [(s.kind, s.src) for s in script.steps] == [("expect", "-x"), ("send", r"\x41")]
    assert script.steps[1].payload == b"A\r"
    with pytest.raises(ModuleError, match=r'^invalid regular expression "\(": '):
        parse_args(["expect", "("])
    assert parse_args([]).steps == []
    # Go's booleans: -x=T/F/TRUE/0...; a boolean never takes the next word
    script = parse_args(["-keep-escapes=F", "--i=TRUE"])
    assert (script.keep_escapes, script.console) == (False, True)
    assert parse_args(["-keep-escapes", "send", "x"]).keep_escapes
    with pytest.raises(ModuleError, match=r"^failed to parse arguments: flag: help requested$"):
        parse_args(["-h"])


def test_help_documents_modes() -> None:
    text = Serial(decode_options(Serial, {"port": "/dev/ttyUSB0"})).help()
    assert 'Configured COM port is "/dev/ttyUSB0" with baud rate 115200' in text
    for word in ("console", "-keep-escapes", "send-raw", "64 KiB", "busy"):
        assert word in text


# ---------------------------------------------------------------- a console that runs for days


def _read_until(fd: int, needle: bytes, timeout: float) -> int:
    """Read the client's output until ``needle`` went by; the number of bytes read."""
    deadline = time.monotonic() + timeout
    tail, seen = b"", 0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        assert chunk, "the client ended early"
        seen += len(chunk)
        if needle in tail + chunk:
            return seen
        tail = chunk[-len(needle) :]
    raise AssertionError(f"{needle!r} not seen after {seen} bytes and {timeout}s")


def _through_monitor(board: Bootloader, client_out: int, size: int, timeout: float) -> float:
    """Flood ``size`` bytes through a running monitor session; seconds until all of it left the client."""
    marker = f"\r\n=== {size} bytes done ===\r\n".encode()
    start = time.monotonic()
    board.flood(size, marker)
    seen = _read_until(client_out, marker, timeout)
    assert seen >= size
    return time.monotonic() - start


@pytest.mark.serial  # compares two timings: run alone, not beside another worker
def test_monitor_streams_200mb_in_linear_time_and_bounded_memory(lab, board: Bootloader) -> None:
    """A chatty console at full pty speed through a real agent and client: the agent keeps nothing beyond what
    it forwards, so 200 MB take about four times as long as 50 MB and the agent stays small."""
    cfg = lab.tmp / "serial.yaml"
    cfg.write_text("version: 0.1.0\ndevices:\n" + serial_device("board", board.path))
    agent, addr = lab.agent(cfg)
    read_fd, write_fd = os.pipe()
    client = subprocess.Popen([conftest.exe("zdut"), "-s", addr, "board", "serial"], stdin=subprocess.DEVNULL,
                              stdout=write_fd, stderr=subprocess.STDOUT, env=lab.env, cwd=lab.tmp)
    os.close(write_fd)
    try:
        _read_until(read_fd, b"--- Connected to", 10)  # the port is open (opening drops what was waiting)
        small = _through_monitor(board, read_fd, 50_000_000, 30)
        large = _through_monitor(board, read_fd, 200_000_000, 60)
        rss = conftest.peak_rss_mb(agent.pid)
    finally:
        client.kill()
        client.wait(5)
        os.close(read_fd)
    print(f"monitor: 50 MB in {small:.2f}s, 200 MB in {large:.2f}s (ratio {large / small:.1f}), "
          f"agent peak RSS {rss:.0f} MB")
    assert rss < 100, f"agent peak RSS {rss:.0f} MB"
    assert large / small < 8, f"50 MB in {small:.2f}s but 200 MB in {large:.2f}s: not linear"
