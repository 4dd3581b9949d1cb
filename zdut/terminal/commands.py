"""The ``zdut`` command language both front ends speak: dutctl's grammar, flags, output formats, exit codes.

``Cli`` plans and runs one command line on a connected client; the one-shot ``zdut`` (``zdut.cli``) runs one
per process, ``zdut shell`` one per prompt line on its lasting connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from glob import escape
from typing import Any

from zdut.brokers import client_order, connect_first
from zdut.client import Client, Run
from zdut.common import flags
from zdut.common.addresses import server_list
from zdut.common.client_config import DEFAULT_SERVER, ClientKeys, default_server
from zdut.common.durations import format_duration, lock_seconds
from zdut.common.watch_args import lock_words, log_query, replay_lines
from zdut.lock_queue import lock_first
from zdut.protocol import JOURNAL, VERSION, WATCH, ZdutError
from zdut.terminal.console import attach
from zdut.terminal.help_text import HELP, OPTIONS, SYNOPSIS  # noqa: F401  HELP: read here by cli.py and tests
from zdut.terminal.output import (
    AGENT_LIST,
    COMMAND_DETAIL,
    COMMAND_LIST,
    DEVICE_LIST,
    FORMATS,
    GENERAL,
    LOCK_RESULT,
    VERSION_T,
    Content,
    Output,
    Unlocked,
)
from zdut.terminal.printer import EXIT_BROKEN_PIPE, CliRunHandler, GuardedOutput, OutputFailed, Printer
from zdut.terminal.safe_text import safe

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
LONG_LOCK_S = 8 * 3600
#: How long the agent gets to confirm a cancel (Ctrl-C, Ctrl-]) before we stop waiting.
CANCEL_GRACE_S = 3.0

#: A planned command line, to run on a connected client.
Action = Callable[[Client], Awaitable[int]]

class UsageError(Exception):
    """A flag problem (exit 2)."""


@dataclass
class Options:
    server: str = DEFAULT_SERVER  # parse_flags settles it: -s, $ZDUT_SERVER, the config file, this
    fmt: str = "text"
    verbose: bool = False
    no_color: bool = False
    user: str | None = None
    log: str = "warn"
    help: bool = False
    version: bool = False
    key: str | None = None
    server_key: str | None = None
    #: What --key and --server-key, the environment and the config file settle on (``zdut.cli.main``).
    keys: ClientKeys | None = None
    #: The same for each server of a list given to -s (each may have its own section in the config file).
    server_keys: dict[str, ClientKeys | None] = field(default_factory=dict)


_VALUE_FLAGS = {"s": "server", "f": "fmt", "u": "user", "log": "log", "key": "key", "server-key": "server_key"}
_BOOL_FLAGS = {"v": "verbose", "no-color": "no_color", "h": "help", "help": "help", "version": "version"}


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
        raise UsageError(f"invalid value {flags.go_quote(opts.fmt)} for flag -f: want text, json, yaml, oneline or csv")
    opts.fmt = opts.fmt or "text"
    if opts.log not in ("debug", "warn", "none"):
        raise UsageError(f"invalid value {flags.go_quote(opts.log)} for flag -log: want debug, warn or none")
    if opts.user is not None and flags.utf8_problem(opts.user):
        raise UsageError(f"invalid value {flags.go_quote(opts.user)} for flag -u: not valid UTF-8")
    if not (opts.help or opts.version) and parsed.rest[:1] not in (["version"], ["help"]):  # none needs a server
        origin = "flag -s"
        if "s" not in parsed.values:
            opts.server, origin = default_server()  # KeyConfigError for a bad config file: main says so
        try:
            server_list(opts.server)
        except ValueError as exc:
            raise UsageError(f"invalid value {flags.go_quote(opts.server)} for {origin}: {exc}") from None
    return opts, parsed.rest


class Warnings:
    """dutctl's client log: buffered warnings (summary at exit), live debug lines, or nothing.  A line may
    quote the server (its version, an agent's warning): its control characters are escaped."""

    def __init__(self, level: str, out: Output) -> None:
        self.level, self.out = level, out
        self.items: list[str] = []

    def warn(self, text: str) -> None:
        if self.level == "debug":
            self.out.err.write(f"WARN {safe(text)}\n")
        elif self.level == "warn":
            self.items.append(safe(text))

    def debug(self, text: str) -> None:
        if self.level == "debug":
            self.out.err.write(f"DEBUG {safe(text)}\n")

    def flush(self) -> None:
        if self.items:
            self.out.err.write(self.out._paint("\x1b[33m", f"⚠ {len(self.items)} warning(s) during run:") + "\n")
            for item in self.items:
                self.out.err.write(f"  - {item}\n")
            self.items.clear()


class Cli:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.out = GuardedOutput(opts.fmt, opts.verbose, False if opts.no_color else None)
        self.answered_by = ""  # the server (of -s's list) this command talks to
        self.log = Warnings(opts.log, self.out)

    def meta(self, msg: str, **extra: str) -> dict[str, str]:
        return {"server": self.answered_by or self.opts.server, "msg": msg, **extra} if self.opts.verbose else {}

    def error(self, text: str) -> None:
        with contextlib.suppress(OutputFailed):  # stderr itself is gone: the exit status has to say it
            self.log.flush()
            self.out.emit(Content(GENERAL, text, True))

    def output_failed(self) -> int:
        """The exit status after stdout or stderr could not be written: a shell's 141 (SIGPIPE) when the
        reader went away, which needs no message, else an error that says why."""
        gone, text = self.out.failure()
        if gone:
            return EXIT_BROKEN_PIPE
        self.error(text)
        return EXIT_ERROR

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
        try:
            client = await connect_first(client_order(self.opts.server), self.client_for)
        except ZdutError as exc:
            self.error(exc.message)
            return EXIT_ERROR
        self.answered_by = client.address  # -v says which broker of a list answered
        try:
            self.greet(client)
            return await self.perform(action, client)
        finally:
            await client.close()

    def client_for(self, address: str, connect_timeout: float) -> Client:
        return Client(address, self.opts.user, keys=self.opts.server_keys.get(address, self.opts.keys),
                      connect_timeout=connect_timeout)

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
        except OutputFailed:
            return self.output_failed()
        except ZdutError as exc:
            self.error(exc.message)
            code = EXIT_ERROR
        with contextlib.suppress(OutputFailed):
            self.log.flush()
        return code

    def plan(self, words: list[str]) -> Action:
        """Map the positional words to an action (raises UsageError for a malformed line)."""
        if not words or words[0] == "list":
            glob = list_match(words[1:])
            return lambda c: self._list(c, glob)
        if words[0] == "agents":
            if len(words) > 1:
                raise UsageError("agents takes no arguments")
            return self._agents
        if words[0] == "forget":
            if len(words) != 2:
                raise UsageError("forget takes one argument: the name of an offline agent")
            return lambda c: self._forget(c, words[1])
        device, rest = words[0], words[1:]
        if rest in ([], ["help"]):  # `DEV help` lists the commands, as `DEV` does
            return lambda c: self._commands(c, device)
        command, args = rest[0], rest[1:]
        if command == "lock":
            try:
                duration, wait_s = lock_words(args)
            except ZdutError as exc:
                raise UsageError(exc.message) from None
            if wait_s is None:
                return lambda c: self._lock(c, device, duration)
            return lambda c: self._lock_wait(c, device.split(","), duration, wait_s)
        if command == "unlock":
            if args not in ([], ["force"]):
                raise UsageError('unlock takes nothing or the word "force"')
            return lambda c: self._unlock(c, device, bool(args))
        if command == "log":
            return self._plan_log(device, args)
        if command == "watch":
            try:
                replay_lines(args)
            except ZdutError as exc:
                raise UsageError(exc.message) from None
            return lambda c: self._run(c, device, command, args, WATCH)
        if args and args[0] == "help":
            if len(args) > 1:
                raise UsageError('"help" must be the only argument after the command')
            return lambda c: self._details(c, device, command)
        return lambda c: self._run(c, device, command, args)

    def _plan_log(self, device: str, args: list[str]) -> Action:
        if self.out.fmt not in ("text", "json"):
            raise UsageError("log prints text, or JSON lines with -f json")
        try:
            query = dataclasses.replace(log_query(args), json=self.out.fmt == "json")
        except ZdutError as exc:
            raise UsageError(exc.message) from None
        return lambda c: self._run(c, device, "log", query.args(), JOURNAL)

    # ------------------------------------------------------------- unary actions
    async def _list(self, client: Client, glob: str) -> int:
        devices = await client.list(glob)
        with_agent = client.server_role == "broker"
        self.out.emit(Content(DEVICE_LIST, [(d, with_agent) for d in devices], False, self.meta("List Response")))
        return EXIT_OK

    async def _agents(self, client: Client) -> int:
        agents = await client.agents()
        self.out.emit(Content(AGENT_LIST, agents, False, self.meta("Agents Response")))
        return EXIT_OK

    async def _forget(self, client: Client, agent: str) -> int:
        devices = await client.forget(agent)
        show = safe if self.out.fmt == "text" else str  # the other formats escape by themselves
        text = f'✓ Agent "{show(agent)}" forgotten, with its devices: {", ".join(map(show, devices)) or "none"}'
        self.out.emit(Content(GENERAL, self._green(text), False, self.meta("Forget Response", agent=agent)))
        return EXIT_OK

    def _green(self, text: str) -> str:
        return f"\x1b[32m{text}\x1b[0m" if self.out.color and self.out.fmt == "text" else text

    async def _commands(self, client: Client, device: str) -> int:
        cmds = await client.described_commands(device)
        self.out.emit(Content(COMMAND_LIST, cmds, False, self.meta("Commands Response", device=device)))
        if self.out.fmt == "text":  # who waits for its lock, for the person deciding whether to join them
            waiting = next((d.waiting for d in await client.list(escape(device))), [])
            if waiting:
                self.out.emit(Content(GENERAL, f"Waiting for its lock: {', '.join(safe(u) for u in waiting)}", False,
                                      {}))
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
        asked_until = time.time() + seconds
        lock = await client.lock(device, seconds)
        kept = seconds > 0 and lock.expires_at > asked_until + 1  # the agent extends a lock, never shortens it
        self.out.emit(Content(LOCK_RESULT, (device, lock, kept), False, self.meta("Lock Response", device=device)))
        return EXIT_OK

    async def _lock_wait(self, client: Client, patterns: list[str], duration: str, wait_s: float) -> int:
        """``lock --wait``: the first of the devices to become free, its place in each queue shown on a
        terminal; Ctrl-C leaves the queues."""
        shown = self.out.fmt == "text" and self.out.err.isatty()
        show_place = (lambda device, text: self.out.progress(safe(text) + "\n")) if shown else None
        with self.interrupts(functools.partial(_cancel, asyncio.current_task())):
            try:
                device, lock = await lock_first(client, patterns, lock_seconds(duration), wait_s, show_place)
            except asyncio.CancelledError:
                self.error("interrupted")
                return EXIT_INTERRUPTED
        self.out.emit(Content(LOCK_RESULT, (device, lock, False), False, self.meta("Lock Response", device=device)))
        return EXIT_OK

    async def _unlock(self, client: Client, device: str, force: bool) -> int:
        reply = await client.unlock(device, force)
        record = Unlocked(device, reply.broke, reply.cancelled)
        self.out.emit(Content(LOCK_RESULT, record, False, self.meta("Unlock Response", device=device)))
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

    async def _run(self, client: Client, device: str, command: str, args: list[str], mode: str = "") -> int:
        """Run a command; with a ``mode`` (watch, log), a session that reads no input."""
        printer = Printer(asyncio.get_running_loop())
        meta = self.meta("Run Response", device=device, command=command, args=" ".join(args))
        handler = CliRunHandler(self.out, printer, meta, self.log.warn, raw=mode == JOURNAL)
        run = client.run(device, command, args, handler, mode)
        interrupted = asyncio.Event()
        stopping = asyncio.Event()  # the remote command is being cancelled: Ctrl-C, SIGTERM or a failed write
        def stop() -> None:
            stopping.set()
            run.cancel()

        def interrupt() -> None:
            interrupted.set()
            stop()

        printer.on_failure = stop
        with self.interrupts(interrupt):
            try:
                interactive = await run.started
                detached = False
                if not mode and not run.finished.done():  # watch and log read no input: none is sent
                    detached = await self._attach(run, interactive)
                if detached:
                    handler.muted = True
                    printer.drain()
                    self.out.err.write("\r\n[detached: remote command cancelled]\r\n")
                    await self._settle(run)
                    return EXIT_OK
                await self._finish(run, stopping)
            except ZdutError:
                printer.drain()
                if not stopping.is_set():
                    raise
            finally:
                handler.end_progress()  # a transfer cut short leaves no bar behind
                printer.stop()
        if self.out.failed is not None:
            return self.output_failed()
        if interrupted.is_set():
            self.error("interrupted")
            return EXIT_INTERRUPTED
        return EXIT_OK

    async def _attach(self, run: Run, interactive: bool) -> bool:
        fd = self.stdin_fd()
        if fd is None:
            await run.close_stdin()
            return False
        if interactive and os.isatty(fd):  # a person at the keyboard: say where the keys go, and the way out
            self.out.progress(f"[attached to {run.device} {run.command}; Ctrl-] . detaches, Ctrl-] ? more]\n")
        return await attach(run, fd, interactive)

    @staticmethod
    async def _settle(run: Run) -> None:
        """Give the agent a moment to confirm a cancel, so that the session ends cleanly."""
        with contextlib.suppress(TimeoutError, ZdutError):
            async with asyncio.timeout(CANCEL_GRACE_S):
                await asyncio.shield(run.finished)

    async def _finish(self, run: Run, stopping: asyncio.Event) -> None:
        """Wait for Done; once the command is being cancelled, give the agent a moment to confirm it."""
        stop = asyncio.ensure_future(stopping.wait())
        either: set[asyncio.Future[Any]] = {stop, run.finished}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if stopping.is_set():
            await self._settle(run)
            if not run.finished.done():
                return
        await run.wait()


def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()


def list_match(args: list[str]) -> str:
    """The glob of ``list --match GLOB`` (or ``--match=GLOB``), "" for a bare ``list``."""
    match args:
        case []:
            return ""
        case ["--match", glob] | ["-m", glob]:
            pass
        case [word] if word.startswith("--match="):
            glob = word.partition("=")[2]
        case _:
            raise UsageError("list takes nothing, or --match GLOB: the devices whose names match, such as 'board-*'")
    if not glob:
        raise UsageError("--match wants a glob of device names, such as 'board-*'")
    return glob
