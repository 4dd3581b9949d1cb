"""The ``zdut`` command language both front ends speak: dutctl's grammar, flags, output formats, exit codes.

``Cli`` plans and runs one command line on a connected client; the one-shot ``zdut`` (``zdut.cli``) runs one
per process, ``zdut shell`` one per prompt line on its lasting connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from zdut.client import Client, Run, RunHandler
from zdut.common import flags
from zdut.common.durations import format_duration, lock_seconds
from zdut.protocol import STDERR, VERSION, ZdutError
from zdut.terminal.console import attach
from zdut.terminal.output import (
    AGENT_LIST,
    COMMAND_DETAIL,
    COMMAND_LIST,
    DEVICE_LIST,
    FILE_TRANSFER,
    FORMATS,
    GENERAL,
    LOCK_RESULT,
    MODULE_OUTPUT,
    VERSION_T,
    Content,
    Output,
    human_size,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_SERVER = "localhost:1024"
LONG_LOCK_S = 8 * 3600
PROGRESS_MIN_BYTES = 16 * 1024 * 1024
#: How long the agent gets to confirm a cancel (Ctrl-C, Ctrl-]) before we stop waiting.
CANCEL_GRACE_S = 3.0

#: A planned command line, to run on a connected client.
Action = Callable[[Client], Awaitable[int]]

SYNOPSIS = """SYNOPSIS
    zdut [options] [list]
    zdut [options] agents
    zdut [options] forget <agent>
    zdut [options] <device>
    zdut [options] <device> <command> [args...]
    zdut [options] <device> <command> help
    zdut [options] <device> lock [duration]
    zdut [options] <device> unlock [force]
    zdut [options] shell
    zdut version
"""

OPTIONS = """OPTIONS
    -s ADDR        server (zdut-broker or zdut-agent) as host:port or tcp://host:port
                   (default $ZDUT_SERVER, else localhost:1024)
    -f FORMAT      output format: text (default), json, yaml, oneline (alias csv)
    -v             verbose: include metadata (server, device, command) in the output
    --no-color     disable colours (they are only used on a terminal anyway)
    -u USER        identity for locks and runs (default $USER@hostname)
    --log LEVEL    client log: warn (default, summary at exit), debug (live), none
    -h, --help     show this help
"""

HELP = f"""zdut - reach lab devices (serial consoles, power, flashers, GPIO, IPMI) by name.

{SYNOPSIS}
DESCRIPTION
    Without arguments, or with `list`, lists the devices the server knows and their locks.
    `agents` lists the agents behind a broker; `forget` drops an offline agent and its devices
    from a broker (and its state file), so that a device locked there can move to another agent.
    With a device, lists its commands; with a
    command, runs it: output streams as it arrives, stdin is forwarded (raw mode on a terminal
    for interactive commands; Ctrl-] detaches), and files the command names are transferred.
    `help` after a command shows its usage. `lock` reserves a device (default 30m, Go duration
    syntax such as 1h30m); `unlock force` breaks anyone's lock and cancels their sessions on
    the device. Flags go before the device.
    Exit status: 0 success, 1 error, 2 bad flag, 130 interrupted.

{OPTIONS}"""


class UsageError(Exception):
    """A flag problem (exit 2)."""


@dataclass
class Options:
    server: str = field(default_factory=lambda: os.environ.get("ZDUT_SERVER") or DEFAULT_SERVER)
    fmt: str = "text"
    verbose: bool = False
    no_color: bool = False
    user: str | None = None
    log: str = "warn"
    help: bool = False


_VALUE_FLAGS = {"s": "server", "f": "fmt", "u": "user", "log": "log"}
_BOOL_FLAGS = {"v": "verbose", "no-color": "no_color", "h": "help", "help": "help"}


def parse_flags(argv: list[str]) -> tuple[Options, list[str]]:
    """Go ``flag`` style: flags (``-x``, ``--x``, ``-x=v``) only before the first positional."""
    try:
        parsed = flags.parse_flags(argv, _BOOL_FLAGS, _VALUE_FLAGS)
    except flags.FlagError as exc:
        raise UsageError(str(exc)) from None
    opts = Options()
    for name, on in parsed.switches.items():
        setattr(opts, _BOOL_FLAGS[name], on)
    for name, value in parsed.values.items():
        setattr(opts, _VALUE_FLAGS[name], value)
    if opts.fmt not in FORMATS and opts.fmt != "":
        raise UsageError(f'invalid value "{opts.fmt}" for flag -f: want text, json, yaml, oneline or csv')
    opts.fmt = opts.fmt or "text"
    if opts.log not in ("debug", "warn", "none"):
        raise UsageError(f'invalid value "{opts.log}" for flag -log: want debug, warn or none')
    return opts, parsed.rest


class Warnings:
    """dutctl's client log: buffered warnings (summary at exit), live debug lines, or nothing."""

    def __init__(self, level: str, out: Output) -> None:
        self.level, self.out = level, out
        self.items: list[str] = []

    def warn(self, text: str) -> None:
        if self.level == "debug":
            self.out.err.write(f"WARN {text}\n")
        elif self.level == "warn":
            self.items.append(text)

    def debug(self, text: str) -> None:
        if self.level == "debug":
            self.out.err.write(f"DEBUG {text}\n")

    def flush(self) -> None:
        if self.items:
            self.out.err.write(self.out._paint("\x1b[33m", f"⚠ {len(self.items)} warning(s) during run:") + "\n")
            for item in self.items:
                self.out.err.write(f"  - {item}\n")
            self.items.clear()


class Printer:
    """Writes run output on a thread, so a slow terminal or pipe never stalls the session's
    event loop (keepalives go on); credit returns only once the bytes are written."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Callable[[], object] | None] | None] = (
            queue.SimpleQueue())
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="zdut-output", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], object], done: Callable[[], object] | None = None,
               fd: int | None = None, size: int = 0) -> None:
        """Queue ``write``; small writes to an fd that can take them now are done inline (no thread hop,
        which is most of a console echo's latency), as long as nothing is queued before them."""
        if fd is not None and size <= select.PIPE_BUF and self._pending == 0 and _writable(fd):
            with contextlib.suppress(Exception):
                write()
            if done is not None:
                done()
            return
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put((write, done))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            write, done = item
            with contextlib.suppress(Exception):
                write()
            if done is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(done)
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def drain(self, timeout: float = 30.0) -> None:
        self._idle.wait(timeout)

    def stop(self) -> None:
        self.drain()
        self._queue.put(None)


def _writable(fd: int) -> bool:
    try:
        return bool(select.select([], [fd], [], 0)[1])
    except (OSError, ValueError):
        return False


class CliRunHandler(RunHandler):
    """Prints a Run's output as it arrives, in the chosen format."""

    def __init__(self, out: Output, printer: Printer, meta: dict[str, str], warnings: Warnings) -> None:
        super().__init__()
        self.out, self.printer, self.meta, self.log = out, printer, meta, warnings
        self._progress_at = 0.0
        self._progress_shown = False
        #: Set after a detach: output still in flight must not land on the restored terminal.
        self.muted = False

    def output(self, stream: int, data: bytes, consumed: Callable[[], None]) -> None:
        if self.muted:
            consumed()
        elif self.out.fmt == "text" and not self.out.verbose:
            to_err = stream == STDERR
            self.printer.submit(lambda: self.out.raw(data, to_err), consumed, self.out.fileno(to_err), len(data))
        else:
            content = Content(MODULE_OUTPUT, data, stream == STDERR, self.meta)
            self.printer.submit(lambda: self.out.emit(content), consumed)

    def transferred(self, direction: str, path: str, size: int) -> None:
        self._clear_progress()
        self.printer.submit(lambda: self.out.emit(Content(FILE_TRANSFER, (direction, path, size), False, self.meta)))

    def progress(self, direction: str, path: str, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES or not self.out.err.isatty() or self.out.fmt != "text":
            return
        now = time.monotonic()
        if now - self._progress_at < 0.1 and done < total:
            return
        self._progress_at = now
        self._progress_shown = True
        arrow = "↑" if direction == "sent" else "↓"
        width = 30
        filled = int(width * done / total) if total else width
        line = f"\r{arrow} {path} [{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1)}% " \
               f"{human_size(done)}/{human_size(total)}"
        self.printer.submit(lambda: (self.out.err.write(line), self.out.err.flush()))

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self._progress_shown = False
            self.printer.submit(lambda: (self.out.err.write("\r\x1b[K"), self.out.err.flush()))

    def warning(self, text: str) -> None:
        self.log.warn(text)


class Cli:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.out = Output(opts.fmt, opts.verbose, False if opts.no_color else None)
        self.log = Warnings(opts.log, self.out)

    def meta(self, msg: str, **extra: str) -> dict[str, str]:
        return {"server": self.opts.server, "msg": msg, **extra} if self.opts.verbose else {}

    def error(self, text: str) -> None:
        self.log.flush()
        self.out.emit(Content(GENERAL, text, True))

    def version(self) -> int:
        self.out.emit(Content(VERSION_T, f"zdut client\nVersion: {VERSION}\nPython {sys.version.split()[0]}\n"))
        return EXIT_OK

    async def execute(self, words: list[str]) -> int:
        """The one-shot command: plan the words, connect, perform, close."""
        if words and words[0] == "version":
            return self.version()
        try:
            action = self.plan(words)
        except UsageError as exc:
            self.error(str(exc))
            self.out.err.write("\n" + SYNOPSIS + "\n" + OPTIONS)
            return EXIT_ERROR
        client = Client(self.opts.server, self.opts.user)
        try:
            try:
                await client.connect()
            except ZdutError as exc:
                self.error(exc.message)
                return EXIT_ERROR
            self.greet(client)
            return await self.perform(action, client)
        finally:
            await client.close()

    def greet(self, client: Client) -> None:
        """Log what the handshake told us (version drift warnings)."""
        for w in client.warnings:
            self.log.warn(w)
        self.log.debug(f"{client.server_role} version: {client.server_version}")

    async def perform(self, action: Action, client: Client) -> int:
        """Run a planned action on a connected client (the CLI's one, or the shell's lasting one);
        a failure is reported, not raised."""
        try:
            code = await action(client)
        except ZdutError as exc:
            self.error(exc.message)
            code = EXIT_ERROR
        self.log.flush()
        return code

    def plan(self, words: list[str]) -> Action:
        """Map the positional words to an action (raises UsageError for a malformed line)."""
        if not words or words[0] == "list":
            if len(words) > 1:
                raise UsageError("list takes no arguments")
            return self._list
        if words[0] == "agents":
            if len(words) > 1:
                raise UsageError("agents takes no arguments")
            return self._agents
        if words[0] == "forget":
            if len(words) != 2:
                raise UsageError("forget takes one argument: the name of an offline agent")
            return lambda c: self._forget(c, words[1])
        device, rest = words[0], words[1:]
        if not rest:
            return lambda c: self._commands(c, device)
        command, args = rest[0], rest[1:]
        if command == "lock":
            if len(args) > 1:
                raise UsageError("lock takes at most one argument: a duration such as 30m or 1h30m")
            return lambda c: self._lock(c, device, args[0] if args else "")
        if command == "unlock":
            if args not in ([], ["force"]):
                raise UsageError('unlock takes nothing or the word "force"')
            return lambda c: self._unlock(c, device, bool(args))
        if args and args[0] == "help":
            if len(args) > 1:
                raise UsageError('"help" must be the only argument after the command')
            return lambda c: self._details(c, device, command)
        return lambda c: self._run(c, device, command, args)

    # ------------------------------------------------------------- unary actions
    async def _list(self, client: Client) -> int:
        devices = await client.list()
        with_agent = client.server_role == "broker"
        self.out.emit(Content(DEVICE_LIST, [(d, with_agent) for d in devices], False, self.meta("List Response")))
        return EXIT_OK

    async def _agents(self, client: Client) -> int:
        agents = await client.agents()
        self.out.emit(Content(AGENT_LIST, agents, False, self.meta("Agents Response")))
        return EXIT_OK

    async def _forget(self, client: Client, agent: str) -> int:
        devices = await client.forget(agent)
        text = f'✓ Agent "{agent}" forgotten, with its devices: {", ".join(devices) or "none"}'
        self.out.emit(Content(GENERAL, self._green(text), False, self.meta("Forget Response", agent=agent)))
        return EXIT_OK

    def _green(self, text: str) -> str:
        return f"\x1b[32m{text}\x1b[0m" if self.out.color and self.out.fmt == "text" else text

    async def _commands(self, client: Client, device: str) -> int:
        cmds = await client.commands(device)
        self.out.emit(Content(COMMAND_LIST, cmds, False, self.meta("Commands Response", device=device)))
        return EXIT_OK

    async def _details(self, client: Client, device: str, command: str) -> int:
        text = await client.details(device, command, "help")
        meta = self.meta("", device=device, command=command)
        if meta:
            meta.pop("msg")
            meta.update(rpc="Details Response", keyword="help")
        self.out.emit(Content(COMMAND_DETAIL, text, False, meta))
        return EXIT_OK

    async def _lock(self, client: Client, device: str, duration: str) -> int:
        seconds = lock_seconds(duration)  # as the Python API reads it
        if seconds > LONG_LOCK_S:
            self.log.warn("requested a long lock duration; release the device when you are done "
                          f"duration={format_duration(seconds)}")
        lock = await client.lock(device, seconds)
        self.out.emit(Content(LOCK_RESULT, (device, lock), False, self.meta("Lock Response", device=device)))
        return EXIT_OK

    async def _unlock(self, client: Client, device: str, force: bool) -> int:
        reply = await client.unlock(device, force)
        text = f'✓ Device "{device}" unlocked'
        if reply.broke:
            text += f': broke the lock of "{reply.broke}"'
            if reply.cancelled:
                text += f", cancelled {reply.cancelled} running session{'s' if reply.cancelled != 1 else ''}"
        self.out.emit(Content(GENERAL, self._green(text), False, self.meta("Unlock Response", device=device)))
        return EXIT_OK

    # ------------------------------------------------------------- Run
    @contextlib.contextmanager
    def interrupts(self, handler: Callable[[], None]) -> Iterator[None]:
        """Route Ctrl-C and SIGTERM to ``handler`` while a Run is open.  The one-shot CLI owns the
        process, so it takes the signals; the shell overrides this with its own dispatch."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, handler)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def stdin_fd(self) -> int | None:
        """The input to forward to a Run, or None for none."""
        try:
            return sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return None

    async def _run(self, client: Client, device: str, command: str, args: list[str]) -> int:
        printer = Printer(asyncio.get_running_loop())
        meta = self.meta("Run Response", device=device, command=command, args=" ".join(args))
        handler = CliRunHandler(self.out, printer, meta, self.log)
        run = client.run(device, command, args, handler)
        interrupted = asyncio.Event()
        def interrupt() -> None:
            interrupted.set()
            run.cancel()

        with self.interrupts(interrupt):
            try:
                interactive = await run.started
                detached = False
                if not run.finished.done():
                    detached = await self._attach(run, interactive)
                if detached:
                    handler.muted = True
                    printer.drain()
                    self.out.err.write("\r\n[detached: remote command cancelled]\r\n")
                    await self._settle(run)
                    return EXIT_OK
                await self._finish(run, interrupted)
            except ZdutError:
                printer.drain()
                if interrupted.is_set():
                    self.error("interrupted")
                    return EXIT_INTERRUPTED
                raise
            finally:
                printer.stop()
        if interrupted.is_set():
            self.error("interrupted")
            return EXIT_INTERRUPTED
        return EXIT_OK

    async def _attach(self, run: Run, interactive: bool) -> bool:
        fd = self.stdin_fd()
        if fd is None:
            await run.close_stdin()
            return False
        return await attach(run, fd, interactive)

    @staticmethod
    async def _settle(run: Run) -> None:
        """Give the agent a moment to confirm a cancel, so that the session ends cleanly."""
        with contextlib.suppress(TimeoutError, ZdutError):
            await asyncio.wait_for(asyncio.shield(run.finished), CANCEL_GRACE_S)

    async def _finish(self, run: Run, interrupted: asyncio.Event) -> None:
        """Wait for Done; after Ctrl-C give the agent a moment to confirm the cancel."""
        if interrupted.is_set():
            await self._settle(run)
            if not run.finished.done():
                return
        await run.wait()
