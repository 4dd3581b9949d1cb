"""The serial module: dutctl's send/expect engine and monitor mode, plus an interactive console.

The port is opened per run (never at init, so the agent starts while the DUT is
off) and only one session may hold it at a time; with ``background: true`` the agent
also reads it while no session does (``serial_background``).  The parts live beside
this file: ``serial_script`` parses the arguments, ``serial_ports`` opens, claims and
reads the port, ``serial_ansi`` filters escape sequences and ``serial_expect`` matches
output.
"""

from __future__ import annotations

import asyncio
import re

import msgspec

from zdut.common.durations import format_duration, parse_duration
from zdut.common.flags import go_quote
from zdut.devices.base import Capture, Module, ModuleError, Session
from zdut.devices.serial_ansi import KEEP_ALL, KEEP_DISPLAY, EscapeFilter
from zdut.devices.serial_background import BackgroundReader
from zdut.devices.serial_expect import Engine, PrintWriter
from zdut.devices.serial_ports import Port, claim_port, os_text
from zdut.devices.serial_script import Script, label, parse_args

DEFAULT_BAUD = 115200
DEFAULT_DELAY = "50ms"
#: How long output keeps flowing after a script's final send (and after console stdin EOF).
SEND_DRAIN_S = 1.0


class SerialOptions(msgspec.Struct, forbid_unknown_fields=True):
    port: str = ""
    baud: int = 0
    delay: str = DEFAULT_DELAY
    #: Keep reading the port into the device's journal (and to its watchers) while no session uses it.
    background: bool = False
    #: Keep what is typed into a console in the device's journal too (off by default: it can hold passwords).
    record_input: bool = False


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
default 50ms; 0s disables), background (true: the agent keeps reading the port while no session uses it,
so what the board prints meanwhile is in the device's journal and replayed to watchers; a session still
gets the port to itself; default false), record_input (true: what is typed into a console goes to the
device's journal too, never to watchers; default false, as it can hold passwords).
"""


class Serial(Module[SerialOptions]):
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

    def __init__(self, options: SerialOptions) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.  There is
        # no init: the port is opened per run, as the DUT (and its USB serial adapter) may be off now.
        if not options.port:
            raise ModuleError("COM port is not set")
        if options.baud < 0:
            raise ModuleError(f"invalid baud rate {options.baud}")
        try:
            delay = options.delay
            self._delay = max(0.0, parse_duration(delay)) if delay else parse_duration(DEFAULT_DELAY)
        except ValueError as exc:
            raise ModuleError(f"invalid delay {go_quote(options.delay)}: {exc}") from None

    @property
    def _baud(self) -> int:
        return self.options.baud or DEFAULT_BAUD

    def has_background(self) -> bool:
        return self.options.background

    async def background(self, capture: Capture) -> None:
        await BackgroundReader(self.options.port, self._baud, capture).run()

    async def run(self, session: Session, args: list[str]) -> None:
        script = parse_args(args)
        path = self.options.port
        loop = asyncio.get_running_loop()
        deadline = loop.time() + script.timeout if script.timeout > 0 else None
        async with claim_port(path):
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
                    raise ModuleError(f"monitor: error reading from serial port: {os_text(exc)}") from None
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
                    raise ModuleError(f"{what}: error reading from serial port: {os_text(exc)}") from None
        except TimeoutError:
            raise ModuleError(f"{what}: timeout of {format_duration(timeout)} reached without match") from None

    async def _send(self, engine: Engine, payload: bytes, what: str, deadline: float | None) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(self._delay)  # lets a console that printed its prompt get ready to read
                try:
                    await engine.write(payload)
                except OSError as exc:
                    raise ModuleError(f"{what}: error writing to serial port: {os_text(exc)}") from None
        except TimeoutError:
            raise ModuleError(f"{what}: context deadline exceeded") from None

    async def _console(self, session: Session, port: Port, script: Script, deadline: float | None) -> None:
        console = _Console(session, port, script.keep_escapes, self.options.record_input)
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

    def __init__(self, session: Session, port: Port, keep_escapes: bool, record_input: bool) -> None:
        self.session = session
        self.port = port
        self.record_input = record_input
        self.filter = EscapeFilter(KEEP_ALL if keep_escapes else KEEP_DISPLAY)
        self.at_line_start = True
        self._breaking: asyncio.Future[None] | None = None

    async def emit(self, data: bytes) -> None:
        if data:
            await self.session.stdout(data)
            self.at_line_start = data.endswith(b"\n")

    async def _from_port(self) -> None:
        try:
            while True:
                await self.emit(self.filter.feed(await self.port.read()))
        except OSError as exc:
            raise ModuleError(f"console: error reading from serial port: {os_text(exc)}") from None

    async def _to_port(self) -> None:
        while data := await self.session.read_stdin():
            if self.record_input:
                self.session.record_input(data)
            try:
                await self.port.write(data)
            except OSError as exc:
                raise ModuleError(f"console: error writing to serial port: {os_text(exc)}") from None

    def _break(self) -> None:
        """The user's Ctrl-] b: a break on the line, said on the console so that it shows when it happened."""
        if self._breaking is not None and not self._breaking.done():
            return  # one at a time
        self._breaking = asyncio.ensure_future(self._send_break())

    async def _send_break(self) -> None:
        await self.port.send_break()
        await self.session.stderr(b"\r\n[zdut: serial break sent]\r\n")  # in the journal and to watchers too

    async def run(self) -> None:
        reader = asyncio.create_task(self._from_port())
        writer = asyncio.create_task(self._to_port())
        self.session.on_break = self._break
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
            self.session.on_break = None
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if self._breaking is not None:
                await asyncio.gather(self._breaking, return_exceptions=True)  # the line is released first
