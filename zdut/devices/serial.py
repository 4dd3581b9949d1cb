"""The serial module: dutctl's send/expect engine and monitor mode, plus an interactive console.

The port is opened per run (never at init, so the agent starts while the DUT is
off) and read through its file descriptor on the event loop, so cancellation
closes it at once.  A process-wide registry keyed by the port's real path makes
sure two sessions never read one port: the second gets a busy error.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import serial as pyserial

from zdut.common.durations import format_duration, parse_duration
from zdut.devices.base import Module, ModuleError, Session
from zdut.protocol import Code

DEFAULT_BAUD = 115200
DEFAULT_DELAY = "50ms"
#: How far back one expect may reach, in characters of (escape-stripped) output.
MATCH_WINDOW = 64 * 1024
READ_CHUNK = 4096
#: How long output keeps flowing after a script's final send (and after console stdin EOF).
SEND_DRAIN_S = 1.0
#: Cap on a partial escape sequence carried from one read to the next.
MAX_REMAINDER = 4 * READ_CHUNK
MAX_LABEL = 20
CONSOLE_WORD = "console"


class SerialOptions(msgspec.Struct, forbid_unknown_fields=True):
    port: str = ""
    baud: int = 0
    delay: str = DEFAULT_DELAY


# ---------------------------------------------------------------- helpers


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(text: str) -> str:
    """Go's %q for a string: double quotes, backslash escapes, printable Unicode kept."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def label(text: str) -> str:
    """A step's argument as shown in markers and errors: at most 20 characters, then ``...``."""
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL] + "..."


def decode_escapes(text: str) -> bytes:
    r"""``\r \n \t \\ \xNN`` -> bytes; any other escape is an error so that typos surface."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        i += 1
        if i >= len(text):
            raise ValueError("trailing backslash")
        esc = text[i]
        if esc in "rnt\\":
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[esc]
        elif esc == "x":
            digits = text[i + 1 : i + 3]
            if len(digits) < 2:
                raise ValueError(r"\x requires two hex digits")
            if not re.fullmatch(r"[0-9a-fA-F]{2}", digits):
                raise ValueError(rf"invalid \x escape {go_quote(digits)}: invalid syntax")
            out.append(int(digits, 16))
            i += 2
        else:
            raise ValueError(f"unknown escape {go_quote(chr(92) + esc)}")
        i += 1
    return bytes(out)


# ---------------------------------------------------------------- arguments


@dataclass
class Step:
    kind: str  # "expect", "send" or "send-raw"
    src: str
    pattern: re.Pattern[str] | None = None
    payload: bytes = b""


@dataclass
class Script:
    timeout: float = 0.0
    keep_escapes: bool = False
    console: bool = False
    steps: list[Step] = field(default_factory=list)


_EOLS = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n", "none": b""}
_BOOL_FLAGS = ("keep-escapes", "i")
_VALUE_FLAGS = ("t", "eol")
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _parse_flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Go ``flag`` rules: flags first, ``-x``/``--x``/``-x=v``/``-x v``; stops at ``--`` or a non-flag."""
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            i += 1
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise ValueError(f"bad flag syntax: {arg}")
        i += 1
        name, has_value, value = name.partition("=")
        if name in ("h", "help"):
            raise ValueError("flag: help requested")
        if name in _BOOL_FLAGS:
            if has_value and value not in _GO_TRUE + _GO_FALSE:
                raise ValueError(f"invalid boolean value {go_quote(value)} for -{name}: parse error")
            values[name] = "true" if not has_value or value in _GO_TRUE else "false"
        elif name in _VALUE_FLAGS:
            if not has_value:
                if i >= len(args):
                    raise ValueError(f"flag needs an argument: -{name}")
                value, i = args[i], i + 1
            if name == "t":
                try:
                    parse_duration(value)
                except ValueError:
                    raise ValueError(f"invalid value {go_quote(value)} for flag -t: parse error") from None
            values[name] = value
        else:
            raise ValueError(f"flag provided but not defined: -{name}")
    return values, args[i:]


def _parse_steps(tokens: list[str], eol: bytes) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(tokens):
        verb, i = tokens[i], i + 1
        if verb not in ("expect", "send", "send-raw"):
            raise ModuleError(f"unknown step verb {go_quote(verb)} (want expect, send, or send-raw)")
        if i >= len(tokens):
            what = "pattern" if verb == "expect" else "data"
            raise ModuleError(f"{go_quote(verb)} requires a {what} argument")
        arg, i = tokens[i], i + 1
        if verb == "expect":
            try:
                steps.append(Step("expect", arg, pattern=re.compile(arg)))
            except re.error as exc:
                raise ModuleError(f"invalid regular expression {go_quote(arg)}: {exc}") from None
            continue
        try:
            data = decode_escapes(arg)
        except ValueError as exc:
            raise ModuleError(f"invalid data {go_quote(arg)}: {exc}") from None
        steps.append(Step(verb, arg, payload=data + eol if verb == "send" else data))
    return steps


def parse_args(args: list[str]) -> Script:
    try:
        flags, rest = _parse_flags(args)
    except ValueError as exc:
        raise ModuleError(f"failed to parse arguments: {exc}") from None
    eol_name = flags.get("eol", "cr")
    if eol_name.lower() not in _EOLS:
        raise ModuleError(f"invalid -eol {go_quote(eol_name)}: want cr, lf, crlf, or none")
    script = Script(
        timeout=max(0.0, parse_duration(flags["t"])) if "t" in flags else 0.0,
        keep_escapes=flags.get("keep-escapes") == "true",
        console=flags.get("i") == "true",
    )
    if rest and rest[0] == CONSOLE_WORD:
        script.console, rest = True, rest[1:]
    script.steps = _parse_steps(rest, _EOLS[eol_name.lower()])
    if script.console and script.steps:
        raise ModuleError(f"console mode takes no steps, got {len(script.steps)}")
    return script


# ---------------------------------------------------------------- escape sequences

STRIP_ALL, KEEP_DISPLAY, KEEP_ALL = range(3)
_ESC, _ST, _BEL = 0x1B, 0x9C, 0x07
_STRING_INTRODUCERS = b"P]X^_"  # DCS, OSC, SOS, PM, APC


def _string_end(data: bytes, start: int) -> int:
    osc = data[start + 1] == ord("]")
    pos = start + 2
    while pos < len(data):
        byte = data[pos]
        if byte == _ST or (osc and byte == _BEL):
            return pos
        if byte == _ESC:
            if pos + 1 >= len(data):
                return -1
            if data[pos + 1] == ord("\\"):
                return pos + 1
        pos += 1
    return -1


def _csi_end(data: bytes, start: int) -> int:
    pos = start + 2
    while pos < len(data) and 0x30 <= data[pos] <= 0x3F:
        pos += 1
    while pos < len(data) and 0x20 <= data[pos] <= 0x2F:
        pos += 1
    if pos >= len(data):
        return -1
    if not 0x40 <= data[pos] <= 0x7E:
        # A CSI cut short (e.g. by a new ESC): drop what we have, rescan the interrupting byte.
        return pos - 1
    return pos


def _seq_end(data: bytes, start: int) -> int:
    """Index of the last byte of the escape sequence at ``start``, -1 if it is incomplete."""
    if start + 1 >= len(data):
        return -1
    second = data[start + 1]
    if second in _STRING_INTRODUCERS:
        return _string_end(data, start)
    if second == ord("["):
        return _csi_end(data, start)
    pos = start + 1
    while pos < len(data) and 0x20 <= data[pos] <= 0x2F:
        pos += 1
    return pos if pos < len(data) else -1


def _is_display(seq: bytes) -> bool:
    """Sequences that only draw the screen (kept in console mode); not titles, clipboard or window ops."""
    if seq[1] in _STRING_INTRODUCERS:
        return False
    if seq[1] == ord("["):
        return len(seq) > 2 and 0x40 <= seq[-1] <= 0x7E and seq[-1] != ord("t")
    return True


class EscapeFilter:
    """Removes terminal escape sequences from a byte stream, reassembling ones split across reads."""

    def __init__(self, policy: int) -> None:
        self.policy = policy
        self.remainder = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.policy == KEEP_ALL:
            return chunk
        data, self.remainder = self.remainder + chunk, b""
        if _ESC not in data:
            return data
        out = bytearray()
        pos = 0
        while pos < len(data):
            esc = data.find(_ESC, pos)
            if esc < 0:
                out += data[pos:]
                break
            out += data[pos:esc]
            end = _seq_end(data, esc)
            if end < 0:
                self.remainder = data[esc:]
                break
            if self.policy == KEEP_DISPLAY and _is_display(data[esc : end + 1]):
                out += data[esc : end + 1]
            pos = end + 1
        if len(self.remainder) > MAX_REMAINDER:
            self.remainder = b""  # junk, not a sequence: keep memory bounded
        return bytes(out)


# ---------------------------------------------------------------- the port

_registry_lock = threading.Lock()
_open_ports: set[str] = set()


@contextlib.contextmanager
def claim_port(path: str) -> Iterator[None]:
    """Reserve ``path`` (by real path) for this session, or fail with the busy error."""
    key = os.path.realpath(path)
    with _registry_lock:
        if key in _open_ports:
            raise ModuleError(f"serial port {path} is busy (in use by another session)", Code.FAILED_PRECONDITION)
        _open_ports.add(key)
    try:
        yield
    finally:
        with _registry_lock:
            _open_ports.discard(key)


def _open_serial(path: str, baud: int) -> pyserial.Serial:
    if not os.path.exists(path):
        raise ModuleError(
            f"failed to open serial port {path}: no such device (is the serial adapter plugged in? "
            "check 'ls /dev/serial/by-id/' and the 'port' key)"
        )
    try:
        port = pyserial.Serial(port=path, baudrate=baud, timeout=0)
        port.reset_input_buffer()  # stale bytes from an earlier boot must not satisfy an expect
    except pyserial.SerialException as exc:
        code = exc.errno if isinstance(exc.errno, int) else None
        if code in (errno.EACCES, errno.EPERM):
            raise ModuleError(
                f"failed to open serial port {path}: permission denied (add the agent user to the dialout group)"
            ) from None
        raise ModuleError(f"failed to open serial port {path}: {exc}") from None
    return port


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Port:
    """A pyserial port driven through its non-blocking fd on the event loop."""

    def __init__(self, ser: pyserial.Serial) -> None:
        self.ser = ser
        self.fd = ser.fileno()

    @classmethod
    async def open(cls, path: str, baud: int) -> Port:
        task = asyncio.ensure_future(asyncio.to_thread(_open_serial, path, baud))
        try:
            return cls(await asyncio.shield(task))
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().close())
            raise

    async def _ready(self, writing: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if writing:
            loop.add_writer(self.fd, _resolve, fut)
        else:
            loop.add_reader(self.fd, _resolve, fut)
        try:
            await fut
        finally:
            (loop.remove_writer if writing else loop.remove_reader)(self.fd)

    async def read(self) -> bytes:
        """The next bytes from the port; OSError when the device is gone."""
        while True:
            await self._ready(writing=False)
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                # Readable yet empty: the tty was hung up (adapter unplugged, pty closed).
                raise OSError(errno.EIO, "device disconnected (end of file)")
            return data

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._ready(writing=True)

    def close(self) -> None:
        self.ser.close()


def _os_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---------------------------------------------------------------- the engine


class PrintWriter:
    """Serial output to the client as Print text; markers always start on a fresh line."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.at_line_start = True

    async def write(self, text: str) -> None:
        if text:
            await self.session.print(text)
            self.at_line_start = text.endswith("\n")

    async def marker(self, text: str) -> None:
        await self.write(text if self.at_line_start else "\n" + text)


class Engine:
    """Reads the port, tees everything to the client and keeps a rolling window to match against."""

    def __init__(self, port: Port, out: PrintWriter, keep_escapes: bool) -> None:
        self.port = port
        self.out = out
        self.filter = EscapeFilter(KEEP_ALL if keep_escapes else STRIP_ALL)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buf = ""

    async def read_more(self) -> None:
        text = self.decoder.decode(self.filter.feed(await self.port.read()))
        if text:
            await self.out.write(text)
            self.buf += text

    async def read_until(self, pattern: re.Pattern[str]) -> None:
        while True:
            # Check what is already buffered first: output that arrived during an earlier step counts.
            match = pattern.search(self.buf)
            if match:
                self.buf = self.buf[match.end() :]
                return
            if len(self.buf) > MATCH_WINDOW:
                self.buf = self.buf[-MATCH_WINDOW:]
            await self.read_more()

    async def write(self, payload: bytes) -> None:
        await self.port.write(payload)
        self.buf = ""  # the next expect only sees output produced after this send

    async def pump(self) -> None:
        while True:
            await self.read_more()

    async def drain(self, seconds: float) -> None:
        """Show output for a while; read errors end it quietly (the DUT may have just rebooted)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(seconds):
                await self.pump()


# ---------------------------------------------------------------- the module

_HELP = """\
Serial connection to the DUT

ARGUMENTS:
\t[-t <duration>] [-eol cr|lf|crlf|none] [-keep-escapes]                 (monitor: stream output)
\t[-t <duration>] [-keep-escapes] console                                (interactive console)
\t[-t <duration>] [-eol cr|lf|crlf|none] [-keep-escapes] [--] <step>...  (run a step sequence)

\tstep := expect <regex> | send <data> | send-raw <data>

Configured COM port is {port} with baud rate {baud}, send delay {delay}.

Modes, selected by the arguments:
  - MONITOR (no arguments): stream the serial output until the run is cancelled (Ctrl-C) or -t
    elapses (a success), then print "--- Connection closed ---".
  - CONSOLE (the word "console", or -i): an interactive console. Your stdin goes to the port and the
    port's output comes back on stdout, until stdin ends (then output is shown for 1s more), the run
    is cancelled or -t elapses. On a terminal the client offers raw mode so every key reaches the DUT.
    Escape sequences that only draw the screen are kept here so full-screen programs work.
  - STEP SEQUENCE: run the steps in order; the run fails on the first expect that times out.

STEPS:
\texpect <regex>   Wait until the serial output matches the regular expression (Python re syntax,
\t                 which agrees with RE2 for the usual cases). A plain string matches itself; escape
\t                 meta characters (. $ * + ? ( ) [ ] {{ }} ^ | \\) to match them literally.
\tsend <data>      Write <data> followed by the line ending (see -eol) to the port.
\tsend-raw <data>  Write <data> verbatim, with no line ending.

send / send-raw data supports the escapes \\r \\n \\t \\\\ and \\xNN (e.g. \\x03 for Ctrl-C). Each step
value is one argument, so quote values containing spaces. Each send waits the configured delay first.
If the last step is a send, output is shown for 1s more so the DUT's reply is visible.

FLAGS (before the steps):
\t-t <duration>          Global timeout for the whole run (e.g. 30s, 3m); 0 (default) means none.
\t-eol cr|lf|crlf|none   Line ending appended by 'send'. Default: cr.
\t-keep-escapes          Keep terminal escape sequences instead of stripping them from the output.

Terminal escape sequences (cursor moves, colour, queries, titles) are stripped before output is shown
or matched, unless -keep-escapes is given. Matching uses a rolling window of the last 64 KiB of output;
match on distinctive prompts rather than ^/$ anchors. The DUT may echo what you send, so an expect right
after a send can match your own input. Only one session may use the port at a time; another one gets a
"busy" error.

EXAMPLES:
\tmonitor the console:            (no arguments)
\tinteractive console:            console
\twait for a boot marker:         -- expect 'Welcome to'
\tlogin then run a command:       -t 60s -- expect 'login:' send root expect '# ' send reboot
\tstop autoboot:                  -- expect 'Hit any key' send-raw ' ' expect '=> '

with: port (device path, required), baud (default 115200), delay (Go duration before each send,
default 50ms; 0s disables).
"""


class Serial(Module):
    id = "serial"
    Options = SerialOptions
    interactive = True

    def wants_terminal(self, args: list[str]) -> bool:
        """Only the console mode takes keystrokes; scripts and monitor mode keep Ctrl-C as cancel."""
        try:
            return parse_args(args).console
        except ModuleError:
            return False

    def help(self) -> str:
        opts = self.options
        return _HELP.format(port=go_quote(opts.port), baud=opts.baud or DEFAULT_BAUD, delay=opts.delay)

    async def init(self) -> None:
        opts = self.options
        if not opts.port:
            raise ModuleError("COM port is not set")
        if opts.baud < 0:
            raise ModuleError(f"invalid baud rate {opts.baud}")
        try:
            self._delay = max(0.0, parse_duration(opts.delay)) if opts.delay else parse_duration(DEFAULT_DELAY)
        except ValueError as exc:
            raise ModuleError(f"invalid delay {go_quote(opts.delay)}: {exc}") from None
        # The port is opened per run: the DUT (and its USB serial adapter) may be off now.

    @property
    def _baud(self) -> int:
        return self.options.baud or DEFAULT_BAUD

    async def run(self, session: Session, args: list[str]) -> None:
        script = parse_args(args)
        path = self.options.port
        loop = asyncio.get_running_loop()
        deadline = loop.time() + script.timeout if script.timeout > 0 else None
        with claim_port(path):
            port = await Port.open(path, self._baud)
            try:
                if script.console:
                    await self._console(session, port, script, deadline)
                elif not script.steps:
                    await self._monitor(session, port, script, deadline)
                else:
                    await self._steps(session, port, script, deadline)
            finally:
                port.close()

    def _connected(self) -> str:
        return f"--- Connected to {self.options.port} at {self._baud} baud ---\n"

    async def _monitor(self, session: Session, port: Port, script: Script, deadline: float | None) -> None:
        out = PrintWriter(session)
        await out.marker(self._connected())
        engine = Engine(port, out, script.keep_escapes)
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    await engine.pump()
                except OSError as exc:
                    raise ModuleError(f"monitor: error reading from serial port: {_os_text(exc)}") from None
        except TimeoutError:
            pass  # -t elapsed: a normal end for a monitor
        await out.marker("--- Connection closed ---\n")

    async def _steps(self, session: Session, port: Port, script: Script, deadline: float | None) -> None:
        out = PrintWriter(session)
        await out.marker(self._connected())
        engine = Engine(port, out, script.keep_escapes)
        total = len(script.steps)
        for index, step in enumerate(script.steps, 1):
            what = f"step {index} ({'expect' if step.kind == 'expect' else 'send'} {go_quote(label(step.src))})"
            if step.kind == "expect":
                assert step.pattern is not None
                await self._expect(engine, step.pattern, what, script.timeout, deadline)
                await out.marker(f"--- [{index}/{total}] matched {go_quote(label(step.src))} ---\n")
            else:
                await self._send(engine, step.payload, what, deadline)
                await out.marker(f"--- [{index}/{total}] sent {go_quote(label(step.src))} ---\n")
        if script.steps[-1].kind != "expect":
            await engine.drain(SEND_DRAIN_S)  # its own window, not bounded by -t
        await out.marker("--- Script completed ---\n")

    @staticmethod
    async def _expect(
        engine: Engine, pattern: re.Pattern[str], what: str, timeout: float, deadline: float | None
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    await engine.read_until(pattern)
                except OSError as exc:
                    raise ModuleError(f"{what}: error reading from serial port: {_os_text(exc)}") from None
        except TimeoutError:
            raise ModuleError(f"{what}: timeout of {format_duration(timeout)} reached without match") from None

    async def _send(self, engine: Engine, payload: bytes, what: str, deadline: float | None) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(self._delay)  # lets a console that printed its prompt get ready to read
                try:
                    await engine.write(payload)
                except OSError as exc:
                    raise ModuleError(f"{what}: error writing to serial port: {_os_text(exc)}") from None
        except TimeoutError:
            raise ModuleError(f"{what}: context deadline exceeded") from None

    async def _console(self, session: Session, port: Port, script: Script, deadline: float | None) -> None:
        console = _Console(session, port, script.keep_escapes)
        await console.emit(self._connected().encode())
        try:
            async with asyncio.timeout_at(deadline):
                await console.run()
        except TimeoutError:
            pass  # -t elapsed: a normal end
        await console.emit(
            b"--- Connection closed ---\n" if console.at_line_start else b"\n--- Connection closed ---\n"
        )


class _Console:
    """Bridges the session's stdin/stdout and the port until stdin ends."""

    def __init__(self, session: Session, port: Port, keep_escapes: bool) -> None:
        self.session = session
        self.port = port
        self.filter = EscapeFilter(KEEP_ALL if keep_escapes else KEEP_DISPLAY)
        self.at_line_start = True

    async def emit(self, data: bytes) -> None:
        if data:
            await self.session.stdout(data)
            self.at_line_start = data.endswith(b"\n")

    async def _from_port(self) -> None:
        try:
            while True:
                await self.emit(self.filter.feed(await self.port.read()))
        except OSError as exc:
            raise ModuleError(f"console: error reading from serial port: {_os_text(exc)}") from None

    async def _to_port(self) -> None:
        while data := await self.session.read_stdin():
            try:
                await self.port.write(data)
            except OSError as exc:
                raise ModuleError(f"console: error writing to serial port: {_os_text(exc)}") from None

    async def run(self) -> None:
        reader = asyncio.create_task(self._from_port())
        writer = asyncio.create_task(self._to_port())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()
            writer.result()
            # stdin ended: let the answer to the last input arrive before closing.
            await asyncio.wait({reader}, timeout=SEND_DRAIN_S)
            if reader.done():
                reader.result()
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
